"""The export report: op counts, sizes, fold entries, fp16 plan, validation table, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import normswap
from normswap._fs import OutputPathError
from normswap.errors import ExportError
from normswap.export import export_onnx
from tests.conftest import randomize_bn


class _HotNet(nn.Module):
    """Conv + BN (folds), then a conv whose output exceeds the overflow limit (kept fp32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.bn = nn.BatchNorm2d(64)
        self.hot = nn.Conv2d(64, 64, 1)
        with torch.no_grad():
            self.hot.weight.mul_(1e5)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(self.hot(y) * 1e-5)


@pytest.fixture(scope="module")
def report_and_dir(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    model = _HotNet().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 12, 12) * 3
    folded = normswap.fold(model, example_inputs=x)
    d = tmp_path_factory.mktemp("rep")
    return export_onnx(folded, x, d / "hot.onnx"), d


def test_report_carries_ops_sizes_fold_and_plan(report_and_dir) -> None:
    report, _ = report_and_dir
    assert report.ops_before["Conv"] == 2 and "Cast" not in report.ops_before
    assert report.ops_after["Conv"] == 2 and report.ops_after.get("Cast", 0) >= 2
    assert ("Conv", 2, 2) in report.op_table()
    assert report.size_before_bytes > report.file_size_bytes > 0  # fp16 halves the weights
    assert report.fold_entries and any(e["kind"] == "change" for e in report.fold_entries)
    hot = [n for n, r in report.fp32_nodes.items() if "reaches |x|" in r]
    assert hot and report.node_ops[hot[0]] == "Conv"
    assert report.node_ranges[hot[0]][0] > report.overflow_limit
    rows = report.validation.rows()
    assert {r["evaluator"] for r in rows} >= {"ORT CPUExecutionProvider", "fp16 emulated"}


def test_report_writes_json_md_html(report_and_dir) -> None:
    report, d = report_and_dir
    data = json.loads(report.write(d / "r.json").read_text())
    assert data["ops_before"]["Conv"] == 2 and data["fold_entries"]
    assert data["validation"]["evaluators"][0]["name"] == "ORT CPUExecutionProvider"
    assert data["validation"]["passed"] is True and "verdict" in data["validation"]
    md = report.write(d / "r.md").read_text()
    for needle in ("## Operators", "| Conv | 2 | 2 |", "## Fold", "## fp16 plan",
                   "reaches |x|", "## Validation", "fp16 emulated", "not an fp16 check"):
        assert needle in md.replace("\\|", "|"), needle
    page = report.write(d / "r.html").read_text()
    assert page.startswith("<!doctype html>") and "<table>" in page and "fp16 emulated" in page
    with pytest.raises(OutputPathError):
        report.write(d / "r.md")
    report.write(d / "r.md", force=True)
    with pytest.raises(ExportError, match=r"\.txt"):
        report.write(d / "r.txt")


def test_plot_ranges_writes_a_png(report_and_dir) -> None:
    pytest.importorskip("matplotlib")
    report, d = report_and_dir
    path = report.plot_ranges(d / "ranges.png")
    head = path.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_plot_ranges_needs_ranges(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    report = export_onnx(nn.Linear(4, 2).eval(), torch.randn(2, 4), tmp_path / "l.onnx",
                         fp16=False)
    assert report.ops_before == report.ops_after
    with pytest.raises(ExportError, match="no node range"):
        report.plot_ranges(tmp_path / "x.png")
