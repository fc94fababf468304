"""Synchronised (cross-process) L1, L-inf/top-k and Kalman batch normalisation.

Counterparts of :class:`torch.nn.SyncBatchNorm` for the normswap layers. In train mode, inside an
initialised ``torch.distributed`` process group of more than one process, the batch statistics
are reduced over the group (the default group or the layer's ``process_group``), so every process
normalises with the statistics of the *global* batch and every process updates its running
statistics with the same numbers. Outside a process group (or with a group of one), in eval mode
and when ``frozen``, each layer is exactly its non-sync parent.

A sync class overrides only where the batch statistics come from (``_reducer`` returns a
:class:`~normswap.norms._reduce.ProcessGroupReducer`); the forward, the backward and the
running-statistics update are the parent's. Per-rank batches may differ in size (also zero).
The collectives, per layer (docs/layers.md, "Synchronised layers"):

* L1: two all-reduces forward (``[sum x, n_r]``, then ``[sum|d|, sum sign d]``), one backward
  (``[sum g, sum g*d]``). The exact two-pass definition: ``|x - mu|`` needs the global ``mu``.
* L-inf / top-k: one all-reduce and one all-gather forward (each rank's signed local top-k; the
  global top-k is contained in the union of the local ones), one all-reduce backward.
* Kalman: one all-gather forward (per-rank ``(n_r, mean_r, M2_r)`` merged in float64 with Chan et
  al.'s parallel update, no cancellation when ``|mean| >> std``), one all-reduce backward (the
  gradients with respect to the global moments). ``gain="auto"`` uses the global sample count;
  the prior must be the same on every rank.

The input gradient on rank ``r`` is ``d(sum_r' loss_r') / d x_r``: exactly the single-process
layer's gradient on the concatenated batch. ``weight``/``bias`` gradients stay local (each
rank's own contribution), like ``SyncBatchNorm``: ``DistributedDataParallel`` averages them.

State: the sync classes subclass the non-sync ones, so parameters, buffers and ``state_dict``
keys are identical; ``process_group`` is not part of the state. See
:func:`normswap.distributed.convert_sync` and :func:`normswap.distributed.revert_sync`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import Tensor, nn

from ._functional import l1_batch_norm_reduced, linf_batch_norm_reduced
from ._reduce import ProcessGroupReducer, global_moments, sync_active
from .base import BatchStatNorm
from .kalman import GAIN_MICRO_BATCH, KalmanBatchNorm
from .lp_batchnorm import L1BatchNorm, LinfBatchNorm

__all__ = [
    "SyncL1BatchNorm",
    "SyncLinfBatchNorm",
    "SyncKalmanBatchNorm",
    "SyncNormMixin",
    "sync_active",
    "sync_l1_batch_norm",
    "sync_linf_batch_norm",
    "sync_moments",
]

logger = logging.getLogger(__name__)

ProcessGroup = Any  # torch.distributed.ProcessGroup; Any keeps the import optional at runtime
"""A ``torch.distributed`` process group, or None for the default (WORLD) group."""

_SYNC_ONLY_ATTRS = ("process_group", "_source_cls", "_expected_dims", "_bn_dims")


# ---------------------------------------------------------------------------------------------
# functional forms
# ---------------------------------------------------------------------------------------------
def sync_l1_batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                       eps: float = 1e-5, process_group: ProcessGroup | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, int]:
    """Train-mode L1 batch norm of the local ``x`` with statistics of the global batch.

    Must be called by every process of the group (it runs collectives).

    Args:
        x: this process's input (N_r, C, *), channels at dim 1 (N_r may differ per process).
        weight: gamma (C,) or None.
        bias: beta (C,) or None.
        eps: added to the scale.
        process_group: the group, or None for the default group.

    Returns:
        ``(y, mu, s_raw, n)``: the local output, the global mean, ``C_L1 * mean|x - mu|`` over
        the global batch (identical on every rank, not differentiable) and the global element
        count per channel.
    """
    return l1_batch_norm_reduced(x, weight, bias, eps, ProcessGroupReducer(process_group))


def sync_linf_batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                         eps: float = 1e-5, k: int = 1, exact_topk: bool = False,
                         process_group: ProcessGroup | None = None
                         ) -> tuple[Tensor, Tensor, Tensor, int]:
    """Train-mode L-inf/top-k batch norm of the local ``x`` with the global batch's top-k.

    Must be called by every process of the group (it runs collectives).

    Args:
        x: this process's input (N_r, C, *), channels at dim 1.
        weight: gamma (C,) or None.
        bias: beta (C,) or None.
        eps: added to the scale.
        k: number of largest ``|x - mu|`` of the global batch averaged per channel; clamped
            to ``[1, n]`` with ``n`` the global element count per channel.
        exact_topk: select the local candidates with a full ``topk`` (slow reference path).
        process_group: the group, or None for the default group.

    Returns:
        ``(y, mu, s_raw, n)`` with ``s_raw = C(n) * mean(global top-k |x - mu|)``.

    Raises:
        ValueError: ``k < 1``.
    """
    return linf_batch_norm_reduced(x, weight, bias, eps, k, exact_topk,
                                   ProcessGroupReducer(process_group))


def sync_moments(x: Tensor, process_group: ProcessGroup | None = None
                 ) -> tuple[Tensor, Tensor, int, int]:
    """Per-channel mean and biased variance of the global batch, differentiable.

    Must be called by every process of the group (it runs collectives).

    Args:
        x: this process's input (N_r, C, *) (float32 or float64; cast half input first).
        process_group: the group, or None for the default group.

    Returns:
        ``(mean, var, n, batch)``: the moments (C,) in x's dtype, the global element count per
        channel and the global sample count.
    """
    return global_moments(x, ProcessGroupReducer(process_group))


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
class SyncNormMixin:
    """What makes a layer sync: ``process_group``, the reducer hook, module conversions."""

    process_group: ProcessGroup | None
    _source_cls: type[nn.Module] | None
    _parent_cls: type[BatchStatNorm]
    training: bool

    def _init_sync(self, process_group: ProcessGroup | None) -> None:
        self.process_group = process_group
        self._source_cls = None

    def _reducer(self) -> ProcessGroupReducer | None:
        """A reducer over the group in train mode with batch statistics and > 1 process."""
        if self.training and sync_active(self.process_group):
            return ProcessGroupReducer(self.process_group)
        return None

    @classmethod
    def from_module(cls, module: nn.Module, process_group: ProcessGroup | None = None) -> Any:
        """The sync variant of a non-sync layer, sharing its parameters, buffers and hooks.

        The new module is a new object whose parameters and buffers *are* the old module's
        tensors (as ``SyncBatchNorm.convert_sync_batchnorm`` does), so an optimizer built on the
        old parameters keeps working. All attributes (``k``, ``gain``, ``frozen``, hooks,
        train/eval mode ...) are carried over, and so is the input-rank check of a 1d/2d/3d
        source class.

        Args:
            module: an instance of the non-sync parent class (or one of its 1d/2d/3d classes).
            process_group: the group to reduce over; None for the default group.

        Returns:
            The sync layer.

        Raises:
            TypeError: ``module`` is not an instance of the parent class, or is already sync.
        """
        parent = cls._parent_cls
        if not isinstance(module, parent) or isinstance(module, SyncNormMixin):
            raise TypeError(f"{cls.__name__}.from_module: expected a non-sync "
                            f"{parent.__name__}, got {type(module).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update(_shallow_state(module))
        new.process_group = process_group
        new._source_cls = type(module)
        new._expected_dims = type(module)._expected_dims
        new._bn_dims = type(module)._bn_dims
        return new

    def to_module(self) -> nn.Module:
        """The non-sync layer this one was made from (or the generic parent class), sharing
        parameters, buffers, hooks and attributes; the inverse of :meth:`from_module`."""
        target = self._source_cls or self._parent_cls
        old = target.__new__(target)
        state = _shallow_state(self)  # type: ignore[arg-type]
        for name in _SYNC_ONLY_ATTRS:
            state.pop(name, None)
        old.__dict__.update(state)
        return old

    def to_batchnorm(self, cls: type[nn.modules.batchnorm._BatchNorm] | None = None
                     ) -> nn.Module:
        """An eval-equivalent BatchNorm; by default ``nn.SyncBatchNorm`` on this layer's group.

        Args:
            cls: the BatchNorm class to build (default ``nn.SyncBatchNorm``).

        Returns:
            The BatchNorm (see :meth:`~normswap.norms.base.BatchStatNorm.to_batchnorm`).
        """
        bn = super().to_batchnorm(cls or nn.SyncBatchNorm)  # type: ignore[misc]
        if isinstance(bn, nn.SyncBatchNorm):
            bn.process_group = self.process_group
        return bn

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        return text if self.process_group is None else \
            f"{text}, process_group={self.process_group}"


def _shallow_state(module: nn.Module) -> dict[str, Any]:
    """A module's ``__dict__`` with its dict-valued entries (parameters, buffers, hooks) copied."""
    return {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}


class SyncL1BatchNorm(SyncNormMixin, L1BatchNorm):
    """L1 batch normalisation with statistics reduced over a ``torch.distributed`` group.

    Accepts any (N, C, *) input, like :class:`torch.nn.SyncBatchNorm`; a layer made by
    :meth:`from_module` keeps the input-rank check of its source class (L1BatchNorm2d ...).

    Args:
        num_features: C.
        eps: added to the batch scale in train mode.
        momentum: running-statistics factor; None for a cumulative moving average.
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep running statistics.
        device: parameter/buffer device.
        dtype: parameter/buffer dtype.
        bias: with ``affine``, also learn ``bias`` (keyword only).
        process_group: the group to reduce over (keyword only); None for the default group.
    """

    _parent_cls = L1BatchNorm

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 *, bias: bool = True, process_group: ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self._init_sync(process_group)


class SyncLinfBatchNorm(SyncNormMixin, LinfBatchNorm):
    """L-inf / top-k batch normalisation over the global top-k of a ``torch.distributed`` group.

    Args:
        num_features: C.
        eps: added to the batch scale in train mode.
        momentum: running-statistics factor; None for a cumulative moving average.
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep running statistics.
        device: parameter/buffer device.
        dtype: parameter/buffer dtype.
        k: how many of the largest ``|x - mu|`` of the *global* batch are averaged per channel.
        exact_topk: select local candidates with a full ``topk`` (slow reference path).
        bias: with ``affine``, also learn ``bias`` (keyword only).
        process_group: the group to reduce over (keyword only); None for the default group.
    """

    _parent_cls = LinfBatchNorm

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 k: int = 1, exact_topk: bool = False, *, bias: bool = True,
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         k=k, exact_topk=exact_topk, bias=bias)
        self._init_sync(process_group)


class SyncKalmanBatchNorm(SyncNormMixin, KalmanBatchNorm):
    """Batch Kalman Normalization with global batch moments over a ``torch.distributed`` group.

    The batch moments are those of the global batch (Chan's parallel merge of the per-rank
    moments, float64), combined with the prior as in
    :class:`~normswap.norms.kalman.KalmanBatchNorm`; ``gain="auto"`` is resolved from the global
    sample count. The prior must be identical on every rank.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance before the square root.
        momentum: running-statistics momentum; None for a cumulative average.
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep running statistics.
        gain: the Kalman gain ``p`` or ``"auto"``.
        fallback_ratio: use the batch moments when ``mean(var_p / S) >= fallback_ratio``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: with ``affine``, learn ``bias`` too (keyword only).
        process_group: the group to reduce over (keyword only); None for the default group.
    """

    _parent_cls = KalmanBatchNorm

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 gain: float | str = GAIN_MICRO_BATCH, fallback_ratio: float = 100.0,
                 device: Any = None, dtype: torch.dtype | None = None, *, bias: bool = True,
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, gain,
                         fallback_ratio, device, dtype, bias=bias)
        self._init_sync(process_group)
