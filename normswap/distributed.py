"""Data-parallel training with normswap layers: convert to and from the sync layers.

:func:`convert_sync` replaces every normswap L1 / L-inf / Kalman layer of a model by its
synchronised variant (:mod:`normswap.norms.sync`), whose train-mode statistics are reduced over
a ``torch.distributed`` process group, as
:meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` does for BatchNorm; :func:`revert_sync`
undoes it. Typical use, in every process::

    model = normswap.swap(model, "l1")
    model = normswap.distributed.convert_sync(model)        # after init_process_group
    model = torch.nn.parallel.DistributedDataParallel(model.to(device), device_ids=[rank])

Both functions work **in place** on the module tree, like ``convert_sync_batchnorm``: converted
children are replaced on their parent modules and the (possibly new) root is returned, so always
use the return value. A replaced layer is a new module object that shares the old one's
parameters and buffers (an optimizer built before the conversion still holds the right tensors),
its hooks and attributes, so ``state_dict`` keys and values are unchanged.

Only the exact normswap classes (``L1BatchNorm``, ``LinfBatchNorm``, ``KalmanBatchNorm`` and their
1d/2d/3d variants) are converted. A user subclass may add behaviour the sync layer would lose
(docs/layers.md, "Synchronised layers"), so it is left alone and a warning names it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from .norms.kalman import KalmanBatchNorm, KalmanBatchNorm1d, KalmanBatchNorm2d, KalmanBatchNorm3d
from .norms.lp_batchnorm import (
    L1BatchNorm,
    L1BatchNorm1d,
    L1BatchNorm2d,
    L1BatchNorm3d,
    LinfBatchNorm,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    LinfBatchNorm3d,
)
from .norms.sync import (
    SyncKalmanBatchNorm,
    SyncL1BatchNorm,
    SyncLinfBatchNorm,
    SyncNormMixin,
    sync_active,
)

__all__ = [
    "convert_sync",
    "revert_sync",
    "is_sync_layer",
    "sync_active",
    "SyncL1BatchNorm",
    "SyncLinfBatchNorm",
    "SyncKalmanBatchNorm",
]

logger = logging.getLogger(__name__)

_TO_SYNC: dict[type[nn.Module], type[SyncNormMixin]] = {
    **{c: SyncL1BatchNorm for c in (L1BatchNorm, L1BatchNorm1d, L1BatchNorm2d, L1BatchNorm3d)},
    **{c: SyncLinfBatchNorm
       for c in (LinfBatchNorm, LinfBatchNorm1d, LinfBatchNorm2d, LinfBatchNorm3d)},
    **{c: SyncKalmanBatchNorm
       for c in (KalmanBatchNorm, KalmanBatchNorm1d, KalmanBatchNorm2d, KalmanBatchNorm3d)},
}
_BASES = (L1BatchNorm, KalmanBatchNorm)
_SOURCE_ATTR = "_normswap_source_cls"


def is_sync_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of the normswap sync layers."""
    return isinstance(module, SyncNormMixin)


def convert_sync(model: nn.Module, process_group: Any | None = None, *,
                 batchnorm: bool = False) -> nn.Module:
    """Replace every normswap L1 / L-inf / Kalman layer by its sync variant, in place.

    Mirrors :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the module tree is modified
    in place and the root is returned (a new object when the root itself is converted). State is
    shared, not copied (see the module docstring). Already-sync layers get ``process_group``
    set. Call it in every process, before wrapping the model in ``DistributedDataParallel``.

    Args:
        model: any module (a ``torch.fx.GraphModule`` included).
        process_group: the group to reduce statistics over; None for the default group.
        batchnorm: also convert plain ``torch.nn`` BatchNorm layers to ``nn.SyncBatchNorm``
            (through ``convert_sync_batchnorm``; their class is remembered for
            :func:`revert_sync`).

    Returns:
        The converted model (``model`` itself unless ``model`` is a convertible layer).
    """
    counts = {"normswap": 0, "batchnorm": 0}
    out = _convert(model, process_group, batchnorm, counts)
    logger.info("convert_sync: %d normswap layer(s) and %d BatchNorm layer(s) made sync",
                counts["normswap"], counts["batchnorm"])
    return out


def _convert(module: nn.Module, group: Any | None, batchnorm: bool,
             counts: dict[str, int]) -> nn.Module:
    """Recursive worker of :func:`convert_sync`."""
    sync_cls = _TO_SYNC.get(type(module))
    if sync_cls is not None:
        counts["normswap"] += 1
        return sync_cls.from_module(module, group)
    if isinstance(module, SyncNormMixin):
        module.process_group = group
        return module
    if isinstance(module, _BASES):
        logger.warning("convert_sync: %s subclasses a normswap layer but is not a known class; "
                       "left unsynchronised (its own behaviour would be lost): convert it "
                       "yourself", type(module).__name__)
        return module
    if batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm) \
            and not isinstance(module, nn.SyncBatchNorm):
        counts["batchnorm"] += 1
        source = type(module)
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
        setattr(converted, _SOURCE_ATTR, source)
        return converted
    for name, child in list(module.named_children()):
        new = _convert(child, group, batchnorm, counts)
        if new is not child:
            module.add_module(name, new)
    return module


def revert_sync(model: nn.Module, *, batchnorm: bool = False) -> nn.Module:
    """Replace every normswap sync layer by the non-sync layer it was made from, in place.

    The inverse of :func:`convert_sync`: layers return to their original class (e.g.
    ``L1BatchNorm2d``; a sync layer built directly returns to the generic ``L1BatchNorm`` /
    ``LinfBatchNorm`` / ``KalmanBatchNorm``), sharing parameters, buffers, hooks and
    attributes. Works in place and returns the root, like :func:`convert_sync`.

    Args:
        model: any module.
        batchnorm: also turn ``nn.SyncBatchNorm`` layers made by ``convert_sync(...,
            batchnorm=True)`` back into their original BatchNorm class (SyncBatchNorm layers
            of unknown origin are left alone, with a warning).

    Returns:
        The reverted model (``model`` itself unless ``model`` is a sync layer).
    """
    counts = {"normswap": 0, "batchnorm": 0}
    out = _revert(model, batchnorm, counts)
    logger.info("revert_sync: %d normswap layer(s) and %d BatchNorm layer(s) made non-sync",
                counts["normswap"], counts["batchnorm"])
    return out


def _revert(module: nn.Module, batchnorm: bool, counts: dict[str, int]) -> nn.Module:
    """Recursive worker of :func:`revert_sync`."""
    if isinstance(module, SyncNormMixin):
        counts["normswap"] += 1
        return module.to_module()
    if batchnorm and isinstance(module, nn.SyncBatchNorm):
        source = getattr(module, _SOURCE_ATTR, None)
        if source is None:
            logger.warning("revert_sync: SyncBatchNorm %r was not made by convert_sync, its "
                           "BatchNorm class is unknown; left as is", module)
            return module
        counts["batchnorm"] += 1
        return _unsync_batchnorm(module, source)
    for name, child in list(module.named_children()):
        new = _revert(child, batchnorm, counts)
        if new is not child:
            module.add_module(name, new)
    return module


def _unsync_batchnorm(module: nn.SyncBatchNorm, source: type[nn.Module]) -> nn.Module:
    """The BatchNorm of class ``source`` sharing ``module``'s parameters, buffers and hooks."""
    old = source.__new__(source)
    state = {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    for name in ("process_group", _SOURCE_ATTR):
        state.pop(name, None)
    old.__dict__.update(state)
    return old
