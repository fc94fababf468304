"""verify_equivalence: every output compared, NaN/inf never pass, structure and paths named."""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from normswap.errors import NumericalMismatchError, VerificationError
from normswap.verify import (
    Verification,
    batch_stat_norms,
    compare_outputs,
    default_example_inputs,
    relative_error,
    verify_equivalence,
)
from tests.conftest import randomize_bn

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Returns(nn.Module):
    """A model whose output is ``build(x)``: any structure, for the comparison tests."""

    def __init__(self, build: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.build = build

    def forward(self, x: Tensor) -> Any:
        return self.build(x)


def _check(ref: Callable[[Tensor], Any], out: Callable[[Tensor], Any], **kw: Any
           ) -> Verification:
    kw.setdefault("raise_on_fail", False)
    return verify_equivalence(Returns(ref), Returns(out), (X,), **kw)


def _conv_bn() -> nn.Sequential:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)).eval())


# -- a real equivalent rewrite passes, with a small but non-zero error ------------------------

def test_folded_conv_bn_passes_with_its_real_error() -> None:
    model = _conv_bn()
    fused = nn.Sequential(torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1]),
                          nn.ReLU(), torch.nn.utils.fusion.fuse_conv_bn_eval(model[3], model[4]))
    res = verify_equivalence(model, fused, (X,), rtol=1e-4)
    assert res.passed and res.mismatches == []
    assert 0.0 < res.rel < 1e-5 and res.max_abs > 0.0
    assert res.tensors_compared == 1 and res.worst_output == "out"
    assert res.input_shapes == [[4, 3, 8, 8]]
    metrics = res.as_metrics()
    assert metrics["verify.tensors_compared"] == 1 and metrics["verify.worst_output"] == "out"
    assert metrics["verify.passed"] is True and metrics["verify.mismatches"] == []
    assert res.message() == ""


# -- NaN and inf ------------------------------------------------------------------------------

def _poison(value: float, index: tuple[int, ...] = (1, 2, 3, 4)) -> Callable[[Tensor], Tensor]:
    def build(x: Tensor) -> Tensor:
        y = x.clone()
        y[index] = value
        return y
    return build


def test_nan_in_the_rewritten_output_fails_with_count_and_index() -> None:
    assert max(0.0, float("nan")) == 0.0  # why the old max-based check passed NaN
    res = _check(lambda x: x, _poison(float("nan")))
    assert not res.passed
    assert res.rel == float("inf") and res.max_abs == float("inf")
    assert [m.kind for m in res.mismatches] == ["nonfinite"]
    assert "1 value(s) non-finite" in res.mismatches[0].message
    assert "index [1, 2, 3, 4]" in res.mismatches[0].message
    assert not res.layers_agree
    with pytest.raises(NumericalMismatchError,
                       match=r"out: 1 value\(s\) non-finite .*\[1, 2, 3, 4\]"):
        _check(lambda x: x, _poison(float("nan")), raise_on_fail=True)


def test_whole_output_nan_fails() -> None:
    res = _check(lambda x: x, lambda x: torch.full_like(x, float("nan")))
    assert not res.passed and f"{X.numel()} value(s) non-finite" in res.mismatches[0].message


@pytest.mark.parametrize("ref_value, out_value, passes", [
    (float("inf"), float("inf"), True),      # the same non-finite value at the same place
    (float("-inf"), float("-inf"), True),
    (float("nan"), float("nan"), True),
    (float("inf"), float("-inf"), False),    # sign of the infinity differs
    (float("nan"), 0.5, False),              # the reference is NaN, the rewrite finite
    (float("inf"), 1e30, False),
    (0.5, float("inf"), False),
    (float("nan"), float("inf"), False),
])
def test_nonfinite_values_are_compared_only_for_equality(ref_value: float, out_value: float,
                                                         passes: bool) -> None:
    res = _check(_poison(ref_value), _poison(out_value))
    assert res.passed is passes, res.message()
    if passes:  # the finite places are still compared
        assert res.rel == 0.0 and res.tensors_compared == 1
        res = _check(_poison(ref_value), lambda x: _poison(out_value)(x) * 1.01)
        assert not res.passed and res.mismatches[0].kind == "tolerance"


def test_nonfinite_in_an_fp16_and_a_complex_output() -> None:
    res = _check(lambda x: x.half(), lambda x: _poison(float("inf"))(x).half())
    assert not res.passed and res.mismatches[0].kind == "nonfinite"
    res = _check(lambda x: torch.complex(x, x),
                 lambda x: torch.complex(x, _poison(float("nan"))(x)))
    assert not res.passed and res.mismatches[0].kind == "nonfinite"
    assert _check(lambda x: torch.complex(x, x), lambda x: torch.complex(x, x)).passed


def test_relative_error_reports_inf_for_nonfinite_disagreement() -> None:
    a = torch.tensor([1.0, float("nan")])
    assert relative_error(a, torch.tensor([1.0, 2.0])) == (float("inf"), float("inf"))
    assert relative_error(a, a.clone()) == (0.0, 0.0)
    d, r = relative_error(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0]))
    assert d == pytest.approx(0.5) and r == pytest.approx(0.25)


# -- every output, nested, with paths ---------------------------------------------------------

class Boxes(NamedTuple):
    boxes: Tensor
    labels: Tensor


@dataclass
class Head:
    scores: Tensor
    name: str
    extra: Any = None


def _nested(x: Tensor, *, boxes: float = 0.0, labels: int = 0, scores: float = 0.0,
            logits: float = 0.0, name: str = "head", count: int = 3) -> Any:
    return {
        "logits": x.mean((2, 3)) + logits,
        "detections": [x.sum(), Boxes(x[:, :2, 0, 0] + boxes,
                                      torch.arange(4) + labels)],
        "head": Head(x.amax((1, 2, 3)) * (1 + scores), name, OrderedDict(count=count)),
    }


def test_nested_outputs_all_compared() -> None:
    res = _check(_nested, _nested)
    assert res.passed and res.tensors_compared == 5


@pytest.mark.parametrize("change, path", [
    ({"logits": 1.0}, "out['logits']"),
    ({"boxes": 0.1}, "out['detections'][1].boxes"),
    ({"labels": 1}, "out['detections'][1].labels"),
    ({"scores": 1e-2}, "out['head'].scores"),
    ({"name": "other"}, "out['head'].name"),
    ({"count": 4}, "out['head'].extra['count']"),
])
def test_a_difference_deep_inside_is_found_and_named(change: dict[str, Any], path: str) -> None:
    res = _check(_nested, lambda x: _nested(x, **change))
    assert not res.passed
    assert [m.path for m in res.mismatches] == [path]
    with pytest.raises(NumericalMismatchError, match=f"eval outputs differ: {re.escape(path)}: "):
        _check(_nested, lambda x: _nested(x, **change), raise_on_fail=True)


def test_worst_output_is_the_one_with_the_largest_relative_error() -> None:
    # a large output with a large absolute but tiny relative error, and a small output with a
    # small absolute but large relative error: the small one is the worst
    def ref(x: Tensor) -> Any:
        return (x * 1e4, x * 1e-3)

    def out(x: Tensor) -> Any:
        return (x * 1e4 + 1e-2, x * 1e-3 * 1.5)

    res = _check(ref, out)
    assert res.worst_output == "out[1]" and res.rel == pytest.approx(0.5, rel=1e-5)
    assert 0.005 < res.max_abs < 0.02  # 1e-2 up to float32 rounding at 1e4
    assert [m.path for m in res.mismatches] == ["out[1]"]


def test_integer_and_bool_tensors_are_compared_exactly() -> None:
    def ref(x: Tensor) -> Any:
        return x.argmax(1), x > 0

    res = _check(ref, lambda x: ((x.argmax(1) + (x[:, :1] > 2.5).long()[:, 0]), x > 0))
    assert not res.passed and res.mismatches[0].path == "out[0]"
    assert res.mismatches[0].kind == "values" and "int64 values differ" in res.mismatches[0].message
    res = _check(ref, lambda x: (x.argmax(1), x >= 0.05))
    assert [m.path for m in res.mismatches] == ["out[1]"]


def test_shape_and_dtype_must_match() -> None:
    res = _check(lambda x: x, lambda x: x[:, :2])
    assert res.mismatches[0].kind == "shape" and "[4, 3, 8, 8]" in res.mismatches[0].message
    res = _check(lambda x: x, lambda x: x.double())
    assert res.mismatches[0].kind == "dtype" and "torch.float64" in res.mismatches[0].message
    with pytest.raises(NumericalMismatchError, match=r"out\[1\]: dtype torch.float32"):
        _check(lambda x: (x, x), lambda x: (x, x.half()), raise_on_fail=True)


@pytest.mark.parametrize("ref, out, path, words", [
    (lambda x: {"a": x, "b": x}, lambda x: {"a": x}, "out['b']", "missing"),
    (lambda x: {"a": x}, lambda x: {"a": x, "c": x}, "out['c']", "not in the original"),
    (lambda x: (x, x), lambda x: (x,), "out", "2 items"),
    (lambda x: (x, None), lambda x: (x, x), "out[1]", "NoneType"),
    (lambda x: Boxes(x, x), lambda x: (x, x), "out", "Boxes"),
    (lambda x: [x, {"k": x}], lambda x: [x, x], "out[1]", "dict"),
    (lambda x: (x, 1), lambda x: (x, True), "out[1]", "bool"),
])
def test_structure_mismatch_names_the_path(ref: Any, out: Any, path: str, words: str) -> None:
    res = _check(ref, out)
    assert not res.passed
    assert any(m.path == path and m.kind == "structure" and words in m.message
               for m in res.mismatches), res.mismatches
    assert not res.layers_agree


def test_tuple_and_list_are_interchangeable_and_key_order_does_not_matter() -> None:
    assert _check(lambda x: (x, [x]), lambda x: [x, (x,)]).passed
    res = _check(lambda x: {"a": x, "b": 2 * x}, lambda x: OrderedDict(b=2 * x, a=x))
    assert res.passed and res.tensors_compared == 2


def test_non_tensor_leaves() -> None:
    assert _check(lambda x: (x, 3, "a", None, 1.0), lambda x: (x, 3, "a", None, 1.0 + 1e-7)).passed
    res = _check(lambda x: (x, 1.0), lambda x: (x, 1.1))
    assert res.mismatches[0].path == "out[1]" and res.mismatches[0].kind == "values"
    res = _check(lambda x: (x, torch.Size([2, 3])), lambda x: (x, torch.Size([2, 4])))
    assert res.mismatches[0].path == "out[1]"


def test_numpy_outputs_are_compared() -> None:
    res = _check(lambda x: x.numpy(), lambda x: x.numpy() * 2)
    assert not res.passed and res.tensors_compared == 1 and res.mismatches[0].kind == "tolerance"
    assert _check(lambda x: x.numpy(), lambda x: x.numpy().copy()).passed


def test_transformers_model_output() -> None:
    pytest.importorskip("transformers")
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    def ref(x: Tensor) -> Any:
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x.mean((2, 3)))

    def out(x: Tensor) -> Any:
        return BaseModelOutputWithPooling(last_hidden_state=x,
                                          pooler_output=_poison(float("nan"), (0, 1))(
                                              x.mean((2, 3))))

    assert _check(ref, ref).tensors_compared == 2
    with pytest.raises(NumericalMismatchError, match=r"out\['pooler_output'\]: 1 value"):
        _check(ref, out, raise_on_fail=True)
    # a field that is None in one and a tensor in the other is a structure mismatch
    res = _check(ref, lambda x: BaseModelOutputWithPooling(last_hidden_state=x))
    assert res.mismatches[0].path == "out['pooler_output']"


class Opaque:
    """An output object of a type the check knows nothing about."""

    def __init__(self, t: Tensor) -> None:
        self._data = {"t": t}


def test_unknown_object_holding_tensors_is_an_error_not_a_pass() -> None:
    with pytest.raises(VerificationError, match=r"cannot compare out\[1\]: .*Opaque"):
        _check(lambda x: (x, Opaque(x)), lambda x: (x, Opaque(x)))

    class Plain:  # no tensor inside: compared with ==
        def __eq__(self, other: object) -> bool:
            return isinstance(other, Plain)

    assert _check(lambda x: (x, Plain()), lambda x: (x, Plain())).passed


def test_nothing_compared_is_a_failure() -> None:
    res = _check(lambda x: None, lambda x: None)
    assert not res.passed and res.tensors_compared == 0 and res.mismatches[0].kind == "empty"
    with pytest.raises(NumericalMismatchError, match="no tensor was compared"):
        _check(lambda x: {"n": 3}, lambda x: {"n": 3}, raise_on_fail=True)


# -- hostile models ---------------------------------------------------------------------------

def test_a_model_that_changes_its_input_in_place_does_not_leak_into_the_other() -> None:
    def mutate(x: Tensor) -> Tensor:
        x.mul_(2)
        return x + 1

    res = _check(mutate, mutate)
    assert res.passed
    assert torch.equal(X, torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)))


def test_random_eval_models_see_the_same_draws_and_global_rng_is_kept() -> None:
    state = torch.random.get_rng_state()
    res = _check(lambda x: x + torch.randn_like(x), lambda x: x + torch.randn_like(x))
    assert res.passed
    assert torch.equal(torch.random.get_rng_state(), state)


def test_training_flags_are_restored() -> None:
    a, b = _conv_bn().train(), _conv_bn()
    b[1].train()
    verify_equivalence(a, b, (X,), raise_on_fail=False)
    assert all(m.training for m in a.modules())
    assert [m.training for m in b.modules()] == [False, False, True, False, False, False]


def test_keyword_inputs() -> None:
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, *, image: Tensor) -> Tensor:
            return self.bn(image)

    a = randomize_bn(Kw())
    res = verify_equivalence(a, copy.deepcopy(a), (), kwargs={"image": X})
    assert res.passed and res.input_shapes == [[4, 3, 8, 8]]


# -- the first disagreeing layer --------------------------------------------------------------

class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = torch.relu(self.bn(self.stem(x)))
        seq = y.flatten(2).transpose(1, 2)
        out, (h, _) = self.lstm(seq)  # a layer whose output is a nested tuple
        return {"logits": self.head(out[:, -1]), "h": h}


PAIRS = [("stem", "stem"), ("bn", "bn"), ("lstm", "lstm"), ("head", "head")]


def test_first_disagreeing_layer_with_tuple_outputs() -> None:
    a = randomize_bn(Net()).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.lstm.weight_hh_l0.mul_(1.5)
    res = verify_equivalence(a, b, (X,), layer_pairs=PAIRS, raise_on_fail=False)
    assert not res.passed and res.worst_layer == "lstm" and res.layers_checked == 3
    assert res.worst_layer_rel > 1e-3 and not res.layers_agree
    with pytest.raises(NumericalMismatchError, match="first disagreeing layer is 'lstm'"):
        verify_equivalence(a, b, (X,), layer_pairs=PAIRS)


def test_first_disagreeing_layer_that_makes_nan() -> None:
    a = randomize_bn(Net()).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.bn.running_var[2] = -1.0  # sqrt of a negative variance: NaN from 'bn' on
    res = verify_equivalence(a, b, (X,), layer_pairs=PAIRS, raise_on_fail=False)
    assert res.worst_layer == "bn" and res.worst_layer_rel == float("inf")
    assert {m.kind for m in res.mismatches} == {"nonfinite"}


def test_layers_agree_when_only_post_processing_differs() -> None:
    a = randomize_bn(Net()).eval()

    class Thresholded(nn.Module):
        def __init__(self, net: nn.Module, cut: float) -> None:
            super().__init__()
            self.net, self.cut = net, cut

        def forward(self, x: Tensor) -> Tensor:
            logits = self.net(x)["logits"]
            return (logits > self.cut).long()  # a discontinuous step after the layers

    with torch.no_grad():
        ranked = a(X)["logits"].flatten().sort().values
    ref = Thresholded(a, float(ranked[3]))
    out = Thresholded(copy.deepcopy(a), float(ranked[4]))  # one decision flips
    pairs = [(f"net.{n}", f"net.{n}") for n, _ in PAIRS]
    res = verify_equivalence(ref, out, (X,), layer_pairs=pairs, raise_on_fail=False)
    assert not res.passed and res.mismatches[0].kind == "values"
    assert res.layers_checked == 4 and res.layers_agree


def test_missing_layer_pair_is_ignored() -> None:
    a = randomize_bn(Net()).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.head.bias.add_(1.0)
    res = verify_equivalence(a, b, (X,), layer_pairs=[("nope", "nope"), ("head", "head")],
                             raise_on_fail=False)
    assert res.worst_layer == "head" and res.layers_checked == 1


# -- BatchNorms with batch statistics in eval -------------------------------------------------

def test_batch_stat_norms_are_listed_and_explained() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    assert batch_stat_norms(model) == ["1"]
    assert batch_stat_norms(nn.Sequential(nn.InstanceNorm2d(4), model)) == ["1.1"]
    deleted = nn.BatchNorm1d(3)
    deleted.running_mean = None
    deleted.running_var = None
    assert batch_stat_norms(nn.Sequential(deleted)) == ["0"]
    assert batch_stat_norms(_conv_bn()) == []
    # the rewrite uses fixed statistics: the outputs differ, and the message says why
    fixed = copy.deepcopy(model)
    fixed[1] = nn.BatchNorm2d(4)
    res = verify_equivalence(model, fixed, (X,), raise_on_fail=False)
    assert not res.passed and res.batch_stat_norms == ["1"]
    with pytest.raises(NumericalMismatchError,
                       match=r"without running statistics \('1': track_running_stats=False\)"
                             r".*recalibrate"):
        verify_equivalence(model, fixed, (X,))


def test_compare_outputs_directly_and_default_inputs_importable() -> None:
    found, compared, max_abs, rel, worst = compare_outputs(
        {"a": torch.ones(2)}, {"a": torch.ones(2) * 2}, rtol=1e-4, path="y")
    assert compared == 1 and worst == "y['a']" and rel == pytest.approx(0.5)
    assert found[0].message.startswith("y['a']: relative error 0.5")
    assert max_abs == 1.0
    args = default_example_inputs(_conv_bn())
    assert args is not None and list(args[0].shape) == [2, 3, 64, 64]
    assert np.isfinite(args[0].numpy()).all()
