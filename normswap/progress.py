"""Progress on stderr for the steps that can take seconds, and warnings said once.

Every long step of normswap (capture, swap, verification, fold, ONNX export, range measurement,
validation, calibration loops) runs inside :func:`stage` or iterates through :func:`iterate`:

* :func:`stage` prints ``normswap: capture ...`` when the step starts and
  ``normswap: capture done (1.23 s)`` when it ends, on stderr;
* :func:`iterate` shows a ``tqdm`` bar when tqdm is installed (one status line per 10 % of the
  work otherwise).

Whether anything is shown: :func:`set_progress` (the CLI turns it on, ``-q`` off); by default it
is on when stderr is a terminal or ``NORMSWAP_PROGRESS=1``, off otherwise (tests, logs, pipes).
Every stage is also logged at INFO level on the ``normswap.progress`` logger, whatever the
setting. :func:`warn_once` logs a warning only the first time its key is seen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

__all__ = ["set_progress", "progress_enabled", "stage", "iterate", "warn_once",
           "reset_warnings"]

log = logging.getLogger("normswap.progress")
T = TypeVar("T")

_enabled: bool | None = None
_depth = 0
_said: set[str] = set()


def set_progress(enabled: bool | None) -> None:
    """Show progress on stderr (True), never (False), or when stderr is a terminal (None)."""
    global _enabled
    _enabled = enabled


def progress_enabled() -> bool:
    """Whether progress is shown now."""
    if _enabled is not None:
        return _enabled
    if os.environ.get("NORMSWAP_PROGRESS", "") not in ("", "0"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _say(text: str) -> None:
    if progress_enabled():
        print(f"normswap: {'  ' * max(_depth - 1, 0)}{text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(name: str, detail: str = "") -> Iterator[None]:
    """Announce a step, time it, and report its end (or its failure).

    Args:
        name: what the step does (``"capture"``, ``"verify"``, ``"export onnx"``).
        detail: an optional short description shown after the name.
    """
    global _depth
    label = f"{name} ({detail})" if detail else name
    _depth += 1
    _say(f"{label} ...")
    log.info("%s ...", label)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        dt = time.perf_counter() - t0
        _say(f"{name} failed ({dt:.2f} s)")
        log.info("%s failed (%.2f s)", name, dt)
        raise
    finally:
        _depth -= 1
    dt = time.perf_counter() - t0
    _depth += 1
    _say(f"{name} done ({dt:.2f} s)")
    _depth -= 1
    log.info("%s done (%.2f s)", name, dt)


def iterate(items: Iterable[T], name: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while showing progress (tqdm when installed, status lines otherwise).

    Args:
        items: the work items.
        name: what is being done (``"recalibrate"``).
        total: the number of items, when ``items`` has no ``len``.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not progress_enabled():
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=f"normswap: {name}", file=sys.stderr,
                        leave=False, dynamic_ncols=True)
        return
    step = max(1, (total or 10) // 10)
    t0 = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or (total is not None and i == total):
            of = f"/{total}" if total else ""
            _say(f"{name}: {i}{of} ({time.perf_counter() - t0:.1f} s)")


def warn_once(key: str, message: str, logger: logging.Logger | None = None,
              *args: Any) -> bool:
    """Log ``message`` as a warning the first time ``key`` is seen in this process.

    Returns:
        True when the warning was logged now.
    """
    if key in _said:
        return False
    _said.add(key)
    (logger or log).warning(message, *args)
    return True


def reset_warnings() -> None:
    """Forget which warnings were said (for tests)."""
    _said.clear()
