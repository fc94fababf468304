"""Bounded weight normalisation and mean-only batch normalisation (Hoffer et al. 2018).

Hoffer, Banner, Golan and Soudry ("Norm matters", NeurIPS 2018) replace BatchNorm by a weight
normalisation whose norm is *bounded* (fixed) followed by a BatchNorm that only subtracts the
batch mean: no batch variance, so nothing is squared over the batch (fp16-friendly) and the
statistics of tiny batches stay usable. The maths and the exact mapping from a trained
Conv→BN pair are in ``docs/bwn.md``.

* :class:`BoundedWeightNorm`: a ``torch.nn.utils.parametrize`` parametrization of a weight
  ``v`` per output channel ``c``, with a fixed bound ``ρ`` (a buffer) and three gain forms:

  - ``learn_gain=False``:      ``w_c = ρ · v_c/‖v_c‖``                 (the paper's form)
  - ``learn_gain="bounded"``:  ``w_c = ρ·sqrt(C)·(g_c/‖g‖₂) · v_c/‖v_c‖`` (the authors' code:
    the per-channel gain is rescaled to a fixed total norm, ``‖w‖_F = ρ·sqrt(C)``);
    ``learn_gain=True`` means this form
  - ``learn_gain="free"``:     ``w_c = ρ·g_c · v_c/‖v_c‖``              (a free, signed
    per-channel magnitude: represents any weight, e.g. a BN-folded one, exactly)

  The output channels of ``Conv*d`` and ``Linear`` are slices of weight axis 0. ``ConvTranspose*d``
  stores ``(C_in, C_out/groups, k...)``: output channel ``c = j + (C_out/groups)·i`` is column
  ``j`` of axis 1 within the rows of group ``i``, so a norm "per slice of axis 1" would mix the
  groups; :func:`weight_layout` gives ``(dim=1, groups)`` and every per-channel operation views
  the weight as ``(groups, C_in/groups, C_out/groups, k)``.

  It composes with the rest of PyTorch: ``parametrize.remove_parametrizations(m, "weight",
  leave_parametrized=True)`` or :func:`normswap.fold` turn it into a plain weight.

* :class:`MeanOnlyBatchNorm` (``1d``/``2d``/``3d``): per channel over the batch and spatial dims,
  train ``y = x − mean_batch(x) + bias`` with ``running_mean`` tracked under PyTorch's momentum
  convention (``r ← (1−m)·r + m·mean``; ``momentum=None`` is a cumulative average over
  ``num_batches_tracked``); eval ``y = x − running_mean + bias``. The mean accumulates in
  float32 for half-precision inputs.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._common import stats_dtype
from .base import BatchStatNorm

__all__ = [
    "GainMode",
    "BoundedWeightNorm",
    "apply_bounded_weight_norm",
    "weight_layout",
    "channel_norms",
    "scale_channels",
    "MeanOnlyBatchNorm",
    "MeanOnlyBatchNorm1d",
    "MeanOnlyBatchNorm2d",
    "MeanOnlyBatchNorm3d",
    "MEAN_ONLY_BY_DIMS",
]

log = logging.getLogger(__name__)

GainMode = Literal["none", "bounded", "free"]
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_OR_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# -- per-output-channel tensor helpers -------------------------------------------------------
def weight_layout(module: nn.Module) -> tuple[int, int]:
    """``(dim, groups)`` locating the output channels in ``module.weight``.

    Args:
        module: a Conv1d/2d/3d or Linear (``(0, 1)``) or a ConvTranspose1d/2d/3d
            (``(1, groups)``; its weight is ``(C_in, C_out/groups, k...)``).

    Returns:
        The axis holding the output channels within a group, and the number of groups.

    Raises:
        TypeError: any other module.
    """
    if isinstance(module, _CONV_TRANSPOSE):
        return 1, int(module.groups)
    if isinstance(module, _CONV_OR_LINEAR):
        return 0, 1
    raise TypeError(f"weight_layout: {type(module).__name__} is not a Conv, ConvTranspose or "
                    "Linear; pass dim= explicitly")


def _grouped(w: Tensor, dim: int, groups: int) -> Tensor:
    """``w`` viewed as ``(groups, rows per group, channels per group, rest)``."""
    dim = dim % w.dim()
    lead = math.prod(w.shape[:dim])
    if groups < 1 or lead % groups:
        raise ValueError(f"weight of shape {tuple(w.shape)}: the {lead} entries before dim {dim} "
                         f"do not split into groups={groups}")
    return w.reshape(groups, lead // groups, w.shape[dim], -1)


def channel_norms(w: Tensor, dim: int = 0, groups: int = 1,
                  dtype: torch.dtype | None = None) -> Tensor:
    """‖w_c‖₂ of every output channel ``c``, shape ``(groups · w.shape[dim],)``.

    Args:
        w: the weight.
        dim: the axis of the output channels (within a group).
        groups: the ConvTranspose groups (1 otherwise).
        dtype: compute (and return) in this dtype; default ``w.dtype``.

    Returns:
        The norms, in channel order ``c = j + (w.shape[dim])·i`` for group ``i``, column ``j``.
    """
    return torch.linalg.vector_norm(_grouped(w, dim, groups), dim=(1, 3), dtype=dtype).reshape(-1)


def scale_channels(w: Tensor, factor: Tensor, dim: int = 0, groups: int = 1) -> Tensor:
    """``w`` with output channel ``c`` multiplied by ``factor[c]`` (layout as
    :func:`channel_norms`); computed in the dtype of ``w``·``factor`` promotion."""
    view = _grouped(w, dim, groups)
    return (view * factor.reshape(groups, 1, view.shape[2], 1)).reshape(w.shape)


def _gain_mode(learn_gain: bool | str) -> GainMode:
    """Normalise the ``learn_gain`` argument (True is the authors' bounded form)."""
    if learn_gain is True:
        return "bounded"
    if learn_gain is False or learn_gain is None:
        return "none"
    if learn_gain in ("none", "bounded", "free"):
        return learn_gain  # type: ignore[return-value]
    raise ValueError(f"learn_gain must be False, True, 'none', 'bounded' or 'free', got "
                     f"{learn_gain!r}")


# -- the parametrization --------------------------------------------------------------------
class BoundedWeightNorm(nn.Module):
    """Hoffer et al.'s bounded weight norm as a ``torch.nn.utils.parametrize`` parametrization.

    ``forward(v)`` returns ``w`` with ``w_c = ρ · m_c · v_c/‖v_c‖`` for every output channel
    ``c``, where ``m_c = 1`` (``learn_gain=False``), ``sqrt(C)·g_c/‖g‖₂`` (``"bounded"`` or
    True) or ``g_c`` (``"free"``). Norms are computed in float32 for half-precision weights (in
    float64 for float64 ones), so no square overflows in fp16.

    Args:
        rho: the fixed bound ``ρ > 0`` (stored as the buffer ``rho``).
        num_slices: ``C``, the number of output channels (``groups · weight.shape[dim]``).
        dim: the weight axis of the output channels (0 for Conv/Linear, 1 for ConvTranspose).
        learn_gain: the gain form (see above); the gain ``g`` is a parameter of ones.
        groups: the ConvTranspose ``groups`` when ``dim`` is its axis 1 (see
            :func:`weight_layout`); 1 otherwise.
        device: where ``rho`` and ``g`` live.
        dtype: their dtype (default float32).

    Raises:
        ValueError: ``rho`` is not a finite positive number, or a bad ``learn_gain``/``groups``.
    """

    rho: Tensor

    def __init__(self, rho: float, num_slices: int, dim: int = 0,
                 learn_gain: bool | GainMode = False, *, groups: int = 1,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        rho = float(rho)
        if not rho > 0 or not math.isfinite(rho):
            raise ValueError(f"BoundedWeightNorm needs a finite rho > 0, got {rho}")
        if not isinstance(num_slices, int) or num_slices < 1 or groups < 1 or num_slices % groups:
            raise ValueError(f"BoundedWeightNorm: num_slices={num_slices!r} must be a positive "
                             f"multiple of groups={groups!r}")
        self.gain_mode: GainMode = _gain_mode(learn_gain)
        self.dim = int(dim)
        self.groups = int(groups)
        self.num_slices = num_slices
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("rho", torch.tensor(rho, **factory))
        if self.gain_mode == "none":
            self.register_parameter("gain", None)
        else:
            self.gain = nn.Parameter(torch.ones(num_slices, **factory))

    # -- maths ---------------------------------------------------------------------------------
    def channel_norms(self, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """‖v_c‖₂ per output channel (see :func:`channel_norms`), checked against ``C``."""
        norms = channel_norms(v, self.dim, self.groups, dtype=dtype)
        if norms.numel() != self.num_slices:
            raise ValueError(f"BoundedWeightNorm for {self.num_slices} channels (dim={self.dim}, "
                             f"groups={self.groups}) got a weight of shape {tuple(v.shape)}")
        return norms

    def magnitude(self, dtype: torch.dtype) -> Tensor:
        """``ρ·m_c`` per channel (shape ``(C,)``) in ``dtype``: the norm of each ``w_c``."""
        rho = self.rho.to(dtype)
        if self.gain is None:
            return rho.expand(self.num_slices)
        g = self.gain.to(dtype)
        if self.gain_mode == "bounded":
            return rho * math.sqrt(self.num_slices) * g / torch.linalg.vector_norm(g)
        return rho * g

    def forward(self, v: Tensor) -> Tensor:
        """Return the weight ``w`` for the direction ``v``."""
        acc = stats_dtype(v.dtype)
        factor = self.magnitude(acc) / self.channel_norms(v, dtype=acc)
        return scale_channels(v, factor.to(v.dtype), self.dim, self.groups)

    # -- inference / folding -------------------------------------------------------------------
    def nan_reason(self, v: Tensor) -> str | None:
        """Why ``forward(v)`` would hold NaN (a zero-norm channel of ``v`` or a zero gain
        vector in the bounded form), or None."""
        norms = self.channel_norms(v.detach(), dtype=torch.float64)
        zero = [int(i) for i in torch.nonzero(norms == 0).flatten().tolist()]
        if zero:
            return (f"v has zero norm in slice(s) {zero[:8]}{' ...' if len(zero) > 8 else ''} "
                    "(rho*v/||v|| would be NaN there)")
        if self.gain_mode == "bounded" and float(
                torch.linalg.vector_norm(self.gain.detach().double())) == 0.0:
            return "gain g has zero norm (g/||g|| would be NaN)"
        return None

    @torch.no_grad()
    def exact_value(self, v: Tensor) -> Tensor:
        """``forward(v)`` evaluated in float64 and cast to ``v.dtype`` (for folding)."""
        v64 = v.detach().double()
        factor = self.magnitude(torch.float64) / self.channel_norms(v64, dtype=torch.float64)
        return scale_channels(v64, factor, self.dim, self.groups).to(v.dtype)

    def extra_repr(self) -> str:
        return (f"rho={float(self.rho):.6g}, dim={self.dim}, groups={self.groups}, "
                f"gain={self.gain_mode}")


def apply_bounded_weight_norm(module: nn.Module, name: str = "weight", rho: float | None = None,
                              dim: int | None = None, learn_gain: bool | GainMode = False
                              ) -> nn.Module:
    """Register :class:`BoundedWeightNorm` on ``module.<name>`` (in place).

    The current weight becomes the direction ``v``. With a learned gain, ``g`` starts at
    ``‖v_c‖/ρ``, so the layer computes exactly its current weight when that is representable
    (always for ``"free"``; for ``"bounded"`` when ``ρ`` is the default). Without a gain every
    channel is rescaled to norm ``ρ``.

    Args:
        module: a Conv/ConvTranspose/Linear (any module with the parameter when ``dim`` is given).
        name: the parameter to parametrize.
        rho: the fixed bound; default the mean channel norm of the current weight
            (``learn_gain=False``) or its root-mean-square channel norm (with a gain: then
            ``‖w‖_F`` stays the current one).
        dim: the axis of the output channels; default from :func:`weight_layout` (which also
            handles grouped ConvTranspose); an explicit ``dim`` normalises plain slices.
        learn_gain: the gain form of :class:`BoundedWeightNorm`.

    Returns:
        ``module``. A zero-norm channel of the weight has no direction: the layer outputs NaN
        there (and :func:`normswap.fold` refuses it) until it is re-initialised.
    """
    weight = getattr(module, name)
    groups = 1
    if dim is None:
        dim, groups = weight_layout(module)
    mode = _gain_mode(learn_gain)
    norms = channel_norms(weight.detach(), dim, groups, dtype=torch.float64)
    if rho is None:
        rho = float(norms.mean()) if mode == "none" else float(norms.square().mean().sqrt())
    param = BoundedWeightNorm(rho, norms.numel(), dim=dim, learn_gain=mode, groups=groups,
                              device=weight.device, dtype=weight.dtype)
    if param.gain is not None:
        with torch.no_grad():
            param.gain.copy_(norms / float(param.rho))
    parametrize.register_parametrization(module, name, param)
    return module


# -- mean-only batch norm -------------------------------------------------------------------
class MeanOnlyBatchNorm(BatchStatNorm):
    """Mean-only batch normalisation for inputs ``(N, C, *)`` with channels at dim 1.

    Train: ``y = x − mean_c(x) + bias`` with the mean over the batch and spatial dims; the
    running mean is updated with PyTorch's convention (``momentum=None``: cumulative average).
    Eval: ``y = x − running_mean + bias``. There is no variance and no scale.

    Args:
        num_features: C.
        momentum: running-mean factor; None for a cumulative moving average.
        affine: learn a per-channel ``bias`` (zeros); there is no ``weight``.
        track_running_stats: keep ``running_mean``/``num_batches_tracked``; without them eval
            mode uses the batch mean.
        device: parameter/buffer device.
        dtype: parameter/buffer dtype.
    """

    def __init__(self, num_features: int, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(num_features, eps=0.0, momentum=momentum, affine=False,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.affine = bool(affine)
        if self.affine:
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    # no spread statistic: the hooks of BatchStatNorm have nothing to do
    def _init_spread(self, factory: dict[str, Any]) -> None:
        """Mean-only: no spread buffer."""

    def _reset_spread(self) -> None:
        """Mean-only: no spread buffer."""

    def _load_spread(self, state: Any) -> None:
        """Mean-only: no spread buffer."""

    def _eval_denominator(self) -> Tensor:
        """Mean-only: the denominator is one."""
        return torch.ones(self.num_features, dtype=torch.float64)

    def reset_parameters(self) -> None:
        """Reset the running statistics and set ``bias`` to zeros."""
        self.reset_running_stats()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Subtract the batch mean (train) or the running mean (eval), add the bias."""
        self._check_input(x)
        acc = stats_dtype(x.dtype)
        factor = self._update_factor()
        if self._use_batch_stats():
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dim=dims, dtype=acc)
            if factor is not None:
                self._ema_(self.running_mean, mean.detach(), factor)  # type: ignore[arg-type]
        else:
            mean = self.running_mean.to(acc)  # type: ignore[union-attr]
        shift = -mean if self.bias is None else self.bias.to(acc) - mean
        return x + shift.to(x.dtype).reshape([-1] + [1] * (x.dim() - 2))

    def eval_scale_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` in float64 with eval output ``x·scale + shift``.

        Returns:
            ``(ones, bias − running_mean)``.

        Raises:
            ValueError: no running statistics (eval mode then uses the batch mean).
        """
        if self.running_mean is None:
            raise ValueError(f"{type(self).__name__}: no running statistics "
                             "(track_running_stats=False), so eval mode uses the batch mean and "
                             "is no fixed per-channel affine; build it with "
                             "track_running_stats=True")
        shift = -self.running_mean.detach().double()
        if self.bias is not None:
            shift = shift + self.bias.detach().double()
        return torch.ones_like(shift), shift

    def extra_repr(self) -> str:
        text = (f"{self.num_features}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")
        return text + (", frozen=True" if self.frozen else "")


class MeanOnlyBatchNorm1d(MeanOnlyBatchNorm):
    """MeanOnlyBatchNorm for 2-D (N, C) or 3-D (N, C, L) inputs."""

    _expected_dims = (2, 3)
    _bn_dims = 1


class MeanOnlyBatchNorm2d(MeanOnlyBatchNorm):
    """MeanOnlyBatchNorm for 4-D (N, C, H, W) inputs."""

    _expected_dims = (4,)
    _bn_dims = 2


class MeanOnlyBatchNorm3d(MeanOnlyBatchNorm):
    """MeanOnlyBatchNorm for 5-D (N, C, D, H, W) inputs."""

    _expected_dims = (5,)
    _bn_dims = 3


MEAN_ONLY_BY_DIMS: dict[int | None, type[MeanOnlyBatchNorm]] = {
    1: MeanOnlyBatchNorm1d, 2: MeanOnlyBatchNorm2d, 3: MeanOnlyBatchNorm3d, None: MeanOnlyBatchNorm}
