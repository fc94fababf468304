"""Reading BatchNorm-family modules: which ones they are, and their state as one plain record.

``batchnorm_state`` reads any ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d,
SyncBatchNorm, subclasses) or torchvision's ``FrozenBatchNorm2d`` into a :class:`BatchNormState`,
and :func:`check_batchnorm_state` refuses states no layer should be built from (non-finite or
negative statistics, non-finite affine parameters), so that every layer's ``from_batchnorm`` is
a few lines (see :class:`~normswap.norms.base.BatchStatNorm`). The passes use
:func:`is_frozen_batchnorm` and :func:`overrides_forward` to match BatchNorms in a graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import NormswapError, UnsupportedNodeError

__all__ = [
    "BatchNormState",
    "InvalidBatchNormError",
    "NotABatchNormError",
    "batchnorm_state",
    "check_batchnorm_state",
    "is_frozen_batchnorm",
    "overrides_forward",
    "bn_dims_of",
    "stats_dtype",
]

logger = logging.getLogger(__name__)


class InvalidBatchNormError(NormswapError, ValueError):
    """A BatchNorm's state (statistics or affine parameters) cannot be converted as it is."""


class NotABatchNormError(UnsupportedNodeError, TypeError):
    """A conversion from BatchNorm was given a module that is not a BatchNorm."""


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
        affine: whether the BN has a ``weight`` parameter.
        has_bias: whether it also has a ``bias`` (BatchNorm's ``bias=False`` form has none).
        track_running_stats: whether it has running statistics.
        frozen: True for ``FrozenBatchNorm2d`` (statistics and affine never change).
        weight: gamma, or None.
        bias: beta, or None.
        weight_requires_grad: the BN's ``weight.requires_grad`` (False when frozen).
        bias_requires_grad: the BN's ``bias.requires_grad`` (False when frozen).
        running_mean: mu_r, or None.
        running_var: sigma^2_r, or None.
        num_batches_tracked: the counter, or None.
        device: where the BN's tensors live.
        dtype: the BN's floating dtype.
        training: the BN's train/eval mode.
        class_name: the BN's class name (for messages).
    """

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    has_bias: bool
    track_running_stats: bool
    frozen: bool
    weight: Tensor | None
    bias: Tensor | None
    weight_requires_grad: bool
    bias_requires_grad: bool
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    device: torch.device
    dtype: torch.dtype
    training: bool
    class_name: str

    def eval_scale(self) -> Tensor | None:
        """``sqrt(running_var + eps)`` computed in float64, or None without running stats."""
        if self.running_var is None:
            return None
        return torch.sqrt(self.running_var.double() + self.eps)


def batchnorm_state(bn: nn.Module, who: str = "from_batchnorm") -> BatchNormState:
    """Read a BatchNorm-family module into a :class:`BatchNormState`.

    Behaviour a BatchNorm subclass adds in its own ``forward`` is not part of the state; the swap
    pass carries it over and reports it.

    Args:
        bn: a ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm,
            subclasses) or torchvision's ``FrozenBatchNorm2d``.
        who: the caller, named in the error message.

    Returns:
        The module's hyperparameters and detached tensors.

    Raises:
        NotABatchNormError: ``bn`` is neither (an ``UnsupportedNodeError`` and a ``TypeError``).
    """
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        tensors = [t for t in (bn.weight, bn.running_mean) if t is not None]
        ref = tensors[0] if tensors else None
        return BatchNormState(
            num_features=bn.num_features, eps=float(bn.eps), momentum=bn.momentum,
            affine=bn.affine, has_bias=bn.bias is not None,
            track_running_stats=bn.running_mean is not None, frozen=False,
            weight=_detached(bn.weight), bias=_detached(bn.bias),
            weight_requires_grad=bool(bn.weight is not None and bn.weight.requires_grad),
            bias_requires_grad=bool(bn.bias is not None and bn.bias.requires_grad),
            running_mean=_detached(bn.running_mean), running_var=_detached(bn.running_var),
            num_batches_tracked=_detached(bn.num_batches_tracked),
            device=ref.device if ref is not None else torch.device("cpu"),
            dtype=ref.dtype if ref is not None else torch.get_default_dtype(),
            training=bn.training, class_name=type(bn).__name__,
        )
    if is_frozen_batchnorm(bn):
        w = bn.weight
        return BatchNormState(
            num_features=w.numel(), eps=float(getattr(bn, "eps", 1e-5)), momentum=0.1,
            affine=True, has_bias=True, track_running_stats=True, frozen=True,
            weight=_detached(w), bias=_detached(bn.bias),
            weight_requires_grad=False, bias_requires_grad=False,
            running_mean=_detached(bn.running_mean), running_var=_detached(bn.running_var),
            num_batches_tracked=None, device=w.device, dtype=w.dtype,
            training=bn.training, class_name=type(bn).__name__,
        )
    raise NotABatchNormError(
        f"{who} expects a BatchNorm module (BatchNorm1d/2d/3d, SyncBatchNorm or a subclass, or "
        f"torchvision FrozenBatchNorm2d), cannot convert {type(bn).__name__}; pass one of those")


def check_batchnorm_state(state: BatchNormState, name: str = "") -> None:
    """Refuse a BatchNorm state that no eval-exact layer can be built from.

    Refused: NaN/inf in ``running_mean``, ``running_var``, ``weight`` or ``bias``; a negative
    ``running_var`` (a variance cannot be negative: the checkpoint is corrupt, or it was written
    by an L1/L-inf layer whose scale is below ``sqrt(eps)``, see docs/layers.md, "State").

    Args:
        state: the state read by :func:`batchnorm_state`.
        name: the module's qualified name, put at the front of the message when given.

    Raises:
        InvalidBatchNormError: naming the module, every problem found and the remedy (also a
            ``ValueError``).
    """
    problems = []
    for field in ("running_mean", "running_var", "weight", "bias"):
        t = getattr(state, field)
        if t is None:
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            kinds = [k for k, hit in (("NaN", bool(torch.isnan(t).any())),
                                      ("inf", bool(torch.isinf(t).any()))) if hit]
            problems.append(f"{field} has {int(bad.sum())} non-finite value(s) "
                            f"({'/'.join(kinds)})")
    var = state.running_var
    if var is not None:
        neg = torch.isfinite(var) & (var < 0)
        if bool(neg.any()):
            problems.append(f"running_var has {int(neg.sum())} negative value(s) "
                            f"(min {float(var[neg].min()):.6g})")
    if not problems:
        return
    where = f"{name} ({state.class_name})" if name else state.class_name
    raise InvalidBatchNormError(
        f"{where}: cannot convert: {'; '.join(problems)}. Fix or re-estimate the statistics "
        "(e.g. normswap.recalibrate on the original model), or load a checkpoint that has "
        "finite values; a state_dict written by an L1/L-inf layer loads into that layer directly")


def _detached(t: Tensor | None) -> Tensor | None:
    """``t.detach().clone()`` or None."""
    return None if t is None else t.detach().clone()

