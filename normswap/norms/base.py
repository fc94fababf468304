"""The one base of normswap's batch-statistics layers (L1, L-inf/top-k, Kalman, their sync forms).

:class:`BatchStatNorm` owns what every such layer repeats, with PyTorch BatchNorm's conventions:
``weight``/``bias`` (ones/zeros; BatchNorm's ``bias=False`` form too), ``running_mean``,
``num_batches_tracked``, the momentum rule ``r <- (1-m)*r + m*new`` (``momentum=None``: a
cumulative moving average), the ``frozen`` switch, the input checks, the conversions
``from_batchnorm`` / ``to_batchnorm`` / ``eval_scale_shift`` and ``extra_repr``.

A subclass says how it keeps its spread statistic (``running_var`` for Kalman, a running scale
for L1/L-inf, see :mod:`normswap.norms._scale_state`) through four hooks: ``_init_spread``,
``_reset_spread``, ``_load_spread`` and ``_eval_denominator``. Sync variants override only
``_reducer`` (where batch statistics are reduced), never the forward. The state layout is
described in docs/layers.md ("State").
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from ._common import BatchNormState, batchnorm_state, check_batchnorm_state, stats_dtype

__all__ = ["BatchStatNorm", "BATCHNORM_BY_DIMS"]

logger = logging.getLogger(__name__)

BATCHNORM_BY_DIMS: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
"""The torch BatchNorm class for each dimensionality."""

_RANK_HINTS = {1: "a 2-D (N, C) or 3-D (N, C, L) tensor", 2: "a 4-D (N, C, H, W) tensor",
               3: "a 5-D (N, C, D, H, W) tensor"}


class BatchStatNorm(nn.Module):
    """Base of layers that normalise with per-channel batch statistics, BatchNorm-style.

    Args:
        num_features: C, the channels on dim 1.
        eps: the layer's epsilon (its meaning is the subclass's).
        momentum: running-statistics factor; None for a cumulative moving average.
        affine: learn ``weight`` (ones) and ``bias`` (zeros).
        track_running_stats: keep running statistics; without them eval uses batch statistics.
        device: parameter/buffer device.
        dtype: parameter/buffer dtype.
        bias: with ``affine``, also learn ``bias`` (keyword only; BatchNorm's ``bias=False``).

    Attributes:
        frozen: always normalise with the running statistics and never update them (also in
            train mode), like torchvision's ``FrozenBatchNorm2d``.

    Class attributes a subclass may set: ``_expected_dims`` (accepted input ranks, e.g.
    ``(4,)``), ``_bn_dims`` (1/2/3: the BatchNorm class ``to_batchnorm`` builds) and
    ``_generic_batchnorm`` (what the dimension-generic class converts to; None refuses).
    """

    _expected_dims: tuple[int, ...] | None = None
    _bn_dims: int | None = None
    _generic_batchnorm: type[nn.modules.batchnorm._BatchNorm] | None = None
    frozen: bool

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 *, bias: bool = True) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(num_features, int) or isinstance(num_features, bool) \
                or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"{name}: eps must be a finite number >= 0, got {eps!r}")
        if momentum is not None and not (0.0 <= float(momentum) <= 1.0):
            raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum!r}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.frozen = False
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if self.affine and bias:
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        # BatchNorm's buffer order: running_mean, the spread (running_var), num_batches_tracked
        self.register_buffer("running_mean", torch.zeros(num_features, **factory)
                             if self.track_running_stats else None)
        self._init_spread(factory)
        self.register_buffer("num_batches_tracked",
                             torch.tensor(0, dtype=torch.long, device=device)
                             if self.track_running_stats else None)

    # -- the spread statistic (subclass hooks) ------------------------------------------------
    def _init_spread(self, factory: dict[str, Any]) -> None:
        """Register the spread buffer (``running_var`` or the running scale)."""
        raise NotImplementedError

    def _reset_spread(self) -> None:
        """Reset the spread buffer to its initial value."""
        raise NotImplementedError

    def _load_spread(self, state: BatchNormState) -> None:
        """Set the spread buffer from a BatchNorm's ``running_var`` (eval-exact)."""
        raise NotImplementedError

    def _eval_denominator(self) -> Tensor:
        """The eval-mode denominator per channel, float64: ``sqrt(running_var + eps)``."""
        raise NotImplementedError

    # -- state --------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Zero the running mean and the batch counter, reset the spread statistic."""
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]
            self._reset_spread()

    def reset_parameters(self) -> None:
        """Reset running statistics and set ``weight`` to ones and ``bias`` to zeros."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            # checkpoints without the counter (BatchNorm v1, FrozenBatchNorm2d) load with 0
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- forward helpers ----------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        """Raise ValueError, naming the class, for a wrong rank, channel count or dtype (not
        while fx traces the layer: a Proxy has no rank)."""
        if isinstance(x, torch.fx.Proxy):
            return
        name = type(self).__name__
        dims = self._expected_dims
        if dims is not None and x.dim() not in dims:
            want = " or ".join(f"{d}D" for d in dims)
            hint = _RANK_HINTS.get(self._bn_dims or 0, "a tensor of rank " + want)
            raise ValueError(f"{name} expected {want} input, got a {x.dim()}-D tensor of shape "
                             f"{tuple(x.shape)}; pass {hint}")
        if x.dim() < 2:
            raise ValueError(f"{name} expected an (N, C, *) input with at least 2 dimensions, "
                             f"got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected {self.num_features} channels at dim 1, got "
                             f"input of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point input, got {x.dtype}")

    def _use_batch_stats(self) -> bool:
        """Batch statistics in train mode, or in eval mode without running statistics.

        Raises:
            ValueError: the layer is frozen but has no running statistics.
        """
        if self.frozen:
            if self.running_mean is None:
                raise ValueError(f"{type(self).__name__} is frozen but has no running "
                                 "statistics; set frozen=False or build it with "
                                 "track_running_stats=True")
            return False
        return self.training or self.running_mean is None

    def _check_batch_size(self, n: int, x: Tensor) -> None:
        """Raise when a train-mode batch has at most one value per channel (as BN does)."""
        if n < 2:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel "
                             f"when training, got input of shape {tuple(x.shape)}; use eval "
                             "mode or a larger batch")

    def _reducer(self) -> Any:
        """Where batch statistics are reduced: None here (this process's batch only); the
        sync layers return a process-group reducer (see :mod:`normswap.norms._reduce`)."""
        return None

    def _update_factor(self) -> float | None:
        """Bump ``num_batches_tracked`` and return the EMA factor, or None if no update is due."""
        if not (self.training and self.track_running_stats and not self.frozen
                and self.running_mean is not None):
            return None
        self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)  # type: ignore[arg-type]
        return self.momentum

    @staticmethod
    @torch.no_grad()
    def _ema_(buffer: Tensor, new: Tensor, factor: float) -> None:
        """``buffer <- (1 - factor) * buffer + factor * new`` in float32/64, cast back."""
        acc = stats_dtype(buffer.dtype)
        buffer.copy_(buffer.to(acc).mul_(1.0 - factor).add_(new.detach().to(acc), alpha=factor))

    # -- conversions --------------------------------------------------------------------------
    @classmethod
    def from_batchnorm(cls, bn: nn.Module, *, name: str = "", **options: Any) -> Any:
        """Build a layer that computes exactly what ``bn`` computes in eval mode.

        Copies ``num_features``, ``eps``, ``momentum``, ``affine`` (and ``bias=False``),
        ``track_running_stats``, the parameters with their ``requires_grad`` flags, the running
        statistics (``num_batches_tracked`` included), device, dtype and the train/eval mode.
        torchvision's ``FrozenBatchNorm2d`` gives a ``frozen`` layer with non-trainable
        parameters. Behaviour a BatchNorm subclass adds in its own ``forward`` is not part of the
        layer (the swap pass carries it over and reports it).

        Args:
            bn: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, another ``_BatchNorm`` subclass, or
                torchvision's ``FrozenBatchNorm2d``.
            name: the module's qualified name, used in error messages.
            **options: constructor options overriding the BN's (``momentum``, ``k``, ``gain``
                ...).

        Returns:
            The new layer. Without running statistics (``track_running_stats=False``) no eval
            equivalence exists; the layer is just built.

        Raises:
            NotABatchNormError: ``bn`` is not a BatchNorm-family module (also a TypeError).
            InvalidBatchNormError: NaN/inf or negative statistics, NaN/inf weight or bias (also
                a ValueError); the message names the module and the problem.
            TypeError: an unknown option.
        """
        state = batchnorm_state(bn, who=f"{cls.__name__}.from_batchnorm")
        check_batchnorm_state(state, name)
        cls._check_options(options)
        kwargs: dict[str, Any] = {
            "eps": state.eps, "momentum": state.momentum, "affine": state.affine,
            "track_running_stats": state.track_running_stats,
            "device": state.device, "dtype": state.dtype,
        }
        if not state.has_bias:
            kwargs["bias"] = False
        kwargs.update(options)
        layer = cls(state.num_features, **kwargs)
        layer._load_batchnorm_state(state)
        layer.train(state.training)
        return layer

    @classmethod
    def _check_options(cls, options: dict[str, Any]) -> None:
        """Raise TypeError for options the constructor does not take."""
        params = inspect.signature(cls.__init__).parameters
        accepted = sorted(p for p in params if p not in ("self", "num_features"))
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_batchnorm: unknown option(s) {unknown}; "
                            f"accepted: {accepted}")

    def _load_batchnorm_state(self, state: BatchNormState) -> None:
        """Copy parameters (keeping ``requires_grad``), running statistics and ``frozen``."""
        with torch.no_grad():
            for attr, src, trainable in (("weight", state.weight, state.weight_requires_grad),
                                         ("bias", state.bias, state.bias_requires_grad)):
                dst = getattr(self, attr)
                if dst is not None and src is not None:
                    dst.copy_(src)
                    dst.requires_grad_(trainable and not state.frozen)
            if self.track_running_stats and state.running_mean is not None:
                self.running_mean.copy_(state.running_mean)  # type: ignore[union-attr]
                if state.num_batches_tracked is not None:
                    self.num_batches_tracked.copy_(  # type: ignore[union-attr]
                        state.num_batches_tracked)
                self._load_spread(state)
        self.frozen = state.frozen

    def eval_scale_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` in float64 with eval output ``x * scale + shift``.

        Returns:
            ``scale = weight / sqrt(running_var + eps)`` (the stored denominator for L1/L-inf)
            and ``shift = bias - running_mean * scale``.

        Raises:
            ValueError: the layer has no running statistics (``track_running_stats=False``), so
                its eval output depends on the batch.
        """
        if self.running_mean is None:
            raise ValueError(f"{type(self).__name__}: no running statistics "
                             "(track_running_stats=False), so eval mode uses batch statistics and "
                             "has no fixed per-channel affine; build it with "
                             "track_running_stats=True")
        scale = 1.0 / self._eval_denominator()
        if self.weight is not None:
            scale = scale * self.weight.detach().double()
        shift = -self.running_mean.detach().double() * scale
        if self.bias is not None:
            shift = shift + self.bias.detach().double()
        return scale, shift

    def _default_batchnorm_class(self) -> type[nn.modules.batchnorm._BatchNorm]:
        """The BatchNorm class ``to_batchnorm`` builds when none is given."""
        if self._bn_dims is not None:
            return BATCHNORM_BY_DIMS[self._bn_dims]
        if self._generic_batchnorm is not None:
            return self._generic_batchnorm
        raise ValueError(f"{type(self).__name__}.to_batchnorm(): the layer is dimension-generic; "
                         "pass cls=nn.BatchNorm1d/2d/3d")

    def to_batchnorm(self, cls: type[nn.modules.batchnorm._BatchNorm] | None = None
                     ) -> nn.Module:
        """An eval-equivalent torch BatchNorm (``running_var`` as in this layer's state_dict).

        A frozen 2d layer gives torchvision's ``FrozenBatchNorm2d`` when torchvision is
        installed (and ``cls`` is not given); other frozen layers give a BatchNorm with
        non-trainable parameters (keep it in eval mode; a warning is logged).

        Args:
            cls: the BatchNorm class to build; default BatchNorm1d/2d/3d after this layer's
                dimensionality (the dimension-generic L1/L-inf classes need it; the generic
                Kalman class gives ``SyncBatchNorm``, which accepts any ``(N, C, *)``).

        Returns:
            The BatchNorm, with the same eps, momentum, affine and running statistics, in this
            layer's train/eval mode.

        Raises:
            ValueError: ``cls`` is missing for a dimension-generic L1/L-inf layer.
        """
        name = type(self).__name__
        ref = self.running_mean if self.running_mean is not None else self.weight
        factory: dict[str, Any] = {} if ref is None else {"device": ref.device,
                                                          "dtype": ref.dtype}
        if cls is None and self.frozen and self._bn_dims == 2:
            frozen_bn = self._to_frozen_batchnorm(factory)
            if frozen_bn is not None:
                return frozen_bn
        cls = cls or self._default_batchnorm_class()
        bn = cls(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                 track_running_stats=self.track_running_stats,
                 bias=not self.affine or self.bias is not None, **factory)
        with torch.no_grad():
            for attr in ("weight", "bias"):
                src, dst = getattr(self, attr), getattr(bn, attr)
                if dst is not None and src is not None:
                    dst.copy_(src)
                    dst.requires_grad_(False if self.frozen else src.requires_grad)
            if self.track_running_stats and self.running_mean is not None:
                var = self.running_var  # type: ignore[attr-defined]
                if bool((var < 0).any()):
                    logger.warning("%s.to_batchnorm(): running_var < 0 in %d channel(s) (scale "
                                   "below sqrt(eps)); BatchNorm computes it exactly, but "
                                   "from_batchnorm refuses negative variances", name,
                                   int((var < 0).sum()))
                bn.running_mean.copy_(self.running_mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(self.num_batches_tracked)
        if self.frozen:
            logger.warning("%s is frozen; the returned %s has non-trainable parameters but "
                           "updates its statistics in train mode: keep it in eval mode", name,
                           type(bn).__name__)
        return bn.train(self.training)

    def _to_frozen_batchnorm(self, factory: dict[str, Any]) -> nn.Module | None:
        """torchvision's FrozenBatchNorm2d with this layer's state, or None without torchvision."""
        try:
            from torchvision.ops.misc import FrozenBatchNorm2d
        except ImportError:  # pragma: no cover - torchvision is optional
            return None
        fbn = FrozenBatchNorm2d(self.num_features, eps=self.eps).to(**factory)
        with torch.no_grad():
            if self.weight is not None:
                fbn.weight.copy_(self.weight)
            if self.bias is not None:
                fbn.bias.copy_(self.bias)
            fbn.running_mean.copy_(self.running_mean)  # type: ignore[arg-type]
            fbn.running_var.copy_(self.running_var)  # type: ignore[attr-defined]
        return fbn.train(self.training)

    def extra_repr(self) -> str:
        text = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")
        if self.affine and self.bias is None:
            text += ", bias=False"
        return text + (", frozen=True" if self.frozen else "")
