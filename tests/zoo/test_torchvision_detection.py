"""torchvision detection models: whole-model capture fails in their heads, so the swap captures
regions (the backbone) instead, names the modules that break capture in the report, and the backbone still computes
the same function (randomised statistics, 1e-5 relative).

(The classification, segmentation and video sweeps that lived in tests/test_torchvision_zoo.py
are cases of the zoo sweep now: tests/zoo/cases_torchvision.py, run by test_zoo.py.)
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import normswap
from normswap.passes._match import batchnorm_like_modules

from ..conftest import randomize_bn, rel_err, swapped

RTOL = 1e-5
# ssd300_vgg16's VGG backbone has no BatchNorm
DETECTION = sorted(set(torchvision.models.list_models(module=torchvision.models.detection))
                   - {"ssd300_vgg16"})
FAST = {"fasterrcnn_mobilenet_v3_large_320_fpn"}


def _params(names: list[str]) -> list[object]:
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]


def _build(name: str, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kw)
    return randomize_bn(model).eval()


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
        # whole-model capture fails in the detection heads: the report names the modules
        # responsible and the regions captured instead
        assert rep.warnings and "could not capture the whole model" in rep.warnings[0].message
        cap = rep.metrics["capture"]
        assert cap["strategy"] == "regions", rep.table()
        assert any("rpn" in c or "roi_heads" in c for c in cap["culprits"]), cap
        assert any(r.startswith("backbone") for r in cap["regions"]), cap
        assert not batchnorm_like_modules(out)
        assert len(swapped(rep)) == n_bn
        with torch.no_grad():
            got = out.backbone(x)
        for k in ref:
            assert rel_err(got[k], ref[k]) < RTOL, (method, k)
