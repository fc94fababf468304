"""Progress on stderr for long steps, silence for short ones, warnings said once."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from torch import nn

import normswap
from normswap import progress


@pytest.fixture(autouse=True)
def _on(monkeypatch: pytest.MonkeyPatch) -> None:
    progress.set_progress(True)
    yield
    progress.set_progress(None)


def test_a_long_step_is_announced_and_a_short_one_is_not(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "ANNOUNCE_AFTER_S", 0.05)
    with progress.stage("slow step", "detail"):
        time.sleep(0.2)
    with progress.stage("fast step"):
        pass
    err = capsys.readouterr().err
    assert "normswap: slow step (detail) ..." in err and "slow step done (" in err
    assert "fast step" not in err


def test_a_failing_step_says_so(capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "ANNOUNCE_AFTER_S", 0.01)
    with pytest.raises(RuntimeError), progress.stage("doomed"):
        time.sleep(0.05)
        raise RuntimeError("x")
    assert "doomed failed (" in capsys.readouterr().err


def test_swap_shows_its_steps_on_stderr(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "ANNOUNCE_AFTER_S", 0.0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    normswap.swap(model, "l1", example_inputs=torch.randn(2, 3, 8, 8))
    err = capsys.readouterr().err
    for step in ("copy model", "capture", "swap -> l1", "verify"):
        assert f"normswap: {step}" in err, step
    progress.set_progress(False)
    normswap.swap(model, "l1", example_inputs=torch.randn(2, 3, 8, 8))
    assert capsys.readouterr().err == ""


def test_iterate_reports_long_loops_only(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "ANNOUNCE_AFTER_S", 0.05)
    assert list(progress.iterate(range(3), "quick")) == [0, 1, 2]
    assert "quick" not in capsys.readouterr().err
    for _ in progress.iterate(range(2), "slow loop"):
        time.sleep(0.06)
    assert "normswap: slow loop: 2/2" in capsys.readouterr().err


def test_warnings_are_said_once(caplog: pytest.LogCaptureFixture) -> None:
    progress.reset_warnings()
    with caplog.at_level(logging.WARNING):
        assert progress.warn_once("k", "said once") is True
        assert progress.warn_once("k", "said once") is False
    assert [r.message for r in caplog.records].count("said once") == 1


def test_swapping_a_timm_model_logs_no_repeated_warning(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv2_035", pretrained=False).eval()  # BatchNormAct2d
    with caplog.at_level(logging.WARNING):
        out = normswap.swap(model, "l1")
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == len(set(messages)), messages
    assert not any("overrides forward" in m for m in messages)
    assert any("grafted" in c.detail for c in out.normswap_report.changes)
