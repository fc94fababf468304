"""Files normswap writes: checked before anything is written, written atomically, never clobbered.

One helper for every output (checkpoints, ONNX models, reports, plots):

* :func:`check_output_path` refuses, before any work is done, a path that is a directory, lies
  under a regular file, already exists (unless ``force``), or equals another output of the same
  run.
* :func:`check_output_dir` / :func:`atomic_write_dir` do the same for a folder written as a
  whole (a Hugging Face ``save_pretrained`` folder): it is built in a temp sibling folder and
  renamed into place; ``force`` replaces only a folder that carries the writer's marker file.
* :func:`atomic_write` writes through a temp file in the target's directory and moves it into
  place with ``os.replace``: a reader sees the old file or the new one, never half of one. The new
  file gets ordinary permissions (``0666`` minus the umask, as ``open()`` gives), not the ``0600``
  of ``tempfile.mkstemp``. Temp files of our own naming (``.NAME.normswap-*.tmp``) that a killed
  run left beside the target are removed on the next write to that path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import CheckpointError, ExportError

__all__ = ["OutputPathError", "check_output_path", "check_output_paths", "atomic_write",
           "atomic_write_bytes", "atomic_write_text", "check_output_dir", "atomic_write_dir",
           "TEMP_MARK"]

TEMP_MARK = ".normswap-"


class OutputPathError(CheckpointError, ExportError):
    """An output path cannot be written (exists, is a directory, lies under a file ...)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike[str], *, force: bool = False,
                      what: str = "output") -> Path:
    """Check that ``path`` can be written, before any work is done.

    Args:
        path: the destination file.
        force: allow replacing an existing regular file.
        what: the argument's name for messages (``"-o"``, ``"--report"``).

    Returns:
        The path as a :class:`~pathlib.Path`.

    Raises:
        OutputPathError: the path is a directory, lies under a regular file, exists without
            ``force``, or is empty.
    """
    if str(path) == "":
        raise OutputPathError(f"{what}: empty path")
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"{what} '{target}' is a directory; name a file inside it")
    _check_parent(target, what)
    if (target.exists() or target.is_symlink()) and not force:
        raise OutputPathError(f"{what} '{target}' already exists; pass force=True (CLI: "
                              "--force) to overwrite it")
    return target


def check_output_paths(paths: Iterable[tuple[str, str | os.PathLike[str] | None]], *,
                       force: bool = False) -> list[Path]:
    """Check several outputs of one run: each as :func:`check_output_path`, and no two alike.

    Args:
        paths: ``(argument name, path or None)`` pairs; None entries are ignored.
        force: allow replacing existing files.

    Returns:
        The checked paths, in order (None entries dropped).

    Raises:
        OutputPathError: one path is unusable, or two arguments name the same file.
    """
    seen: dict[Path, str] = {}
    out: list[Path] = []
    for what, p in paths:
        if p is None:
            continue
        target = check_output_path(p, force=force, what=what)
        key = Path(os.path.abspath(target))
        if key in seen:
            raise OutputPathError(f"{what} and {seen[key]} name the same file '{target}'; "
                                  "give them different paths")
        seen[key] = what
        out.append(target)
    return out


def _remove_stale_temps(target: Path) -> None:
    """Delete temp files of our own naming that an interrupted write to ``target`` left."""
    with contextlib.suppress(OSError):
        for stale in target.parent.glob(f".{target.name}{TEMP_MARK}*.tmp"):
            with contextlib.suppress(OSError):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], *,
                 force: bool = False, what: str = "output") -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one step.

    Args:
        path: the destination.
        write: writes the content to the temp path it is given.
        force: replace an existing file.
        what: the argument's name for messages.

    Returns:
        The destination path.

    Raises:
        OutputPathError: the destination is unusable (see :func:`check_output_path`).
        Whatever ``write`` raises; no partial file is left behind.
    """
    target = check_output_path(path, force=force, what=what)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{TEMP_MARK}", suffix=".tmp",
                               dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, force: bool = False,
                       what: str = "output") -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, write, force=force, what=what)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, force: bool = False,
                      what: str = "output") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), force=force, what=what)


def _check_parent(target: Path, what: str) -> None:
    """The nearest existing ancestor of ``target`` must be a writable directory."""
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{what} '{target}': '{parent}' is a file, not a "
                                      "directory")
            if not os.access(parent, os.W_OK):
                raise OutputPathError(f"{what} '{target}': directory '{parent}' is not "
                                      "writable")
            return


def check_output_dir(path: str | os.PathLike[str], *, force: bool = False,
                     what: str = "output", marker: str | None = None) -> Path:
    """Check that the folder ``path`` can be written as a whole, before any work is done.

    Args:
        path: the destination folder.
        force: allow replacing an existing folder (only one holding ``marker``, or an empty one).
        what: the argument's name for messages.
        marker: a file name that marks folders this writer made (e.g. ``normswap.json``).

    Returns:
        The path as a :class:`~pathlib.Path`.

    Raises:
        OutputPathError: the path is a file, lies under a file, exists without ``force``, or
            is a non-empty folder without ``marker``.
    """
    if str(path) == "":
        raise OutputPathError(f"{what}: empty path")
    target = Path(path)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputPathError(f"{what} '{target}' exists and is not a folder; name a new "
                              "folder")
    if target.exists():
        if not force:
            raise OutputPathError(f"{what} '{target}' already exists; pass force=True (CLI: "
                                  "--force) to replace it")
        if marker is not None and any(target.iterdir()) and not (target / marker).is_file():
            raise OutputPathError(f"{what} '{target}' is a folder normswap did not write (no "
                                  f"{marker}); it is not replaced even with --force: remove "
                                  "it yourself or name another folder")
    _check_parent(target, what)
    return target


def _ordinary_permissions(folder: Path) -> None:
    """Give a freshly written tree the modes ``open()``/``mkdir`` give (``0666``/``0777`` minus
    the umask): temp folders and some writers (safetensors) use ``0600``/``0700``."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def atomic_write_dir(path: str | os.PathLike[str], write: Callable[[str], None], *,
                     force: bool = False, what: str = "output",
                     marker: str | None = None) -> Path:
    """Call ``write(tmp_folder)`` and move the folder onto ``path`` by renaming it.

    The temp folder is a sibling of ``path`` (same file system); its tree gets ordinary
    permissions (``0777``/``0666`` minus the umask) and it is removed if ``write`` fails. With ``force``, an existing
    folder is first renamed aside and deleted once the new one is in place.

    Args:
        path: the destination folder.
        write: fills the temp folder it is given.
        force: replace an existing folder (see :func:`check_output_dir`).
        what: the argument's name for messages.
        marker: see :func:`check_output_dir`.

    Returns:
        The destination path.

    Raises:
        OutputPathError: the destination is unusable.
        Whatever ``write`` raises; no partial folder is left behind.
    """
    target = check_output_dir(path, force=force, what=what, marker=marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}{TEMP_MARK}", suffix=".tmp",
                           dir=target.parent)
    old: str | None = None
    try:
        write(tmp)
        _ordinary_permissions(Path(tmp))
        if target.exists():
            old = tempfile.mkdtemp(prefix=f".{target.name}{TEMP_MARK}old-", suffix=".tmp",
                                   dir=target.parent)
            os.rmdir(old)
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
