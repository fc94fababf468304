"""Models past protobuf's 2 GB limit: weights in an external data file, written atomically.

A model whose serialised size exceeds ``external_data_threshold`` is staged in a temp directory
beside the target (``.NAME.normswap-XXXX.tmpdir``): every tensor of 1 KB or more goes to one data
file (``onnx.save_model(..., save_as_external_data=True)``), which also empties the in-memory
proto (only the graph stays in memory). ONNX Runtime, the checker and the emulation read the
staged files by path. The final ``NAME.onnx`` and ``NAME.onnx.data`` are moved into place data
first, model last, so a reader never sees a model whose data file is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper

from .._fs import TEMP_MARK, check_output_paths

__all__ = ["EXTERNAL_DATA_THRESHOLD", "data_file_name", "estimated_size", "staging_dir",
           "save_external", "move_into_place"]

#: Default size above which a model is written with external data: protobuf's 2 GiB limit
#: minus a 64 MiB margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2 ** 31 - 64 * 2 ** 20


def _tensor_size(t: TensorProto) -> int:
    """Serialised size of one tensor: its values' bytes from dims and type when they are raw or
    external (read from neither), else its own ``ByteSize``; plus its name and dims."""
    raw = t.data_location == TensorProto.EXTERNAL or t.HasField("raw_data")
    if not raw or t.data_type == TensorProto.STRING:
        return t.ByteSize()
    count = int(np.prod(t.dims, dtype=np.int64))
    return count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize + len(t.name) + \
        10 * len(t.dims) + 16


def estimated_size(model: ModelProto) -> int:
    """The serialised size of ``model`` within a few bytes per tensor, without serialising it.

    ``ModelProto.ByteSize()`` encodes the whole model (upb protobuf): a transient buffer of up
    to twice the weights' size, just to decide between the in-memory and external-data paths.
    Here initialisers count from their shapes and types; nodes, inputs, outputs, value_info and
    functions from their own (small) ``ByteSize``.
    """
    g = model.graph
    small = (*g.node, *g.input, *g.output, *g.value_info, *model.functions,
             *model.opset_import)
    return sum(_tensor_size(t) for t in g.initializer) + sum(m.ByteSize() for m in small) + \
        sum(t.ByteSize() for t in g.sparse_initializer)


def data_file_name(target: Path) -> str:
    """The external data file's name for ``target`` (``model.onnx`` -> ``model.onnx.data``)."""
    return f"{target.name}.data"


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A temp directory beside ``target`` (same file system: the final move is a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}{TEMP_MARK}*.tmpdir"):
        shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMP_MARK}", suffix=".tmpdir",
                                 dir=target.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def save_external(model: ModelProto, path: Path, location: str) -> None:
    """Save ``model`` at ``path`` with its tensors in ``path.parent / location``.

    The proto is edited in place: its tensors then refer to the data file and hold no bytes.
    An existing data file of that name is replaced (onnx appends to it otherwise).
    """
    with contextlib.suppress(FileNotFoundError):
        (path.parent / location).unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024, convert_attribute=False)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def move_into_place(staged_model: Path, staged_data: Path, target: Path, *,
                    force: bool = False) -> Path | None:
    """Move a staged model and its data file onto ``target`` and ``target.data``.

    Args:
        staged_model: the model saved with :func:`save_external` (location = the data name).
        staged_data: its data file, named :func:`data_file_name` of ``target``.
        target: the final model path.
        force: replace existing files.

    Returns:
        The final data file path (None when no tensor was large enough to go there).

    Raises:
        OutputPathError: the model or data path exists without ``force``.
    """
    data_target = target.parent / data_file_name(target)
    has_data = staged_data.exists()
    check_output_paths([("path", target)] + ([("external data", data_target)] if has_data
                                              else []), force=force)
    mask = os.umask(0)
    os.umask(mask)
    for staged in (staged_data, staged_model) if has_data else (staged_model,):
        _fsync(staged)
        os.chmod(staged, 0o666 & ~mask)
    if has_data:
        os.replace(staged_data, data_target)
    os.replace(staged_model, target)
    return data_target if has_data else None
