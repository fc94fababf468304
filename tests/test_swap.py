"""The swap: every BN form, eval equivalence with randomised statistics, the report, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normswap
from normswap.errors import (
    NumericalMismatchError,
    TracingError,
    UnknownMethodError,
    UnsupportedNodeError,
    VerificationError,
)
from normswap.passes._match import batchnorm_like_modules
from normswap.registry import register_norm

from .conftest import assert_same_state, randomize_bn, rel_err, state_snapshot, swapped

METHODS = ["l1", "linf", "kalman"]


class Net(nn.Module):
    """BN1d/2d/3d, a residual add, a concat, grouped conv, Linear+BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv3d(1, 4, 3, padding=1)
        self.b3 = nn.BatchNorm3d(4)
        self.fc = nn.Linear(16 + 4, 12)
        self.b4 = nn.BatchNorm1d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        y = y + self.b2(self.c2(y))
        a = torch.cat([y.mean((2, 3)), y.amax((2, 3))], 1)
        v = self.b3(self.c3(x[:, :1].unsqueeze(2).repeat(1, 1, 2, 1, 1))).mean((2, 3, 4))
        return self.b4(self.fc(torch.cat([a, v], 1)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Net()).eval()


@pytest.mark.parametrize("method", METHODS)
def test_swap_is_eval_exact_and_leaves_no_bn(method: str) -> None:
    model = _net()
    x = torch.randn(4, 3, 16, 16)
    before = state_snapshot(model)
    out = normswap.swap(model, method, example_inputs=x)
    assert not batchnorm_like_modules(out)
    assert_same_state(before, state_snapshot(model))  # caller's model untouched
    with torch.no_grad():
        assert rel_err(out.eval()(x), model(x)) < 1e-5
    rep = out.normswap_report
    assert len(swapped(rep)) == 4
    assert {c.node for c in swapped(rep)} == {"b1", "b2", "b3", "b4"}
    assert rep.metrics["verify.passed"] is True
    assert rep.metrics["verify.rel"] < 1e-5
    data = json.loads(rep.to_json())
    assert normswap.PassReport.from_dict(data).to_dict() == data
    assert "b1" in rep.table()


def test_key_map_is_empty_l1_and_kalman_keep_bn_keys() -> None:
    model = _net()
    l1 = normswap.swap(model, "l1")
    assert l1.normswap_report.key_map == {}
    assert set(l1.state_dict()) == set(model.state_dict())
    kal = normswap.swap(model, "kalman")
    assert kal.normswap_report.key_map == {}
    assert set(kal.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        for k, v in model.state_dict().items():
            assert torch.equal(kal.state_dict()[k], v), k


def test_training_mode_preserved_and_model_untouched() -> None:
    model = _net().train()
    before = state_snapshot(model)
    out = normswap.swap(model, "l1", example_inputs=torch.randn(2, 3, 8, 8))
    assert out.training and model.training
    assert all(m.training for m in model.modules())
    assert_same_state(before, state_snapshot(model))


class BNAct(nn.BatchNorm2d):
    """A BN subclass adding behaviour in its forward (like timm's BatchNormAct2d)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.LeakyReLU(0.3)
        self.register_buffer("offset", torch.full((1, c, 1, 1), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum or 0.0, self.eps)
        return self.act(y) + self.offset


class PlainSubBN(nn.BatchNorm2d):
    """A subclass that adds nothing to forward."""


class FunctionalBN(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 1)
        self.register_buffer("mu", torch.randn(c) * 0.1)
        self.register_buffer("var", torch.rand(c) + 0.5)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.beta = nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mu, self.var, self.gamma, self.beta, False, 0.1,
                            1e-3)


class SubNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bnact = BNAct(6)
        self.sub = PlainSubBN(6)
        self.func = FunctionalBN(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sub(self.bnact(self.conv(x)))[..., 1:-1, 1:-1] + self.func(x)[..., 2:-2, 2:-2]


@pytest.mark.parametrize("method", METHODS)
def test_subclasses_and_functional_batch_norm_keep_behaviour(method: str) -> None:
    model = randomize_bn(SubNet()).eval()
    x = torch.randn(2, 3, 12, 12)
    out = normswap.swap(model, method, example_inputs=x)
    with torch.no_grad():
        assert rel_err(out.eval()(x), model(x)) < 1e-5
    assert not batchnorm_like_modules(out)
    nodes = {c.node for c in out.normswap_report.changes}
    assert {"bnact", "sub", "func"} <= nodes
    # the subclass's activation and extra buffer survived on the replacement
    assert isinstance(out.get_submodule("bnact").act, nn.LeakyReLU)
    assert "bnact.offset" in out.state_dict()
    assert "func.mu" in out.normswap_report.key_map


def test_frozen_and_sync_batchnorm() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.SyncBatchNorm(4))
    with torch.no_grad():
        for m in (model[1], model[4]):
            m.running_mean.copy_(torch.randn(4))
            m.running_var.copy_(torch.rand(4) + 0.5)
            m.weight.copy_(torch.rand(4) + 0.5)
            m.bias.copy_(torch.randn(4))
    model.eval()
    x = torch.randn(2, 3, 9, 9)
    for method in METHODS:
        out = normswap.swap(model, method, example_inputs=x)
        assert not batchnorm_like_modules(out)
        assert out.get_submodule("1").frozen is True
        out.train()  # a frozen layer keeps using running statistics in train mode
        with torch.no_grad():
            y = out.get_submodule("1")(torch.randn(2, 4, 5, 5) * 3)
            out.eval()
            assert rel_err(out(x), model(x)) < 1e-5
        assert torch.isfinite(y).all()


class Untraceable(nn.Module):
    """Data-dependent control flow in a child breaks fx."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.gate = Gate()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.gate(self.stem(x)))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


@pytest.mark.parametrize("method", METHODS)
def test_untraceable_model_falls_back_and_names_the_module(method: str) -> None:
    model = randomize_bn(Untraceable()).eval()
    x = torch.randn(2, 3, 8, 8)
    out = normswap.swap(model, method, example_inputs=x)
    rep = out.normswap_report
    assert any("'gate' (Gate)" in w.message for w in rep.warnings)
    assert rep.metrics["capture"]["culprits"] == ["gate"]
    assert rep.metrics["capture"]["strategy"] == "regions"
    assert isinstance(out, Untraceable) and not batchnorm_like_modules(out)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5


def test_leaf_modules_option_keeps_the_graph() -> None:
    model = randomize_bn(Untraceable()).eval()
    x = torch.randn(2, 3, 8, 8)
    out = normswap.swap(model, "l1", leaf_modules=["gate"], example_inputs=x)
    # nothing needed the graph: modules are replaced inside the user's own class
    assert isinstance(out, Untraceable) and out.normswap_report.metrics["mode"] == "module"
    assert not out.normswap_report.warnings
    kal = normswap.swap(model, "kalman", leaf_modules=["gate"], example_inputs=x)
    # the prior chain to 'bn' is cut at the opaque 'gate': nothing to wire, the class is kept
    assert isinstance(kal, Untraceable) and kal.normswap_report.metrics["mode"] == "module"
    assert [(s.node, s.op) for s in kal.normswap_report.skips] == [("bn", "Gate")]


class SuperForwardBN(nn.BatchNorm2d):
    """A subclass whose forward calls super().forward() (BN's input-dim check branches)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


def test_subclass_calling_super_forward_is_traced_through() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), SuperForwardBN(4))).eval()
    x = torch.randn(2, 3, 8, 8)
    out = normswap.swap(model, "l1", example_inputs=x)
    assert not batchnorm_like_modules(out)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5


def test_train_only_branches_survive_module_mode() -> None:
    import torchvision

    model = randomize_bn(torchvision.models.googlenet(aux_logits=True, init_weights=True))
    out = normswap.swap(model.eval(), "l1", example_inputs=torch.randn(1, 3, 64, 64))
    assert type(out).__name__ == "GoogLeNet" and not batchnorm_like_modules(out)
    assert out.aux1 is not None and "aux1.conv.bn.running_var" in out.state_dict()
    kal = normswap.swap(model.eval(), "kalman", example_inputs=torch.randn(1, 3, 64, 64))
    assert any("aux1" in w.message for w in kal.normswap_report.warnings)
    assert kal.normswap_report.key_map["aux1.conv.bn.running_var"] is None
    assert isinstance(kal, torch.fx.GraphModule)


def test_mixed_train_eval_flags_are_kept() -> None:
    model = _net().train()
    model.b2.eval()
    out = normswap.swap(model, "l1", example_inputs=torch.randn(2, 3, 8, 8))
    assert out.training and out.b1.training and not out.b2.training


def test_graph_method_on_untraceable_model_raises_naming_module() -> None:
    with pytest.raises(TracingError, match="gate"):
        normswap.swap(randomize_bn(Untraceable()).eval(), "normprop")


class SubUntraceable(Untraceable):
    def __init__(self) -> None:
        super().__init__()
        self.bn = BNAct(4)


class TwiceBN(nn.BatchNorm2d):
    """A subclass that normalises twice: no single batch_norm call to graft."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias)
        return F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias)


def test_strict_refuses_what_fallback_cannot_keep() -> None:
    model = randomize_bn(SubUntraceable()).eval()
    x = torch.randn(2, 3, 8, 8)
    # the module walk grafts the subclass: its activation is kept although no graph reaches it
    out = normswap.swap(model, "l1", example_inputs=x)
    assert not batchnorm_like_modules(out) and type(out.bn).__name__ == "L1BatchNorm2d[BNAct]"
    with torch.no_grad():
        assert rel_err(out(x), model(x)) < 1e-5
    # what the walk cannot keep (a subclass calling batch_norm twice) is refused under strict
    model.bn = randomize_bn(TwiceBN(4))
    with pytest.raises(UnsupportedNodeError, match="'bn'.*batch_norm 2 times"):
        normswap.swap(model, "l1", example_inputs=x)
    out = normswap.swap(model, "l1", strict=False, example_inputs=x)
    assert [s.node for s in out.normswap_report.skips] == ["bn"]
    assert isinstance(out.bn, TwiceBN)


def test_unknown_method_lists_choices() -> None:
    with pytest.raises(UnknownMethodError, match="choose one of: bwn, kalman, l1, linf"):
        normswap.swap(_net(), "l3")
    with pytest.raises(ValueError):
        normswap.swap(_net(), "l3")


def test_method_names_are_normalised() -> None:
    out = normswap.swap(_net(), "L1_BN", example_inputs=torch.randn(2, 3, 8, 8))
    assert out.normswap_method["method"] == "l1"


def test_mismatch_raises_naming_the_layer() -> None:
    @register_norm("_test_broken", summary="deliberately wrong")
    def _broken(bn: nn.Module) -> nn.Module:
        from normswap.norms.lp_batchnorm import l1_from_batchnorm

        new = l1_from_batchnorm(bn)
        if new.num_features == 12:
            with torch.no_grad():
                new.running_scale.mul_(2.0)
        return new

    with pytest.raises(NumericalMismatchError, match="'b4'"):
        normswap.swap(_net(), "_test_broken", example_inputs=torch.randn(4, 3, 8, 8))
    out = normswap.swap(_net(), "_test_broken", verify=False)
    assert any("skipped" in n.message for n in out.normswap_report.notes)


def test_unguessable_input_is_reported_not_silent() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.bn(a + b)

    with pytest.raises(VerificationError, match="could not run.*example_inputs"):
        normswap.swap(TwoInputs().eval(), "l1")
    out = normswap.swap(TwoInputs().eval(), "l1", verify=False)
    assert any("verify=False" in n.message for n in out.normswap_report.notes)


def test_sync_option_converts_layers_and_keeps_keys() -> None:
    from normswap.distributed import is_sync_layer

    model = _net()
    x = torch.randn(4, 3, 8, 8)
    plain = normswap.swap(model, "l1", example_inputs=x)
    synced = normswap.swap(model, "l1", example_inputs=x, sync=True)
    assert sum(is_sync_layer(m) for m in synced.modules()) == 4
    assert set(synced.state_dict()) == set(plain.state_dict())
    with torch.no_grad():  # without a process group the sync layers act as the plain ones
        assert torch.equal(synced.eval()(x), plain.eval()(x))


@pytest.mark.parametrize("method", ["l1", "linf", "kalman", "normprop", "selu"])
def test_swapped_torchvision_resnet_trains(method: str) -> None:
    """A train step through torchvision's in-place ReLUs (custom autograd outputs must not be
    views), in both memory layouts."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 3, 32, 32).to(memory_format=layout)
        out = normswap.swap(model.to(memory_format=layout), method, example_inputs=x,
                            strict=False).train()
        opt = torch.optim.SGD(out.parameters(), lr=0.01)
        loss = F.cross_entropy(out(x), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in out.parameters() if p.grad is not None)


@pytest.mark.parametrize("method", ["l1", "linf", "kalman"])
def test_half_precision_model_verifies_with_half_tolerance(method: str) -> None:
    model = _net().half()
    x = torch.randn(4, 3, 16, 16).half()
    out = normswap.swap(model, method, example_inputs=x)
    assert out.normswap_report.metrics["verify.rtol"] == 1e-2
    assert out.normswap_report.metrics["verify.passed"] is True


def test_kalman_swap_wires_priors_from_the_graph_and_trains_at_batch_two() -> None:
    import torchvision

    from normswap.norms.kalman import KalmanBatchNorm

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=4)).eval()
    out = normswap.swap(model, "kalman", example_inputs=torch.randn(2, 3, 32, 32))
    rep = out.normswap_report
    wired = [c for c in rep.changes if c.before.startswith("Kalman")]
    assert len(wired) == 19  # every layer but the stem's bn1 gets a prior
    assert all("prior from" in c.detail for c in wired)
    seen: dict[str, bool] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def f(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            prior = kwargs.get("prior", args[1] if len(args) > 1 else None)
            seen[name] = prior is not None
        return f

    for name, m in out.named_modules():
        if isinstance(m, KalmanBatchNorm):
            m.register_forward_pre_hook(hook(name), with_kwargs=True)
    out.train()
    opt = torch.optim.SGD(out.parameters(), lr=0.01)
    for _ in range(2):
        loss = F.cross_entropy(out(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert seen["bn1"] is False and sum(seen.values()) == 19


@pytest.mark.parametrize("method", ["l1", "linf", "kalman"])
def test_swapped_models_export_and_trace_through_their_layers(method: str) -> None:
    """``torch.export`` and plain ``fx.symbolic_trace`` go inside the converted layers: their
    eval forward has no data-dependent branch, before and after a training step moved the
    running statistics (the converted variance is no longer valid then)."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 9, 9)
    out = normswap.swap(model, method, example_inputs=x)
    for step in range(2):
        out.eval()
        with torch.no_grad():
            expect = out(x)
        program = torch.export.export(out, (x,), strict=False)
        traced = torch.fx.symbolic_trace(out)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), expect, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(traced(x), expect, rtol=1e-6, atol=1e-6)
        if step == 0:  # a training step: running statistics move
            out.train()(torch.randn(4, 3, 9, 9) * 2 + 1).sum().backward()
