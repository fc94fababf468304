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

A NaN or an inf never reaches the statistics silently: each batch's input and, after it, every
layer's statistics are checked; a non-finite batch stops the run (the error names its index) or,
with ``on_nonfinite="skip"``, is undone and listed in the report. See docs/verification.md.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .errors import NormswapError
from .inputs import iter_tensors
from .progress import iterate
from .report import PassReport

__all__ = ["recalibrate", "running_stat_modules", "forward_batch"]

log = logging.getLogger(__name__)


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


def _fed_tensors(batch: Any) -> list[Tensor]:
    """The tensors of ``batch`` that :func:`forward_batch` feeds to the model."""
    fed = batch
    if isinstance(batch, (tuple, list)) and not isinstance(batch, Mapping) and batch:
        fed = batch[0]
    return list(iter_tensors(fed))


def _count_nonfinite(tensors: list[Tensor]) -> int:
    """Number of NaN/inf values in the floating (and complex) tensors."""
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors
               if t.is_floating_point() or t.is_complex())


def _nonfinite_layers(layers: list[tuple[str, nn.Module]]) -> list[str]:
    """Names of the layers with a non-finite value in a floating statistics buffer."""
    return [name or "<root>" for name, m in layers
            if any(b.is_floating_point() and not bool(torch.isfinite(b).all())
                   for b in m.buffers(recurse=False))]


def _names(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


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
                momentum: float | None = None, progress: bool = True, reset: bool = True,
                on_nonfinite: str = "raise", report: PassReport | None = None) -> nn.Module:
    """Re-estimate the running statistics of every normalisation layer, in place.

    The model is changed **in place** and returned (meant for the copy that ``swap`` returned;
    deep-copy first if the original must be kept). Only the statistics buffers change: no
    gradient is computed and no parameter is updated. During the run the normalisation layers
    are in train mode and every other module is in eval mode (Dropout stays off); afterwards each
    module's ``training`` flag and each layer's ``momentum`` are restored. If the run fails, the
    statistics are restored as well.

    Non-finite values never reach the statistics silently: a batch whose input holds a NaN or
    an inf, and a batch after which a statistic is non-finite (an overflow, a NaN made inside
    the model), either stops the run (``on_nonfinite="raise"``: the error names the batch by
    its index, counting from 0, and every statistic is put back as it was before the run) or
    is skipped (``on_nonfinite="skip"``: the statistics are put back as they were before that
    batch, and the report gets a skip entry for it).

    Args:
        model: the model whose layers to recalibrate (see :func:`running_stat_modules`).
        batches: any iterable of tensors, ``(input, target)`` tuples/lists (the first element is
            the input) or dicts of keyword inputs (``model(**batch)``), e.g. a DataLoader.
        num_batches: use at most this many batches (default: all of them).
        momentum: momentum used during the run; ``None`` (default) gives a cumulative average in
            which every batch weighs the same.
        progress: show progress through :func:`normswap.progress.iterate` (when progress is
            enabled there); ``False`` never shows it.
        reset: reset the statistics first (``reset_running_stats()``); with ``reset=False`` and
            ``momentum=None`` the average continues from ``num_batches_tracked``.
        on_nonfinite: ``"raise"`` (default) or ``"skip"``, see above.
        report: the report that receives the skipped batches and a summary; by default the
            model's ``normswap_report`` (the one ``swap`` attached), else a new report that is
            attached to the model as ``normswap_report``.

    Returns:
        ``model`` itself.

    Raises:
        NormswapError: ``batches`` yielded no usable batch, a batch has an unsupported form, a
            batch is non-finite (with ``on_nonfinite="raise"``), or ``reset=False`` and the
            current statistics are already non-finite.
        ValueError: ``num_batches`` is not positive or ``on_nonfinite`` is unknown.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be a positive int or None; got {num_batches}")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip'; got {on_nonfinite!r}")
    layers = running_stat_modules(model)
    if not layers:
        log.warning("recalibrate: %s has no layers with running statistics; nothing to do",
                    type(model).__name__)
        return model
    if report is None:
        report = getattr(model, "normswap_report", None)
        if not isinstance(report, PassReport):
            report = PassReport(title="normswap recalibrate")
            model.normswap_report = report  # type: ignore[assignment]
    if not reset and (broken := _nonfinite_layers(layers)):
        raise NormswapError(
            f"recalibrate(reset=False): the running statistics of {_names(broken)} are already "
            "non-finite, so continuing their average cannot repair them; pass reset=True")
    flags = {m: m.training for m in model.modules()}
    momenta = [m.momentum for _, m in layers]
    saved = _snapshot(layers)
    total = num_batches
    if hasattr(batches, "__len__"):
        size = len(batches)  # type: ignore[arg-type]
        total = size if total is None else min(total, size)
    seen, skipped = 0, 0
    try:
        model.eval()
        for _, m in layers:
            m.train()
            m.momentum = momentum
            if reset:
                m.reset_running_stats()
        stream = iterate(batches, "recalibrate", total) if progress else batches
        with torch.no_grad():
            for index, batch in enumerate(stream):
                if num_batches is not None and seen >= num_batches:
                    break
                if _is_empty(batch):
                    log.warning("recalibrate: skipped batch %d: empty (no samples)", index)
                    report.skip(f"batch {index}", "recalibrate", "empty batch (no samples)")
                    continue
                problem = _check_input(batch)
                if problem is None:
                    before = _snapshot(layers)
                    forward_batch(model, batch)
                    broken = _nonfinite_layers(layers)
                    if broken:
                        _restore_buffers(layers, before)
                        problem = (f"after it the running statistics of {_names(broken)} were "
                                   "non-finite (an overflow or a NaN made inside the model)")
                if problem is not None:
                    if on_nonfinite == "raise":
                        raise NormswapError(
                            f"recalibrate: batch {index} (counting from 0): {problem}; the "
                            "statistics were left as they were before the run. Clean that "
                            "batch, or pass on_nonfinite='skip' to skip such batches")
                    skipped += 1
                    log.warning("recalibrate: skipped batch %d: %s", index, problem)
                    report.skip(f"batch {index}", "recalibrate", problem)
                    continue
                seen += 1
        if seen == 0:
            raise NormswapError(
                "recalibrate got no batches to use"
                + (f" ({skipped} skipped as non-finite)" if skipped else "")
                + "; pass a non-empty iterable of finite input batches (the statistics were "
                "left unchanged)")
    except BaseException:
        _restore_buffers(layers, saved)
        raise
    finally:
        for (_, m), mom in zip(layers, momenta):
            m.momentum = mom
        for m, flag in flags.items():
            m.training = flag
    report.note(f"recalibrated the running statistics of {len(layers)} layers on {seen} "
                f"batches" + (f" ({skipped} non-finite batches skipped)" if skipped else ""))
    report.metrics["recalibrate.batches"] = seen
    report.metrics["recalibrate.skipped"] = skipped
    log.info("recalibrate: %d layers re-estimated on %d batches (%d skipped)", len(layers), seen,
             skipped)
    return model


def _check_input(batch: Any) -> str | None:
    """Why the input of ``batch`` cannot be used (non-finite values), or None."""
    count = _count_nonfinite(_fed_tensors(batch))
    if count:
        return f"its input holds {count} non-finite value(s) (NaN or inf)"
    return None
