"""recalibrate: running statistics re-estimated on data, everything else restored."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import Tensor, nn

import normswap.progress
from normswap.calibrate import recalibrate, running_stat_modules
from normswap.errors import NormswapError
from normswap.progress import set_progress
from normswap.report import PassReport

MEAN = torch.tensor([1.0, -2.0, 0.5])
STD = torch.tensor([0.5, 2.0, 1.0])


def _batches(n: int = 20, size: int = 32, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 6, 6, generator=g) * STD.view(1, 3, 1, 1) + MEAN.view(1, 3, 1, 1)
            for _ in range(n)]


def _model() -> nn.Sequential:
    # Dropout BEFORE the BN: if it were active, the BN would see rescaled, zeroed inputs and
    # its variance would be inflated.
    return nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(3, momentum=0.1), nn.Conv2d(3, 4, 1),
                         nn.BatchNorm2d(4))


def test_running_stats_match_the_data_moments() -> None:
    model = _model().train()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = _batches()
    out = recalibrate(model, batches, progress=False)
    assert out is model  # in place
    bn = model[1]
    data = torch.cat(batches)
    # cumulative average: mean of equal-size batch means = the data mean; variance = the mean
    # of the per-batch unbiased variances
    torch.testing.assert_close(bn.running_mean, data.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    per_batch_var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch_var, rtol=1e-5, atol=1e-5)
    # and the known moments of the generating distribution
    torch.testing.assert_close(bn.running_mean, MEAN, rtol=0, atol=0.05)
    torch.testing.assert_close(bn.running_var, STD**2, rtol=0.05, atol=0)
    assert int(bn.num_batches_tracked) == len(batches)
    # restored: momentum, modes; no parameter changed
    assert bn.momentum == 0.1 and model[3].momentum == 0.1
    assert all(m.training for m in model.modules())
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k


def test_eval_model_stays_eval_and_dropout_stays_off() -> None:
    model = _model().eval()
    recalibrate(model, _batches(5), progress=False)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model[1].running_var, STD**2, rtol=0.1, atol=0)


def test_momentum_num_batches_and_batch_forms() -> None:
    batches = _batches(4)
    model = _model()
    recalibrate(model, batches, momentum=1.0, progress=False)  # EMA with m=1: the last batch
    torch.testing.assert_close(model[1].running_mean, batches[-1].mean((0, 2, 3)))
    assert model[1].momentum == 0.1
    model = _model()
    pairs = [(b, torch.zeros(len(b))) for b in batches]
    recalibrate(model, pairs, num_batches=1, progress=False)
    torch.testing.assert_close(model[1].running_mean, batches[0].mean((0, 2, 3)))
    assert int(model[1].num_batches_tracked) == 1

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, *, image: Tensor) -> Tensor:
            return self.bn(image)

    kw = Keyword()
    recalibrate(kw, [{"image": b} for b in batches], progress=False)
    torch.testing.assert_close(kw.bn.running_mean, torch.cat(batches).mean((0, 2, 3)))


def test_reset_false_continues_the_average() -> None:
    batches = _batches(4)
    model = _model()
    recalibrate(model, batches[:2], progress=False)
    recalibrate(model, batches[2:], progress=False, reset=False)
    torch.testing.assert_close(model[1].running_mean, torch.cat(batches).mean((0, 2, 3)))


class _ScaleNorm(nn.Module):
    """Stand-in for a normswap layer: running_mean and running_scale (mean |x − μ|) buffers."""

    def __init__(self, c: int, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_scale", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_scale.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        dims = [0] + list(range(2, x.dim()))
        if self.training:
            mean = x.mean(dims)
            scale = (x - mean.view(1, -1, *[1] * (x.dim() - 2))).abs().mean(dims)
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(
                self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_scale.mul_(1 - m).add_(m * scale)
        else:
            mean, scale = self.running_mean, self.running_scale
        shape = (1, -1, *[1] * (x.dim() - 2))
        return (x - mean.view(shape)) / scale.view(shape)


def test_generic_layer_with_running_scale() -> None:
    layer = _ScaleNorm(3, momentum=0.3)
    model = nn.Sequential(nn.Dropout(0.5), layer).eval()
    assert running_stat_modules(model) == [("1", layer)]
    batches = _batches(10)
    recalibrate(model, batches, progress=False)
    data = torch.cat(batches)
    torch.testing.assert_close(layer.running_mean, data.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    mad = (STD * (2 / torch.pi) ** 0.5)  # E|x − μ| of a Gaussian
    torch.testing.assert_close(layer.running_scale, mad, rtol=0.05, atol=0)
    assert layer.momentum == 0.3 and not layer.training


def test_no_batches_raises_and_keeps_the_statistics() -> None:
    model = _model()
    with torch.no_grad():
        model[1].running_mean.fill_(7.0)
    with pytest.raises(NormswapError, match="no batches"):
        recalibrate(model, [], progress=False)
    assert torch.equal(model[1].running_mean, torch.full((3,), 7.0))
    assert model[1].momentum == 0.1 and model.training
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate(model, _batches(1), num_batches=0)
    with pytest.raises(NormswapError, match="cannot feed"):
        recalibrate(model, [3.0], progress=False)


def test_progress_goes_through_normswap_progress(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    model = _model()
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: status lines
    monkeypatch.setattr(normswap.progress, "ANNOUNCE_AFTER_S", 0.0)  # announce at once
    set_progress(True)
    try:
        recalibrate(model, _batches(12), progress=True)
        assert "normswap: recalibrate: 10/12" in capsys.readouterr().err
        recalibrate(model, _batches(12), progress=False)
        assert "recalibrate" not in capsys.readouterr().err
    finally:
        set_progress(None)
    torch.testing.assert_close(model[1].running_mean, MEAN, rtol=0, atol=0.1)


def test_model_without_norm_layers_is_returned_unchanged(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    model = nn.Linear(3, 3)
    with caplog.at_level(logging.WARNING, logger="normswap.calibrate"):
        assert recalibrate(model, [torch.randn(2, 3)]) is model
    assert "nothing to do" in caplog.text


def test_empty_batches_are_skipped() -> None:
    bn = nn.BatchNorm1d(3)
    data = torch.randn(64, 3) * 2 + 1
    recalibrate(bn, [torch.empty(0, 3), data, (torch.empty(0, 3), None)], progress=False)
    torch.testing.assert_close(bn.running_mean, data.mean(0))


def _with_nan(batches: list[Tensor], index: int) -> list[Tensor]:
    out = [b.clone() for b in batches]
    out[index][3, 1, 2, 2] = float("nan")
    return out


def test_nonfinite_input_batch_is_refused_by_index_and_nothing_changes() -> None:
    model = _model()
    with torch.no_grad():
        model[1].running_mean.fill_(7.0)
    batches = _with_nan(_batches(6), 3)
    with pytest.raises(NormswapError, match=r"batch 3 \(counting from 0\).*1 non-finite"):
        recalibrate(model, batches, progress=False)
    assert torch.equal(model[1].running_mean, torch.full((3,), 7.0))
    assert torch.isfinite(model[3].running_var).all()
    assert model[1].momentum == 0.1 and model.training
    # an inf in the first element of an (input, target) pair and in a dict value too
    pairs = [(b, torch.zeros(len(b))) for b in _batches(3)]
    pairs[1][0][0, 0, 0, 0] = float("inf")
    with pytest.raises(NormswapError, match="batch 1"):
        recalibrate(_model(), pairs, progress=False)
    # a NaN in the target (not fed to the model) is no reason to refuse
    ok = [(b, torch.full((len(b),), float("nan"))) for b in _batches(3)]
    recalibrate(_model(), ok, progress=False)


def test_nonfinite_input_batch_is_skipped_with_a_report_entry() -> None:
    clean = _batches(6)
    batches = _with_nan(clean, 2)
    model = _model()
    recalibrate(model, batches, progress=False, on_nonfinite="skip")
    kept = [b for i, b in enumerate(clean) if i != 2]
    torch.testing.assert_close(model[1].running_mean, torch.cat(kept).mean((0, 2, 3)))
    assert int(model[1].num_batches_tracked) == 5
    report = model.normswap_report
    assert isinstance(report, PassReport)
    assert [s.node for s in report.skips] == ["batch 2"]
    assert "non-finite" in report.skips[0].reason
    assert report.metrics["recalibrate.skipped"] == 1
    assert report.metrics["recalibrate.batches"] == 5
    # the report a swap attached is extended, not replaced; an explicit report wins
    mine = PassReport(title="mine")
    recalibrate(model, batches, progress=False, on_nonfinite="skip", report=mine)
    assert len(mine.skips) == 1 and len(report.skips) == 1
    recalibrate(model, batches, progress=False, on_nonfinite="skip")
    assert model.normswap_report is report and len(report.skips) == 2


def test_batch_that_makes_statistics_nonfinite_is_undone() -> None:
    # finite input, but its square overflows float32: the running variance becomes inf
    clean = _batches(5)
    batches = [b.clone() for b in clean]
    batches[1][0, 0] = 1e30
    model = _model()
    with pytest.raises(NormswapError, match=r"batch 1 .*running statistics of '1'"):
        recalibrate(model, batches, progress=False)
    assert torch.isfinite(model[1].running_var).all()
    model = _model()
    recalibrate(model, batches, progress=False, on_nonfinite="skip")
    kept = [b for i, b in enumerate(clean) if i != 1]
    # the skipped batch left no trace: neither in the average nor in the batch count
    torch.testing.assert_close(model[1].running_mean, torch.cat(kept).mean((0, 2, 3)))
    per_batch_var = torch.stack([b.var((0, 2, 3)) for b in kept]).mean(0)
    torch.testing.assert_close(model[1].running_var, per_batch_var, rtol=1e-5, atol=1e-5)
    assert int(model[1].num_batches_tracked) == 4
    assert "running statistics of '1'" in model.normswap_report.skips[0].reason


def test_all_batches_nonfinite_or_bad_option() -> None:
    model = _model()
    bad = [torch.full((4, 3, 2, 2), float("nan")) for _ in range(2)]
    with pytest.raises(NormswapError, match=r"no batches to use \(2 skipped as non-finite\)"):
        recalibrate(model, bad, progress=False, on_nonfinite="skip")
    assert torch.equal(model[1].running_mean, torch.zeros(3))
    with pytest.raises(ValueError, match="on_nonfinite"):
        recalibrate(model, _batches(1), on_nonfinite="ignore")


def test_reset_false_refuses_statistics_that_are_already_nonfinite() -> None:
    model = _model()
    with torch.no_grad():
        model[3].running_var[1] = float("nan")
    with pytest.raises(NormswapError, match=r"'3' are already non-finite.*reset=True"):
        recalibrate(model, _batches(2), progress=False, reset=False)
    recalibrate(model, _batches(2), progress=False)  # reset=True repairs them
    assert torch.isfinite(model[3].running_var).all()
