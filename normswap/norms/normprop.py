"""Normalization Propagation layers (Arpit et al. 2016, arXiv 1603.01431).

NormProp normalises with the weights instead of batch statistics. Each output unit ``i`` of a
convolution or linear layer computes::

    z_i = γ_i · (W_i ∗ x) / (κ · ‖W_i‖₂) + β_i

where ``W_i`` is the unit's whole filter (``C_in/groups × k…`` for a convolution, the weight row
for a linear layer) and gradients flow through ``‖W_i‖₂`` (it is not detached). The ReLU that
follows is kept as it is and then a data-independent correction standardises the rectified unit
Gaussian (docs/layers.md, "NormProp layers")::

    o = (relu(z) − 1/sqrt(2π)) / sqrt(½(1 − 1/π)) = a·relu(z) + c
    a = 1/sqrt(½(1 − 1/π)) = 1.712858550449663,  c = −a/sqrt(2π) = −0.683331696121481

(third-party code writes the mean as ``np.sqrt(1/2*np.pi)`` = 1.2533, an operator-precedence
bug; the mean of a rectified standard Gaussian is ``1/sqrt(2π)`` = 0.3989).

There are no buffers: the forward is the same in training and in evaluation.

The convolution layers pad their input explicitly. ``padding_value`` is the constant used for
``padding_mode="zeros"`` (default 0): a converted network pads a corrected input ``o = a·r + c``
with ``c`` so that the padded border equals the original network's zero border in ``r``.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KAPPA",
    "RELU_MEAN",
    "RELU_STD",
    "POST_RELU_SCALE",
    "POST_RELU_SHIFT",
    "normprop_weight",
    "normprop_correction",
    "NormPropLinear",
    "NormPropConv1d",
    "NormPropConv2d",
    "NormPropConv3d",
    "NormPropCorrection",
    "NormPropBase",
    "NORMPROP_LAYERS",
]

log = logging.getLogger(__name__)

KAPPA: float = 1.21
"""Default κ (third-party initialisation correction; absorbed into γ by a conversion)."""
RELU_MEAN: float = 1.0 / math.sqrt(2.0 * math.pi)
"""Mean of relu(N(0, 1)): 1/sqrt(2π) = 0.3989422804014327."""
RELU_STD: float = math.sqrt(0.5 * (1.0 - 1.0 / math.pi))
"""Standard deviation of relu(N(0, 1)): sqrt(½(1 − 1/π)) = 0.5838193701035489."""
POST_RELU_SCALE: float = 1.0 / RELU_STD
"""``a`` of the post-ReLU correction ``o = a·r + c`` (1.712858550449663)."""
POST_RELU_SHIFT: float = -RELU_MEAN / RELU_STD
"""``c`` of the post-ReLU correction ``o = a·r + c`` (−0.683331696121481)."""

_NORM_EPS = 1e-12


def normprop_weight(weight: Tensor, gamma: Tensor, kappa: float = KAPPA,
                    eps: float = _NORM_EPS) -> Tensor:
    """Return the effective weight ``γ_i·W_i/(κ·‖W_i‖₂)`` (output units on dim 0).

    Args:
        weight: ``(C_out, …)`` weight of a convolution or linear layer.
        gamma: per-output-unit gain, shape ``(C_out,)``.
        kappa: the constant κ.
        eps: lower bound on ``‖W_i‖₂`` so that an all-zero filter gives 0 instead of NaN.

    Returns:
        A tensor shaped like ``weight``; differentiable in ``weight`` (through the norm) and
        ``gamma``.
    """
    norm = weight.flatten(1).norm(dim=1).clamp_min(eps)
    scale = gamma / (kappa * norm)
    return weight * scale.reshape([-1] + [1] * (weight.dim() - 1))


def normprop_correction(x: Tensor) -> Tensor:
    """Standardise a rectified unit Gaussian: ``(x − 1/sqrt(2π)) / sqrt(½(1 − 1/π))``."""
    return (x - RELU_MEAN) / RELU_STD


class NormPropCorrection(nn.Module):
    """The post-ReLU NormProp correction ``(x − 1/sqrt(2π)) / sqrt(½(1 − 1/π))``.

    Elementwise, no parameters, identical in train and eval.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Apply :func:`normprop_correction`."""
        return normprop_correction(x)


class NormPropBase(nn.Module):
    """Base of the NormProp layers: ``weight``, per-unit ``gamma``/``beta`` and ``kappa``.

    Deliberately not a subclass of nn.Linear/nn.ConvNd: passes that rescale a plain layer's
    ``weight`` (BN folding) must not treat a normalised weight as a plain one.
    """

    def __init__(self, weight_shape: Sequence[int], kappa: float,
                 device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        if not kappa > 0:
            raise ValueError(f"NormProp needs kappa > 0; got {kappa}")
        factory = {"device": device, "dtype": dtype}
        self.kappa = float(kappa)
        self.weight = nn.Parameter(torch.empty(*weight_shape, **factory))
        self.gamma = nn.Parameter(torch.ones(weight_shape[0], **factory))
        self.beta = nn.Parameter(torch.zeros(weight_shape[0], **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform weight (as nn.Conv/nn.Linear), γ = 1, β = 0."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.ones_(self.gamma)
        nn.init.zeros_(self.beta)

    def effective_weight(self) -> Tensor:
        """The weight actually applied: ``γ_i·W_i/(κ·‖W_i‖₂)``."""
        return normprop_weight(self.weight, self.gamma, self.kappa)

    def _add_beta(self, y: Tensor, channel_dim: int) -> Tensor:
        """Add β along ``channel_dim`` of ``y``."""
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        return y + self.beta.reshape(shape)


class NormPropLinear(NormPropBase):
    """Linear layer with NormProp weight normalisation: ``γ·(W x)/(κ‖W_i‖) + β``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        kappa: the constant κ (default 1.21).
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, kappa: float = KAPPA,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        super().__init__((out_features, in_features), kappa, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the normalised linear map (features on the last dim)."""
        return F.linear(x, self.effective_weight(), self.beta)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kappa={self.kappa}")


def _ntuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """Expand an int to an n-tuple, or check a sequence's length."""
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"{name} needs {n} values; got {out}")
    return out


class _NormPropConvNd(NormPropBase):
    """A NormProp convolution over ``_dims`` spatial dims with explicit padding."""

    _dims: int = 2
    _conv = staticmethod(F.conv2d)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, *,
                 padding_mode: str = "zeros", padding_value: float = 0.0, kappa: float = KAPPA,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None
                 ) -> None:
        n = self._dims
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _ntuple(kernel_size, n, "kernel_size")
        self.stride = _ntuple(stride, n, "stride")
        self.dilation = _ntuple(dilation, n, "dilation")
        self.groups = groups
        self.padding_mode = padding_mode
        self.padding_value = float(padding_value)
        self.padding = self._pairs(padding)
        super().__init__((out_channels, in_channels // groups, *self.kernel_size), kappa,
                         device, dtype)

    def _pairs(self, padding: int | Sequence[int]) -> tuple[int, ...]:
        """Padding as F.pad wants it: (left, right) per spatial dim, last dim first.

        Accepts an int, one int per dim (symmetric) or ``2·dims`` values already in F.pad order.
        """
        n = self._dims
        if isinstance(padding, int):
            return (padding,) * (2 * n)
        vals = tuple(int(p) for p in padding)
        if len(vals) == 2 * n:
            return vals
        vals = _ntuple(vals, n, "padding")
        return tuple(p for v in reversed(vals) for p in (v, v))

    def _pad(self, x: Tensor) -> Tensor:
        """Pad ``x`` explicitly (constant ``padding_value`` for ``padding_mode='zeros'``)."""
        if not any(self.padding):
            return x
        if self.padding_mode == "zeros":
            return F.pad(x, self.padding, mode="constant", value=self.padding_value)
        return F.pad(x, self.padding, mode=self.padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        """Pad, convolve with the normalised filters, add β per channel."""
        y = self._conv(self._pad(x), self.effective_weight(), None, self.stride, 0,
                       self.dilation, self.groups)
        return self._add_beta(y, 1)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        elif self.padding_value != 0.0:
            s += f", padding_value={self.padding_value:.6g}"
        return s + f", kappa={self.kappa}"


class NormPropConv1d(_NormPropConvNd):
    """1-D NormProp convolution (see :class:`NormPropConv2d` for the arguments)."""

    _dims = 1
    _conv = staticmethod(F.conv1d)


class NormPropConv2d(_NormPropConvNd):
    """2-D NormProp convolution: ``γ_i·(W_i ∗ x)/(κ‖W_i‖₂) + β_i``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size (int or one per spatial dim).
        stride: stride.
        padding: int, one int per dim, or ``(left, right, …)`` pairs in ``F.pad`` order.
        dilation: dilation.
        groups: groups.
        padding_mode: ``"zeros"`` (constant ``padding_value``), ``"reflect"``,
            ``"replicate"`` or ``"circular"``.
        padding_value: the constant for ``padding_mode="zeros"``.
        kappa: the constant κ (default 1.21).
        device: parameter device.
        dtype: parameter dtype.
    """

    _dims = 2
    _conv = staticmethod(F.conv2d)


class NormPropConv3d(_NormPropConvNd):
    """3-D NormProp convolution (see :class:`NormPropConv2d` for the arguments)."""

    _dims = 3
    _conv = staticmethod(F.conv3d)


NORMPROP_LAYERS: dict[type[nn.Module], type[NormPropBase]] = {
    nn.Linear: NormPropLinear,
    nn.Conv1d: NormPropConv1d,
    nn.Conv2d: NormPropConv2d,
    nn.Conv3d: NormPropConv3d,
}
"""Which NormProp layer replaces which torch layer."""
