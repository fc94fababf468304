"""Checkpoints: read (weights only, always), build architectures, write atomically.

A converted checkpoint is a plain dict ``{"normswap": {...metadata...}, "state_dict": {...}}``
saved with ``torch.save`` (or a ``.safetensors`` file whose metadata carries the same header),
so :func:`load` can rebuild the converted model from its architecture and method.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ._fs import atomic_write
from .errors import CheckpointError

__all__ = ["read_state_dict", "build_arch", "load_weights", "write_checkpoint", "load",
           "save", "FORMAT_VERSION"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the state_dict inside common checkpoint containers; strip a DDP 'module.' prefix."""
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "normswap" in obj and "state_dict" in obj:
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
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"'{path}': entries {bad[:5]} are not tensors; expected a "
                              "state_dict")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        meta["stripped_prefix"] = "module."
    return sd, meta


def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor],
                                                            dict[str, Any]]:
    """Read a ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors``.

    Returns:
        ``(state_dict, metadata)``; metadata holds normswap's header for converted checkpoints.

    Raises:
        CheckpointError: missing file, a pickle that needs code to load, no state_dict inside.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{p}' does not exist")
    if p.suffix == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError as exc:  # pragma: no cover - safetensors is a dependency
            raise CheckpointError("reading .safetensors needs `pip install safetensors`") from exc
        sd: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(p), framework="pt") as f:
                header = f.metadata() or {}
                for k in f.keys():
                    sd[k] = f.get_tensor(k)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"'{p}' is not a readable safetensors file: {exc}") from exc
        meta = json.loads(header["normswap"]) if "normswap" in header else {}
        if meta:
            return sd, meta
        return _unwrap(sd, p)
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"'{p}' is a pickle that needs code to load (it stores objects, not only tensors); "
            "normswap loads with weights_only=True and refuses it. Re-save it with "
            "torch.save(model.state_dict(), ...) or as .safetensors from a trusted "
            "environment") from exc
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"could not read checkpoint '{p}': {exc}") from exc
    return _unwrap(obj, p)


def build_arch(spec: str, **kwargs: Any) -> nn.Module:
    """Build an architecture from ``torchvision:NAME`` or ``package.module:factory``.

    ``torchvision`` models are built with ``weights=None`` (no download).
    """
    if ":" not in spec:
        raise CheckpointError(f"architecture '{spec}' is not of the form torchvision:NAME or "
                              "module.path:factory")
    where, name = spec.split(":", 1)
    if where == "torchvision":
        try:
            import torchvision
        except ImportError as exc:
            raise CheckpointError(f"'{spec}' needs torchvision: pip install torchvision") from exc
        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except ValueError as exc:
            raise CheckpointError(f"torchvision has no model '{name}': {exc}") from exc
    try:
        module = importlib.import_module(where)
    except ImportError as exc:
        raise CheckpointError(f"cannot import '{where}' for architecture '{spec}': {exc}") from exc
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise CheckpointError(f"'{where}' has no callable '{name}' (architecture '{spec}')")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"'{spec}' returned {type(model).__name__}, not an nn.Module")
    return model


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
    model.load_state_dict(dict(state_dict), strict=False)


def write_checkpoint(path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor],
                     meta: dict[str, Any], *, force: bool = False) -> Path:
    """Write ``state_dict`` with normswap's header, atomically (.pt/.pth or .safetensors)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    header = {"format": FORMAT_VERSION, **meta}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={
            "normswap": json.dumps(header)}), force=force)
    return atomic_write(path, lambda tmp: torch.save({"normswap": header, "state_dict": sd}, tmp),
                        force=force)


def save(model: nn.Module, path: str | os.PathLike[str], *, arch: str,
         arch_kwargs: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Save a model returned by :func:`normswap.swap` so that :func:`load` can rebuild it."""
    info = getattr(model, "normswap_method", None)
    if info is None:
        raise CheckpointError("this model was not produced by normswap.swap(); save its "
                              "state_dict with torch.save instead")
    meta = {"arch": arch, "arch_kwargs": arch_kwargs or {}, **info}
    return write_checkpoint(path, model.state_dict(), meta, force=force)


def load(arch: str | None, path: str | os.PathLike[str], **arch_kwargs: Any) -> nn.Module:
    """Rebuild a converted model from a normswap checkpoint.

    Args:
        arch: architecture spec (``torchvision:resnet50``); None to use the one recorded in the
            checkpoint.
        path: a checkpoint written by ``normswap convert`` or :func:`save`.
        **arch_kwargs: override the recorded architecture arguments.
    """
    from .api import swap

    sd, meta = read_state_dict(path)
    if "method" not in meta:
        raise CheckpointError(f"'{path}' is not a normswap checkpoint (no header); load it with "
                              "torch.load and swap the model with normswap.swap")
    spec = arch or meta.get("arch")
    if not spec:
        raise CheckpointError(f"'{path}' records no architecture; pass arch=")
    kwargs = {**meta.get("arch_kwargs", {}), **arch_kwargs}
    model = build_arch(spec, **kwargs).eval()
    converted = swap(model, meta["method"], verify=False, strict=meta.get("strict", True),
                     leaf_modules=meta.get("leaf_modules", ()), sync=meta.get("sync", False),
                     **meta.get("options", {}))
    load_weights(converted, sd, source=f"'{path}'")
    return converted.eval()
