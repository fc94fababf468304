"""torchvision detection models: the swap either captures the whole model (shape-aware tracing
gets through the anchor and NMS code of some of them, and the whole output is then verified) or
captures regions (the backbone at least) and names in the report what breaks whole-model capture:
the submodule, or the place in the model's own forward. Either way every BatchNorm is replaced
and the backbone computes the same function (randomised statistics, 1e-5 relative).

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
        out = normswap.swap(model, method, example_inputs=(x,))
        rep = out.normswap_report
        cap = rep.metrics["capture"]
        if cap["strategy"] == "regions":
            # the report says what broke whole-model capture: a submodule or a source line
            msg = next((w.message for w in rep.warnings
                        if "could not capture the whole model" in w.message), None)
            assert msg, rep.table()
            assert cap["culprits"] or "in the model's own forward" in msg, msg
            assert any(r.startswith("backbone") for r in cap["regions"]), cap
        else:
            # whole-model capture: the conversion was verified on the whole output
            assert cap["strategy"] in ("fx", "fx-shape", "export"), rep.table()
            assert rep.metrics["verify.tensors_compared"] > 0, rep.table()
            assert not rep.metrics["verify.mismatches"], rep.table()
        assert not batchnorm_like_modules(out)
        assert len(swapped(rep)) == n_bn
        with torch.no_grad():
            if cap["strategy"] == "regions":
                got, want = out.backbone(x), ref
            else:  # a graph module: its submodules hold no forward of their own
                got, want = out(x)[0], model(x)[0]
        assert set(got) == set(want), (method, sorted(got), sorted(want))
        for k in want:
            assert got[k].shape == want[k].shape, (method, k)
            if want[k].is_floating_point() and want[k].numel():
                assert rel_err(got[k], want[k]) < RTOL, (method, k)
            else:
                assert torch.equal(got[k], want[k]), (method, k)
