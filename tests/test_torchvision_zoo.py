"""Model-zoo sweep: every torchvision model with BatchNorm, swapped with l1/linf/kalman, has no
BatchNorm left and computes the same eval function (randomised statistics, 1e-5 relative).
``bwn`` converts conv/linear -> BN pairs: a BN with no conv of its own before it (DenseNet's
pre-activation BNs; those after torchvision video models' Conv3d subclasses, which fx traces into
a call_function conv3d) is kept with a reason (strict=False), every other one is converted.

The default run covers a representative subset; ``-m slow`` covers every model.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import normswap
from normswap.passes._match import batchnorm_like_modules

from .conftest import randomize_bn, rel_err, swapped

METHODS = ["l1", "linf", "kalman", "bwn"]
RTOL = 1e-5

# Classification models without any BatchNorm: nothing to swap (their norm is LayerNorm or none).
NO_BATCHNORM = {
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny",
    "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s",
    "swin_v2_t", "vgg11", "vgg13", "vgg16", "vgg19", "vit_b_16", "vit_b_32", "vit_h_14",
    "vit_l_16", "vit_l_32",
}
CLASSIFICATION = sorted(set(torchvision.models.list_models(module=torchvision.models))
                        - NO_BATCHNORM)
SEGMENTATION = sorted(torchvision.models.list_models(module=torchvision.models.segmentation))
VIDEO = sorted(set(torchvision.models.list_models(module=torchvision.models.video))
               # mvit and swin3d are transformer models with LayerNorm, no BatchNorm
               - {"mvit_v1_b", "mvit_v2_s", "swin3d_b", "swin3d_s", "swin3d_t"})
# ssd300_vgg16's VGG backbone has no BatchNorm
DETECTION = sorted(set(torchvision.models.list_models(module=torchvision.models.detection))
                   - {"ssd300_vgg16"})

FAST = {"resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
        "shufflenet_v2_x0_5", "regnet_x_400mf", "mnasnet0_5", "googlenet", "vgg11_bn",
        "lraspp_mobilenet_v3_large", "r3d_18", "fasterrcnn_mobilenet_v3_large_320_fpn"}

INPUT = {
    "inception_v3": (2, 3, 96, 96),      # needs >= 75x75
    "maxvit_t": (1, 3, 224, 224),        # window partitions need 224
}


def _params(names: list[str]) -> list[object]:
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]


def _build(name: str, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kw)
    return randomize_bn(model).eval()


def _check_same(model: nn.Module, x: torch.Tensor, pick=lambda o: o) -> None:
    with torch.no_grad():
        ref = pick(model(x))
    n_bn = len(batchnorm_like_modules(model))
    for method in METHODS:
        if method == "bwn":
            out = normswap.swap(model, method, verify=False, strict=False, example_inputs=x)
            rep = out.normswap_report
            kept = batchnorm_like_modules(out)
            assert len(kept) == len(rep.skips), rep.table()
            assert all("no preceding Conv" in s.reason for s in rep.skips), rep.table()
            assert sum(c.after.startswith("MeanOnly") for c in rep.changes) == n_bn - len(kept)
        else:
            out = normswap.swap(model, method, verify=False)
            assert not batchnorm_like_modules(out), method
            assert len(swapped(out.normswap_report)) == n_bn
        with torch.no_grad():
            got = pick(out.eval()(x))
        assert rel_err(got, ref) < RTOL, (method, rel_err(got, ref))


@pytest.mark.parametrize("name", _params(CLASSIFICATION))
def test_classification(name: str) -> None:
    # aux heads run in train mode only; their fate under an eval-mode trace (kept in module
    # mode, reported as dropped in graph mode) is tested in test_swap.py
    model = _build(name, **({"aux_logits": False, "init_weights": True}
                            if name in ("googlenet", "inception_v3") else {}))
    assert batchnorm_like_modules(model), f"{name} has no BatchNorm: add it to NO_BATCHNORM"
    x = torch.randn(*INPUT.get(name, (2, 3, 64, 64)))
    _check_same(model, x)


@pytest.mark.parametrize("name", _params(SEGMENTATION))
def test_segmentation(name: str) -> None:
    model = _build(name, weights_backbone=None, num_classes=5)
    _check_same(model, torch.randn(2, 3, 64, 64), pick=lambda o: o["out"])


@pytest.mark.parametrize("name", _params(VIDEO))
def test_video(name: str) -> None:
    model = _build(name)
    # s3d ends in a (2, 7, 7) average pool: it needs 16 frames of 224x224
    shape = (1, 3, 16, 224, 224) if name == "s3d" else (1, 3, 4, 64, 64)
    _check_same(model, torch.randn(*shape))


@pytest.mark.parametrize("name", _params(DETECTION))
def test_detection_falls_back_and_names_the_module(name: str) -> None:
    model = _build(name, weights_backbone=None, num_classes=5)
    n_bn = len(batchnorm_like_modules(model))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = model.backbone(x)
    for method in ["l1", "kalman"]:
        out = normswap.swap(model, method)
        rep = out.normswap_report
        # tracing fails in the detection heads; the report names the modules responsible
        assert rep.warnings and "could not trace" in rep.warnings[0].message
        assert rep.metrics["untraceable"], rep.table()
        assert not batchnorm_like_modules(out)
        assert len(swapped(rep)) == n_bn
        with torch.no_grad():
            got = out.backbone(x)
        for k in ref:
            assert rel_err(got[k], ref[k]) < RTOL, (method, k)
