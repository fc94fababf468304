"""Eval-mode equivalence checks between an original model and its rewrite.

:func:`verify_equivalence` runs both models on the same inputs (cloned per run, same RNG seed,
eval mode, no gradients) and compares **every** output, walking dicts, lists, tuples,
namedtuples, dataclasses and ``transformers`` ``ModelOutput``\\ s to any depth:

* the structure must match (mapping keys, sequence lengths, container types up to tuple/list);
  a mismatch names its path (``out['logits']``, ``out[1].boxes``);
* floating tensors: shape and dtype must match; a non-finite value (NaN, ±inf) in either output
  that is not the same non-finite value at the same place in the other fails the check, with
  the count and the first index; elsewhere the relative error ``max|a − b| / max|b|`` over the
  finite places is computed per output tensor and must be ``<= rtol``;
* integer and bool tensors are compared exactly; ints, strings, bools and ``None`` for
  equality; Python floats within ``rtol``;
* an object of an unknown type that holds tensors raises :class:`VerificationError` (it cannot be
  compared, so it must not pass); a check that compared no tensor at all fails.

On failure, forward hooks on ``layer_pairs`` find the first layer whose output disagrees, and
the message explains BatchNorms that use batch statistics in eval mode
(``track_running_stats=False``, see :func:`batch_stat_norms`). See docs/verification.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import logging
import math
import numbers
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import NumericalMismatchError, VerificationError
from .inputs import default_example_inputs, iter_tensors

__all__ = ["Verification", "Mismatch", "verify_equivalence", "run_reference", "compare_outputs",
           "relative_error", "batch_stat_norms", "eval_mode", "default_example_inputs"]

log = logging.getLogger(__name__)

Inputs = tuple[Any, ...]

#: Relative error above which a layer counts as disagreeing in the layer search.
LAYER_RTOL = 1e-3
_SEED = 0
_MAX_LISTED = 5

#: Mismatch kinds that no downstream post-processing can explain.
HARD_KINDS = frozenset({"structure", "dtype", "nonfinite", "empty"})


@dataclass(frozen=True)
class Mismatch:
    """One disagreement between the outputs.

    Attributes:
        path: where it is (``out['logits']``, ``out[1].boxes``).
        kind: ``"structure"`` (keys, lengths, types), ``"shape"``, ``"dtype"``,
            ``"nonfinite"``, ``"values"`` (exact comparison of integers, bools, strings ...),
            ``"tolerance"`` (relative error above ``rtol``) or ``"empty"`` (nothing compared).
        message: a sentence that starts with the path.
    """

    path: str
    kind: str
    message: str


@dataclass
class Verification:
    """Result of one equivalence check.

    Attributes:
        max_abs: largest ``|a − b|`` over every compared tensor (inf when a non-finite value
            disagrees).
        rel: the worst per-output relative error ``max|a − b| / max|b|``.
        rtol: the tolerance.
        passed: every output matched and at least one tensor was compared.
        input_shapes: shapes of the input tensors.
        worst_layer: on failure, the first rewritten layer whose output disagrees (else the
            worst one).
        worst_layer_rel: its relative error (inf for a structural or non-finite disagreement).
        layers_checked: how many layer pairs were compared.
        tensors_compared: how many output tensors were compared.
        worst_output: path of the output with the largest relative error.
        mismatches: every disagreement found.
        batch_stat_norms: BatchNorms of the original that use batch statistics in eval mode.
    """

    max_abs: float
    rel: float
    rtol: float
    passed: bool
    input_shapes: list[list[int]]
    worst_layer: str = ""
    worst_layer_rel: float = 0.0
    layers_checked: int = 0
    tensors_compared: int = 0
    worst_output: str = ""
    mismatches: list[Mismatch] = field(default_factory=list)
    batch_stat_norms: list[str] = field(default_factory=list)

    @property
    def layers_agree(self) -> bool:
        """On a failed check: every rewritten layer still matches its original and the failure
        is one that discontinuous post-processing downstream (NMS, top-k, thresholds) can cause
        (a tolerance, value or shape difference, not NaN or a changed structure)."""
        return (self.layers_checked > 0 and self.worst_layer_rel <= self.rtol
                and not any(m.kind in HARD_KINDS for m in self.mismatches))

    def message(self) -> str:
        """What failed, where, and what to do (empty when the check passed)."""
        if self.passed:
            return ""
        listed = [m.message for m in self.mismatches[:_MAX_LISTED]]
        more = len(self.mismatches) - len(listed)
        text = "eval outputs differ: " + "; ".join(listed)
        if more > 0:
            text += f"; and {more} more mismatch(es)"
        if self.worst_layer:
            text += (f". The first disagreeing layer is '{self.worst_layer}' (relative error "
                     f"{self.worst_layer_rel:.3g})")
        if self.batch_stat_norms:
            text += ". " + _batch_stat_explanation(self.batch_stat_norms)
        return text + ". Check the layer's statistics, or pass verify=False to skip the check."

    def as_metrics(self) -> dict[str, Any]:
        """The result as flat ``verify.*`` metrics for a report."""
        return {"verify.max_abs": self.max_abs, "verify.rel": self.rel,
                "verify.rtol": self.rtol, "verify.passed": self.passed,
                "verify.input_shapes": self.input_shapes,
                "verify.tensors_compared": self.tensors_compared,
                "verify.worst_output": self.worst_output,
                "verify.mismatches": [m.message for m in self.mismatches[:_MAX_LISTED]]}


# -- batch-statistics norms ------------------------------------------------------------------

def batch_stat_norms(model: nn.Module) -> list[str]:
    """Qualified names of the BatchNorm-like layers that normalise with batch statistics even
    in eval mode (``track_running_stats=False``, or no running statistics).

    Their eval output depends on the whole batch, so a rewrite that uses fixed statistics
    cannot reproduce it. ``InstanceNorm`` (per-sample statistics by design) is not listed.

    Args:
        model: the model to search.

    Returns:
        Names in ``named_modules()`` order (``"<root>"`` for the model itself).
    """
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            continue
        is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(m).__name__
        if not is_bn:
            continue
        if getattr(m, "track_running_stats", True) is False or (
                hasattr(m, "running_mean") and getattr(m, "running_mean") is None):
            found.append(name or "<root>")
    return found


def _batch_stat_explanation(names: Sequence[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return (f"The original model has BatchNorms without running statistics ({shown}{more}: "
            "track_running_stats=False), which normalise with the statistics of each batch "
            "even in eval mode, so its output depends on the batch and a rewrite with fixed "
            "statistics cannot match it. Give them running statistics first "
            "(track_running_stats=True, then normswap.recalibrate(model, batches)), or pass "
            "verify=False")


# -- comparison ------------------------------------------------------------------------------

@dataclass
class _Tally:
    """Running result of a comparison."""

    rtol: float
    compared: int = 0
    max_abs: float = 0.0
    rel: float = 0.0
    worst: str = ""
    mismatches: list[Mismatch] = field(default_factory=list)

    def fail(self, path: str, kind: str, message: str) -> None:
        self.mismatches.append(Mismatch(path, kind, f"{path}: {message}"))


def _type_name(x: Any) -> str:
    return type(x).__name__


def _is_leaf(x: Any) -> bool:
    """A non-tensor value compared for equality."""
    return (x is None or isinstance(x, (str, bytes, bool, numbers.Number, torch.Size,
                                        torch.dtype, torch.device, enum.Enum, range)))


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _is_dataclass_instance(x: Any) -> bool:
    return dataclasses.is_dataclass(x) and not isinstance(x, type)


def _holds_tensor(x: Any, depth: int = 0) -> bool:
    """Whether an object of unknown type keeps a tensor somewhere in its attributes."""
    if isinstance(x, Tensor):
        return True
    if depth > 4 or _is_leaf(x):
        return False
    if isinstance(x, Mapping):
        return any(_holds_tensor(v, depth + 1) for v in x.values())
    if isinstance(x, (list, tuple, set, frozenset)):
        return any(_holds_tensor(v, depth + 1) for v in x)
    attrs = getattr(x, "__dict__", None)
    if isinstance(attrs, dict):
        return any(_holds_tensor(v, depth + 1) for v in attrs.values())
    slots = getattr(type(x), "__slots__", ())
    return any(_holds_tensor(getattr(x, s, None), depth + 1)
               for s in ([slots] if isinstance(slots, str) else slots))


def _as_tensor(x: Any) -> Any:
    """A numpy array (of numbers) as a tensor; anything else unchanged."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(x, np.ndarray) and x.dtype != object:
        return torch.from_numpy(x)
    return x


def compare_outputs(out: Any, ref: Any, *, rtol: float, path: str = "out"
                    ) -> tuple[list[Mismatch], int, float, float, str]:
    """Compare a rewritten model's output ``out`` with the original's ``ref``, everywhere.

    Args:
        out: the rewritten model's output (any nest of tensors and containers).
        ref: the original's output.
        rtol: tolerance of the per-tensor relative error.
        path: the name of the root in messages.

    Returns:
        ``(mismatches, tensors compared, max abs error, worst relative error, its path)``.

    Raises:
        VerificationError: an output of unknown type holds tensors (it cannot be compared).
    """
    tally = _Tally(rtol)
    _compare(out, ref, path, tally)
    return tally.mismatches, tally.compared, tally.max_abs, tally.rel, tally.worst


def _compare(out: Any, ref: Any, path: str, tally: _Tally) -> None:
    out, ref = _as_tensor(out), _as_tensor(ref)
    if isinstance(ref, Tensor) or isinstance(out, Tensor):
        if not (isinstance(ref, Tensor) and isinstance(out, Tensor)):
            tally.fail(path, "structure", f"the original returns {_type_name(ref)}, the "
                                          f"rewritten model {_type_name(out)}")
            return
        _compare_tensors(out, ref, path, tally)
    elif _is_leaf(ref) or _is_leaf(out):
        _compare_leaves(out, ref, path, tally)
    elif isinstance(ref, Mapping) or isinstance(out, Mapping):
        _compare_mappings(out, ref, path, tally)
    elif _is_namedtuple(ref) or _is_namedtuple(out) or _is_dataclass_instance(ref) \
            or _is_dataclass_instance(out):
        _compare_records(out, ref, path, tally)
    elif isinstance(ref, (list, tuple)) or isinstance(out, (list, tuple)):
        if not (isinstance(ref, (list, tuple)) and isinstance(out, (list, tuple))):
            tally.fail(path, "structure", f"the original returns {_type_name(ref)}, the "
                                          f"rewritten model {_type_name(out)}")
            return
        if len(ref) != len(out):
            tally.fail(path, "structure", f"the original returns {len(ref)} items, the "
                                          f"rewritten model {len(out)}")
            return
        for i, (a, b) in enumerate(zip(out, ref)):
            _compare(a, b, f"{path}[{i}]", tally)
    else:
        _compare_unknown(out, ref, path, tally)


def _compare_mappings(out: Any, ref: Any, path: str, tally: _Tally) -> None:
    if not (isinstance(ref, Mapping) and isinstance(out, Mapping)):
        tally.fail(path, "structure", f"the original returns {_type_name(ref)}, the "
                                      f"rewritten model {_type_name(out)}")
        return
    for key in ref:
        sub = f"{path}[{key!r}]"
        if key not in out:
            tally.fail(sub, "structure", "missing from the rewritten model's output")
        else:
            _compare(out[key], ref[key], sub, tally)
    for key in out:
        if key not in ref:
            tally.fail(f"{path}[{key!r}]", "structure",
                       "in the rewritten model's output but not in the original's")


def _record_fields(x: Any) -> list[str]:
    if _is_namedtuple(x):
        return list(type(x)._fields)
    return [f.name for f in dataclasses.fields(x)]


def _compare_records(out: Any, ref: Any, path: str, tally: _Tally) -> None:
    """Namedtuples and dataclasses: same type, then field by field (``path.field``)."""
    if type(out) is not type(ref):
        tally.fail(path, "structure", f"the original returns {_type_name(ref)}, the "
                                      f"rewritten model {_type_name(out)}")
        return
    for name in _record_fields(ref):
        _compare(getattr(out, name), getattr(ref, name), f"{path}.{name}", tally)


def _compare_leaves(out: Any, ref: Any, path: str, tally: _Tally) -> None:
    numeric = (isinstance(out, numbers.Number) and isinstance(ref, numbers.Number)
               and not isinstance(out, bool) and not isinstance(ref, bool))
    if numeric:
        if isinstance(out, numbers.Integral) and isinstance(ref, numbers.Integral):
            same = out == ref
        else:
            a, b = complex(out), complex(ref)
            same = (a == b or (math.isnan(abs(a)) and math.isnan(abs(b)))
                    or abs(a - b) <= tally.rtol * abs(b))
        if not same:
            tally.fail(path, "values", f"the original returns {ref!r}, the rewritten model "
                                       f"{out!r}")
        return
    if type(out) is not type(ref):
        tally.fail(path, "structure", f"the original returns {_type_name(ref)} {ref!r}, the "
                                      f"rewritten model {_type_name(out)} {out!r}")
    elif out != ref:
        tally.fail(path, "values", f"the original returns {ref!r}, the rewritten model {out!r}")


def _compare_unknown(out: Any, ref: Any, path: str, tally: _Tally) -> None:
    if _holds_tensor(ref) or _holds_tensor(out):
        raise VerificationError(
            f"cannot compare {path}: an object of type {type(ref).__module__}."
            f"{type(ref).__qualname__} that holds tensors; return tensors (or dicts, tuples, "
            "namedtuples, dataclasses of them) from forward, pass a wrapper that does, or "
            "pass verify=False")
    if type(out) is not type(ref):
        tally.fail(path, "structure", f"the original returns {_type_name(ref)}, the "
                                      f"rewritten model {_type_name(out)}")
        return
    try:
        same = bool(out == ref)
    except Exception as exc:  # noqa: BLE001 - a foreign __eq__
        raise VerificationError(
            f"cannot compare {path}: {_type_name(ref)} objects do not compare ({exc}); pass "
            "verify=False") from exc
    if not same:
        tally.fail(path, "values", f"the original returns {ref!r}, the rewritten model {out!r}")


def _first_index(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def _compare_tensors(out: Tensor, ref: Tensor, path: str, tally: _Tally) -> None:
    if out.shape != ref.shape:
        tally.fail(path, "shape", f"shape {list(ref.shape)} in the original, "
                                  f"{list(out.shape)} in the rewritten model")
        return
    if out.dtype != ref.dtype:
        tally.fail(path, "dtype", f"dtype {ref.dtype} in the original, {out.dtype} in the "
                                  "rewritten model")
        return
    tally.compared += 1
    a, b = _plain(out.detach()).to(ref.device), _plain(ref.detach())
    if not (a.is_floating_point() or a.is_complex()):
        differ = a != b
        count = int(differ.sum())
        if count:
            idx = _first_index(differ)
            tally.fail(path, "values", f"{count} of {a.numel()} {a.dtype} values differ (first "
                                       f"at index {list(idx)}: {b[idx].item()!r} in the "
                                       f"original, {a[idx].item()!r} in the rewritten model)")
        return
    diff, rel, bad = _errors(a, b)
    if bad is not None:
        count = int(bad.sum())
        idx = _first_index(bad)
        tally.fail(path, "nonfinite",
                   f"{count} value(s) non-finite in one model and not the same at that place in "
                   f"the other (first at index {list(idx)}: {_scalar(b[idx])} in the original, "
                   f"{_scalar(a[idx])} in the rewritten model)")
    tally.max_abs = max(tally.max_abs, diff)
    if rel > tally.rel or not tally.worst:
        tally.rel, tally.worst = rel, path
    if bad is None and rel > tally.rtol:
        tally.fail(path, "tolerance", f"relative error {rel:.3g} > rtol {tally.rtol:g} "
                                      f"(max abs {diff:.3g})")


def _scalar(x: Tensor) -> str:
    v = x.item()
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _plain(t: Tensor) -> Tensor:
    """A dense, non-quantized tensor."""
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t


def _errors(a: Tensor, b: Tensor) -> tuple[float, float, Tensor | None]:
    """(max abs error, relative error, mask of non-finite disagreements or None) of ``a``
    against the reference ``b``; the errors are inf when non-finite values disagree."""
    complex_ = a.is_complex()
    if complex_:  # real and imaginary parts side by side in a last dimension
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    bad: Tensor | None = None
    both = None
    if not (bool(fa.all()) and bool(fb.all())):
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        mask = ~(fa & fb) & ~same
        if bool(mask.any()):
            bad = mask.any(-1) if complex_ else mask
        both = fa & fb
    if both is not None:
        a, b = a[both], b[both]
    if a.numel() == 0:
        diff, scale = 0.0, 0.0
    else:
        a64, b64 = a.double(), b.double()
        diff = (a64 - b64).abs().max().item()
        scale = b64.abs().max().item()
    rel = diff / max(scale, 1e-12)
    if bad is not None:
        return math.inf, math.inf, bad
    return diff, rel, None


def relative_error(out: Tensor, ref: Tensor) -> tuple[float, float]:
    """(max ``|out − ref|``, that divided by max ``|ref|``) in float64, over the places where
    both are finite; both are inf when a non-finite value of one is not matched by the same
    value at the same place in the other."""
    diff, rel, _ = _errors(_plain(out.detach()).to(ref.device), _plain(ref.detach()))
    return diff, rel


# -- running ---------------------------------------------------------------------------------

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


def _tree_map_tensors(obj: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor in a nest of tuples, lists, dicts (other leaves as is)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if _is_namedtuple(obj):
        return type(obj)(*(_tree_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        mapped = copy.copy(obj)  # keeps the type (OrderedDict, ModelOutput ...)
        for k, v in obj.items():
            mapped[k] = _tree_map_tensors(v, fn)
        return mapped
    return obj


def _clone(obj: Any) -> Any:
    return _tree_map_tensors(obj, lambda t: t.detach().clone())


def _cuda_devices(model: nn.Module, inputs: Any) -> list[int]:
    tensors = list(model.parameters()) + list(model.buffers()) + list(iter_tensors(inputs))
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _run(model: nn.Module, inputs: Inputs, kwargs: Mapping[str, Any]) -> Any:
    """One forward on fresh copies of the inputs, under a fixed RNG seed, without gradients."""
    args, kw = _clone(tuple(inputs)), _clone(dict(kwargs))
    with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(model, (args, kw))):
        torch.manual_seed(_SEED)
        return model(*args, **kw)


_NO_REFERENCE = object()


def run_reference(model: nn.Module, inputs: Inputs, kwargs: Mapping[str, Any] | None = None
                  ) -> Any:
    """``model``'s output as the check computes it (no grad, inputs cloned, fixed RNG seed):
    a reference recorded once and reused by :func:`verify_equivalence` (``reference=``)."""
    return _run(model, inputs, dict(kwargs or {}))


def verify_equivalence(original: nn.Module | None, rewritten: nn.Module, inputs: Inputs, *,
                       rtol: float = 1e-4, layer_pairs: Sequence[tuple[str, str]] = (),
                       raise_on_fail: bool = True,
                       kwargs: Mapping[str, Any] | None = None,
                       reference: Any = _NO_REFERENCE) -> Verification:
    """Compare eval-mode outputs of ``original`` and ``rewritten`` on ``inputs``.

    Both models run in eval mode without gradients on their own copy of the inputs, with the
    same RNG seed; every module's training flag is restored afterwards. Every output is
    compared (see the module docstring): structure, shapes, dtypes, non-finite values, and a
    per-output relative error ``max|a − b| / max|b|`` against ``rtol``. On failure, forward
    hooks on ``layer_pairs`` (``(name in original, name in rewritten)``) find the first layer
    whose output disagrees.

    Args:
        original: the reference model.
        rewritten: the model to check.
        inputs: positional inputs.
        rtol: tolerance of the relative error.
        layer_pairs: layers to compare on failure, in any order (execution order is used).
        raise_on_fail: raise on failure instead of returning a failed result.
        kwargs: keyword inputs, passed to both models.
        reference: the original's output on ``inputs``, recorded earlier with
            :func:`run_reference` (saves a copy and a run of the original); ``original`` is then
            only run to find the first disagreeing layer of a failed check (None: not searched).

    Returns:
        The result (``passed``, errors, the worst output's path, the number of tensors
        compared, the mismatches, the first disagreeing layer).

    Raises:
        NumericalMismatchError: the check failed and ``raise_on_fail``.
        VerificationError: an output cannot be compared (an object of unknown type that holds
            tensors).
    """
    kw = dict(kwargs or {})
    if reference is _NO_REFERENCE:
        if original is None:
            raise ValueError("verify_equivalence: pass the original model or its reference "
                             "output")
        with eval_mode(original, rewritten):
            ref = _run(original, inputs, kw)
            out = _run(rewritten, inputs, kw)
    else:
        ref = reference
        with eval_mode(rewritten):
            out = _run(rewritten, inputs, kw)
    mismatches, compared, max_abs, rel, worst = compare_outputs(out, ref, rtol=rtol)
    if compared == 0:
        mismatches.append(Mismatch("out", "empty", "out: no tensor was compared (the outputs "
                                                   "hold none), so nothing is verified"))
    shapes = [list(t.shape) for t in iter_tensors((tuple(inputs), kw))]
    result = Verification(max_abs, rel, rtol, not mismatches, shapes, tensors_compared=compared,
                          worst_output=worst, mismatches=mismatches)
    if not result.passed and original is not None:
        result.batch_stat_norms = batch_stat_norms(original)
        (result.worst_layer, result.worst_layer_rel,
         result.layers_checked) = _worst_layer(original, rewritten, inputs, kw, layer_pairs)
        log.info("verification failed: %s", result.message())
        if raise_on_fail:
            raise NumericalMismatchError(result.message())
    return result


def _worst_layer(original: nn.Module, rewritten: nn.Module, inputs: Inputs,
                 kwargs: Mapping[str, Any], layer_pairs: Sequence[tuple[str, str]]
                 ) -> tuple[str, float, int]:
    """First layer (in execution order) whose output differs by more than ``LAYER_RTOL``
    relative (or in structure, or in non-finite values), else the worst one; with the number
    of layers compared."""
    if not layer_pairs:
        return "", 0.0, 0
    a_out: dict[str, Any] = {}
    b_out: dict[str, Any] = {}
    order: list[str] = []
    hooks = []

    def grab(store: dict[str, Any], name: str, record: bool) -> Any:
        def hook(_m: nn.Module, _i: Any, o: Any) -> None:
            if name not in store:  # the first call; cloned, as in-place ops may follow
                store[name] = _clone(o)
                if record:
                    order.append(name)
        return hook

    try:
        for oname, rname in layer_pairs:
            try:
                a_mod, b_mod = original.get_submodule(oname), rewritten.get_submodule(rname)
            except AttributeError:
                log.debug("layer pair (%s, %s) not found; not compared", oname, rname)
                continue
            hooks.append(a_mod.register_forward_hook(grab(a_out, oname, True)))
            hooks.append(b_mod.register_forward_hook(grab(b_out, oname, False)))
        with eval_mode(original, rewritten):
            _run(original, inputs, kwargs)
            _run(rewritten, inputs, kwargs)
    finally:
        for h in hooks:
            h.remove()
    worst, worst_rel, checked = "", 0.0, 0
    for name in order:
        if name not in b_out:
            continue
        try:
            found, compared, _, rel, _ = compare_outputs(b_out[name], a_out[name],
                                                         rtol=LAYER_RTOL, path=name)
        except VerificationError:
            continue
        if compared == 0:
            continue
        checked += 1
        if any(m.kind in HARD_KINDS or m.kind == "shape" for m in found):
            return name, math.inf, checked
        if rel > LAYER_RTOL:
            return name, rel, checked
        if rel > worst_rel or not worst:
            worst, worst_rel = name, rel
    return worst, worst_rel, checked
