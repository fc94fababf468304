"""Shared plumbing for BatchNorm-like layers: parameters, buffers, momentum, state transfer.

``_NormBase`` owns what every batch-statistics layer repeats: ``weight``/``bias`` (ones/zeros),
``running_mean``, ``num_batches_tracked``, PyTorch's momentum convention
(``r <- (1-m)*r + m*new``; ``momentum=None`` gives a cumulative moving average), the ``frozen``
switch, input-dimension checks and ``extra_repr``. ``_ScaleNormBase`` adds the ``running_scale``
buffer (the running estimate of the eval denominator) used by the L1 and L-inf layers.

``batchnorm_state`` reads any ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d,
SyncBatchNorm, subclasses) or torchvision's ``FrozenBatchNorm2d`` into one plain record, so that
each layer's ``from_batchnorm`` is a few lines.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedNodeError

__all__ = [
    "BatchNormState",
    "batchnorm_state",
    "is_frozen_batchnorm",
    "bn_dims_of",
    "stats_dtype",
    "_NormBase",
    "_ScaleNormBase",
]

logger = logging.getLogger(__name__)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics accumulate in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is torchvision's ``FrozenBatchNorm2d`` (or a look-alike).

    Detected by class name plus the four buffers, so torchvision need not be installed.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    names = {n for n, _ in module.named_buffers(recurse=False)}
    return ("FrozenBatchNorm" in type(module).__name__
            and {"weight", "bias", "running_mean", "running_var"} <= names)


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def overrides_forward(module: nn.Module) -> bool:
    """True when a BatchNorm subclass defines its own forward (extra behaviour to keep)."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module) in _BN_TYPES:
        return False
    for base in type(module).__mro__:
        if base in _BN_TYPES or base is nn.modules.batchnorm._BatchNorm:
            return type(module).forward is not base.forward
    return True


def bn_dims_of(module: nn.Module) -> int | None:
    """1, 2 or 3 for ``BatchNorm1d/2d/3d`` (and their subclasses), 2 for ``FrozenBatchNorm2d``,
    None for SyncBatchNorm and other BatchNorm-family classes."""
    if isinstance(module, nn.SyncBatchNorm):
        return None
    for dims, cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(module, cls):
            return dims
    if is_frozen_batchnorm(module):
        return 2
    return None


@dataclass
class BatchNormState:
    """Everything a conversion needs from a BatchNorm-family module (tensors are detached).

    Attributes:
        num_features: channel count.
        eps: the BN's epsilon.
        momentum: the BN's momentum (None = cumulative average).
        affine: whether the BN has ``weight``/``bias`` parameters.
        track_running_stats: whether it has running statistics.
        frozen: True for ``FrozenBatchNorm2d`` (statistics and affine never change).
        weight: gamma, or None.
        bias: beta, or None.
        running_mean: mu_r, or None.
        running_var: sigma^2_r, or None.
        num_batches_tracked: the counter, or None.
        device: where the BN's tensors live.
        dtype: the BN's floating dtype.
    """

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    frozen: bool
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    device: torch.device
    dtype: torch.dtype

    def eval_scale(self) -> Tensor | None:
        """``sqrt(running_var + eps)`` computed in float64, or None without running stats."""
        if self.running_var is None:
            return None
        return torch.sqrt(self.running_var.double() + self.eps)


def batchnorm_state(bn: nn.Module) -> BatchNormState:
    """Read a BatchNorm-family module into a :class:`BatchNormState`.

    Args:
        bn: a ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm,
            subclasses) or torchvision's ``FrozenBatchNorm2d``.

    Returns:
        The module's hyperparameters and detached tensors.

    Raises:
        UnsupportedNodeError: ``bn`` is neither.
    """
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        if overrides_forward(bn):
            logger.warning("%s overrides forward (e.g. a fused activation); only its BatchNorm "
                           "state is converted, the extra behaviour is not carried over",
                           type(bn).__name__)
        tensors = [t for t in (bn.weight, bn.running_mean) if t is not None]
        ref = tensors[0] if tensors else None
        return BatchNormState(
            num_features=bn.num_features, eps=float(bn.eps), momentum=bn.momentum,
            affine=bn.affine, track_running_stats=bn.running_mean is not None, frozen=False,
            weight=_detached(bn.weight), bias=_detached(bn.bias),
            running_mean=_detached(bn.running_mean), running_var=_detached(bn.running_var),
            num_batches_tracked=_detached(bn.num_batches_tracked),
            device=ref.device if ref is not None else torch.device("cpu"),
            dtype=ref.dtype if ref is not None else torch.get_default_dtype(),
        )
    if is_frozen_batchnorm(bn):
        w = bn.weight
        return BatchNormState(
            num_features=w.numel(), eps=float(getattr(bn, "eps", 1e-5)), momentum=0.1,
            affine=True, track_running_stats=True, frozen=True,
            weight=_detached(w), bias=_detached(bn.bias),
            running_mean=_detached(bn.running_mean), running_var=_detached(bn.running_var),
            num_batches_tracked=None, device=w.device, dtype=w.dtype,
        )
    raise UnsupportedNodeError(
        f"cannot convert {type(bn).__name__}: expected a torch BatchNorm (BatchNorm1d/2d/3d, "
        "SyncBatchNorm or a subclass) or torchvision FrozenBatchNorm2d; pass one of those")




def _detached(t: Tensor | None) -> Tensor | None:
    """``t.detach().clone()`` or None."""
    return None if t is None else t.detach().clone()


class _NormBase(nn.Module):
    """Base of batch-statistics normalisation layers with PyTorch BatchNorm conventions.

    Subclasses implement ``forward`` and may override ``_expected_dims`` (e.g. ``(4,)``) to get
    the 1d/2d/3d input check. Helpers: ``_check_input(x)``, ``_use_batch_stats()``,
    ``_update_factor()`` (bumps ``num_batches_tracked`` and returns the EMA factor, or None when
    no update is due), ``_ema_(buffer, new, factor)``, ``_load_batchnorm_state(state)``.

    Attributes:
        frozen: when True the layer always normalises with its running statistics and never
            updates them (also in train mode), like torchvision's ``FrozenBatchNorm2d``.
    """

    _expected_dims: tuple[int, ...] | None = None
    frozen: bool

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
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
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("num_batches_tracked", None)

    # -- state --------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Zero the running mean and the batch counter (subclasses reset their spread buffer)."""
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Reset running statistics and set ``weight`` to ones and ``bias`` to zeros."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)  # old checkpoints, like BN v1
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _load_batchnorm_state(self, state: BatchNormState) -> None:
        """Copy weight, bias, running_mean and num_batches_tracked from a BN state (no grad)."""
        with torch.no_grad():
            if self.affine and state.weight is not None:
                self.weight.copy_(state.weight)
                self.bias.copy_(state.bias)
            if self.track_running_stats and state.running_mean is not None:
                self.running_mean.copy_(state.running_mean)  # type: ignore[union-attr]
                if state.num_batches_tracked is not None:
                    self.num_batches_tracked.copy_(  # type: ignore[union-attr]
                        state.num_batches_tracked)
        self.frozen = state.frozen

    # -- forward helpers ----------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        """Raise ValueError, naming the class, for a wrong rank or channel count."""
        name = type(self).__name__
        dims = self._expected_dims
        if dims is not None and x.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise ValueError(f"{name}: expected {want} input, got {x.dim()}-D input of shape "
                             f"{tuple(x.shape)}")
        if x.dim() < 2:
            raise ValueError(f"{name}: expected input (N, C, *) with at least 2 dims, got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected {self.num_features} channels at dim 1, got "
                             f"input of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point input, got {x.dtype}")

    def _use_batch_stats(self) -> bool:
        """Batch statistics in train mode, or in eval mode without running statistics."""
        if self.frozen and self.running_mean is not None:
            return False
        return self.training or self.running_mean is None

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
        buffer.copy_(buffer.to(acc).mul_(1.0 - factor).add_(new.to(acc), alpha=factor))

    def extra_repr(self) -> str:
        text = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")
        return text + (", frozen=True" if self.frozen else "")


class _ScaleNormBase(_NormBase):
    """``_NormBase`` plus a ``running_scale`` buffer: the running eval denominator (ones init).

    Eval output is ``(x - running_mean) / running_scale * weight + bias``; ``eval_scale_shift``
    gives that as a per-channel ``x * scale + shift`` (float64) and ``to_batchnorm`` converts back
    with ``running_var = running_scale**2 - eps``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if self.track_running_stats:
            self.register_buffer("running_scale",
                                 torch.ones(num_features, device=device, dtype=dtype))
        else:
            self.register_buffer("running_scale", None)

    def reset_running_stats(self) -> None:
        """Zero the running mean and counter, set the running scale to ones."""
        super().reset_running_stats()
        if self.track_running_stats:
            self.running_scale.fill_(1.0)  # type: ignore[union-attr]

    def _load_batchnorm_state(self, state: BatchNormState) -> None:
        """Copy the BN state; ``running_scale = sqrt(running_var + eps_BN)`` (float64, cast)."""
        super()._load_batchnorm_state(state)
        scale = state.eval_scale()
        if self.track_running_stats and scale is not None:
            with torch.no_grad():
                self.running_scale.copy_(scale)  # type: ignore[union-attr]

    def eval_scale_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` in float64 with eval output ``x * scale + shift``.

        Returns:
            ``scale = weight / running_scale`` and ``shift = bias - running_mean * scale``.

        Raises:
            ValueError: the layer has no running statistics (``track_running_stats=False``), so
                its eval output depends on the batch.
        """
        if self.running_mean is None or self.running_scale is None:
            raise ValueError(f"{type(self).__name__}: no running statistics "
                             "(track_running_stats=False), so eval mode uses batch statistics and "
                             "has no fixed per-channel affine; build it with "
                             "track_running_stats=True")
        scale = 1.0 / self.running_scale.detach().double()
        if self.weight is not None:
            scale = scale * self.weight.detach().double()
        shift = -self.running_mean.detach().double() * scale
        if self.bias is not None:
            shift = shift + self.bias.detach().double()
        return scale, shift

    def _eval_forward(self, x: Tensor) -> Tensor:
        """``(x - running_mean) / running_scale * weight + bias`` via the native eval kernel."""
        acc = stats_dtype(x.dtype)
        rm = self.running_mean.to(acc)  # type: ignore[union-attr]
        var = self.running_scale.to(acc).square()  # type: ignore[union-attr]
        w = None if self.weight is None else self.weight.to(acc)
        b = None if self.bias is None else self.bias.to(acc)
        return torch.nn.functional.batch_norm(x, rm, var, w, b, False, 0.0, 0.0)

    def to_batchnorm(self, cls: type[nn.modules.batchnorm._BatchNorm] | None = None
                     ) -> nn.modules.batchnorm._BatchNorm:
        """An eval-equivalent ``nn.BatchNormXd`` (``running_var = running_scale**2 - eps``).

        Args:
            cls: the BatchNorm class to build; default BatchNorm1d/2d/3d after this layer's
                dimensionality (required for the dimension-generic classes).

        Returns:
            A BatchNorm with the same eps, momentum, affine and running statistics, in the
            training mode of this layer. A frozen layer becomes an ordinary BatchNorm.

        Raises:
            ValueError: ``cls`` is missing for a dimension-generic layer.
        """
        name = type(self).__name__
        if cls is None:
            dims = getattr(type(self), "_bn_dims", None)
            if dims is None:
                raise ValueError(f"{name}.to_batchnorm(): the layer is dimension-generic; pass "
                                 "cls=nn.BatchNorm1d/2d/3d")
            cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        ref = self.weight if self.weight is not None else self.running_mean
        bn = cls(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                 track_running_stats=self.track_running_stats,
                 device=None if ref is None else ref.device,
                 dtype=None if ref is None else ref.dtype)
        with torch.no_grad():
            if self.affine:
                bn.weight.copy_(self.weight)
                bn.bias.copy_(self.bias)
            if self.track_running_stats and self.running_scale is not None:
                var = self.running_scale.double().square() - self.eps
                if bool((var < 0).any()):
                    logger.warning("%s.to_batchnorm(): running_scale**2 < eps in %d channel(s); "
                                   "running_var clamped to 0, eval output differs there", name,
                                   int((var < 0).sum()))
                    var = var.clamp_min(0.0)
                bn.running_var.copy_(var)
                bn.running_mean.copy_(self.running_mean)
                bn.num_batches_tracked.copy_(self.num_batches_tracked)
        bn.train(self.training)
        return bn
