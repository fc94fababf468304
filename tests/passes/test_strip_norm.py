"""strip_for_selu: BN folded away, ReLU → SELU, Dropout → AlphaDropout, LeCun / calibrated init."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

import normswap
from normswap.capture import capture
from normswap.errors import NormswapError
from normswap.norms.affine import ChannelAffine
from normswap.passes._infra import PassStep, run_passes
from normswap.passes.fold_conv_bn import fold_conv_bn
from normswap.passes.strip_norm import alpha_dropout, selu_activations, selu_init
from normswap.report import PassReport
from tests.conftest import randomize_bn, rel_err

torchvision = pytest.importorskip("torchvision")

_RELU_FAMILY = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU)


def _strip(model: nn.Module, **opts: object) -> tuple[nn.Module, object]:
    example = opts.pop("example_inputs", None)
    result = normswap.swap(copy.deepcopy(model).eval(), "selu", example_inputs=example,
                           strict=False, **opts)
    return result, result.normswap_report


def _count(model: nn.Module, cls: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _mlp(depth: int = 16, width: int = 256, d_in: int = 64) -> nn.Module:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers)


def _vgg_style() -> nn.Module:
    """3×3 conv-BN-ReLU stacks (strided convs downsample), flatten, two FC-BN-ReLU, classifier."""
    layers: list[nn.Module] = []
    c = 3
    for width, stride in [(32, 1), (32, 2), (64, 1), (64, 2), (64, 1), (64, 2)]:
        layers += [nn.Conv2d(c, width, 3, stride=stride, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        c = width
    layers += [nn.Flatten(), nn.Linear(c * 4 * 4, 256), nn.BatchNorm1d(256), nn.ReLU(),
               nn.Dropout(0.1), nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
               nn.Linear(256, 10)]
    return nn.Sequential(*layers)


def _last_hidden(gm: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """Output of the last SELU (the last hidden layer's activations)."""
    last = [m for m in gm.modules() if isinstance(m, nn.SELU)][-1]
    seen: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        gm(x)
    handle.remove()
    return seen[-1]


def test_mlp16_lecun_is_self_normalizing() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_mlp()).eval()
    gm, report = _strip(model, init="lecun", example_inputs=torch.randn(2, 64),
                        generator=torch.Generator().manual_seed(0))
    assert _count(gm, _BatchNorm) == 0 and _count(gm, ChannelAffine) == 0
    assert _count(gm, nn.SELU) == 16 and _count(gm, nn.ReLU) == 0
    x = torch.randn(4000, 64, generator=torch.Generator().manual_seed(1))  # standardised
    h = _last_hidden(gm, x)
    # SELU fixed point (mean 0, var 1): measured ≈ 0.004 / 1.004 at this seed
    assert abs(h.mean().item()) < 0.1
    assert abs(h.var().item() - 1.0) < 0.15


def test_vgg_style_cnn_lecun_is_self_normalizing() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_vgg_style()).eval()
    gm, report = _strip(model, init="lecun", example_inputs=torch.randn(2, 3, 32, 32),
                        generator=torch.Generator().manual_seed(0))
    assert _count(gm, _BatchNorm) == 0 and _count(gm, nn.SELU) == 8
    assert _count(gm, nn.AlphaDropout) == 1
    x = torch.randn(1000, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    h = _last_hidden(gm, x)
    # Zero padding gives border pixels less fan-in, so the variance sags to ~0.75 in the
    # small late feature maps and recovers to ~0.87 in the FC layers: tolerance ±0.25.
    assert abs(h.mean().item()) < 0.1
    assert abs(h.var().item() - 1.0) < 0.25


def test_keep_init_equals_bn_model_with_selu() -> None:
    # The BN fold is exact: stripping with init="keep" equals the BN model with ReLU → SELU.
    torch.manual_seed(0)
    model = randomize_bn(_vgg_style()).eval()
    reference = copy.deepcopy(model)
    for i, m in enumerate(reference):
        if isinstance(m, nn.ReLU):
            reference[i] = nn.SELU()
        elif isinstance(m, nn.Dropout):
            reference[i] = nn.AlphaDropout(m.p)
    gm, _ = _strip(model, init="keep", example_inputs=torch.randn(2, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(gm(x), reference.eval()(x)) < 1e-5


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18"])
def test_torchvision_no_bn_no_relu_left(name: str) -> None:
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    gm, report = _strip(model)
    assert _count(gm, _BatchNorm) == 0
    assert _count(gm, _RELU_FAMILY) == 0 and _count(gm, nn.SELU) > 0
    # new modules follow eval mode (fx's own container Modules have no forward: ignored)
    assert not any(m.training for m in gm.modules() if not list(m.children()))
    assert any("NOT eval-exact" in w.message for w in report.warnings)
    warned = {w.node for w in report.warnings if w.node}
    if name == "resnet18":
        assert {"add"} | {f"add_{i}" for i in range(1, 8)} <= warned
        assert "maxpool" in warned
        assert any("residual sum" in w.message and "add_7" in w.message for w in report.warnings)
    else:
        dropouts = [m for m in gm.modules() if isinstance(m, nn.AlphaDropout)]
        assert len(dropouts) == 2 and all(m.p == 0.5 for m in dropouts)
        assert _count(gm, nn.Dropout) == 0
        assert {"features.3", "features.28"} <= warned  # max-pools named
    with torch.no_grad():
        assert torch.isfinite(gm(torch.randn(2, 3, 32, 32))).all()


def test_calibrate_gives_unit_moments_per_unit() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_vgg_style()).eval()
    g = torch.Generator().manual_seed(2)
    calib = [(torch.randn(32, 3, 32, 32, generator=g) * 2 + 1, torch.zeros(32))
             for _ in range(2)]
    gm, report = _strip(model, init="calibrate", calibration_inputs=calib)
    assert report.metrics["calibrated_layers"] == 8  # 6 convs + 2 hidden FC, not the classifier
    data = torch.cat([b[0] for b in calib])
    stats: dict[str, tuple[float, float]] = {}

    def hook(name: str, dim: int):
        def fn(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            z = out.detach().movedim(dim, -1).reshape(-1, out.shape[dim]).double()
            stats[name] = (z.mean(0).abs().max().item(),
                           (z.var(0, unbiased=False) - 1).abs().max().item())
        return fn

    for name, m in gm.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook(name, 1 if isinstance(m, nn.Conv2d) else -1))
    with torch.no_grad():
        gm(data)
    classifier = [n for n, m in gm.named_modules() if isinstance(m, nn.Linear)][-1]
    hidden = {k: v for k, v in stats.items() if k != classifier}
    assert len(hidden) == 8
    for name, (mean_err, var_err) in hidden.items():
        assert mean_err < 1e-4 and var_err < 1e-3, (name, mean_err, var_err)


def test_calibrate_without_inputs_raises() -> None:
    with pytest.raises(NormswapError, match="calibration_inputs"):
        _strip(_mlp(depth=2), init="calibrate")
    with pytest.raises(ValueError, match="init"):
        _strip(_mlp(depth=2), init="xavier")


class _Mixed(nn.Module):
    """Functional activations of several kinds, a gate, an unfoldable BN, functional dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm1d(8)      # no layer before it → ChannelAffine
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 8)
        self.gelu = nn.GELU()
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_in(x)
        x = F.relu(self.l1(x), inplace=True)
        x = torch.relu(x) + F.leaky_relu(x, 0.1)
        x = self.gelu(self.l2(x).relu())
        x = F.dropout(x, 0.2, training=self.training)
        return x * self.gate(x)


def test_functional_activations_gates_and_unfoldable_bn() -> None:
    model = randomize_bn(_Mixed()).eval()
    gm, report = _strip(model)
    targets = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert not targets & {F.relu, torch.relu, F.leaky_relu, "relu"}
    selus = [n for n in gm.graph.nodes if n.target is F.selu]
    assert len(selus) == 4 and sum(bool(n.kwargs["inplace"]) for n in selus) == 1
    assert isinstance(gm.get_submodule("gelu"), nn.SELU)
    assert isinstance(gm.get_submodule("gate"), nn.Sigmoid)
    assert any("gate (Sigmoid)" in n.message for n in report.notes)
    assert isinstance(gm.get_submodule("bn_in"), ChannelAffine)
    assert any(s.node == "bn_in" for s in report.skips)
    assert any(n.target is F.alpha_dropout for n in gm.graph.nodes)
    assert any(n.node == "add" for n in report.warnings)
    with torch.no_grad():
        assert torch.isfinite(gm(torch.randn(5, 8))).all()


class _DeadInplace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.l(x)
        F.relu(y, inplace=True)  # result unused: only the in-place effect matters
        return y


def test_unused_inplace_call_is_flagged() -> None:
    _, report = _strip(_DeadInplace())
    assert any("in-place calls whose result is unused" in w.message and "relu" in w.message
               for w in report.warnings)


def test_calibrate_accepts_a_single_tensor() -> None:
    model = randomize_bn(_mlp(depth=3, width=32, d_in=8)).eval()
    data = torch.randn(256, 8) * 3 + 2
    gm, report = _strip(model, init="calibrate", calibration_inputs=data)
    assert report.metrics["calibrated_layers"] == 3
    assert _count(gm, _BatchNorm) == 0 and _count(gm, ChannelAffine) == 0  # shapes propagated
    layer = gm.get_submodule
    with torch.no_grad():
        pre = layer("6")(F.selu(layer("3")(F.selu(layer("0")(data)))))
    torch.testing.assert_close(pre.mean(0), torch.zeros(32), atol=1e-4, rtol=0)
    torch.testing.assert_close(pre.var(0, unbiased=False), torch.ones(32), atol=1e-3, rtol=0)


# -- graphs captured by torch.export (ATen ops between lifted modules) ---------------------------

class _AtenActs(nn.Module):
    """Functional rectifiers and dropouts (ATen after export); ``as_selu`` is the reference."""

    def __init__(self, as_selu: bool = False) -> None:
        super().__init__()
        self.as_selu = as_selu
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.b3 = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.as_selu
        x = self.b1(self.c1(x))
        x = F.max_pool2d(F.selu(x) if s else F.relu(x), 2)
        x = self.b2(self.c2(x))
        x = F.max_pool2d(torch.selu_(x) if s else torch.relu_(x), 2)
        x = F.dropout(x.view(x.shape[0], -1), 0.1, training=self.training)
        x = self.b3(self.fc(x))
        x = F.selu(x) if s else F.leaky_relu(x, 0.1, inplace=True)
        return self.head(F.dropout1d(x, 0.2, self.training))


def test_export_captured_activations_become_aten_selu() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_AtenActs()).eval()
    reference = copy.deepcopy(model)
    reference.as_selu = True
    x = torch.randn(4, 3, 16, 16)
    cap = capture(copy.deepcopy(model), (x,), strategies=("export",), bn_subclasses="inline")
    assert cap.strategy == "export", cap.attempts
    report = PassReport()
    gm = run_passes(cap.regions[0].gm, [PassStep(fold_conv_bn), PassStep(selu_activations),
                                        PassStep(alpha_dropout), PassStep(selu_init)],
                    context={"strict": False}, report=report)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    # same spelling family: ATen relu -> aten.selu, in-place ATen -> aten.selu_
    assert targets.count("aten.selu.default") == 1 and targets.count("aten.selu_.default") == 2
    assert not [t for t in targets if "relu" in t or t in ("aten.dropout.default",
                                                           "aten.feature_dropout.default")]
    assert "aten.alpha_dropout.default" in targets
    assert "aten.feature_alpha_dropout.default" in targets
    changes = {c.node: (c.before, c.after, c.detail) for c in report.changes}
    assert changes["relu_"] == ("aten.relu_.default", "aten.selu_.default", "in-place")
    assert changes["leaky_relu_"][1] == "aten.selu_.default"
    assert any(w.node == "max_pool2d" for w in report.warnings)
    assert _count(gm, _BatchNorm) == 0
    # it runs and computes the BN model with SELU (the fold is exact, dropouts are eval)
    with torch.no_grad():
        out = gm.eval()(x)
        assert rel_err(out, reference.eval()(x)) < 1e-5
        fx_result = normswap.swap(model, "selu", example_inputs=x, init="keep", strict=False)
        assert rel_err(out, fx_result.eval()(x)) < 1e-5
    fx_targets = {n.target for n in fx_result.graph.nodes if n.op == "call_function"}
    assert F.selu in fx_targets and F.alpha_dropout in fx_targets
    assert F.feature_alpha_dropout in fx_targets
