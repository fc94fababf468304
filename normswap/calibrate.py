"""Re-estimate the running statistics of a model's normalisation layers on user data.

After a swap (L1/L∞ BN, Kalman BN …) or after a fine-tune with frozen statistics, the running
statistics may not match what the layers would measure on the data. :func:`recalibrate` runs the
model on a few batches with only the normalisation layers in train mode (every other module,
Dropout included, stays in eval), without gradients, and by default accumulates a cumulative
(equal-weight) average of the batch statistics instead of an exponential moving average.

Which layers: every module that has a tensor ``running_mean`` attribute, a callable
``reset_running_stats()`` and a ``momentum`` attribute: ``nn.BatchNorm*``, ``SyncBatchNorm``,
``InstanceNorm`` with ``track_running_stats=True`` and normswap's own layers (which follow the
same contract: ``momentum=None`` means a cumulative average over ``num_batches_tracked``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .errors import NormswapError

__all__ = ["recalibrate", "running_stat_modules", "forward_batch"]

log = logging.getLogger(__name__)

_LOG_EVERY = 10


def running_stat_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module that keeps running statistics, with its qualified name.

    A module qualifies when it has a tensor ``running_mean``, a callable
    ``reset_running_stats()`` and a ``momentum`` attribute.

    Args:
        model: the model to search.

    Returns:
        ``(name, module)`` pairs in ``named_modules()`` order.
    """
    found = []
    for name, m in model.named_modules():
        if (isinstance(getattr(m, "running_mean", None), Tensor)
                and callable(getattr(m, "reset_running_stats", None))
                and hasattr(m, "momentum")):
            found.append((name, m))
    return found


def _model_device(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter or buffer (None for a stateless model)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else None


def _to(x: Any, device: torch.device | None) -> Any:
    """Move a tensor (or the tensors in a tuple/list/dict) to ``device``."""
    if device is None:
        return x
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _is_empty(batch: Any) -> bool:
    """A batch whose input tensor holds no sample."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 0


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch in the forms normswap accepts.

    A tensor is passed as ``model(batch)``; a tuple or list as ``model(batch[0])`` (the usual
    ``(input, target)`` pair from a DataLoader); a mapping as ``model(**batch)``. Tensors are
    moved to the model's device.

    Args:
        model: the model.
        batch: a tensor, an ``(input, target, …)`` tuple/list, or a dict of keyword inputs.

    Returns:
        Whatever the model returns.

    Raises:
        NormswapError: the batch has none of these forms.
    """
    device = _model_device(model)
    if isinstance(batch, Tensor):
        return model(_to(batch, device))
    if isinstance(batch, Mapping):
        return model(**_to(dict(batch), device))
    if isinstance(batch, (tuple, list)) and batch:
        return model(_to(batch[0], device))
    raise NormswapError(
        f"cannot feed a batch of type {type(batch).__name__} to the model; pass tensors, "
        "(input, target) tuples/lists, or dicts of keyword inputs")


def _progress(batches: Iterable[Any], total: int | None, enabled: bool) -> Iterable[Any]:
    """Wrap ``batches`` in a tqdm bar when tqdm is installed, else log every few batches."""
    if not enabled:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _logged(batches, total)
    return tqdm(batches, total=total, desc="recalibrate", unit="batch", leave=False)


def _logged(batches: Iterable[Any], total: int | None) -> Iterable[Any]:
    """Yield the batches, logging progress (the no-tqdm fallback)."""
    of = f"/{total}" if total is not None else ""
    i = 0
    for i, b in enumerate(batches, 1):
        yield b
        if i % _LOG_EVERY == 0:
            log.info("recalibrate: %d%s batches", i, of)
    log.info("recalibrate: done after %d batches", i)


def _snapshot(layers: list[tuple[str, nn.Module]]) -> list[dict[str, Tensor]]:
    """Copies of each layer's buffers (to undo a failed run)."""
    return [{k: v.detach().clone() for k, v in m.named_buffers(recurse=False)}
            for _, m in layers]


def _restore_buffers(layers: list[tuple[str, nn.Module]], saved: list[dict[str, Tensor]]) -> None:
    """Put the buffers saved by :func:`_snapshot` back."""
    with torch.no_grad():
        for (_, m), bufs in zip(layers, saved):
            for k, v in bufs.items():
                getattr(m, k).copy_(v)


def recalibrate(model: nn.Module, batches: Iterable[Any], *, num_batches: int | None = None,
                momentum: float | None = None, progress: bool = True,
                reset: bool = True) -> nn.Module:
    """Re-estimate the running statistics of every normalisation layer, in place.

    The model is changed **in place** and returned (meant for the copy that ``swap`` returned;
    deep-copy first if the original must be kept). Only the statistics buffers change: no
    gradient is computed and no parameter is updated. During the run the normalisation layers
    are in train mode and every other module is in eval mode (Dropout stays off); afterwards each
    module's ``training`` flag and each layer's ``momentum`` are restored. If the run fails, the
    statistics are restored as well.

    Args:
        model: the model whose layers to recalibrate (see :func:`running_stat_modules`).
        batches: any iterable of tensors, ``(input, target)`` tuples/lists (the first element is
            the input) or dicts of keyword inputs (``model(**batch)``), e.g. a DataLoader.
        num_batches: use at most this many batches (default: all of them).
        momentum: momentum used during the run; ``None`` (default) gives a cumulative average in
            which every batch weighs the same.
        progress: show a tqdm progress bar when tqdm is installed, else log progress.
        reset: reset the statistics first (``reset_running_stats()``); with ``reset=False`` and
            ``momentum=None`` the average continues from ``num_batches_tracked``.

    Returns:
        ``model`` itself.

    Raises:
        NormswapError: ``batches`` yielded no batch, or a batch has an unsupported form.
        ValueError: ``num_batches`` is not positive.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive int or None; got {num_batches}")
    layers = running_stat_modules(model)
    if not layers:
        log.warning("recalibrate: %s has no layers with running statistics; nothing to do",
                    type(model).__name__)
        return model
    flags = {m: m.training for m in model.modules()}
    momenta = [m.momentum for _, m in layers]
    saved = _snapshot(layers)
    total = num_batches
    if hasattr(batches, "__len__"):
        size = len(batches)  # type: ignore[arg-type]
        total = size if total is None else min(total, size)
    seen = 0
    try:
        model.eval()
        for _, m in layers:
            m.train()
            m.momentum = momentum
            if reset:
                m.reset_running_stats()
        with torch.no_grad():
            for batch in _progress(batches, total, progress):
                if num_batches is not None and seen >= num_batches:
                    break
                if _is_empty(batch):
                    log.warning("recalibrate: skipped an empty batch (no samples)")
                    continue
                forward_batch(model, batch)
                seen += 1
        if seen == 0:
            raise NormswapError("recalibrate got no batches; pass a non-empty iterable of "
                                "input batches (the statistics were left unchanged)")
    except BaseException:
        _restore_buffers(layers, saved)
        raise
    finally:
        for (_, m), mom in zip(layers, momenta):
            m.momentum = mom
        for m, flag in flags.items():
            m.training = flag
    log.info("recalibrate: %d layers re-estimated on %d batches", len(layers), seen)
    return model
