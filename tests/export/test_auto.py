"""fp16="auto": a short list of extra fp32 nodes, found by measured error, until it passes."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto
from torch import Tensor, nn

from normswap.export import ValidationError, export_onnx
from normswap.export.validate import EMULATED


class _OverflowsInFp16(nn.Module):
    """A conv reaching |x| ~ 1e5 and a square of values ~ 300, both scaled back down."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        with torch.no_grad():
            self.conv.weight.mul_(1e5)
        self.mid = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x) * 1e-4                   # the conv output overflows fp16, y does not
        z = self.mid(y) * 300.0
        z = (z * z) * 1e-4                         # squares of ~300 overflow fp16
        return self.head(z.mean(dim=(2, 3)))


def _model_and_input() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = _OverflowsInFp16().eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert float(model.conv(x).abs().max()) > 65504
    return model, x


def test_range_plan_with_a_high_limit_fails_in_fp16(tmp_path: Path) -> None:
    model, x = _model_and_input()
    with pytest.raises(ValidationError) as info:
        export_onnx(model, x, tmp_path / "m.onnx", overflow_limit=1e9)
    emu = [m for m in info.value.report.validation.metrics if m.provider == EMULATED]
    assert emu and not emu[0].passed


def test_auto_ends_with_a_passing_verdict_and_a_short_node_list(tmp_path: Path) -> None:
    model, x = _model_and_input()
    path = tmp_path / "auto.onnx"
    report = export_onnx(model, x, path, fp16="auto", overflow_limit=1e9)
    assert report.passed is True
    auto = report.auto
    assert auto is not None and auto["passed"] and auto["stopped_by"] == "passed"
    assert 1 <= auto["iterations"] <= 4 and auto["seconds"] > 0
    nodes = auto["nodes"]
    assert 1 <= len(nodes) <= 8
    ops = {report.node_ops[n] for n in nodes}
    assert "Conv" in ops  # the conv whose output overflows
    assert all(n in report.fp32_nodes and "auto" in report.fp32_nodes[n] for n in nodes)
    assert [h["passed"] for h in auto["history"]][-1] is True
    # the written model computes those nodes in fp32
    saved = onnx.load(str(path))
    conv = next(n for n in saved.graph.node if n.name in nodes and n.op_type == "Conv")
    weights = {i.name: i.data_type for i in saved.graph.initializer}
    producer = {o: n for n in saved.graph.node for o in n.output}
    weight = conv.input[1]
    while weight not in weights:  # ORT's converter feeds it through an fp32 -> fp32 Cast
        weight = producer[weight].input[0]
    assert weights[weight] == TensorProto.FLOAT
    assert any("fp16 auto" in n.message for n in report.notes)


def test_auto_is_a_no_op_when_the_range_plan_passes(tmp_path: Path) -> None:
    model, x = _model_and_input()
    report = export_onnx(model, x, tmp_path / "plain.onnx", fp16="auto")
    assert report.passed is True and report.auto is None


def test_bad_fp16_value_is_refused(tmp_path: Path) -> None:
    from normswap.errors import ExportError

    model, x = _model_and_input()
    with pytest.raises(ExportError, match="fp16='yes'"):
        export_onnx(model, x, tmp_path / "x.onnx", fp16="yes")  # type: ignore[arg-type]
