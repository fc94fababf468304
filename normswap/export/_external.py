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
           "save_external", "move_into_place", "write_inline"]

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


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_GRAPH_FIELD = 7        # ModelProto.graph
_INITIALIZER_FIELD = 5  # GraphProto.initializer
_RAW_DATA_FIELD = 9     # TensorProto.raw_data


def _field(number: int, length: int) -> bytes:
    """The tag and length prefix of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def write_inline(model: ModelProto, base_dir: str | os.PathLike[str], fh, *,
                 chunk: int = 64 * 2 ** 20) -> int:
    """Write ``model`` (saved with external data, loaded without it) to ``fh`` as one
    self-contained ONNX file, streaming each weight from its data file: the bytes protobuf would
    serialise for the model with the weights loaded (field order aside), without holding them.

    Every external tensor must be a top-level initializer (ValueError otherwise: use
    ``onnx.load`` and serialise instead).

    Returns:
        The number of bytes written.
    """
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    inits = list(model.graph.initializer)
    external_ids = {id(t) for t in inits if uses_external_data(t)}
    if any(uses_external_data(t) and id(t) not in external_ids
           for t in _get_all_tensors(model)):
        raise ValueError("an external tensor outside the top-level initializers")
    tensors = []    # (tensor bytes without its data, data path, offset, length, body size)
    for t in inits:
        if id(t) not in external_ids:
            header = t.SerializeToString()
            tensors.append((header, None, 0, 0, len(header)))
            continue
        info = {e.key: e.value for e in t.external_data}
        meta = TensorProto()
        meta.CopyFrom(t)
        meta.ClearField("external_data")
        meta.ClearField("data_location")
        count = int(np.prod(t.dims, dtype=np.int64))
        length = int(info.get("length", count * helper.tensor_dtype_to_np_dtype(
            t.data_type).itemsize))
        header = meta.SerializeToString()
        body = len(header) + len(_field(_RAW_DATA_FIELD, length)) + length
        tensors.append((header, os.path.join(base_dir, info["location"]),
                        int(info.get("offset", 0)), length, body))
    rest = ModelProto()
    rest.CopyFrom(model)
    rest.graph.ClearField("initializer")
    graph_rest = rest.graph.SerializeToString()
    rest.ClearField("graph")
    graph_len = len(graph_rest) + sum(len(_field(_INITIALIZER_FIELD, b)) + b
                                      for *_, b in tensors)
    written = 0
    for part in (rest.SerializeToString(), _field(_GRAPH_FIELD, graph_len), graph_rest):
        fh.write(part)
        written += len(part)
    for header, path, offset, length, body in tensors:
        head = _field(_INITIALIZER_FIELD, body) + header
        fh.write(head)
        written += len(head)
        if path is None:
            continue
        prefix = _field(_RAW_DATA_FIELD, length)
        fh.write(prefix)
        written += len(prefix)
        with open(path, "rb") as src:
            src.seek(offset)
            left = length
            while left:
                block = src.read(min(chunk, left))
                if not block:
                    raise ValueError(f"{path}: shorter than its tensors say")
                fh.write(block)
                left -= len(block)
        written += length
    return written
