"""Checkpoints: read (weights only, always), rebuild converted models, write atomically.

A converted checkpoint is a plain dict ``{"normswap": {...header...}, "state_dict": {...}}``
saved with ``torch.save`` (or a ``.safetensors`` file whose metadata carries the same header,
or a Hugging Face ``save_pretrained`` folder with the header in ``normswap.json``), so that
:func:`load` can rebuild the converted model from its architecture and method.

Reading never runs code from the file:

* the format is recognised from the file's first bytes (zip of ``torch.save``, legacy torch
  pickle, safetensors), not from its suffix; anything else, and every damaged file, raises
  :class:`CheckpointError` ``"'F' is not a PyTorch or safetensors checkpoint: <why>"``;
* pickles load with ``torch.load(weights_only=True)`` (memory-mapped for big files);
* the header only ever names an architecture for display. :func:`load` rebuilds from it only
  for the built-in namespaces (``torchvision:``, ``timm:``) with JSON-scalar arguments; every
  other architecture must be passed by the caller (``arch=`` / ``--arch``), and a header that
  disagrees with it is reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ._fs import atomic_write, atomic_write_dir, atomic_write_text
from .arch import (
    build_arch,
    build_hf_folder,
    check_recorded_kwargs,
    is_builtin,
    is_hf_folder,
    is_recordable,
)
from .errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "HEADER_FILE",
    "build_arch",
    "load",
    "load_weights",
    "read_state_dict",
    "save",
    "write_checkpoint",
    "write_hf_folder",
]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
#: the header file of a converted Hugging Face folder
HEADER_FILE = "normswap.json"
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_MMAP_BYTES = 64 * 2**20  # memory-map torch zip files from this size on
_MAX_JSON_BYTES = 16 * 2**20  # normswap.json / index files larger than this are refused
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_Format = Literal["zip", "pickle", "safetensors"]


def _not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"'{path}' is not a PyTorch or safetensors checkpoint: {why}")


# --------------------------------------------------------------------------- recognising files

def _check_regular_file(p: Path) -> int:
    """The size of ``p``, or an error saying what it is instead of a readable file."""
    if p.is_symlink() and not p.exists():
        raise _not_a_checkpoint(p, f"it is a dangling symlink (to '{os.readlink(p)}')")
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist (it is not a PyTorch or "
                              "safetensors checkpoint)")
    if p.is_dir():
        raise _not_a_checkpoint(p, "it is a directory (a Hugging Face folder needs a "
                                   "config.json)")
    if not p.is_file():
        raise _not_a_checkpoint(p, "it is not a regular file")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"checkpoint '{p}' is not readable (permissions)")
    return p.stat().st_size


def _sniff(p: Path, size: int) -> _Format:
    """Which format the first bytes announce."""
    if size == 0:
        raise _not_a_checkpoint(p, "it is empty")
    with open(p, "rb") as fh:
        head = fh.read(9)
    if head[:4] in _ZIP_MAGIC:
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if n > size - 8:
            raise _not_a_checkpoint(p, f"its safetensors header claims {n} bytes but the file "
                                       f"has {size - 8} after the length field (truncated or "
                                       "corrupt)")
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise _not_a_checkpoint(p, f"its first bytes {head[:8]!r} are those of neither a "
                               "torch.save zip, a torch pickle nor a safetensors file")


def _check_torch_zip(p: Path, size: int) -> None:
    """A zip must look like ``torch.save`` wrote it: a data.pkl, stored entries, in bounds."""
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            with open(p, "rb") as fh:
                for info in infos:
                    fh.seek(info.header_offset)
                    local = fh.read(30)
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise _not_a_checkpoint(p, f"zip entry '{info.filename}' is corrupt")
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    end = info.header_offset + 30 + name_len + extra_len + info.compress_size
                    if end > size:
                        raise _not_a_checkpoint(p, f"zip entry '{info.filename}' runs past "
                                                   "the end of the file (truncated)")
    except zipfile.BadZipFile as exc:
        raise _not_a_checkpoint(p, f"it is a damaged zip archive ({exc})") from exc
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile raises many kinds on damaged input
        # (OSError, struct.error, EOFError, NotImplementedError "zip file version 6.4" ...)
        raise _not_a_checkpoint(p, f"its zip directory is corrupt ({type(exc).__name__}: "
                                   f"{exc})") from exc
    names = [i.filename for i in infos]
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        raise _not_a_checkpoint(p, "it is a TorchScript archive; load it with torch.jit.load "
                                   "and save its state_dict()")
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise _not_a_checkpoint(p, "it is a zip archive, but not one written by torch.save "
                                   "(no data.pkl)")
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise _not_a_checkpoint(p, f"it holds compressed zip entries ({packed[:3]}); "
                                   "torch.save writes none")


def _first_line(exc: BaseException) -> str:
    """The first informative line of an exception message (torch's advice boilerplate
    dropped), at most 200 characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Weights only load failed",
                                                       "Check the documentation"))] or lines
    return lines[0][:200] if lines else "no detail"


def _read_torch(p: Path, fmt: _Format, size: int) -> Any:
    if fmt == "zip":
        _check_torch_zip(p, size)
    # torch.load memory-maps only a file name, and dispatches a name ending in .safetensors by
    # its suffix: a handle otherwise (the format was read from the content)
    mmap = fmt == "zip" and size >= _MMAP_BYTES and p.suffix != ".safetensors"
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")  # torch warns about odd pickle protocols
            source: Any = str(p) if mmap else stack.enter_context(open(p, "rb"))
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(exc), re.IGNORECASE)
        if found:
            raise _not_a_checkpoint(
                p, f"it is a pickle that needs code to load (it stores '{found.group(1)}', "
                   "not only tensors); normswap loads with weights_only=True and refuses it. "
                   "Re-save it with torch.save(model.state_dict(), ...) or as .safetensors "
                   "from a trusted environment") from exc
        raise _not_a_checkpoint(p, "its pickle is corrupt or uses objects a weights-only "
                                   f"load refuses ({_first_line(exc)})") from exc
    except Exception as exc:
        raise _not_a_checkpoint(p, f"it is truncated or corrupt ({type(exc).__name__}: "
                                   f"{_first_line(exc)})") from exc


def _header_from_json(text: str, where: Path) -> dict[str, Any]:
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"'{where}': the normswap header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"'{where}': the normswap header is a {type(header).__name__}, "
                              "not a mapping")
    return header


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is a dependency
        raise CheckpointError("reading .safetensors needs `pip install safetensors`") from exc
    sd: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                sd[k] = f.get_tensor(k)
    except Exception as exc:
        raise _not_a_checkpoint(p, f"its safetensors header or data is corrupt "
                                   f"({type(exc).__name__}: {_first_line(exc)})") from exc
    meta = _header_from_json(header["normswap"], p) if "normswap" in header else {}
    return sd, meta


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the state_dict inside common checkpoint containers; strip a DDP 'module.' prefix."""
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "normswap" in obj and "state_dict" in obj:
        if not isinstance(obj["normswap"], Mapping):
            raise CheckpointError(f"'{path}': the normswap header is a "
                                  f"{type(obj['normswap']).__name__}, not a mapping")
        meta = dict(obj["normswap"])
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                meta["container_key"] = key
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"'{path}' holds no state_dict (a mapping of names to tensors); "
                              "save model.state_dict() instead of the model object")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"'{path}': entries {[str(b) for b in bad[:5]]} are not named "
                              "tensors; expected a state_dict")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        meta["stripped_prefix"] = "module."
    return sd, meta


def _read_file(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    size = _check_regular_file(p)
    fmt = _sniff(p, size)
    if fmt == "safetensors":
        sd, meta = _read_safetensors(p)
        return (sd, meta) if meta else _unwrap(sd, p)
    return _unwrap(_read_torch(p, fmt, size), p)


def _read_json_file(p: Path) -> Any:
    if p.stat().st_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"'{p}' is larger than {_MAX_JSON_BYTES} bytes; not a header")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{p}' is not valid JSON ({exc})") from exc


def _hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of a save_pretrained folder (shards from its index), all inside it."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            data = _read_json_file(folder / index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"'{folder / index}' has no weight_map")
            shards = sorted({str(v) for v in weight_map.values()})
            outside = [s for s in shards if Path(s).name != s]
            if outside:
                raise CheckpointError(f"'{folder / index}' names shards outside the folder: "
                                      f"{outside[:3]}")
            return [folder / s for s in shards]
    raise _not_a_checkpoint(folder, "it is a Hugging Face folder without weights "
                                    "(model.safetensors or pytorch_model.bin)")


def _read_folder(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not is_hf_folder(p):
        raise _not_a_checkpoint(p, "it is a directory (a Hugging Face folder needs a "
                                   "config.json)")
    sd: dict[str, torch.Tensor] = {}
    for f in _hf_weight_files(p):
        part, _ = _read_file(f)
        sd.update(part)
    meta: dict[str, Any] = {}
    if (p / HEADER_FILE).is_file():
        header = _read_json_file(p / HEADER_FILE)
        if not isinstance(header, dict):
            raise CheckpointError(f"'{p / HEADER_FILE}' is not a mapping")
        meta = header
    meta["hf_folder"] = True
    return sd, meta


def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor],
                                                            dict[str, Any]]:
    """Read a checkpoint: torch.save zip or pickle, ``.safetensors``, or a Hugging Face folder.

    The format is recognised from the content; pickles load with
    ``torch.load(weights_only=True)``; nothing in the file can run code.

    Returns:
        ``(state_dict, metadata)``; metadata holds normswap's header for converted checkpoints
        (``hf_folder: True`` for folders).

    Raises:
        CheckpointError: missing, empty, damaged or unknown file, a directory that is not a
            Hugging Face folder, a pickle that needs code to load, no state_dict inside; the
            message names the file.
    """
    p = Path(path)
    if p.is_dir():
        return _read_folder(p)
    return _read_file(p)


# --------------------------------------------------------------------------- loading weights

def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                 source: str = "checkpoint") -> None:
    """``load_state_dict`` with one clear error listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    # num_batches_tracked is optional in many checkpoints (fx drops it too)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:8]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes[:8]}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: "
                              + "; ".join(parts)
                              + ". Check --arch and its arguments (e.g. num_classes)")
    model.load_state_dict(dict(state_dict), strict=False, assign=_can_assign(own, state_dict))


def _can_assign(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the checkpoint's tensors can become the model's own (``assign=True``): one copy
    of the weights instead of two (the model's initial ones are freed). Only when every tensor
    already has the model's dtype and device, and no two of the model's entries share storage
    (a tie the checkpoint's separate tensors would break)."""
    seen: set[int] = set()
    for k, t in own.items():
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                return False
            seen.add(ptr)
        v = state_dict.get(k)
        if v is not None and (v.dtype != t.dtype or v.device != t.device
                              or type(v) is not torch.Tensor):
            return False
    return True


# --------------------------------------------------------------------------- writing

def _recordable_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The architecture arguments a header can carry (JSON scalars and lists of them)."""
    kept: dict[str, Any] = {}
    for k, v in (kwargs or {}).items():
        if is_recordable(v):
            kept[k] = list(v) if isinstance(v, tuple) else v
        else:
            log.warning("architecture argument %s=%r is not recorded in the checkpoint (not a "
                        "JSON scalar or list); pass it again when loading", k, v)
    return kept


def _header(meta: Mapping[str, Any]) -> dict[str, Any]:
    header = {"format": FORMAT_VERSION, **meta}
    if "arch_kwargs" in header:
        header["arch_kwargs"] = _recordable_kwargs(header["arch_kwargs"])
    return header


def write_checkpoint(path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor],
                     meta: dict[str, Any], *, force: bool = False) -> Path:
    """Write ``state_dict`` with normswap's header, atomically (.pt/.pth or .safetensors).

    Raises:
        OutputPathError: the path exists (without ``force``), is a directory or lies under a
            file.
    """
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    header = _header(meta)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={
            "normswap": json.dumps(header)}), force=force, what="-o")
    return atomic_write(path, lambda tmp: torch.save({"normswap": header, "state_dict": sd}, tmp),
                        force=force, what="-o")


def write_hf_folder(model: nn.Module, folder: str | os.PathLike[str], meta: dict[str, Any], *,
                    force: bool = False, template: nn.Module | None = None) -> Path:
    """Write a converted Hugging Face model as a ``save_pretrained`` folder plus
    ``normswap.json``, atomically (built in a temp sibling folder, then renamed).

    A conversion returned as an ``fx.GraphModule`` (Kalman with graph priors) has no
    ``save_pretrained``; when its state_dict has the original's keys (``l1``, ``linf``,
    ``kalman``: BatchNorm's keys), it is written through ``template`` (the original model),
    loaded strictly with the converted weights, and ``normswap load`` rebuilds the conversion.

    Raises:
        CheckpointError: the model cannot be written as a folder (no ``save_pretrained`` and
            state keys the original class cannot hold); OutputPathError: the folder exists
            without ``force``, or is a folder normswap did not write.
    """
    saver = getattr(model, "save_pretrained", None)
    if not callable(saver) and template is not None and callable(
            getattr(template, "save_pretrained", None)):
        state = model.state_dict()
        if set(state) == set(template.state_dict()):
            import copy

            holder = copy.deepcopy(template)
            holder.load_state_dict(state, strict=True)
            saver = holder.save_pretrained
    if not callable(saver):
        raise CheckpointError(
            f"the converted model is a {type(model).__name__} without save_pretrained, and its "
            "state keys differ from the original class's (the method changed the layers' "
            "state), so it cannot be written as a Hugging Face folder; write a .pt or "
            ".safetensors checkpoint instead")
    header = _header(meta)

    def write(tmp: str) -> None:
        saver(tmp)
        atomic_write_text(Path(tmp) / HEADER_FILE, json.dumps(header, indent=2) + "\n")

    return atomic_write_dir(folder, write, force=force, what="-o", marker=HEADER_FILE)


def save(model: nn.Module, path: str | os.PathLike[str], *, arch: str,
         arch_kwargs: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Save a model returned by :func:`normswap.swap` so that :func:`load` can rebuild it.

    A Hugging Face model saved to a path without suffix becomes a ``save_pretrained`` folder
    with ``normswap.json``; everything else a ``.pt``/``.safetensors`` file.

    Args:
        model: the converted model.
        path: the destination.
        arch: the architecture spec, recorded in the header (rebuilt from it later only for
            ``torchvision:``/``timm:``; any other spec must be passed to :func:`load` again).
        arch_kwargs: the factory's arguments (JSON scalars and lists are recorded).
        force: replace an existing output.
    """
    info = getattr(model, "normswap_method", None)
    if info is None:
        raise CheckpointError("this model was not produced by normswap.swap(); save its "
                              "state_dict with torch.save instead")
    meta = {"arch": arch, "arch_kwargs": arch_kwargs or {}, **info}
    if not Path(path).suffix and callable(getattr(model, "save_pretrained", None)):
        return write_hf_folder(model, path, meta, force=force)
    return write_checkpoint(path, model.state_dict(), meta, force=force)


# --------------------------------------------------------------------------- rebuilding

def _swap_settings(meta: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The swap call a header records, checked to be plain data."""
    method = meta.get("method")
    if not isinstance(method, str):
        raise CheckpointError(f"{source} is not a normswap checkpoint (no method in its "
                              "header); load it with torch.load and convert the model with "
                              "normswap.swap")
    options = check_recorded_kwargs(meta.get("options", {}), f"{source} (method options)")
    leaf = meta.get("leaf_modules", [])
    if not isinstance(leaf, (list, tuple)) or not all(isinstance(q, str) for q in leaf):
        raise CheckpointError(f"{source}: recorded leaf_modules {leaf!r} are not a list of "
                              "names")
    flags = {k: meta.get(k, d) for k, d in (("strict", True), ("sync", False))}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise CheckpointError(f"{source}: recorded strict/sync flags {flags} are not booleans")
    return {"method": method, "options": options, "leaf_modules": list(leaf), **flags}


def _choose_arch(arch: str | None, meta: Mapping[str, Any], source: str, *, folder: bool
                 ) -> tuple[str | None, dict[str, Any], str | None]:
    """``(spec, recorded kwargs to use, warning)``; the header never chooses code."""
    recorded = meta.get("arch")
    if arch:
        if recorded is not None and str(recorded) != arch:
            warning = (f"{source} records architecture {str(recorded)!r} but {arch!r} was "
                       f"given; building {arch!r} without the recorded arguments")
            return arch, {}, warning
        return arch, check_recorded_kwargs(meta.get("arch_kwargs"), source), None
    if folder:
        return None, {}, None  # rebuilt from the folder's own config.json
    if not recorded:
        raise CheckpointError(f"{source} records no architecture; pass arch= (CLI: --arch)")
    if not isinstance(recorded, str) or not is_builtin(recorded):
        raise CheckpointError(
            f"{source} records architecture {str(recorded)!r}; normswap rebuilds only "
            "torchvision:NAME and timm:NAME from what a file records and never imports code a "
            f"file names. If you trust that code, pass it yourself: arch={str(recorded)!r} "
            f"(CLI: --arch {recorded})")
    return recorded, check_recorded_kwargs(meta.get("arch_kwargs"), source), None


def load(arch: str | None, path: str | os.PathLike[str], **arch_kwargs: Any) -> nn.Module:
    """Rebuild a converted model from a normswap checkpoint (file or Hugging Face folder).

    Args:
        arch: architecture spec (``torchvision:resnet50``, ``mypkg.models:build``,
            ``./factories.py:build``). None uses what the checkpoint records, which is allowed
            only for ``torchvision:``/``timm:`` specs and Hugging Face folders (built from
            their ``config.json``). A spec that disagrees with the recorded one wins and is
            reported (a warning naming both).
        path: a checkpoint written by ``normswap convert`` or :func:`save`.
        **arch_kwargs: override the recorded architecture arguments.

    Returns:
        The converted model in eval mode, carrying ``normswap_report`` and
        ``normswap_method``.

    Raises:
        CheckpointError: unreadable file, no normswap header, an architecture the header may
            not choose, arguments that are not plain data, weights that do not fit.
    """
    from .api import swap

    source = f"'{path}'"
    sd, meta = read_state_dict(path)
    settings = _swap_settings(meta, source)
    spec, recorded_kwargs, warning = _choose_arch(arch, meta, source,
                                                  folder=Path(path).is_dir())
    if warning:
        log.warning("%s", warning)
    if spec is None:
        if arch_kwargs:
            raise CheckpointError(f"{source} is a Hugging Face folder: its config.json "
                                  f"describes the model, arguments {sorted(arch_kwargs)} do "
                                  "not apply (pass arch= to build it another way)")
        model = build_hf_folder(path, weights=False)
    else:
        model = build_arch(spec, **{**recorded_kwargs, **arch_kwargs})
    model.eval()
    converted = swap(model, settings["method"], verify=False, strict=settings["strict"],
                     leaf_modules=settings["leaf_modules"], sync=settings["sync"],
                     **settings["options"])
    load_weights(converted, sd, source=source)
    if warning:
        converted.normswap_report.warn(warning)  # type: ignore[operator,union-attr]
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is not None and getattr(converted, "pretrained_cfg", None) is None:
        converted.pretrained_cfg = cfg  # timm's preprocessing settings survive a graph result
    return converted.eval()

