"""recalibrate: running statistics re-estimated on data, everything else restored."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import Tensor, nn

from normswap.calibrate import recalibrate, running_stat_modules
from normswap.errors import NormswapError

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


def test_progress_with_and_without_tqdm(monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    recalibrate(model, _batches(2), progress=True)  # tqdm if installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import now fails
    with caplog.at_level(logging.INFO, logger="normswap.calibrate"):
        recalibrate(model, _batches(12), progress=True)
    assert any("recalibrate: 10/12 batches" in r.message for r in caplog.records)
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
