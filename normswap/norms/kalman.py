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
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from ._common import is_frozen_batchnorm, overrides_forward

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

_OPTION_NAMES = frozenset({"gain", "fallback_ratio"})


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


class KalmanBatchNorm(_NormBase):
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
        self.frozen = False

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
        if self._gain == "auto":
            return GAIN_MICRO_BATCH if x.shape[0] < self.auto_gain_threshold else GAIN_LARGE_BATCH
        return float(self._gain)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, gain={self._gain!r}, "
                f"fallback_ratio={self.fallback_ratio}, frozen={self.frozen}")

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} expected an (N, C, *) input with at least "
                             f"2 dimensions (got {x.dim()}D input)")

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
        """The forward pass proper."""
        self._check_input_dim(x)
        name = type(self).__name__
        if self.frozen and (self.running_mean is None or self.running_var is None):
            raise ValueError(f"{name} is frozen but has no running statistics; "
                             "set frozen=False or build it with track_running_stats=True")
        if self.frozen or (not self.training and self.running_mean is not None):
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             False, 0.0, self.eps)
            if not self.training:
                return y, None
            return y, (self.running_mean, self.running_var)
        n = x.numel() // x.shape[1] if x.shape[1] else 0
        if n <= 1:
            raise ValueError(f"{name}: expected more than 1 value per channel when training "
                             f"(got input of size {tuple(x.shape)}); use a larger batch or "
                             "eval mode")
        if prior is None and not want_stats and self._native_ok(x):
            # no prior and nobody reads the moments: Kalman BN is BatchNorm here, so use the
            # fused native kernel (same statistics, same running-statistics update)
            factor = 0.0
            if self.track_running_stats and self.running_mean is not None:
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                    if self.momentum is None:
                        factor = 1.0 / float(self.num_batches_tracked)
                if self.momentum is not None:
                    factor = self.momentum
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                True, factor, self.eps), None
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        dims = [0, *range(2, x.dim())]
        batch_var, batch_mean = torch.var_mean(xf, dim=dims, correction=0)
        mean, var = batch_mean, batch_var
        if prior is not None and self.training:
            prior_mean, prior_var = self._check_prior(prior, batch_mean)
            mean, var = kalman_moments(batch_mean, batch_var, prior_mean, prior_var,
                                       self.gain_for(x), self.fallback_ratio)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, n)
        y = self._affine_normalise(xf, mean, var).to(x.dtype)
        return y, ((mean, var) if self.training else None)

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

    def _update_running_stats(self, mean: Tensor, var: Tensor, n: int) -> None:
        """BatchNorm's running-statistics update with the combined moments."""
        if self.running_mean is None or self.running_var is None:
            return
        with torch.no_grad():
            factor = 0.0 if self.momentum is None else self.momentum
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
            unbiased = var.detach() * (n / (n - 1))
            self.running_mean.mul_(1.0 - factor).add_(
                mean.detach().to(self.running_mean.dtype), alpha=factor)
            self.running_var.mul_(1.0 - factor).add_(
                unbiased.to(self.running_var.dtype), alpha=factor)

    def _affine_normalise(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """``weight * (x - mean) / sqrt(var + eps) + bias`` broadcast over channel dim 1, as one
        fused multiply-add ``x * a + b`` with per-channel ``a``, ``b``."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        a = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            a = a * self.weight.to(a.dtype)
        b = -mean * a
        if self.bias is not None:
            b = b + self.bias.to(a.dtype)
        return torch.addcmul(b.reshape(shape), x, a.reshape(shape))

    # -- conversions --------------------------------------------------------------------------
    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **options: Any) -> "KalmanBatchNorm":
        """Build a Kalman layer that computes exactly what ``bn`` computes in eval mode.

        Copies ``num_features``, ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
        parameters, buffers (``num_batches_tracked`` included), ``requires_grad`` flags,
        device, dtype and the train/eval mode. Handles SyncBatchNorm and BN subclasses (only
        the normalisation is copied: behaviour a subclass adds in its own ``forward`` is not,
        and a warning is logged) and torchvision's ``FrozenBatchNorm2d`` (``frozen=True``,
        parameters not trainable).

        Args:
            bn: a ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, subclasses) or a frozen BN.
            **options: ``gain`` and/or ``fallback_ratio``.

        Returns:
            The new layer.

        Raises:
            TypeError: ``bn`` is not a BatchNorm, or an unknown option was given.
        """
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            raise TypeError(f"{cls.__name__}.from_batchnorm: unknown option(s) "
                            f"{sorted(unknown)}; accepted: {sorted(_OPTION_NAMES)}")
        frozen = is_frozen_batchnorm(bn)
        if not (frozen or isinstance(bn, _BatchNorm)):
            raise TypeError(f"{cls.__name__}.from_batchnorm expects a BatchNorm module, "
                            f"got {type(bn).__name__}")
        if isinstance(bn, _BatchNorm) and overrides_forward(bn):
            log.warning("%s overrides forward(); only its normalisation is copied to %s",
                        type(bn).__name__, cls.__name__)
        ref = next((t for t in (getattr(bn, "running_mean", None), getattr(bn, "weight", None))
                    if t is not None), None)
        if frozen:
            kwargs: dict[str, Any] = dict(num_features=bn.running_mean.numel(),
                                          eps=float(getattr(bn, "eps", 1e-5)),
                                          affine=True, track_running_stats=True)
        else:
            kwargs = dict(num_features=bn.num_features, eps=bn.eps, momentum=bn.momentum,
                          affine=bn.affine, track_running_stats=bn.track_running_stats,
                          bias=not bn.affine or bn.bias is not None)
        if ref is not None:
            kwargs.update(device=ref.device, dtype=ref.dtype)
        layer = cls(**kwargs, **options)
        with torch.no_grad():
            for name in ("weight", "bias"):
                src, dst = getattr(bn, name, None), getattr(layer, name)
                if dst is not None and src is not None:
                    dst.copy_(src)
                    dst.requires_grad_(False if frozen else src.requires_grad)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(bn, name, None), getattr(layer, name)
                if dst is not None and src is not None:
                    dst.copy_(src)
        layer.frozen = frozen
        layer.train(bn.training)
        return layer

    def _batchnorm_class(self) -> type[nn.Module]:
        """The torch BatchNorm class matching this layer's input rank."""
        return nn.SyncBatchNorm

    def to_batchnorm(self) -> nn.Module:
        """Convert back to the matching torch BatchNorm (eval-exact; the gain is dropped).

        KalmanBatchNorm1d/2d/3d give BatchNorm1d/2d/3d; the generic class gives SyncBatchNorm
        (which accepts any ``(N, C, *)`` input and behaves as BatchNorm without a process
        group). A frozen 2d layer gives torchvision's ``FrozenBatchNorm2d`` when torchvision is
        installed; other frozen layers give a BatchNorm with non-trainable parameters (keep it
        in eval mode to keep it frozen; a warning is logged).

        Returns:
            The BatchNorm module, in this layer's train/eval mode.
        """
        ref = self.running_mean if self.running_mean is not None else self.weight
        factory: dict[str, Any] = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
        if self.frozen and isinstance(self, KalmanBatchNorm2d):
            try:
                from torchvision.ops.misc import FrozenBatchNorm2d
            except ImportError:  # pragma: no cover - torchvision is optional
                FrozenBatchNorm2d = None  # type: ignore[assignment,misc]  # noqa: N806
            if FrozenBatchNorm2d is not None:
                fbn = FrozenBatchNorm2d(self.num_features, eps=self.eps).to(**factory)
                with torch.no_grad():
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(fbn, name).copy_(getattr(self, name))
                return fbn.train(self.training)
        bn = self._batchnorm_class()(self.num_features, eps=self.eps, momentum=self.momentum,
                                     affine=self.affine,
                                     track_running_stats=self.track_running_stats,
                                     bias=not self.affine or self.bias is not None, **factory)
        with torch.no_grad():
            for name in ("weight", "bias"):
                src, dst = getattr(self, name), getattr(bn, name)
                if dst is not None and src is not None:
                    dst.copy_(src)
                    dst.requires_grad_(False if self.frozen else src.requires_grad)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(self, name), getattr(bn, name)
                if dst is not None and src is not None:
                    dst.copy_(src)
        if self.frozen:
            log.warning("%s is frozen; the returned %s has non-trainable parameters but updates "
                        "its statistics in train mode: keep it in eval mode",
                        type(self).__name__, type(bn).__name__)
        return bn.train(self.training)

    def eval_scale_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel float64 ``(scale, shift)`` with eval output ``x * scale + shift``.

        ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``.

        Raises:
            ValueError: the layer has no running statistics (its eval output depends on the
                batch).
        """
        if self.running_mean is None or self.running_var is None:
            raise ValueError(f"{type(self).__name__} has no running statistics "
                             "(track_running_stats=False): its eval output is not affine")
        scale = torch.rsqrt(self.running_var.detach().double() + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.detach().double()
        shift = -self.running_mean.detach().double() * scale
        if self.bias is not None:
            shift = shift + self.bias.detach().double()
        return scale, shift


class KalmanBatchNorm1d(KalmanBatchNorm):
    """Batch Kalman Normalization for ``(N, C)`` or ``(N, C, L)`` input (cf. BatchNorm1d)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__} expected 2D or 3D input "
                             f"(got {x.dim()}D input)")

    def _batchnorm_class(self) -> type[nn.Module]:
        return nn.BatchNorm1d


class KalmanBatchNorm2d(KalmanBatchNorm):
    """Batch Kalman Normalization for ``(N, C, H, W)`` input (cf. BatchNorm2d)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expected 4D input (got {x.dim()}D input)")

    def _batchnorm_class(self) -> type[nn.Module]:
        return nn.BatchNorm2d


class KalmanBatchNorm3d(KalmanBatchNorm):
    """Batch Kalman Normalization for ``(N, C, D, H, W)`` input (cf. BatchNorm3d)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"{type(self).__name__} expected 5D input (got {x.dim()}D input)")

    def _batchnorm_class(self) -> type[nn.Module]:
        return nn.BatchNorm3d


def kalman_from_batchnorm(bn: nn.Module, **options: Any) -> KalmanBatchNorm:
    """Convert a BatchNorm into the matching Kalman layer (eval-exact).

    BatchNorm1d/2d/3d (and their subclasses) give KalmanBatchNorm1d/2d/3d; FrozenBatchNorm2d
    gives a frozen KalmanBatchNorm2d; SyncBatchNorm and other ``_BatchNorm`` subclasses give the
    generic :class:`KalmanBatchNorm`.

    Args:
        bn: the BatchNorm module.
        **options: ``gain`` and/or ``fallback_ratio``.

    Returns:
        The Kalman layer.
    """
    cls: type[KalmanBatchNorm] = KalmanBatchNorm
    if isinstance(bn, nn.BatchNorm1d):
        cls = KalmanBatchNorm1d
    elif isinstance(bn, nn.BatchNorm2d) or is_frozen_batchnorm(bn):
        cls = KalmanBatchNorm2d
    elif isinstance(bn, nn.BatchNorm3d):
        cls = KalmanBatchNorm3d
    return cls.from_batchnorm(bn, **options)


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
