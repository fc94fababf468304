"""Verdicts that say what they checked, and cannot pass by accident."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from normswap.export import FP16_TOLERANCES, Tolerances, ValidationError, export_onnx
from normswap.export.fp16 import convert_fp16
from normswap.export.onnx_export import export_fp32_proto
from normswap.export.validate import (
    EMULATED,
    compare_outputs,
    flatten_outputs,
    torch_outputs,
    validate_onnx,
)

CPU = "ORT CPUExecutionProvider"


def _pm1_linear() -> nn.Module:
    """±1 weights that cancel: y = Σ (x_2i − x_2i+1), small next to inputs near 1000."""
    lin = nn.Linear(32, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([1.0, -1.0]).repeat(4, 16))
    return lin.eval()


def _near_1000(n: int = 4, seed: int = 0) -> Tensor:
    return 1000 + torch.rand(n, 32, generator=torch.Generator().manual_seed(seed))


def _metric(result, provider: str):
    return next(m for m in result.metrics if m.provider == provider)


def test_pm1_linear_near_1000_fails_fp16_although_ort_cpu_agrees(tmp_path: Path) -> None:
    model, x = _pm1_linear(), _near_1000()
    with pytest.raises(ValidationError) as info:
        export_onnx(model, x, tmp_path / "lin.onnx", n_random=0)
    result = info.value.report.validation
    assert result is not None and result.fp16 and not result.passed
    cpu, emu = _metric(result, CPU), _metric(result, EMULATED)
    # ORT CPU runs the Gemm with fp32 kernels: it sees almost none of the fp16 error
    assert cpu.rel < FP16_TOLERANCES.rel_max and cpu.passed
    # the emulation computes on the fp16-rounded input: the error of rounding x to fp16
    rounded = model(x.half().float()).detach().numpy()
    exact = model(x).detach().numpy()
    expected = np.abs(rounded - exact).max() / np.abs(exact).max()
    assert emu.rel == pytest.approx(expected, rel=0.05) and emu.rel > 0.1
    assert not emu.passed
    assert not list(tmp_path.iterdir())
    text = result.verdict()
    assert "fp16 validation FAILED" in text
    assert "fp16 arithmetic, emulated on CPU" in text
    assert "fp32 kernels, not an fp16 check" in text
    assert "not covered" in text


def test_small_cnn_passes_and_verdict_names_each_evaluator(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).eval()
    x = torch.randn(4, 3, 16, 16)
    report = export_onnx(model, x, tmp_path / "cnn.onnx", calibration_inputs=[x * 2])
    v = report.validation
    assert v is not None and v.passed and v.fp16_checked
    names = [e.name for e in v.evaluators]
    assert names[0] == CPU and EMULATED in names
    emu = next(e for e in v.evaluators if e.name == EMULATED)
    assert emu.checks_fp16 and emu.num_inputs == 4 and emu.of_inputs == 4  # capped at 4 of 4
    assert f"fp16 arithmetic, emulated on CPU ({emu.num_inputs} of {emu.of_inputs} inputs" \
        in emu.description
    cpu = next(e for e in v.evaluators if e.name == CPU)
    assert not cpu.checks_fp16 and "not an fp16 check" in cpu.description
    lo, hi = v.input_ranges["input"] if "input" in v.input_ranges else next(
        iter(v.input_ranges.values()))
    assert lo == pytest.approx(float((x * 2).min())) and hi == pytest.approx(float((x * 2).max()))
    assert "fp16 validation PASSED" in v.verdict()


def test_emulation_budget_records_how_many_inputs(tmp_path: Path) -> None:
    model, x = _pm1_linear(), torch.randn(2, 32)
    report = export_onnx(model, x, tmp_path / "b.onnx", n_random=5, emulate_max_inputs=2)
    emu = next(e for e in report.validation.evaluators if e.name == EMULATED)
    assert (emu.num_inputs, emu.of_inputs) == (2, 6) and "capped at 2" in emu.description
    assert [m.compared for m in report.validation.metrics if m.provider == EMULATED] == [2]


def test_ort_cpu_alone_cannot_pass_an_fp16_verdict(tmp_path: Path) -> None:
    model, x = _pm1_linear(), torch.randn(2, 32)
    proto, _ = export_fp32_proto(model, (x,))
    fp16, _ = convert_fp16(proto, [])
    result = validate_onnx(fp16.SerializeToString(), model, [(x,)], tolerances=FP16_TOLERANCES,
                           emulate=False)
    assert all(m.passed for m in result.metrics)  # every compared output is fine on ORT CPU
    assert not result.passed
    assert any("no evaluator computed the fp16 graph in fp16" in r for r in result.reasons)
    lenient = validate_onnx(fp16.SerializeToString(), model, [(x,)], emulate=False,
                            tolerances=Tolerances(require_fp16_arithmetic=False))
    assert lenient.passed


def _overflow_only_in_fp16() -> onnx.ModelProto:
    """Mul by 300 then by 1/300: fp32 is finite everywhere, the fp16 intermediate is inf."""
    up = numpy_helper.from_array(np.array(300.0, np.float16), "up")
    down = numpy_helper.from_array(np.array(1 / 300, np.float16), "down")
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="in_cast"),
             helper.make_node("Mul", ["x16", "up"], ["big"], name="scale_up"),
             helper.make_node("Mul", ["big", "down"], ["y16"], name="scale_down"),
             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT, name="out_cast")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [up, down])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class _Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 1.0


def test_node_that_overflows_only_in_real_fp16_is_caught() -> None:
    model = _overflow_only_in_fp16()
    x = torch.tensor([[1.0, 250.0, -300.0], [2.0, 3.0, 4.0]])
    result = validate_onnx(model.SerializeToString(), _Identity(), [(x,)],
                           tolerances=FP16_TOLERANCES)
    emu = _metric(result, EMULATED)
    assert emu.nonfinite == 2 and not emu.passed  # 250·300 and −300·300 exceed 65504
    assert any("inf/NaN values where the reference is finite" in f for f in emu.failures)
    assert not result.passed


def test_nonfinite_where_reference_is_finite_fails_but_matching_inf_does_not() -> None:
    ref = [[np.array([1.0, np.inf, 3.0])]]
    same = compare_outputs("p", ["y"], [[np.array([1.0, np.inf, 3.0])]], ref, FP16_TOLERANCES)[0]
    assert same.passed and same.nonfinite == 0
    bad = compare_outputs("p", ["y"], [[np.array([np.nan, np.inf, 3.0])]], ref,
                          FP16_TOLERANCES)[0]
    assert not bad.passed and bad.nonfinite == 1
    flipped = compare_outputs("p", ["y"], [[np.array([1.0, -np.inf, 3.0])]], ref,
                              FP16_TOLERANCES)[0]
    assert not flipped.passed and "differ where the reference is inf/NaN" in flipped.failures[0]


def test_shape_mismatch_and_missing_output_fail() -> None:
    shape = compare_outputs("p", ["y"], [[np.zeros((2, 3))]], [[np.zeros((3, 2))]],
                            FP16_TOLERANCES)[0]
    assert not shape.passed and "shape" in shape.failures[0]
    missing = compare_outputs("p", ["a", "b"], [[np.zeros(2)]], [[np.zeros(2), np.zeros(2)]],
                              FP16_TOLERANCES)
    assert not missing[1].passed and missing[1].compared == 0


def test_output_count_mismatch_fails() -> None:
    model, x = _pm1_linear(), torch.randn(2, 32)
    proto, _ = export_fp32_proto(model, (x,))
    refs = [[np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32)]]
    result = validate_onnx(proto.SerializeToString(), None, [(x,)], references=refs,
                           tolerances=FP16_TOLERANCES)
    assert not result.passed and any("1 ONNX outputs vs 2 PyTorch outputs" in r
                                     for r in result.reasons)


def test_validation_that_compares_nothing_fails() -> None:
    model, x = _pm1_linear(), torch.randn(2, 32)
    proto, _ = export_fp32_proto(model, (x,))
    empty = validate_onnx(proto.SerializeToString(), model, [], tolerances=FP16_TOLERANCES)
    assert not empty.passed and any("empty" in r for r in empty.reasons)
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      [2])], [])
    no_out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = validate_onnx(no_out.SerializeToString(), None, [(torch.zeros(2),)],
                           references=[[]], tolerances=FP16_TOLERANCES)
    assert not result.passed and any("no output" in r for r in result.reasons)


Pair = collections.namedtuple("Pair", "left right")


@dataclasses.dataclass
class Heads:
    logits: Tensor
    extra: dict


class _ManyOutputs(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(6, 4)

    def forward(self, x: Tensor):
        y = self.lin(x)
        if self.kind == "dict":
            return {"a": y, "b": [y.relu(), y * 2]}
        if self.kind == "namedtuple":
            return Pair(y, (y - 1, None, torch.tanh(y)))
        return Heads(y, {"sig": torch.sigmoid(y), "sq": y.abs() + 1})


def test_flatten_outputs_walks_every_container() -> None:
    out = Heads(torch.ones(1), {"p": Pair(torch.zeros(1), [torch.ones(2)]), "n": None, "k": 3})
    labels = [label for label, _ in flatten_outputs(out)]
    assert labels == ["['logits']", "['extra']['p'].left", "['extra']['p'].right[0]"]
    assert flatten_outputs(torch.zeros(1))[0][0] == "output"


@pytest.mark.parametrize("kind", ["dict", "namedtuple", "dataclass"])
def test_every_output_is_compared(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _ManyOutputs(kind).eval()
    x = torch.randn(3, 6)
    n = len(torch_outputs(model, (x,)))
    assert n == 3
    report = export_onnx(model, x, tmp_path / f"{kind}.onnx")
    v = report.validation
    assert v is not None and v.passed
    for evaluator in (CPU, EMULATED):
        mine = [m for m in v.metrics if m.provider == evaluator]
        assert len(mine) == n and all(m.compared > 0 for m in mine)
    assert len(onnx.load(str(tmp_path / f"{kind}.onnx")).graph.output) == n
    assert len({m.label for m in v.metrics}) == n
