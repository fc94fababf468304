"""Pure tensor maths shared by the passes (no graphs here; each function is tested alone).

* BatchNorm as a per-channel affine and folding it into a layer's weights
  (:func:`norm_scale_shift`, :func:`fold_bn_into_weights`; docs/maths.md "Folding").
* Normalization Propagation parameters from a Conv/Linear -> BN pair and the correction a
  consumer absorbs (:func:`normprop_params`, :func:`absorb_post_relu`; docs/maths.md
  "NormProp").
* Moment propagation for Batch Kalman Normalization priors: per-channel ``(mean, var)``
  pushed through normalisation, ReLU, conv/linear, sums, pools, dropout and concatenation
  (docs/maths.md "Kalman priors").

Everything runs in float64 where precision matters and is cast back by the caller.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..norms.kalman import Moments
from ..norms.normprop import KAPPA, POST_RELU_SCALE, POST_RELU_SHIFT

__all__ = [
    "norm_scale_shift", "fold_bn_into_weights", "normprop_params", "absorb_post_relu",
    "normalised_moments", "relu_moments", "conv_moments", "linear_moments", "add_moments",
    "affine_moments", "avgpool_moments", "maxpool_moments", "relu_maxpool_moments",
    "dropout_moments", "cat_moments", "activation_moments",
]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TINY = 1e-30


# -- tensor math (pure) -------------------------------------------------------------------------
def norm_scale_shift(module: nn.Module) -> tuple[Tensor, Tensor]:
    """Return the float64 per-channel ``(scale, shift)`` of a norm's eval-mode output.

    Args:
        module: a BatchNorm1d/2d/3d, SyncBatchNorm, FrozenBatchNorm2d, or any module with
            ``eval_scale_shift()``.

    Returns:
        ``(scale, shift)`` such that eval output = ``x·scale[c] + shift[c]`` over dim 1.

    Raises:
        ValueError: the module has no running statistics or is not a known norm.
    """
    if hasattr(module, "eval_scale_shift"):
        scale, shift = module.eval_scale_shift()
        return scale.detach().double(), shift.detach().double()
    mean = getattr(module, "running_mean", None)
    var = getattr(module, "running_var", None)
    if mean is None or var is None:
        raise ValueError(f"{type(module).__name__} has no running statistics; it cannot be "
                         "expressed as a per-channel affine")
    eps = float(getattr(module, "eps", 1e-5))
    mean64, var64 = mean.detach().double(), var.detach().double()
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    gamma = weight.detach().double() if weight is not None else torch.ones_like(mean64)
    beta = bias.detach().double() if bias is not None else torch.zeros_like(mean64)
    scale = gamma / torch.sqrt(var64 + eps)
    return scale, beta - scale * mean64


def fold_bn_into_weights(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *,
                         transpose: bool = False, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Fold ``y = s·layer(x) + t`` into the layer's weight and bias.

    Args:
        weight: Conv ``(C_out, C_in/g, k...)``, Linear ``(C_out, C_in)`` or ConvTranspose
            ``(C_in, C_out/g, k...)`` weight.
        bias: the layer's bias ``(C_out,)`` or None.
        scale: per-output-channel ``s`` ``(C_out,)``.
        shift: per-output-channel ``t`` ``(C_out,)``.
        transpose: the weight is a ConvTranspose weight.
        groups: the ConvTranspose ``groups`` (ignored for non-transposed weights).

    Returns:
        ``(weight', bias')`` in the dtype of ``weight`` (bias in the dtype of ``bias`` if given),
        computed in float64.

    Raises:
        ValueError: shapes do not match.
    """
    s64, t64 = scale.detach().double(), shift.detach().double()
    w64 = weight.detach().double()
    c_out = s64.numel()
    if transpose:
        c_in, per_group = w64.shape[0], w64.shape[1]
        if groups < 1 or c_in % groups or per_group * groups != c_out:
            raise ValueError(f"ConvTranspose weight {tuple(w64.shape)} with groups={groups} does "
                             f"not have {c_out} output channels")
        kernel = w64.shape[2:]
        grouped = w64.reshape(groups, c_in // groups, per_group, *kernel)
        s_view = s64.reshape(groups, 1, per_group, *([1] * len(kernel)))
        new_w = (grouped * s_view).reshape(w64.shape)
    else:
        if w64.shape[0] != c_out:
            raise ValueError(f"weight {tuple(w64.shape)} has {w64.shape[0]} output channels, the "
                             f"norm has {c_out}")
        new_w = w64 * s64.reshape(-1, *([1] * (w64.dim() - 1)))
    b64 = bias.detach().double() if bias is not None else torch.zeros_like(s64)
    new_b = b64 * s64 + t64
    b_dtype = bias.dtype if bias is not None else weight.dtype
    return new_w.to(weight.dtype), new_b.to(b_dtype)



# -- tensor math (pure) ----------------------------------------------------------------------

def normprop_params(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor,
                    kappa: float = KAPPA) -> tuple[Tensor, Tensor]:
    """NormProp ``(γ, β)`` reproducing ``scale·(W∗x + b0) + shift`` (docs/maths.md "NormProp").

    Args:
        weight: conv/linear weight, output units on dim 0.
        bias: conv/linear bias ``b0`` or None.
        scale: per-unit BN scale ``s``.
        shift: per-unit BN shift ``t`` (``β_BN − s·μ``).
        kappa: the NormProp constant κ (absorbed into γ).

    Returns:
        ``γ = κ·s·‖W_i‖₂`` and ``β = t + s·b0`` in float64.
    """
    norm = torch.linalg.vector_norm(weight.detach().flatten(1), dim=1, dtype=torch.float64)
    gamma = kappa * scale.double() * norm
    beta = shift.double().clone()
    if bias is not None:
        beta = beta + scale.double() * bias.detach().double()
    return gamma, beta


def absorb_post_relu(weight: Tensor, bias: Tensor | None, a: float = POST_RELU_SCALE,
                     c: float = POST_RELU_SHIFT) -> tuple[Tensor, Tensor]:
    """Weights of a layer that reads ``o = a·r + c`` and must compute what it computed on ``r``.

    Args:
        weight: the consumer's weight ``W2``, output units on dim 0.
        bias: the consumer's bias ``b2`` or None.
        a: scale of the post-ReLU correction.
        c: shift of the post-ReLU correction.

    Returns:
        ``W2' = W2/a`` in the weight's dtype (one correctly rounded division) and
        ``b2' = b2 − (c/a)·ΣW2`` in float64 (the sum runs over each unit's whole filter, so the
        border must be padded with ``c`` for a convolution).
    """
    w = weight.detach()
    total = w.flatten(1).sum(dim=1, dtype=torch.float64)
    b = bias.detach().double() if bias is not None else torch.zeros_like(total)
    return w / a, b - (c / a) * total



# ---------------------------------------------------------------------------------------------
# Pure moment functions (per-channel tensors of shape (C,))
# ---------------------------------------------------------------------------------------------
def normalised_moments(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                       eps: float) -> Moments:
    """Moments of ``weight*(x-mean)/sqrt(var+eps)+bias`` for x with moments ``(mean, var)``.

    Returns:
        ``(bias, weight**2 * var / (var + eps))`` (``weight`` = 1, ``bias`` = 0 when None).
    """
    out_var = var / (var + eps)
    if weight is not None:
        out_var = out_var * weight.to(var.dtype) ** 2
    out_mean = torch.zeros_like(mean)
    if bias is not None:
        out_mean = out_mean + bias.to(mean.dtype)
    return out_mean, out_var


def relu_moments(mean: Tensor, var: Tensor) -> Moments:
    """Mean and variance of ``relu(x)`` for Gaussian ``x ~ N(mean, var)`` (exact)."""
    std = var.clamp_min(_TINY).sqrt()
    a = mean / std
    cdf = torch.special.ndtr(a)
    pdf = torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
    first = mean * cdf + std * pdf
    second = (mean * mean + var) * cdf + mean * std * pdf
    out_var = (second - first * first).clamp_min(0.0)
    far = a > 8.0  # relu is the identity up to ~1e-15: avoid the cancellation
    return torch.where(far, mean, first), torch.where(far, var, out_var)


def conv_moments(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor | None = None,
                 stride: int | Sequence[int] = 1, padding: int | str | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1,
                 input_size: Sequence[int] | None = None,
                 padding_mode: str = "zeros") -> Moments:
    """Per-output-channel moments of a convolution of independent per-channel inputs.

    Args:
        mean: input channel means, shape ``(C_in,)``.
        var: input channel variances, shape ``(C_in,)``.
        weight: conv weight ``(C_out, C_in/groups, *kernel)``.
        bias: conv bias ``(C_out,)`` or None.
        stride: as the conv's (used only with ``input_size``).
        padding: as the conv's (used only with ``input_size``).
        dilation: as the conv's (used only with ``input_size``).
        groups: as the conv's.
        input_size: spatial input size; when given and the padding is zeros, the moments are
            those of the mixture over all output positions, border included. When None, the
            interior moments ``sum W*m + b`` and ``sum W**2 * v``.
        padding_mode: the conv's padding mode (non-zero modes keep constant maps constant, so
            the interior moments are exact everywhere).

    Returns:
        ``(mean, var)`` of shape ``(C_out,)``.
    """
    w = weight.to(mean.dtype)
    b = None if bias is None else bias.to(mean.dtype)
    if input_size is not None and padding_mode == "zeros":
        nd = w.dim() - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        shape = (1, -1, *[1] * nd)
        full = (1, mean.numel(), *input_size)
        mean_map = conv(mean.reshape(shape).expand(full), w, b, stride, padding, dilation,
                        groups)
        var_map = conv(var.reshape(shape).expand(full), w * w, None, stride, padding, dilation,
                       groups)
        dims = list(range(2, mean_map.dim()))
        out_mean = mean_map.mean(dims).reshape(-1)
        out_var = (var_map.mean(dims) + mean_map.var(dims, correction=0)).reshape(-1)
        return out_mean, out_var
    c_out, c_in_g = w.shape[0], w.shape[1]
    kernel_dims = tuple(range(2, w.dim()))
    w_sum = w.sum(kernel_dims) if kernel_dims else w
    w2_sum = (w * w).sum(kernel_dims) if kernel_dims else w * w
    w_sum = w_sum.reshape(groups, c_out // groups, c_in_g)
    w2_sum = w2_sum.reshape(groups, c_out // groups, c_in_g)
    out_mean = torch.einsum("goi,gi->go", w_sum, mean.reshape(groups, c_in_g)).reshape(c_out)
    out_var = torch.einsum("goi,gi->go", w2_sum, var.reshape(groups, c_in_g)).reshape(c_out)
    if b is not None:
        out_mean = out_mean + b
    return out_mean, out_var


def linear_moments(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor | None = None
                   ) -> Moments:
    """Moments of ``x @ W.T + b`` for independent features: ``W m + b`` and ``W**2 v``."""
    w = weight.to(mean.dtype)
    out_mean = w @ mean
    if bias is not None:
        out_mean = out_mean + bias.to(mean.dtype)
    return out_mean, (w * w) @ var


def add_moments(a: Moments, b: Moments, alpha: float = 1.0) -> Moments:
    """Moments of ``a + alpha*b`` for independent ``a`` and ``b``."""
    return a[0] + alpha * b[0], a[1] + (alpha * alpha) * b[1]


def affine_moments(mean: Tensor, var: Tensor, scale: float = 1.0, shift: float = 0.0
                   ) -> Moments:
    """Moments of ``scale*x + shift`` for Python scalars."""
    return mean * scale + shift, var * (scale * scale)


def avgpool_moments(mean: Tensor, var: Tensor, window: float,
                    divisor: float | None = None) -> Moments:
    """Moments of a sum of ``window`` independent elements divided by ``divisor`` (default
    ``window``): an average pool's ``(m, v/k)``."""
    d = float(window) if divisor is None else float(divisor)
    k = float(window)
    return mean * (k / d), var * (k / (d * d))


@functools.lru_cache(maxsize=64)
def _max_of_normals(window: int) -> tuple[Tensor, Tensor, float, float]:
    """Quadrature grid ``z``, weights of the density of the max of ``window`` iid N(0, 1), and
    that max's mean and variance (float64)."""
    # 401 points over [-8, 8]: the moments change by < 0.2% against 4801 points over [-12, 12],
    # and the per-channel integral in relu_maxpool_moments gets 12x cheaper
    z = torch.linspace(-8.0, 8.0, 401, dtype=torch.float64)
    density = window * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI * torch.special.ndtr(z) ** (
        window - 1)
    weights = density.clone()
    weights[0] *= 0.5
    weights[-1] *= 0.5
    weights = weights / weights.sum()
    mean = float((weights * z).sum())
    var = float((weights * (z - mean) ** 2).sum())
    return z, weights, mean, var


def maxpool_moments(mean: Tensor, var: Tensor, window: int) -> Moments:
    """Moments of the max of ``window`` iid ``N(mean, var)`` elements.

    ``max = mean + std * Z_k`` with ``Z_k`` the max of ``k`` iid standard normals, whose mean and
    variance are computed once per ``k`` by quadrature: exact for iid Gaussian windows
    (neighbouring elements are treated as independent, as everywhere in this pass).
    """
    _, _, z_mean, z_var = _max_of_normals(max(int(window), 1))
    std = var.clamp_min(_TINY).sqrt()
    return mean + std * z_mean, var * z_var


def relu_maxpool_moments(mean: Tensor, var: Tensor, window: int) -> Moments:
    """Moments of ``maxpool(relu(x)) = relu(maxpool(x))`` for iid ``x ~ N(mean, var)`` windows.

    Computed by quadrature over the density of the max of ``window`` standard normals.
    """
    z, weights, _, _ = _max_of_normals(max(int(window), 1))
    z = z.to(device=mean.device, dtype=mean.dtype)
    weights = weights.to(device=mean.device, dtype=mean.dtype)
    std = var.clamp_min(_TINY).sqrt()
    y = torch.relu(mean.reshape(-1, 1) + std.reshape(-1, 1) * z)
    first = (y * weights).sum(1)
    second = (y * y * weights).sum(1)
    return first.reshape(mean.shape), (second - first * first).clamp_min(0.0).reshape(mean.shape)


def dropout_moments(mean: Tensor, var: Tensor, p: float) -> Moments:
    """Moments after train-mode (inverted) dropout with drop probability ``p``."""
    if p >= 1.0:
        return torch.zeros_like(mean), torch.zeros_like(var)
    return mean, (var + mean * mean) / (1.0 - p) - mean * mean


def cat_moments(parts: Sequence[Moments]) -> Moments:
    """Moments of a channel concatenation."""
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# Graph-side wrappers: take Moments | None (None in eval mode) and run-time tensors for shapes
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _hermite_nodes(points: int) -> tuple[Tensor, Tensor]:
    """Gauss-Hermite nodes and weights for ``E[f(Z)]``, Z ~ N(0, 1): ``Σ w_i f(z_i)``."""
    import numpy as np

    t, w = np.polynomial.hermite.hermgauss(points)
    return (torch.tensor(t * math.sqrt(2.0), dtype=torch.float64),
            torch.tensor(w / math.sqrt(math.pi), dtype=torch.float64))


def activation_moments(mean: Tensor, var: Tensor, fn: Callable[[Tensor], Tensor],
                       points: int = 96) -> Moments:
    """Moments of ``fn(X)`` for X ~ N(mean, var) per channel, any elementwise ``fn``.

    Gauss-Hermite quadrature with ``points`` nodes: exact for polynomials of degree
    ``2·points − 1``; smooth activations (SiLU, GELU, sigmoid, tanh) are within ~1e-4 of their
    moments, kinked ones (ReLU6, Hardswish, LeakyReLU) within ~0.3 % of the standard
    deviation at 96 nodes (measured against the closed form for ReLU). ``fn`` is applied to a
    ``(points, C)`` tensor, so
    the module or function of the graph itself defines the activation; gradients flow to
    ``mean`` and ``var``.

    Returns:
        ``(E[fn(X)], Var[fn(X)])``, each ``(C,)``.
    """
    z, w = _hermite_nodes(points)
    z, w = z.to(device=mean.device), w.to(device=mean.device)
    std = var.clamp_min(0.0).to(torch.float64).sqrt()
    x = mean.to(torch.float64).unsqueeze(0) + z.unsqueeze(1) * std.unsqueeze(0)
    y = fn(x.to(mean.dtype)).to(torch.float64)
    m1 = (w.unsqueeze(1) * y).sum(0)
    m2 = (w.unsqueeze(1) * y * y).sum(0)
    return m1.to(mean.dtype), (m2 - m1 * m1).clamp_min(0.0).to(var.dtype)
