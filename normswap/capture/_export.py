"""Capture with ``torch.export`` (non-strict), canonicalised to the shape the passes read.

``torch.export.export(module, args, kwargs, strict=False)`` runs the forward in Python with
fake tensors, so shape-dependent control flow, ``isinstance`` checks, iteration over tensors
and most library code work. Every dimension is ``Dim.AUTO`` (export keeps a dimension
dynamic where the code allows it and specialises it otherwise), so the captured graph is not
tied to the example's batch or spatial size unless the model's code is. The result is an ATen
graph (``ExportedProgram.module()``): parameters keep their original names (``get_attr``
nodes), and every node's ``meta["nn_module_stack"]`` names the module call it came from.

:func:`lift_modules` turns the ATen nodes of each leaf module call back into one
``call_module`` node of the real module object -- the node group of one call
(``nn_module_stack`` key ``L__self__layer1.0.bn1``, with ``@1`` suffixes for later calls of
the same module) that has exactly one tensor input from outside and one output used outside.
After lifting, BatchNorms, convolutions, linears, activations and dropouts are ``call_module``
nodes exactly as in a ``torch.fx`` symbolic trace, so every pass works on either capture; the
lifted modules also keep their train/eval behaviour (an exported ``dropout`` node is frozen to
eval, a lifted ``nn.Dropout`` is not).
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .._modules import ModuleStateGuard, set_submodule

__all__ = ["export_graph", "lift_modules"]

log = logging.getLogger(__name__)


def _auto_dims(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``dynamic_shapes`` with every tensor dim ``Dim.AUTO``: a tuple matching ``args`` when
    there are no keyword inputs, else a dict by the forward's parameter names."""
    from torch.export import Dim

    def spec(tree: Any) -> Any:
        return pytree.tree_map(
            lambda t: {i: Dim.AUTO for i in range(t.dim())} if isinstance(t, torch.Tensor)
            else None, tree)

    if not kwargs:
        return tuple(spec(a) for a in args)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def export_graph(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None,
                 lift: Callable[[nn.Module, str], bool]) -> fx.GraphModule:
    """Export ``module`` on its example inputs and lift its leaf module calls.

    Args:
        module: the module to capture (its state is restored afterwards).
        args: positional example inputs.
        kwargs: keyword example inputs.
        lift: ``lift(submodule, qualified_name)`` says which module calls become
            ``call_module`` nodes.

    Returns:
        The canonical GraphModule.

    Raises:
        Whatever ``torch.export`` raises.
    """
    kwargs = dict(kwargs or {})
    with ModuleStateGuard(module):
        try:
            program = torch.export.export(module, tuple(args), kwargs, strict=False,
                                          dynamic_shapes=_auto_dims(module, tuple(args),
                                                                    kwargs))
        except Exception as exc:  # noqa: BLE001 - dynamic dims refused: retry static
            log.debug("export with dynamic dims failed (%s); retrying with static shapes", exc)
            program = torch.export.export(module, tuple(args), kwargs, strict=False)
        exported = program.module()
    gm = _plain_graph_module(exported, type(module).__name__)
    lift_modules(gm, module, lift)
    gm.train(module.training)
    return gm


def _plain_graph_module(exported: fx.GraphModule, name: str) -> fx.GraphModule:
    """An ordinary, trainable ``fx.GraphModule`` with the exported module's graph (the module
    ``ExportedProgram.module()`` returns refuses ``.train()``)."""
    gm = fx.GraphModule(exported, exported.graph, name)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(exported, attr):
            setattr(gm, attr, getattr(exported, attr))
    gm.recompile()
    return gm


def _call_key(node: fx.Node, path: str) -> str | None:
    """The ``nn_module_stack`` key of the call of module ``path`` that produced ``node``."""
    for key, (qual, _cls) in (node.meta.get("nn_module_stack") or {}).items():
        if qual == path:
            return key
    return None


def _outermost_lifted(node: fx.Node, module: nn.Module,
                      lift: Callable[[nn.Module, str], bool]) -> tuple[str, str] | None:
    """``(stack key, path)`` of the outermost module call around ``node`` that is lifted."""
    for key, (qual, _cls) in (node.meta.get("nn_module_stack") or {}).items():
        if not qual:
            continue
        try:
            sub = module.get_submodule(qual)
        except AttributeError:
            continue
        if lift(sub, qual):
            return key, qual
    return None


def lift_modules(gm: fx.GraphModule, module: nn.Module,
                 lift: Callable[[nn.Module, str], bool]) -> int:
    """Collapse each lifted module call's ATen nodes into one ``call_module`` node (in place).

    Args:
        gm: the exported graph module (``ExportedProgram.module()``).
        module: the module that was exported (the real submodules are installed into ``gm``).
        lift: which module calls to lift.

    Returns:
        The number of calls lifted; calls whose nodes do not form a single-input,
        single-output group stay as ATen nodes.
    """
    groups: dict[str, list[fx.Node]] = defaultdict(list)
    paths: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        found = _outermost_lifted(node, module, lift)
        if found is None:
            continue
        key, path = found
        groups[key].append(node)
        paths[key] = path
    lifted = 0
    installed: set[str] = set()
    for key, nodes in groups.items():
        members = set(nodes)
        outside_inputs: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in members and a.op != "get_attr" and a not in outside_inputs:
                    outside_inputs.append(a)
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        if len(outside_inputs) != 1 or len(outputs) != 1:
            log.debug("not lifting %s: %d inputs, %d outputs", key, len(outside_inputs),
                      len(outputs))
            continue
        path = paths[key]
        if path not in installed:
            set_submodule(gm, path, module.get_submodule(path))
            installed.add(path)
        out = outputs[0]
        with gm.graph.inserting_after(out):
            call = gm.graph.call_module(path, (outside_inputs[0],))
        call.meta.update({k: v for k, v in out.meta.items() if k in ("val", "tensor_meta")})
        call.meta["nn_module_stack"] = dict(nodes[0].meta.get("nn_module_stack") or {})
        out.replace_all_uses_with(call)
        for n in reversed(nodes):
            if not n.users:
                gm.graph.erase_node(n)
        lifted += 1
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return lifted
