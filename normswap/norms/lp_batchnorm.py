"""L1 and L-inf / top-k batch normalisation (Hoffer, Banner, Golan, Soudry 2018, "Norm matters").

Train mode, per channel over the n = N * prod(spatial) elements of the batch (d = x - mu):

* ``L1BatchNorm``:   ``y = d / (C_L1 * mean|d| + eps) * weight + bias``, ``C_L1 = sqrt(pi/2)``
  (so that ``C_L1 * mean|d|`` estimates sigma for Gaussian channels).
* ``LinfBatchNorm``: ``y = d / (C(n) * mean(top-k |d|) + eps) * weight + bias`` with
  ``C(n) = 0.5*(1 + sqrt(pi*ln 4)) / sqrt(2*ln n)``; k=1 is pure L-inf; k is clamped to n.

No squares and no square roots: fp16 inputs of magnitude ~1e3 stay finite where a BatchNorm
computed in fp16 arithmetic overflows. Statistics accumulate in float32; outputs keep the input
dtype. The backward pass is closed-form (:mod:`._functional`), gradcheck-tested. On CUDA tensors
the train-mode batch path uses the Triton kernels of ``normswap.norms._triton`` when that module
imports and accepts the input; otherwise (and always on CPU) the native-kernel path.

Running statistics (PyTorch convention ``r <- (1-m)*r + m*new``; ``momentum=None`` = cumulative
average): ``running_mean`` tracks the batch mean, ``running_scale`` the train-mode denominator.
For L1 the batch scale is multiplied by ``sqrt(n/(n-1))`` before the update, the analogue of
BN's unbiased variance (for Gaussian data ``E|X - Xbar| = sigma*sqrt(2/pi)*sqrt((n-1)/n)``).
L-inf uses no correction: ``C(n)`` is already the paper's n-dependent constant. ``eps`` is added
once: ``new = scale + eps``. Eval output is ``(x - running_mean) / running_scale * weight + bias``
with the stored scale as is. The state_dict speaks BatchNorm (``running_var = running_scale**2 -
eps``, see :mod:`._scale_state`), so converted checkpoints load into the original BatchNorm model.

Conversion from a trained BN is eval-exact: ``running_scale = sqrt(running_var + eps_BN)``,
``weight = gamma``, ``bias = beta``. For L-inf, ``calibrate_`` rescales ``weight`` and
``running_scale`` together by ``r_c = E[C(n)*topk_c] / running_scale_c``: eval output is
unchanged and train-mode output becomes consistent with the BN's (docs/layers.md, "Calibration").
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ._common import bn_dims_of
from ._compile import compile_enabled, set_compile
from ._functional import (
    C_L1,
    l1_batch_norm_reduced,
    linf_batch_norm,
    linf_batch_norm_reduced,
    linf_constant,
)
from ._scale_state import RunningScaleNorm

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
    "accelerated_kernels",
    "set_compile",
    "compile_enabled",
    "C_L1",
    "linf_constant",
]

logger = logging.getLogger(__name__)

_Layer = Any  # a module from this file; kept loose for the classmethod return types

_ACCELERATOR = "normswap.norms._triton"
_CPU_DEVICES = ("cpu",)  # never import the accelerator for these (the CPU path is native)
_accelerator_cache: dict[str, Any] = {}


def accelerated_kernels(x: Tensor) -> Any | None:
    """The Triton kernels module for ``x``, or None to use the CPU (native-kernel) path.

    ``normswap.norms._triton`` is imported lazily, once, and only for non-CPU tensors; a
    missing or failing module, or ``available(x)`` returning False or raising, gives None.

    Args:
        x: the layer's input.

    Returns:
        The module (with ``l1_batch_norm`` and ``linf_batch_norm``) or None.
    """
    if x.device.type in _CPU_DEVICES:
        return None
    if "module" not in _accelerator_cache:
        try:
            _accelerator_cache["module"] = importlib.import_module(_ACCELERATOR)
        except Exception as exc:  # noqa: BLE001 - a broken optional module must not break us
            logger.info("normswap: %s not usable (%s: %s); using the native-kernel path",
                        _ACCELERATOR, type(exc).__name__, exc)
            _accelerator_cache["module"] = None
    module = _accelerator_cache["module"]
    if module is None:
        return None
    try:
        return module if module.available(x) else None
    except Exception as exc:  # noqa: BLE001 - same: fall back to the native path
        logger.warning("normswap: %s.available() raised %s: %s; using the native-kernel path",
                       _ACCELERATOR, type(exc).__name__, exc)
        return None


class L1BatchNorm(RunningScaleNorm):
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
        bias: with ``affine``, also learn ``bias`` (keyword only).

    Attributes:
        frozen: always normalise with the running statistics and never update them.
        running_var: BatchNorm's view of the running scale (``running_scale**2 - eps``).
    """

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` (train: batch statistics; eval: running statistics)."""
        self._check_input(input)
        if not self._use_batch_stats():
            return self._eval_forward(input)
        y, mu, s_raw, n = self._batch_forward(input, self._reducer())
        factor = self._update_factor()
        if factor is not None:
            self._ema_(self.running_mean, mu, factor)  # type: ignore[arg-type]
            self._ema_(self.running_scale, self._running_scale_sample(s_raw, n),  # type: ignore
                       factor)
        return y

    def _batch_forward(self, x: Tensor, reducer: Any) -> tuple[Tensor, Tensor, Tensor, int]:
        """(y, mu, s_raw, n) from the batch statistics (global ones under a reducer)."""
        if reducer is None:
            kernels = accelerated_kernels(x)
            if kernels is not None:
                n = x.numel() // x.shape[1]
                self._check_batch_size(n, x)
                y, mu, s_raw = kernels.l1_batch_norm(x, self.weight, self.bias, self.eps)
                return y, mu, s_raw, n
        return l1_batch_norm_reduced(x, self.weight, self.bias, self.eps, reducer)

    def _running_scale_sample(self, s_raw: Tensor, n: int) -> Tensor:
        """The batch's contribution to ``running_scale``: ``s_raw * sqrt(n/(n-1)) + eps``."""
        return s_raw * (n / (n - 1)) ** 0.5 + self.eps


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
        exact_topk: select with a full ``topk`` (slow reference path) instead of the exact
            selection from group extrema.
        bias: with ``affine``, also learn ``bias`` (keyword only).

    Attributes:
        frozen: always normalise with the running statistics and never update them.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 k: int = 1, exact_topk: bool = False, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{type(self).__name__}: k must be an int >= 1, got {k!r}")
        self.k = k
        self.exact_topk = bool(exact_topk)

    def _batch_forward(self, x: Tensor, reducer: Any) -> tuple[Tensor, Tensor, Tensor, int]:
        """(y, mu, s_raw, n) from the batch statistics (the global top-k under a reducer)."""
        if reducer is None and not self.exact_topk:
            kernels = accelerated_kernels(x)
            if kernels is not None:
                n = x.numel() // x.shape[1]
                self._check_batch_size(n, x)
                y, mu, s_raw = kernels.linf_batch_norm(x, self.weight, self.bias, self.eps,
                                                       self.k)
                return y, mu, s_raw, n
        return linf_batch_norm_reduced(x, self.weight, self.bias, self.eps, self.k,
                                       self.exact_topk, reducer)

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
        """Per-channel calibration (docs/layers.md, "Calibration"), in place; eval is unchanged.

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
        if self.weight is None or self.running_scale is None:
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
    def from_batchnorm(cls, bn: nn.Module, *, name: str = "", **options: Any) -> _Layer:
        """Build an eval-equivalent layer from a trained BatchNorm (see
        :meth:`~normswap.norms.base.BatchStatNorm.from_batchnorm`).

        Args:
            bn: a BatchNorm-family module or torchvision ``FrozenBatchNorm2d``.
            name: the module's qualified name, used in error messages.
            **options: constructor options (``k``, ``momentum``, ...) and
                ``calibration_batches``: an iterable of this layer's inputs to run
                :meth:`calibrate_` on right after the conversion.

        Returns:
            The new layer.
        """
        batches = options.pop("calibration_batches", None)
        layer = super().from_batchnorm(bn, name=name, **options)
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


def l1_from_batchnorm(bn: nn.Module, *, name: str = "", **options: Any) -> L1BatchNorm:
    """Convert a BatchNorm to the matching L1 layer, eval-exact.

    BatchNorm1d/2d/3d (and subclasses) give L1BatchNorm1d/2d/3d, FrozenBatchNorm2d gives a
    frozen L1BatchNorm2d, SyncBatchNorm and other BN classes give the generic L1BatchNorm.

    Args:
        bn: the BatchNorm-family module.
        name: the module's qualified name, used in error messages.
        **options: constructor overrides (``momentum``, ``eps``, ...).

    Returns:
        The new layer (see :meth:`~normswap.norms.base.BatchStatNorm.from_batchnorm`).
    """
    return _L1_BY_DIMS[bn_dims_of(bn)].from_batchnorm(bn, name=name, **options)


def linf_from_batchnorm(bn: nn.Module, *, name: str = "", **options: Any) -> LinfBatchNorm:
    """Convert a BatchNorm to the matching L-inf/top-k layer, eval-exact.

    Class choice as :func:`l1_from_batchnorm`.

    Args:
        bn: the BatchNorm-family module.
        name: the module's qualified name, used in error messages.
        **options: ``k``, ``calibration_batches`` and constructor overrides.

    Returns:
        The new layer (see :meth:`LinfBatchNorm.from_batchnorm`).
    """
    return _LINF_BY_DIMS[bn_dims_of(bn)].from_batchnorm(bn, name=name, **options)


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
