"""Eval-mode equivalence checks between an original model and its rewrite."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import fx, nn

from .errors import NumericalMismatchError

__all__ = ["Verification", "verify_equivalence", "default_example_inputs", "relative_error",
           "eval_mode"]

log = logging.getLogger(__name__)

Inputs = tuple[Any, ...]


@dataclass
class Verification:
    """Result of one equivalence check."""

    max_abs: float
    rel: float
    rtol: float
    passed: bool
    input_shapes: list[list[int]]
    worst_layer: str = ""
    worst_layer_rel: float = 0.0
    layers_checked: int = 0

    @property
    def layers_agree(self) -> bool:
        """On a failed check: every rewritten layer still matches its original (so the gap
        arises downstream, e.g. in discontinuous post-processing such as NMS or top-k)."""
        return self.layers_checked > 0 and self.worst_layer_rel <= self.rtol

    def as_metrics(self) -> dict[str, Any]:
        return {"verify.max_abs": self.max_abs, "verify.rel": self.rel,
                "verify.rtol": self.rtol, "verify.passed": self.passed,
                "verify.input_shapes": self.input_shapes}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out − ref|, that divided by max |ref|) in float64."""
    a, b = out.detach().double(), ref.detach().double()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return diff, diff / max(scale, 1e-12)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode and restore every module's flag afterwards."""
    flags = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for fl in flags:
            for m, t in fl:
                m.training = t


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    if hasattr(out, "_asdict"):
        return _flatten(out._asdict())
    return []


def _input_layer(m: nn.Module) -> bool:
    """A layer whose attributes tell the input's shape (conv/linear-like, or a BatchNorm)."""
    return (hasattr(m, "in_features") or (hasattr(m, "in_channels")
                                           and hasattr(m, "kernel_size"))
            or isinstance(m, nn.modules.batchnorm._BatchNorm))


def default_example_inputs(model: nn.Module, gm: fx.GraphModule | None = None,
                           batch: int = 2, spatial: int = 64) -> Inputs | None:
    """Guess an input from the first Conv/Linear/BN module the input reaches; None if unsure."""
    modules = dict(model.named_modules())
    first: nn.Module | None = None
    if gm is not None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            return None
        frontier = list(placeholders[0].users)
        seen: set[fx.Node] = set()
        while frontier and first is None:
            n = frontier.pop(0)
            if n in seen:
                continue
            seen.add(n)
            if n.op == "call_module" and str(n.target) in modules:
                m = modules[str(n.target)]
                if _input_layer(m):
                    first = m
                    break
            frontier.extend(n.users)
    else:
        for m in model.modules():
            if _input_layer(m):
                first = m
                break
    if first is None:
        return None
    g = torch.Generator().manual_seed(0)
    p = next(iter(first.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    if hasattr(first, "in_features"):
        shape: list[int] = [batch, int(first.in_features)]
    elif hasattr(first, "in_channels") and hasattr(first, "kernel_size"):
        c = int(first.in_channels)
        nd = len(first.kernel_size)
        shape = [batch, c] + ([128] if nd == 1 else [spatial] * 2 if nd == 2 else [8, 32, 32])
    else:
        c = first.num_features
        shape = {nn.BatchNorm1d: [batch, c], nn.BatchNorm3d: [batch, c, 8, 16, 16]}.get(
            type(first), [batch, c, spatial, spatial])
    return (torch.randn(*shape, generator=g).to(device=device, dtype=dtype),)


def _run(model: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return _flatten(model(*inputs))


def verify_equivalence(original: nn.Module, rewritten: nn.Module, inputs: Inputs, *,
                       rtol: float = 1e-4, layer_pairs: Sequence[tuple[str, str]] = (),
                       raise_on_fail: bool = True) -> Verification:
    """Compare eval-mode outputs of ``original`` and ``rewritten`` on ``inputs``.

    The relative error is ``max|a − b| / max|b|`` over every output tensor. On failure, forward
    hooks on ``layer_pairs`` (same names in both models) find the first layer that disagrees.

    Raises:
        NumericalMismatchError: when the error exceeds ``rtol`` and ``raise_on_fail``.
    """
    with eval_mode(original, rewritten):
        ref = _run(original, inputs)
        out = _run(rewritten, inputs)
    if len(ref) != len(out):
        raise NumericalMismatchError(
            f"the rewritten model returns {len(out)} tensors, the original {len(ref)}")
    max_abs, rel = 0.0, 0.0
    for a, b in zip(out, ref):
        if a.shape != b.shape:
            raise NumericalMismatchError(
                f"output shape changed: {tuple(b.shape)} -> {tuple(a.shape)}")
        d, r = relative_error(a, b)
        max_abs, rel = max(max_abs, d), max(rel, r)
    shapes = [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
    result = Verification(max_abs, rel, rtol, bool(rel <= rtol), shapes)
    if not result.passed:
        (result.worst_layer, result.worst_layer_rel,
         result.layers_checked) = _worst_layer(original, rewritten, inputs, layer_pairs)
        if raise_on_fail:
            where = (f"; the first disagreeing layer is '{result.worst_layer}' "
                     f"(relative error {result.worst_layer_rel:.3g})"
                     if result.worst_layer else "")
            raise NumericalMismatchError(
                f"eval outputs differ: relative error {rel:.3g} > rtol {rtol:g}{where}. "
                "Check the layer's statistics, or pass verify=False to skip the check.")
    return result


def _worst_layer(original: nn.Module, rewritten: nn.Module, inputs: Inputs,
                 layer_pairs: Sequence[tuple[str, str]]) -> tuple[str, float, int]:
    """First layer (in execution order) whose output differs by more than 1e-3 relative, else
    the worst one; with the number of layers compared."""
    if not layer_pairs:
        return "", 0.0, 0
    a_out: dict[str, torch.Tensor] = {}
    b_out: dict[str, torch.Tensor] = {}
    order: list[str] = []
    hooks = []

    def grab(store: dict[str, torch.Tensor], name: str, record: bool) -> Any:
        def hook(_m: nn.Module, _i: Any, o: Any) -> None:
            if isinstance(o, torch.Tensor) and name not in store:
                store[name] = o.detach()
                if record:
                    order.append(name)
        return hook

    for oname, rname in layer_pairs:
        try:
            hooks.append(original.get_submodule(oname).register_forward_hook(
                grab(a_out, oname, True)))
            hooks.append(rewritten.get_submodule(rname).register_forward_hook(
                grab(b_out, oname, False)))
        except AttributeError:
            continue
    try:
        with eval_mode(original, rewritten):
            _run(original, inputs)
            _run(rewritten, inputs)
    finally:
        for h in hooks:
            h.remove()
    worst, worst_rel, checked = "", 0.0, 0
    for name in order:
        if name in b_out and a_out[name].shape == b_out[name].shape:
            checked += 1
            _, r = relative_error(b_out[name], a_out[name])
            if r > 1e-3:
                return name, r, checked
            if r > worst_rel:
                worst, worst_rel = name, r
    return worst, worst_rel, checked
