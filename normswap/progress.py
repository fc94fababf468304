"""Progress on stderr for the steps that can take seconds, and warnings said once.

Every long step of normswap (capture, swap, verification, fold, ONNX export, range measurement,
validation, calibration loops) runs inside :func:`stage` or iterates through :func:`iterate`:

* :func:`stage` prints ``normswap: capture ...`` once the step has run for a second, and
  ``normswap: capture done (3.21 s)`` when it ends, on stderr (short steps stay silent);
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
import threading
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


#: a step is announced once it has run this long (short steps stay silent)
ANNOUNCE_AFTER_S = 1.0


@contextlib.contextmanager
def stage(name: str, detail: str = "") -> Iterator[None]:
    """Time a step; when it runs longer than :data:`ANNOUNCE_AFTER_S`, announce it while it
    runs (``normswap: capture (fx) ...``) and report its end (``... done (3.21 s)``).

    Args:
        name: what the step does (``"capture"``, ``"verify"``, ``"export onnx"``).
        detail: an optional short description shown after the name.
    """
    global _depth
    label = f"{name} ({detail})" if detail else name
    _depth += 1
    depth = _depth
    announced = threading.Event()

    def announce() -> None:
        if progress_enabled():
            print(f"normswap: {'  ' * max(depth - 1, 0)}{label} ...", file=sys.stderr,
                  flush=True)
            announced.set()

    timer = threading.Timer(ANNOUNCE_AFTER_S, announce)
    timer.daemon = True
    timer.start()
    log.info("%s ...", label)
    t0 = time.perf_counter()
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        timer.cancel()
        dt = time.perf_counter() - t0
        _depth -= 1
        if announced.is_set():
            word = "failed" if failed else "done"
            print(f"normswap: {'  ' * max(depth - 1, 0)}{name} {word} ({dt:.2f} s)",
                  file=sys.stderr, flush=True)
        log.info("%s %s (%.2f s)", name, "failed" if failed else "done", dt)


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
    tqdm = None
    if sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
    if tqdm is not None:  # shown once the loop has run ANNOUNCE_AFTER_S
        yield from tqdm(items, total=total, desc=f"normswap: {name}", file=sys.stderr,
                        leave=False, dynamic_ncols=True, delay=ANNOUNCE_AFTER_S)
        return
    step = max(1, (total or 10) // 10)
    t0 = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        elapsed = time.perf_counter() - t0
        if elapsed >= ANNOUNCE_AFTER_S and (i % step == 0 or (total is not None and i == total)):
            of = f"/{total}" if total else ""
            _say(f"{name}: {i}{of} ({elapsed:.1f} s)")


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
