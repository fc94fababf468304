"""Module-tree helpers shared by the API, the capture layer, the passes and export.

* :func:`set_submodule` installs a module at a dotted path.
* :func:`safe_deepcopy` copies a model once, also when it holds non-leaf tensor attributes
  (a legacy ``weight_norm`` layer that has run keeps ``weight`` as one, which ``deepcopy``
  refuses); with ``share_parameters=True`` the copy keeps the original's parameters (export
  only runs its copy: no second copy of the weights).
* :func:`as_inputs` turns what a user passes as example inputs into a positional tuple.
* :class:`ModuleStateGuard` snapshots every module's plain attributes and restores them, so
  tracing never leaves state behind (a Proxy cached by a detection head, FakeTensors cached in an
  anchor buffer).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["set_submodule", "safe_deepcopy", "as_inputs", "ModuleStateGuard", "first_float_tensor",
           "carry_module_state",
           "module_device_dtype"]


def set_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    """Install ``new`` at dotted path ``qualname`` under ``root`` (``""`` is not allowed).

    ``new`` takes the train/eval flag of the module it replaces (when there is one).

    Args:
        root: the module tree.
        qualname: e.g. ``"layer1.0.bn1"``.
        new: the module to put there.

    Raises:
        ValueError: ``qualname`` is empty.
    """
    if not qualname:
        raise ValueError("set_submodule: cannot replace the root module itself")
    parent_name, _, leaf = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, leaf, None)
    if isinstance(old, nn.Module):
        new.train(old.training)
    setattr(parent, leaf, new)


def safe_deepcopy(model: nn.Module, *, share_parameters: bool = False) -> nn.Module:
    """``copy.deepcopy`` that also copies modules holding non-leaf tensor attributes.

    Non-leaf tensors (results of a hook, e.g. legacy ``weight_norm``'s ``weight``) are
    pre-seeded in the memo as detached clones; the original is not touched.

    Args:
        model: the module to copy.
        share_parameters: the copy holds the very ``nn.Parameter`` objects of ``model``
            (no second copy of the weights; buffers, attributes and the module tree are still
            copied), for callers that only run the copy and never write its parameters.

    Returns:
        An independent copy (sharing the parameters when asked).
    """
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for value in vars(mod).values():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
        if share_parameters:
            for param in mod._parameters.values():
                if param is not None:
                    memo[id(param)] = param
    return copy.deepcopy(model, memo)


def as_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    """Positional inputs: None stays None, a tensor (or any non-sequence) becomes ``(x,)``, a
    tuple or list becomes a tuple of its items.

    A ``dict`` is not accepted here: keyword inputs go through ``example_kwargs``.
    """
    if example_inputs is None:
        return None
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


_SLOTS = ("_parameters", "_buffers", "_modules")
_HOOK_SLOTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_SKIP_ATTRS = frozenset(_SLOTS + _HOOK_SLOTS + ("training",))


class ModuleStateGuard:
    """Restore every module's plain attributes, its parameter/buffer/child slots and its hooks
    on exit.

    Use around anything that runs a model with proxies or fake tensors (tracing, export,
    shape propagation)::

        with ModuleStateGuard(model):
            torch.export.export(model, inputs)

    Attributes set during the block are restored to their previous values, attributes added are
    removed, the ``_parameters``/``_buffers``/``_modules`` slots are put back as they were, and
    hooks registered during the block are removed (a library that installs its hooks on the first
    forward and marks that in an attribute would otherwise install them twice). Plain dict, list
    and set attributes get their contents back, in the same object (a cache such as timm's
    ``attention_bias_cache`` filled during a trace would otherwise keep a Proxy that a later
    run picks up). Tensor contents are not copied: an in-place change to a buffer's data is not
    undone.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._saved: list[tuple[nn.Module, dict[str, Any], dict[str, dict[Any, Any]], bool]] = []
        self._contents: list[tuple[Any, Any]] = []

    def __enter__(self) -> "ModuleStateGuard":
        self._saved, self._contents = [], []
        for mod in self.model.modules():
            plain = {k: v for k, v in vars(mod).items() if k not in _SKIP_ATTRS}
            slots = {k: dict(getattr(mod, k)) for k in _SLOTS + _HOOK_SLOTS
                     if isinstance(getattr(mod, k, None), dict)}
            self._saved.append((mod, plain, slots, mod.training))
            self._contents += [(v, copy.copy(v)) for v in plain.values()
                               if type(v) in (dict, list, set)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for mod, plain, slots, training in self._saved:
            current = vars(mod)
            for k in [k for k in current if k not in _SKIP_ATTRS and k not in plain]:
                del current[k]
            current.update(plain)
            for name, content in slots.items():
                slot = getattr(mod, name)
                slot.clear()
                slot.update(content)
            mod.training = training
        for container, content in self._contents:
            if isinstance(container, list):
                container[:] = content
            else:
                container.clear()
                container.update(content)
        self._saved, self._contents = [], []


def first_float_tensor(module: nn.Module) -> Tensor | None:
    """The first floating-point parameter or buffer of ``module`` (None if it has none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t
    return None


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a module's first floating tensor (CPU/float32 if none)."""
    t = first_float_tensor(module)
    if t is None:
        return torch.device("cpu"), torch.float32
    return t.device, t.dtype


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_backward_hooks", "_backward_pre_hooks")


def carry_module_state(old: nn.Module, new: nn.Module) -> list[str]:
    """Give ``new`` what the user set on ``old``: train/eval flag, ``requires_grad`` of
    parameters of the same name, and forward/backward hooks.

    Returns:
        Descriptions of what could not be carried (e.g. a parameter that ``new`` lacks was
        frozen); empty when everything was carried.
    """
    lost: list[str] = []
    new.train(old.training)
    new_params = dict(new.named_parameters(recurse=False))
    for name, p in old.named_parameters(recurse=False):
        q = new_params.get(name)
        if q is not None:
            q.requires_grad_(p.requires_grad)
        elif not p.requires_grad:
            lost.append(f"frozen parameter '{name}' has no counterpart")
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if hooks:
            getattr(new, attr).update(hooks)
    return lost
