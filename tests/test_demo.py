"""The README's main job: `normswap demo` on the embedded digits CNN."""

from __future__ import annotations

from pathlib import Path

import pytest

from normswap.cli import main
from normswap.demo import run_demo


def test_demo_rows_keep_accuracy_for_exact_methods(tmp_path: Path) -> None:
    rows = {r.method: r for r in run_demo(out_dir=str(tmp_path))}
    assert set(rows) >= {"l1", "linf", "kalman", "normprop", "selu"}
    base = rows["l1"].acc_before
    assert base > 0.95  # the shipped checkpoint is a trained model, not noise
    for name in ("l1", "linf", "kalman", "normprop"):
        r = rows[name]
        assert r.verdict.startswith("eval-exact"), r
        assert float(r.rel_err) < 1e-4
        assert abs(r.acc_after - base) < 1e-9, name
    assert rows["selu"].rel_err == "n/a" and "fine-tuned" in rows["selu"].verdict
    assert float(rows["selu"].acc_finetuned) > 0.9  # a short fine-tune recovers the function
    onnx_row = rows["l1 -> fold -> fp16 ONNX"]
    assert "pass" in onnx_row.verdict.lower()
    assert abs(onnx_row.acc_after - base) <= 0.01
    assert (tmp_path / "demo_l1_fp16.onnx").is_file()


def test_demo_cli_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--no-export"]) == 0
    out = capsys.readouterr().out
    for name in ("l1", "linf", "kalman", "normprop", "selu"):
        assert f"\n{name} " in out
    assert "acc before" in out
