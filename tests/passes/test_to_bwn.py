"""Conv/ConvTranspose/Linear → BN pairs to bounded weight norm + mean-only BN: eval-exact with
randomised statistics (negative γ included), refusals that name the node, module substitution
only, fold back to plain weights, and training in fp32 and pure fp16."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.nn.utils import parametrize

import normswap
from normswap.capture import trace
from normswap.errors import UnsupportedNodeError
from normswap.norms.bwn import (
    BoundedWeightNorm,
    MeanOnlyBatchNorm,
    channel_norms,
    weight_layout,
)
from normswap.passes._match import batchnorm_like_modules
from normswap.passes.to_bwn import bwn_mapping, to_bwn

from ..conftest import assert_same_state, randomize_bn, rel_err, state_snapshot

RTOL = 1e-5


@torch.no_grad()
def _negate_some_gammas(model: nn.Module) -> nn.Module:
    """Flip the sign of γ in every third channel: negative BN scales must convert exactly."""
    for m in batchnorm_like_modules(model):
        if getattr(m[1], "weight", None) is not None:
            m[1].weight[::3].neg_()
    return model


def _prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    return _negate_some_gammas(randomize_bn(model, seed)).eval()


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict((f"m{i}", m) for i, m in enumerate(layers)))


SMALL_NETS = {
    "conv1d": (lambda: _seq(nn.Conv1d(3, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(),
                            nn.Conv1d(6, 6, 3, groups=3, bias=False), nn.BatchNorm1d(6)),
               (4, 3, 11)),
    "conv2d_depthwise": (lambda: _seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.BatchNorm2d(8)),
                         (2, 3, 9, 9)),
    "conv3d": (lambda: _seq(nn.Conv3d(2, 4, 3, bias=False), nn.BatchNorm3d(4), nn.ReLU()),
               (2, 2, 5, 5, 5)),
    "convT1d_grouped": (lambda: _seq(nn.ConvTranspose1d(6, 9, 3, groups=3), nn.BatchNorm1d(9)),
                        (3, 6, 7)),
    "convT2d_grouped": (lambda: _seq(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                                     nn.BatchNorm2d(6), nn.ReLU(),
                                     nn.ConvTranspose2d(6, 4, 2, bias=False), nn.BatchNorm2d(4)),
                        (2, 4, 5, 5)),
    "convT3d_grouped": (lambda: _seq(nn.ConvTranspose3d(4, 8, 2, groups=4), nn.BatchNorm3d(8)),
                        (1, 4, 3, 3, 3)),
    "mlp": (lambda: _seq(nn.Flatten(), nn.Linear(12, 7), nn.BatchNorm1d(7), nn.ReLU(),
                         nn.Linear(7, 5, bias=False), nn.BatchNorm1d(5)),
            (6, 3, 4)),
}


def _check_exact(model: nn.Module, x: Tensor, **options: object) -> nn.Module:
    """swap → eval-exact, nothing BN left, every pair reported, caller's model untouched."""
    n_bn = len(batchnorm_like_modules(model))
    before = state_snapshot(model)
    with torch.no_grad():
        ref = model(x)
    out = normswap.swap(model, "bwn", example_inputs=x, **options)
    assert_same_state(before, state_snapshot(model))
    assert not batchnorm_like_modules(out)
    report = out.normswap_report
    assert sum(c.after.startswith("MeanOnlyBatchNorm") for c in report.changes) == n_bn
    assert sum(c.after.endswith("+ BoundedWeightNorm") for c in report.changes) == n_bn
    assert report.metrics["verify.passed"] is True
    with torch.no_grad():
        err = rel_err(out.eval()(x), ref)
    assert err < RTOL, err
    return out


# -- pure maths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("transpose", [False, True])
def test_mapping_reproduces_scaled_weight_and_shift(transpose: bool) -> None:
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2) if transpose else nn.Conv2d(3, 5, 3)
    c = 6 if transpose else 5
    scale = torch.randn(c).double()  # signed
    mean, beta = torch.randn(c).double(), torch.randn(c).double()
    dim, groups = weight_layout(layer)
    m = bwn_mapping(layer.weight, layer.bias, scale, mean, beta, dim=dim, groups=groups)
    w = layer.weight.detach().double()
    torch.testing.assert_close(m.direction, w)  # v is the trained weight, unchanged
    norms = channel_norms(w, dim, groups)
    torch.testing.assert_close(m.rho, float((scale * norms).square().mean().sqrt()), rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(m.gain, scale * norms / m.rho)
    assert bool((m.gain[scale < 0] < 0).all())
    torch.testing.assert_close(m.running_mean, scale * (mean - layer.bias.double()))
    torch.testing.assert_close(m.bias, beta)
    # ρ·g_c·v_c/‖v_c‖ is s_c·W_c: the reference, channel by channel through the PyTorch layer
    p = BoundedWeightNorm(m.rho, c, dim=dim, groups=groups, learn_gain="free",
                          dtype=torch.float64)
    with torch.no_grad():
        p.gain.copy_(m.gain)
    x = torch.randn(2, layer.in_channels, 6, 6, dtype=torch.float64)
    fn = torch.nn.functional.conv_transpose2d if transpose else torch.nn.functional.conv2d
    kw = {"groups": groups} if transpose else {}
    got = fn(x, p(m.direction), **kw)
    ref = fn(x, w, **kw) * scale.reshape(1, -1, 1, 1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="rho='rms'"):
        bwn_mapping(layer.weight, None, scale, mean, beta, dim=dim, groups=groups, rho=0.5,
                    learn_gain="bounded")


def test_mapping_refuses_what_it_cannot_represent() -> None:
    w = torch.randn(3, 2)
    with pytest.raises(ValueError, match="not finite in channel"):
        bwn_mapping(w, None, torch.tensor([1.0, math.inf, 1.0]), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="zero in every channel"):
        bwn_mapping(w, None, torch.zeros(3), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="learn_gain"):
        bwn_mapping(w, None, torch.ones(3), torch.zeros(3), torch.zeros(3),
                    learn_gain="none")  # type: ignore[arg-type]


# -- eval-exact conversions -------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SMALL_NETS))
def test_small_nets_eval_exact(name: str) -> None:
    make, shape = SMALL_NETS[name]
    torch.manual_seed(1)
    model = _prepare(make())
    out = _check_exact(model, torch.randn(*shape))
    # the new modules are parametrized layers and mean-only BNs at the old paths
    for n, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            assert isinstance(out.get_submodule(n), MeanOnlyBatchNorm)
    assert any(parametrize.is_parametrized(m, "weight") for m in out.modules())


@pytest.mark.parametrize("options", [{"learn_gain": "bounded"}, {"rho": "mean"}, {"rho": 0.25}])
def test_gain_forms_and_rho_choices_are_exact(options: dict[str, object]) -> None:
    make, shape = SMALL_NETS["convT2d_grouped"]
    torch.manual_seed(2)
    out = _check_exact(_prepare(make(), seed=3), torch.randn(*shape), **options)
    p = out.get_submodule("m0").parametrizations.weight[0]
    assert p.gain_mode == options.get("learn_gain", "free")
    if options.get("rho") == 0.25:
        assert float(p.rho) == 0.25
    if options.get("learn_gain") == "bounded":  # ‖w‖_F = ρ·sqrt(C) exactly the folded norm
        w = out.get_submodule("m0").weight.detach().double()
        assert math.isclose(float(w.norm()), float(p.rho) * math.sqrt(6), rel_tol=1e-6)


def test_default_rho_gives_unit_rms_gain_and_keeps_the_direction() -> None:
    torch.manual_seed(4)
    model = _prepare(_seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    out = _check_exact(model, torch.randn(2, 3, 8, 8))
    conv = out.get_submodule("m0")
    plist = conv.parametrizations.weight
    torch.testing.assert_close(plist.original, model.m0.weight)  # v = W, bit-identical
    g = plist[0].gain.detach().double()
    assert math.isclose(float(g.square().mean()), 1.0, rel_tol=1e-5)
    assert bool((g[::3] < 0).all())  # the negated γ became a negative gain
    assert conv.bias is None
    s = model.m1.weight.double() / (model.m1.running_var.double() + model.m1.eps).sqrt()
    bn = out.get_submodule("m1")
    torch.testing.assert_close(bn.running_mean.double(),
                               s * (model.m1.running_mean.double() - model.m0.bias.double()))
    torch.testing.assert_close(bn.bias, model.m1.bias)
    assert int(bn.num_batches_tracked) == int(model.m1.num_batches_tracked)


def test_report_and_key_map() -> None:
    model = _prepare(_seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    out = _check_exact(model, torch.randn(2, 3, 6, 6))
    rep = out.normswap_report
    changes = {c.node: c for c in rep.changes}
    assert changes["m0"].before == "Conv2d" and changes["m0"].after == "Conv2d + BoundedWeightNorm"
    assert "bias moved into m1.running_mean" in changes["m0"].detail
    assert changes["m1"].after == "MeanOnlyBatchNorm2d"
    assert rep.key_map["m0.weight"] == "m0.parametrizations.weight.original"
    assert rep.key_map["m0.bias"] is None
    assert rep.key_map["m1.weight"] is None and rep.key_map["m1.running_var"] is None
    keys = set(out.state_dict())
    assert {"m0.parametrizations.weight.original", "m0.parametrizations.weight.0.gain",
            "m0.parametrizations.weight.0.rho", "m1.running_mean", "m1.bias",
            "m1.num_batches_tracked"} <= keys
    assert not ({k for k, v in rep.key_map.items() if v is None} & keys)


def test_pass_substitutes_modules_only() -> None:
    """The graph's nodes are untouched: only the modules at the conv and BN paths change."""
    model = _prepare(torchvision.models.resnet18(num_classes=7))
    gm = trace(model)
    nodes = [(n.op, str(n.target), tuple(str(a) for a in n.args)) for n in gm.graph.nodes]
    gm, report = to_bwn(gm)
    assert [(n.op, str(n.target), tuple(str(a) for a in n.args)) for n in gm.graph.nodes] == nodes
    assert isinstance(gm.get_submodule("layer1.0.bn1"), MeanOnlyBatchNorm)
    assert isinstance(gm.get_submodule("layer1.0.conv1").parametrizations.weight[0],
                      BoundedWeightNorm)
    assert report.metrics["bwn.converted"] == 20
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(gm.eval()(x), model(x)) < RTOL


def test_frozen_batchnorm_becomes_frozen_mean_only() -> None:
    from torchvision.ops import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(4)
    model = _seq(nn.Conv2d(3, 4, 3), frozen)
    with torch.no_grad():
        frozen.weight.copy_(torch.tensor([1.5, -0.5, 2.0, 0.7]))
        frozen.bias.normal_()
        frozen.running_mean.normal_()
        frozen.running_var.uniform_(0.5, 2.0)
    out = _check_exact(model.eval(), torch.randn(2, 3, 7, 7))
    bn = out.get_submodule("m1")
    assert isinstance(bn, MeanOnlyBatchNorm) and bn.frozen
    assert not bn.bias.requires_grad  # the frozen BN's β was a buffer


def test_zero_weight_channel_converts_exactly() -> None:
    model = _prepare(_seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with torch.no_grad():
        model.m0.weight[1].zero_()
    out = _check_exact(model, torch.randn(2, 3, 6, 6))
    assert "zero channels [1]" in out.normswap_report.changes[0].detail
    p = out.get_submodule("m0").parametrizations.weight
    assert float(p[0].gain.detach()[1]) == 0.0 and torch.isfinite(out.get_submodule("m0").weight).all()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_eval_exact_and_fold(name: str) -> None:
    torch.manual_seed(0)
    model = _prepare(torchvision.models.get_model(name, weights=None, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    out = _check_exact(model, x)
    folded = normswap.fold(out, example_inputs=x)
    with torch.no_grad():
        err = rel_err(folded(x), model(x))
    assert err < RTOL, err
    assert not any(isinstance(m, (MeanOnlyBatchNorm, nn.modules.batchnorm._BatchNorm))
                   or parametrize.is_parametrized(m) for m in folded.modules())


@pytest.mark.parametrize("name", sorted(SMALL_NETS))
def test_fold_removes_both_exactly(name: str) -> None:
    make, shape = SMALL_NETS[name]
    torch.manual_seed(5)
    model = _prepare(make(), seed=6)
    x = torch.randn(*shape)
    out = normswap.swap(model, "bwn", example_inputs=x)
    folded = normswap.fold(out, example_inputs=x)
    rep = folded.normswap_report
    assert not any(isinstance(m, (MeanOnlyBatchNorm, nn.modules.batchnorm._BatchNorm))
                   or parametrize.is_parametrized(m) for m in folded.modules()), rep.table()
    assert rep.metrics["affine"] == 0 and rep.metrics["folded"] == len(batchnorm_like_modules(model))
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < RTOL
    assert parametrize.is_parametrized(out.get_submodule("m0" if name != "mlp" else "m1"))


# -- refusals -------------------------------------------------------------------------------------
class _TwoCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 4, 1)
        self.head_bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head_bn(self.head(self.bn(self.conv(self.conv(x)))))


class _Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.b(self.a(x)))


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))  # (N, L=4, C=4): BN normalises L, not the features


class _BNAct(nn.BatchNorm2d):
    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(super().forward(x))


class _PreScaledBN(nn.BatchNorm2d):
    """Scales its input before normalising: the norm cannot move into the conv before it."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x * 2.0)


def test_bn_subclass_with_own_forward_is_grafted() -> None:
    torch.manual_seed(3)
    model = _prepare(_seq(nn.Conv2d(3, 4, 3), _BNAct(4)))
    x = torch.randn(2, 3, 6, 6)
    out = normswap.swap(model, "bwn", example_inputs=x)  # verified eval-exact, ReLU included
    assert type(out.m1).__name__ == "MeanOnlyBatchNorm2d[_BNAct]"
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-6)


class _SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.c1(x)) + self.bn(self.c2(x))


REFUSALS = {
    "no_layer_before": (lambda: _seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), (2, 3, 6, 6),
                        r"'m0' \(BatchNorm2d, node 'm0'\): no preceding Conv"),
    "conv_called_twice": (_TwoCalls, (2, 3, 6, 6), r"'bn' .*'conv' \(Conv2d\) is called 2 times"),
    "conv_output_used_twice": (_Branch, (2, 3, 6, 6), r"'bn' .*output of 'conv' has 2 users"),
    "tied_weights": (_Tied, (2, 4, 5, 5), r"'bn' .*'b'.weight is shared .*tied weights"),
    "linear_not_nc": (_Tokens, (2, 4, 4), r"'norm' .*Linear output has shape \(2, 4, 4\)"),
    "bn_subclass_transforms_input": (lambda: _seq(nn.Conv2d(3, 4, 3), _PreScaledBN(4)),
                                     (2, 3, 6, 6),
                                     r"'m1' \(_PreScaledBN, node 'm1'\): _PreScaledBN transforms its "
                                     r"input before normalising it"),
    "no_running_stats": (lambda: _seq(nn.Conv2d(3, 4, 3),
                                      nn.BatchNorm2d(4, track_running_stats=False)),
                         (2, 3, 6, 6), r"'m1' .*track_running_stats=False"),
    "bn_called_twice": (_SharedBN, (2, 3, 6, 6), r"'bn' .*BN module 'bn' is called 2 times"),
    "weight_already_normalised": (
        lambda: _seq(torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)),
                     nn.BatchNorm2d(4)), (2, 3, 6, 6), r"'m1' .*'m0': its weight is already "
                                                       r"parametrized \(_WeightNorm\)"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals_name_the_node(name: str) -> None:
    make, shape, pattern = REFUSALS[name]
    torch.manual_seed(7)
    model = _prepare(make())
    x = torch.randn(*shape)
    with pytest.raises(UnsupportedNodeError, match=pattern):
        normswap.swap(model, "bwn", example_inputs=x)
    # strict=False keeps the refused BN, reports why, converts the rest, stays exact
    out = normswap.swap(model, "bwn", example_inputs=x, strict=False)
    rep = out.normswap_report
    assert rep.skips and any("BatchNorm" in s.op or "BN" in s.op for s in rep.skips)
    assert any("kept as BatchNorm" in w.message for w in rep.warnings)
    with torch.no_grad():
        assert rel_err(out.eval()(x), model(x)) < RTOL


def test_every_refusal_is_listed_in_one_error() -> None:
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.BatchNorm2d(3)
            self.branch = _Branch()
            self.ok = _seq(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x: Tensor) -> Tensor:
            return self.ok(self.branch(self.pre(x)))

    with pytest.raises(UnsupportedNodeError) as info:
        normswap.swap(_prepare(Both()), "bwn", example_inputs=torch.randn(2, 3, 6, 6))
    msg = str(info.value)
    assert "2 BatchNorm node(s)" in msg and "'pre' (BatchNorm2d" in msg and "'branch.bn' (" in msg
    assert "ok.m1" not in msg and "strict=False" in msg


def test_linear_without_shapes_is_refused_when_called_directly() -> None:
    model = _prepare(_seq(nn.Linear(5, 4), nn.BatchNorm1d(4)))
    with pytest.raises(UnsupportedNodeError, match="'m1' .*Linear output rank unknown"):
        to_bwn(trace(model))
    gm, report = to_bwn(trace(model), example_inputs=torch.randn(3, 5))
    assert report.metrics["bwn.converted"] == 1


def test_bad_options_raise() -> None:
    gm = trace(_seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    with pytest.raises(ValueError, match="rho='rms'"):
        to_bwn(gm, learn_gain="bounded", rho=1.0)
    with pytest.raises(ValueError, match="rho must be"):
        to_bwn(gm, rho=-1.0)
    with pytest.raises(ValueError, match="learn_gain"):
        to_bwn(gm, learn_gain="none")  # type: ignore[arg-type]


# -- training -------------------------------------------------------------------------------------
def _cnn() -> nn.Sequential:
    return _seq(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _train_steps(model: nn.Module, dtype: torch.dtype, steps: int = 4) -> list[float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 8, 8, generator=g).to(dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_converted_model_trains(dtype: torch.dtype) -> None:
    """fp32, and pure fp16 (``model.half()``, fp16 weights and activations) on CPU."""
    torch.manual_seed(8)
    model = _prepare(_cnn())
    out = normswap.swap(model, "bwn", example_inputs=torch.randn(2, 1, 8, 8)).to(dtype)
    conv = out.get_submodule("m4")
    v0 = conv.parametrizations.weight.original.detach().clone()
    g0 = conv.parametrizations.weight[0].gain.detach().clone()
    rho0 = conv.parametrizations.weight[0].rho.clone()
    mean0 = out.get_submodule("m5").running_mean.clone()
    losses = _train_steps(out, dtype)
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses
    assert not torch.equal(conv.parametrizations.weight.original.detach(), v0)
    assert not torch.equal(conv.parametrizations.weight[0].gain.detach(), g0)
    assert torch.equal(conv.parametrizations.weight[0].rho, rho0)  # the bound is fixed
    assert not torch.equal(out.get_submodule("m5").running_mean, mean0)
    assert out.get_submodule("m5").running_mean.dtype == dtype


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(9)
    model = _prepare(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    out = normswap.swap(model, "bwn", example_inputs=x)
    path = normswap.save(out, tmp_path / "r18_bwn.pt", arch="torchvision:resnet18",
                         arch_kwargs={"num_classes": 10})
    loaded = normswap.load(None, path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out.eval()(x), rtol=0, atol=0)
    rho = "layer2.0.conv1.parametrizations.weight.0.rho"
    assert torch.equal(loaded.state_dict()[rho], out.state_dict()[rho])
