"""Batch Kalman Normalization (Wang et al. 2018, arXiv 1802.03133), authors' code semantics.

A Kalman layer normalises like BatchNorm, but in training it may receive a *prior*
``(mu_p, var_p)``: an estimate of its input's per-channel moments propagated from the previous
normalised layer (see :mod:`normswap.passes.kalman_prior`). With the batch moments
``(xbar, S)`` (``S`` biased) and a fixed gain ``p`` it normalises with the combined moments::

    mu    = p * mu_p  + (1 - p) * xbar
    var   = p * var_p + (1 - p) * S + p * (1 - p) * (xbar - mu_p) ** 2
    y     = weight * (x - mu) / sqrt(var + eps) + bias

and falls back to the plain batch moments when ``mean_c(var_p / S) >= fallback_ratio`` (one
decision for the whole layer, as in the authors' ``kalman_filter``; a non-finite ratio also falls
back). Without a prior the layer is ordinary BatchNorm. Gradients flow through the prior.

The gain is a fixed hyperparameter, not learned: 0.9 for micro-batches, 0.05 for large batches
(the authors' settings). ``gain="auto"`` picks 0.9 when the batch has fewer than
:data:`AUTO_GAIN_BATCH_THRESHOLD` samples (``x.shape[0] < 16``), else 0.05.

Running statistics are BatchNorm's buffers with BatchNorm's meaning and momentum rule; they track
the *combined* moments, the variance with BatchNorm's unbiased correction ``n / (n - 1)``
(``n`` = elements per channel in the batch). In eval mode the layer is plain BatchNorm on the
running statistics (priors are ignored), so :meth:`KalmanBatchNorm.from_batchnorm` is bit-exact
in eval. Statistics are computed in float32 for float16/bfloat16 input.

Under ``torch.fx`` the layer is a leaf (``normswap.passes._match.NormTracer``); a call
``self.bn(x, prior=p, return_stats=True)`` is one ``call_module`` node returning
``(y, (mean, var))``; :meth:`KalmanBatchNorm.forward_with_stats` is its eager spelling.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import BatchNormState, bn_dims_of
from ._layout import channel_broadcast
from ._reduce import global_moments
from .base import BatchStatNorm

__all__ = [
    "KalmanBatchNorm",
    "KalmanBatchNorm1d",
    "KalmanBatchNorm2d",
    "KalmanBatchNorm3d",
    "kalman_from_batchnorm",
    "kalman_moments",
    "set_kalman_gain",
    "kalman_layers",
    "GAIN_MICRO_BATCH",
    "GAIN_LARGE_BATCH",
    "AUTO_GAIN_BATCH_THRESHOLD",
    "Moments",
]

log = logging.getLogger(__name__)

GAIN_MICRO_BATCH = 0.9
"""Gain the authors use for micro-batches (e.g. 2 samples per group)."""
GAIN_LARGE_BATCH = 0.05
"""Gain the authors use for large batches."""
AUTO_GAIN_BATCH_THRESHOLD = 16
"""``gain="auto"``: batches with fewer samples than this (``x.shape[0]``) use the micro-batch gain."""

Moments = tuple[Tensor, Tensor]
"""Per-channel ``(mean, var)``, each of shape ``(C,)``."""


def kalman_moments(batch_mean: Tensor, batch_var: Tensor, prior_mean: Tensor, prior_var: Tensor,
                   gain: float, fallback_ratio: float = 100.0) -> Moments:
    """Combine batch moments with a prior, with the authors' fallback rule.

    Args:
        batch_mean: per-channel batch mean ``xbar``.
        batch_var: per-channel biased batch variance ``S``.
        prior_mean: per-channel prior mean ``mu_p``.
        prior_var: per-channel prior variance ``var_p``.
        gain: the fixed Kalman gain ``p`` in [0, 1].
        fallback_ratio: use the batch moments when ``mean(var_p / S) >= fallback_ratio``
            (or when that ratio is not finite).

    Returns:
        ``(mean, var)``: ``p*mu_p + (1-p)*xbar`` and
        ``p*var_p + (1-p)*S + p*(1-p)*(xbar-mu_p)**2``, or ``(xbar, S)`` on fallback.
    """
    mean = gain * prior_mean + (1.0 - gain) * batch_mean
    var = (gain * prior_var + (1.0 - gain) * batch_var
           + gain * (1.0 - gain) * (batch_mean - prior_mean) ** 2)
    ratio = (prior_var.detach() / batch_var.detach()).mean()
    use_prior = torch.isfinite(ratio) & (ratio < fallback_ratio)
    return torch.where(use_prior, mean, batch_mean), torch.where(use_prior, var, batch_var)


def _check_gain(gain: float | str) -> float | str:
    """Validate a gain: a number in [0, 1] or "auto"."""
    if isinstance(gain, str):
        if gain.lower() != "auto":
            raise ValueError(f"gain must be a number in [0, 1] or 'auto', got {gain!r}")
        return "auto"
    value = float(gain)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"gain must be in [0, 1] (0.9 for micro-batches, 0.05 for large "
                         f"batches) or 'auto', got {gain!r}")
    return value


class KalmanBatchNorm(BatchStatNorm):
    """Batch Kalman Normalization over the channel dimension of any ``(N, C, *)`` input.

    Parameters and buffers are BatchNorm's (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``) with the same meaning, so a BatchNorm state_dict
    loads as is and back.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance before the square root.
        momentum: running-statistics momentum (PyTorch convention ``r <- (1-m)*r + m*new``);
            ``None`` for a cumulative average.
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep running statistics (eval uses batch statistics otherwise).
        gain: the Kalman gain ``p``: 0.9 for micro-batches, 0.05 for large batches, or ``"auto"``
            (0.9 when ``x.shape[0] < AUTO_GAIN_BATCH_THRESHOLD`` = 16, else 0.05).
        fallback_ratio: use the batch moments when ``mean(var_p / S) >= fallback_ratio``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: with ``affine``, learn ``bias`` too (BatchNorm's ``bias=False`` form).

    Attributes:
        frozen: when True the layer always normalises with its running statistics, never
            updates them and ignores priors (as torchvision's ``FrozenBatchNorm2d``).
    """

    auto_gain_threshold: int = AUTO_GAIN_BATCH_THRESHOLD
    _generic_batchnorm = nn.SyncBatchNorm  # accepts any (N, C, *), like the generic class
    running_var: Tensor | None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 gain: float | str = GAIN_MICRO_BATCH, fallback_ratio: float = 100.0,
                 device: Any = None, dtype: torch.dtype | None = None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.gain = gain
        if not float(fallback_ratio) > 0.0:
            raise ValueError(f"fallback_ratio must be positive, got {fallback_ratio!r}")
        self.fallback_ratio = float(fallback_ratio)

    # -- the spread statistic: BatchNorm's running_var -----------------------------------------
    def _init_spread(self, factory: dict[str, Any]) -> None:
        var = torch.ones(self.num_features, **factory) if self.track_running_stats else None
        self.register_buffer("running_var", var)

    def _reset_spread(self) -> None:
        self.running_var.fill_(1.0)  # type: ignore[union-attr]

    def _load_spread(self, state: BatchNormState) -> None:
        if state.running_var is not None:
            self.running_var.copy_(state.running_var)  # type: ignore[union-attr]

    def _eval_denominator(self) -> Tensor:
        return torch.sqrt(self.running_var.detach().double() + self.eps)  # type: ignore[union-attr]

    # -- hyperparameters ----------------------------------------------------------------------
    @property
    def gain(self) -> float | str:
        """The fixed Kalman gain ``p`` (a float in [0, 1]) or ``"auto"``."""
        return self._gain

    @gain.setter
    def gain(self, value: float | str) -> None:
        self._gain = _check_gain(value)

    def gain_for(self, x: Tensor) -> float:
        """The gain used for input ``x`` (resolves ``"auto"`` from the batch size)."""
        return self._gain_for_batch(x.shape[0])

    def _gain_for_batch(self, batch: int) -> float:
        """The gain for a batch of ``batch`` samples (the global batch when synchronised)."""
        if self._gain == "auto":
            return GAIN_MICRO_BATCH if batch < self.auto_gain_threshold else GAIN_LARGE_BATCH
        return float(self._gain)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gain={self._gain!r}, fallback_ratio={self.fallback_ratio}"

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, prior: Sequence[Tensor] | None = None,
                return_stats: bool = False) -> Tensor | tuple[Tensor, Moments | None]:
        """Normalise ``x``.

        Args:
            x: input of shape ``(N, C, *)``.
            prior: optional ``(mean, var)`` per channel, used in training only.
            return_stats: also return the moments used (see :meth:`forward_with_stats`).

        Returns:
            ``y``, or ``(y, stats)`` when ``return_stats``.
        """
        y, stats = self._normalise_with_stats(x, prior, want_stats=return_stats)
        return (y, stats) if return_stats else y

    def forward_with_stats(self, x: Tensor, prior: Sequence[Tensor] | None = None
                           ) -> tuple[Tensor, Moments | None]:
        """Normalise ``x`` and return the per-channel moments it was normalised with.

        Args:
            x: input of shape ``(N, C, *)``.
            prior: optional ``(mean, var)`` per channel, used in training only.

        Returns:
            ``(y, (mean, var))`` in training mode: the combined moments (float32 for half
            input; the running statistics when ``frozen``); ``(y, None)`` in eval mode, where
            nothing downstream needs them.
        """
        return self(x, prior, return_stats=True)

    def _native_ok(self, x: Tensor) -> bool:
        """Whether ``F.batch_norm`` can run this layer's train step on ``x`` as is."""
        dtypes = {t.dtype for t in (self.weight, self.bias, self.running_mean, self.running_var)
                  if t is not None}
        if x.dtype in (torch.float16, torch.bfloat16):  # native CPU/GPU kernels accumulate
            return dtypes <= {x.dtype, torch.float32}   # in fp32, mixed parameters allowed
        return x.dtype in (torch.float32, torch.float64) and dtypes <= {x.dtype}

    def _normalise_with_stats(self, x: Tensor, prior: Sequence[Tensor] | None,
                              want_stats: bool = True) -> tuple[Tensor, Moments | None]:
        """The forward pass proper (the sync layer differs only in ``_reducer``)."""
        self._check_input(x)
        if not self._use_batch_stats():  # eval with running statistics, or frozen
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             False, 0.0, self.eps)
            if not self.training:
                return y, None
            return y, (self.running_mean, self.running_var)  # type: ignore[return-value]
        reducer = self._reducer()
        if reducer is None:
            self._check_batch_size(x.numel() // x.shape[1], x)
            if prior is None and not want_stats and self._native_ok(x):
                # no prior and nobody reads the moments: Kalman BN is BatchNorm here, so use the
                # fused native kernel (same statistics, same running-statistics update)
                factor = self._update_factor()
                return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                    self.bias, True, 0.0 if factor is None else factor,
                                    self.eps), None
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        batch_mean, batch_var, n, batch = self._batch_moments(xf, reducer)
        mean, var = batch_mean, batch_var
        if prior is not None and self.training:
            prior_mean, prior_var = self._check_prior(prior, batch_mean)
            mean, var = kalman_moments(batch_mean, batch_var, prior_mean, prior_var,
                                       self._gain_for_batch(batch), self.fallback_ratio)
        factor = self._update_factor()
        if factor is not None:
            self._ema_(self.running_mean, mean, factor)  # type: ignore[arg-type]
            self._ema_(self.running_var, var.detach() * (n / (n - 1)),  # type: ignore[arg-type]
                       factor)
        y = self._affine_normalise(xf, mean, var).to(x.dtype)
        return y, ((mean, var) if self.training else None)

    def _batch_moments(self, xf: Tensor, reducer: Any) -> tuple[Tensor, Tensor, int, int]:
        """(mean, biased var, elements per channel, samples) of this or the global batch."""
        if reducer is None:
            var, mean = torch.var_mean(xf, dim=[0, *range(2, xf.dim())], correction=0)
            return mean, var, xf.numel() // xf.shape[1], xf.shape[0]
        mean, var, n, batch = global_moments(xf, reducer)
        if n < 2:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel in "
                             f"the global batch when training, got {n} (local input of shape "
                             f"{tuple(xf.shape)}); use eval mode or a larger batch")
        return mean, var, n, batch

    def _check_prior(self, prior: Sequence[Tensor], like: Tensor) -> Moments:
        """Validate a prior and bring it to the statistics' dtype and shape ``(C,)``."""
        name = type(self).__name__
        if len(prior) != 2:
            raise ValueError(f"{name}: prior must be a (mean, var) pair, got {len(prior)} items")
        out = []
        for what, t in zip(("mean", "var"), prior):
            if not isinstance(t, Tensor) or t.numel() != self.num_features:
                got = t.numel() if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: prior {what} must have {self.num_features} elements "
                                 f"(one per channel), got {got}")
            out.append(t.reshape(-1).to(like.dtype))
        return out[0], out[1]

    def _affine_normalise(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """``weight * (x - mean) / sqrt(var + eps) + bias`` broadcast over channel dim 1, as one
        fused multiply-add ``x * a + b`` with per-channel ``a``, ``b``."""
        a = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            a = a * self.weight.to(a.dtype)
        b = -mean * a
        if self.bias is not None:
            b = b + self.bias.to(a.dtype)
        return torch.addcmul(channel_broadcast(b, x), x, channel_broadcast(a, x))


class KalmanBatchNorm1d(KalmanBatchNorm):
    """Batch Kalman Normalization for ``(N, C)`` or ``(N, C, L)`` input (cf. BatchNorm1d)."""

    _expected_dims = (2, 3)
    _bn_dims = 1


class KalmanBatchNorm2d(KalmanBatchNorm):
    """Batch Kalman Normalization for ``(N, C, H, W)`` input (cf. BatchNorm2d)."""

    _expected_dims = (4,)
    _bn_dims = 2


class KalmanBatchNorm3d(KalmanBatchNorm):
    """Batch Kalman Normalization for ``(N, C, D, H, W)`` input (cf. BatchNorm3d)."""

    _expected_dims = (5,)
    _bn_dims = 3


_KALMAN_BY_DIMS: dict[int | None, type[KalmanBatchNorm]] = {
    1: KalmanBatchNorm1d, 2: KalmanBatchNorm2d, 3: KalmanBatchNorm3d, None: KalmanBatchNorm}


def kalman_from_batchnorm(bn: nn.Module, *, name: str = "", **options: Any) -> KalmanBatchNorm:
    """Convert a BatchNorm into the matching Kalman layer (eval-exact, bit-exact in eval).

    BatchNorm1d/2d/3d (and their subclasses) give KalmanBatchNorm1d/2d/3d; FrozenBatchNorm2d
    gives a frozen KalmanBatchNorm2d; SyncBatchNorm and other ``_BatchNorm`` subclasses give the
    generic :class:`KalmanBatchNorm`.

    Args:
        bn: the BatchNorm module.
        name: the module's qualified name, used in error messages.
        **options: ``gain``, ``fallback_ratio`` and constructor overrides.

    Returns:
        The Kalman layer (see :meth:`~normswap.norms.base.BatchStatNorm.from_batchnorm`).
    """
    return _KALMAN_BY_DIMS[bn_dims_of(bn)].from_batchnorm(bn, name=name, **options)


def kalman_layers(model: nn.Module) -> list[tuple[str, KalmanBatchNorm]]:
    """Every Kalman layer of ``model`` with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, KalmanBatchNorm)]


def set_kalman_gain(model: nn.Module, gain: float | str) -> int:
    """Set the gain of every Kalman layer in ``model``.

    Args:
        model: any module (a GraphModule included).
        gain: a number in [0, 1] (0.9 micro-batches, 0.05 large batches) or ``"auto"``.

    Returns:
        The number of layers changed.

    Raises:
        ValueError: the gain is invalid (checked before any layer changes).
    """
    value = _check_gain(gain)
    layers = kalman_layers(model)
    for _, layer in layers:
        layer.gain = value
    return len(layers)
