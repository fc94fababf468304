"""L1 and L-inf / top-k batch normalisation (Hoffer, Banner, Golan, Soudry 2018, "Norm matters").

Train mode, per channel over the n = N * prod(spatial) elements of the batch (d = x - mu):

* ``L1BatchNorm``:   ``y = d / (C_L1 * mean|d| + eps) * weight + bias``, ``C_L1 = sqrt(pi/2)``
  (so that ``C_L1 * mean|d|`` estimates sigma for Gaussian channels).
* ``LinfBatchNorm``: ``y = d / (C(n) * mean(top-k |d|) + eps) * weight + bias`` with
  ``C(n) = 0.5*(1 + sqrt(pi*ln 4)) / sqrt(2*ln n)``; k=1 is pure L-inf; k is clamped to n.

No squares and no square roots: fp16 inputs of magnitude ~1e3 stay finite where a BatchNorm
computed in fp16 arithmetic overflows. Statistics accumulate in float32; outputs keep the input
dtype. The backward pass is closed-form (see ``_functional``), gradcheck-tested.

Running statistics (PyTorch convention ``r <- (1-m)*r + m*new``; ``momentum=None`` = cumulative
average): ``running_mean`` tracks the batch mean, ``running_scale`` the train-mode denominator.
For L1 the batch scale is multiplied by ``sqrt(n/(n-1))`` before the update, the analogue of
BN's unbiased variance (for Gaussian data ``E|X - Xbar| = sigma*sqrt(2/pi)*sqrt((n-1)/n)``, so
this makes ``running_scale - eps`` unbiased for sigma). L-inf uses no correction: ``C(n)`` is
already the paper's n-dependent constant. ``eps`` is added once: ``new = scale + eps``. Eval
output is ``(x - running_mean) / running_scale * weight + bias`` with the stored scale as is.

Conversion from a trained BN is eval-exact: ``running_scale = sqrt(running_var + eps_BN)``,
``weight = gamma``, ``bias = beta``. For L-inf, ``calibrate_`` rescales ``weight`` and
``running_scale`` together by ``r_c = E[C(n)*topk_c] / running_scale_c`` (REFERENCE section 2):
eval output is unchanged and train-mode output becomes consistent with the BN's.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ._common import _ScaleNormBase, batchnorm_state, bn_dims_of
from ._functional import (
    C_L1,
    compile_enabled,
    l1_batch_norm,
    linf_batch_norm,
    linf_constant,
    set_compile,
)

__all__ = [
    "L1BatchNorm",
    "L1BatchNorm1d",
    "L1BatchNorm2d",
    "L1BatchNorm3d",
    "LinfBatchNorm",
    "LinfBatchNorm1d",
    "LinfBatchNorm2d",
    "LinfBatchNorm3d",
    "l1_from_batchnorm",
    "linf_from_batchnorm",
    "calibrate_linf",
    "set_compile",
    "compile_enabled",
    "C_L1",
    "linf_constant",
]

logger = logging.getLogger(__name__)

_Layer = Any  # a module from this file; kept loose for the classmethod return types


class L1BatchNorm(_ScaleNormBase):
    """L1 batch normalisation for inputs (N, C, *) with channels at dim 1.

    Args:
        num_features: C.
        eps: added to the batch scale in train mode (``C_L1 * mean|d| + eps``).
        momentum: running-statistics factor; None for a cumulative moving average.
        affine: learn ``weight`` (ones) and ``bias`` (zeros).
        track_running_stats: keep ``running_mean``/``running_scale``/``num_batches_tracked``;
            without them eval mode uses batch statistics.
        device: parameter/buffer device.
        dtype: parameter/buffer dtype.

    Attributes:
        frozen: always normalise with the running statistics and never update them.
    """

    _bn_dims: int | None = None

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` (train: batch statistics; eval: running statistics)."""
        self._check_input(input)
        if not self._use_batch_stats():
            return self._eval_forward(input)
        y, mu, s_raw = self._batch_forward(input)
        factor = self._update_factor()
        if factor is not None:
            n = input.numel() // input.shape[1]
            self._ema_(self.running_mean, mu, factor)  # type: ignore[arg-type]
            self._ema_(self.running_scale, self._running_scale_sample(s_raw, n),  # type: ignore
                       factor)
        return y

    def _batch_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(y, mu, s_raw) from batch statistics."""
        return l1_batch_norm(x, self.weight, self.bias, self.eps)

    def _running_scale_sample(self, s_raw: Tensor, n: int) -> Tensor:
        """The batch's contribution to ``running_scale``: ``s_raw * sqrt(n/(n-1)) + eps``."""
        return s_raw * (n / (n - 1)) ** 0.5 + self.eps

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **options: Any) -> _Layer:
        """Build an eval-equivalent layer from a trained BatchNorm.

        Args:
            bn: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, another ``_BatchNorm`` subclass, or
                torchvision's ``FrozenBatchNorm2d`` (converted with ``frozen=True``).
            **options: constructor options overriding the BN's (e.g. ``momentum``, ``eps``);
                layer options such as ``k`` for L-inf.

        Returns:
            The new layer on the BN's device and dtype, in the BN's train/eval mode, with
            ``running_scale = sqrt(running_var + eps_BN)`` (float64, then cast), ``weight = gamma``,
            ``bias = beta`` and ``num_batches_tracked`` copied. Without running statistics
            (``track_running_stats=False``) no eval equivalence exists; the layer is just built.

        Raises:
            UnsupportedNodeError: ``bn`` is not a BatchNorm-family module.
        """
        state = batchnorm_state(bn)
        kwargs: dict[str, Any] = {
            "eps": state.eps, "momentum": state.momentum, "affine": state.affine,
            "track_running_stats": state.track_running_stats,
            "device": state.device, "dtype": state.dtype,
        }
        kwargs.update(options)
        layer = cls(state.num_features, **kwargs)
        layer._load_batchnorm_state(state)
        layer.train(bn.training)
        return layer


class LinfBatchNorm(L1BatchNorm):
    """L-inf / top-k batch normalisation for inputs (N, C, *) with channels at dim 1.

    Args:
        num_features: C.
        eps: added to the batch scale in train mode.
        momentum: running-statistics factor; None for a cumulative moving average.
        affine: learn ``weight`` (ones) and ``bias`` (zeros).
        track_running_stats: keep running statistics; without them eval uses batch statistics.
        device: parameter/buffer device.
        dtype: parameter/buffer dtype.
        k: how many of the largest ``|x - mu|`` per channel are averaged (1 = pure L-inf; the
            convNet.pytorch default is 10). Clamped to the n elements per channel of a batch.
        exact_topk: select with a full ``topk`` (slow reference path) instead of the
            threshold-based exact selection.

    Attributes:
        frozen: always normalise with the running statistics and never update them.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 k: int = 1, exact_topk: bool = False) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{type(self).__name__}: k must be an int >= 1, got {k!r}")
        self.k = k
        self.exact_topk = bool(exact_topk)

    def _batch_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(y, mu, s_raw) from batch statistics."""
        return linf_batch_norm(x, self.weight, self.bias, self.eps, self.k, self.exact_topk)

    def _running_scale_sample(self, s_raw: Tensor, n: int) -> Tensor:
        """The batch's contribution to ``running_scale``: ``s_raw + eps`` (no correction)."""
        return s_raw + self.eps

    @torch.no_grad()
    def batch_scale(self, x: Tensor) -> Tensor:
        """The train-mode denominator ``C(n) * mean(top-k |x - mu|) + eps`` of a batch, (C,).

        Args:
            x: a batch of this layer's inputs (N, C, *).

        Returns:
            Per-channel scale in float32 (float64 for float64 inputs).
        """
        self._check_input(x)
        _, _, s_raw = linf_batch_norm(x, None, None, self.eps, self.k, self.exact_topk)
        return s_raw + self.eps

    @torch.no_grad()
    def calibrate_(self, batches: Iterable[Tensor]) -> Tensor:
        """Per-channel calibration (REFERENCE section 2), in place; eval output is unchanged.

        Measures ``r_c = E_batches[C(n) * mean top-k |d|] / running_scale_c`` and sets
        ``weight <- weight * r`` and ``running_scale <- running_scale * r``, so that the
        train-mode output ``d / s_batch * weight`` matches what BN would give.

        Args:
            batches: inputs of this layer (e.g. captured with a forward hook on the BN).

        Returns:
            The ratios ``r`` (C,), float64.

        Raises:
            ValueError: no batches, ``affine=False`` or no running statistics.
        """
        name = type(self).__name__
        if not self.affine or self.running_scale is None:
            raise ValueError(f"{name}.calibrate_(): needs affine=True and running statistics "
                             "(the ratio is absorbed into weight and running_scale)")
        total: Tensor | None = None
        count = 0
        for xb in batches:
            s = self.batch_scale(xb).double()
            total = s if total is None else total + s
            count += 1
        if total is None:
            raise ValueError(f"{name}.calibrate_(): got no batches; pass an iterable of inputs")
        ratio = (total / count) / self.running_scale.double()
        self.weight.copy_(self.weight.double() * ratio)
        self.running_scale.copy_(self.running_scale.double() * ratio)
        logger.info("%s calibrated on %d batch(es): ratio mean %.4f (min %.4f, max %.4f)", name,
                    count, float(ratio.mean()), float(ratio.min()), float(ratio.max()))
        return ratio

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **options: Any) -> _Layer:
        """Build an eval-equivalent layer from a trained BatchNorm (see L1BatchNorm).

        Args:
            bn: a BatchNorm-family module or torchvision ``FrozenBatchNorm2d``.
            **options: constructor options (``k``, ``momentum``, ...) and
                ``calibration_batches``: an iterable of this layer's inputs to run
                :meth:`calibrate_` on right after the conversion.

        Returns:
            The new layer.
        """
        batches = options.pop("calibration_batches", None)
        layer = super().from_batchnorm(bn, **options)
        if batches is not None:
            layer.calibrate_(batches)
        return layer

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}"


class _Dims1d:
    """Mixin: (N, C) or (N, C, L) inputs."""

    _expected_dims = (2, 3)
    _bn_dims = 1


class _Dims2d:
    """Mixin: (N, C, H, W) inputs."""

    _expected_dims = (4,)
    _bn_dims = 2


class _Dims3d:
    """Mixin: (N, C, D, H, W) inputs."""

    _expected_dims = (5,)
    _bn_dims = 3


class L1BatchNorm1d(_Dims1d, L1BatchNorm):
    """L1BatchNorm for 2-D (N, C) or 3-D (N, C, L) inputs."""


class L1BatchNorm2d(_Dims2d, L1BatchNorm):
    """L1BatchNorm for 4-D (N, C, H, W) inputs."""


class L1BatchNorm3d(_Dims3d, L1BatchNorm):
    """L1BatchNorm for 5-D (N, C, D, H, W) inputs."""


class LinfBatchNorm1d(_Dims1d, LinfBatchNorm):
    """LinfBatchNorm for 2-D (N, C) or 3-D (N, C, L) inputs."""


class LinfBatchNorm2d(_Dims2d, LinfBatchNorm):
    """LinfBatchNorm for 4-D (N, C, H, W) inputs."""


class LinfBatchNorm3d(_Dims3d, LinfBatchNorm):
    """LinfBatchNorm for 5-D (N, C, D, H, W) inputs."""


_L1_BY_DIMS: dict[int | None, type[L1BatchNorm]] = {
    1: L1BatchNorm1d, 2: L1BatchNorm2d, 3: L1BatchNorm3d, None: L1BatchNorm}
_LINF_BY_DIMS: dict[int | None, type[LinfBatchNorm]] = {
    1: LinfBatchNorm1d, 2: LinfBatchNorm2d, 3: LinfBatchNorm3d, None: LinfBatchNorm}


def l1_from_batchnorm(bn: nn.Module, **options: Any) -> L1BatchNorm:
    """Convert a BatchNorm to the matching L1 layer, eval-exact.

    BatchNorm1d/2d/3d (and subclasses) give L1BatchNorm1d/2d/3d, FrozenBatchNorm2d gives a
    frozen L1BatchNorm2d, SyncBatchNorm and other BN classes give the generic L1BatchNorm.

    Args:
        bn: the BatchNorm-family module.
        **options: constructor overrides (``momentum``, ``eps``, ...).

    Returns:
        The new layer (see :meth:`L1BatchNorm.from_batchnorm`).
    """
    return _L1_BY_DIMS[bn_dims_of(bn)].from_batchnorm(bn, **options)


def linf_from_batchnorm(bn: nn.Module, **options: Any) -> LinfBatchNorm:
    """Convert a BatchNorm to the matching L-inf/top-k layer, eval-exact.

    Class choice as :func:`l1_from_batchnorm`.

    Args:
        bn: the BatchNorm-family module.
        **options: ``k``, ``calibration_batches`` and constructor overrides.

    Returns:
        The new layer (see :meth:`LinfBatchNorm.from_batchnorm`).
    """
    return _LINF_BY_DIMS[bn_dims_of(bn)].from_batchnorm(bn, **options)


def calibrate_linf(layer: LinfBatchNorm, inputs: Iterable[Tensor]) -> Tensor:
    """Calibrate an L-inf layer in place; see :meth:`LinfBatchNorm.calibrate_`.

    Args:
        layer: the layer (typically fresh from :func:`linf_from_batchnorm`).
        inputs: batches of the layer's inputs.

    Returns:
        The per-channel ratios (C,), float64.

    Raises:
        TypeError: ``layer`` is not a LinfBatchNorm.
    """
    if not isinstance(layer, LinfBatchNorm):
        raise TypeError(f"calibrate_linf: expected a LinfBatchNorm, got {type(layer).__name__}")
    return layer.calibrate_(inputs)

