"""torchvision: every model with BatchNorm of classification, segmentation, video, detection and
optical flow, built with ``weights=None`` (and ``weights_backbone=None``): nothing downloaded.

Exclusions (no BatchNorm at all, checked by ``test_zoo.py::test_torchvision_exclusions_have_no_batchnorm``):
the LayerNorm transformers (vit_*, swin_*, swin3d_*, mvit_*, maxvit_t is *in*: its MBConv blocks
have BN), convnext_* (LayerNorm2d), and the plain conv nets alexnet, squeezenet*, vgg* without
``_bn``, ssd300_vgg16 (a VGG backbone without BN), raft_small (InstanceNorm2d and no norm).
The quantized models (``torchvision.models.quantization``) are left out: their quantized modules
are not float BatchNorms to swap.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from ._harness import ZooCase

__all__ = ["CASES", "EXPORT_EXCLUDED", "NO_BATCHNORM"]

NO_BATCHNORM: dict[str, str] = {
    **{n: "LayerNorm transformer" for n in (
        "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t", "vit_b_16",
        "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "mvit_v1_b", "mvit_v2_s", "swin3d_b",
        "swin3d_s", "swin3d_t")},
    **{n: "LayerNorm2d" for n in ("convnext_base", "convnext_large", "convnext_small",
                                  "convnext_tiny")},
    **{n: "no norm layer" for n in ("alexnet", "squeezenet1_0", "squeezenet1_1", "vgg11",
                                    "vgg13", "vgg16", "vgg19", "ssd300_vgg16")},
    # its feature encoder uses InstanceNorm2d, its context encoder no norm (raft_large's
    # context encoder has BatchNorm and is in the sweep)
    "raft_small": "InstanceNorm2d and no norm",
}

# Check 4 (fp16 ONNX export + ONNX Runtime validation) costs 10-60 s per model on 2 cores, about
# 90 % of the sweep's time; it runs on one model per family (the smallest), whose blocks and ops
# the others repeat at a larger depth or width. representative -> the models it stands for:
EXPORT_FAMILIES: dict[str, tuple[str, ...]] = {
    "densenet121": ("densenet161", "densenet169", "densenet201"),
    "efficientnet_b0": tuple(f"efficientnet_b{i}" for i in range(1, 8)),
    "efficientnet_v2_s": ("efficientnet_v2_m", "efficientnet_v2_l"),
    "mnasnet0_5": ("mnasnet0_75", "mnasnet1_0", "mnasnet1_3"),
    "mobilenet_v3_small": ("mobilenet_v3_large",),
    "regnet_x_400mf": ("regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf",
                       "regnet_x_16gf", "regnet_x_32gf"),
    "regnet_y_400mf": ("regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf",
                       "regnet_y_16gf", "regnet_y_32gf"),
    "resnet18": ("resnet34",),
    "resnet50": ("resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2"),
    "resnext50_32x4d": ("resnext101_32x8d", "resnext101_64x4d"),
    "shufflenet_v2_x0_5": ("shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"),
    "deeplabv3_resnet50": ("deeplabv3_resnet101",),
    "fcn_resnet50": ("fcn_resnet101",),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("fasterrcnn_mobilenet_v3_large_fpn",),
    "fasterrcnn_resnet50_fpn": ("fasterrcnn_resnet50_fpn_v2",),
    "maskrcnn_resnet50_fpn": ("maskrcnn_resnet50_fpn_v2",),
    "retinanet_resnet50_fpn": ("retinanet_resnet50_fpn_v2",),
}
# models with BatchNorm left out of the sweep, and why
EXCLUDED: dict[str, str] = {
    "regnet_y_128gf": "644M parameters: 14 GB peak for the checks (the model, its swapped "
                      "copies and their deep copies) on a 24 GB machine; regnet_y_400mf ... "
                      "regnet_y_32gf cover the family",
}
EXPORT_EXCLUDED: dict[str, str] = {
    # the two slowest exports (50-120 s each on 2 cores); their ops are exported elsewhere
    **{f"vgg{d}_bn": "133M+ parameters (a 266 MB fp16 file, ~50 s); Conv-BN-ReLU is exported "
                     "by every other CNN here" for d in (11, 13, 16, 19)},
    "maxvit_t": "needs 224x224 inputs (window partition): ~120 s; timm's maxvit_pico exports "
                "the MaxViT blocks at 64x64",
    **{m: f"export covered by {rep} (same family, smallest variant)"
       for rep, members in EXPORT_FAMILIES.items() for m in members},
}

# input (batch 2, 64x64, 3 channels) unless stated
INPUT: dict[str, tuple[int, ...]] = {
    "inception_v3": (2, 3, 96, 96),      # needs >= 75x75
    "googlenet": (2, 3, 64, 64),
    "maxvit_t": (2, 3, 224, 224),        # window partitions need 224
}

SMOKE = {"resnet18", "lraspp_mobilenet_v3_large"}


def _names(module: Any) -> list[str]:
    return sorted(set(torchvision.models.list_models(module=module)) - set(NO_BATCHNORM)
                  - set(EXCLUDED))


def _classifier(name: str) -> Any:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        # aux heads run in train mode only; the eval function is what the sweep compares
        kw = ({"aux_logits": False, "init_weights": True}
              if name in ("googlenet", "inception_v3") else {})
        model = torchvision.models.get_model(name, weights=None, **kw)
        return model, (torch.randn(*INPUT.get(name, (2, 3, 64, 64))),)
    return build


def _segmentation(name: str) -> Any:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                             num_classes=5)
        return model, (torch.randn(2, 3, 64, 64),)
    return build


def _video(name: str) -> Any:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        model = torchvision.models.get_model(name, weights=None)
        # s3d ends in a (2, 7, 7) average pool: it needs 16 frames of 224x224 (batch 1 to keep
        # it small)
        shape = (1, 3, 16, 224, 224) if name == "s3d" else (2, 3, 4, 64, 64)
        return model, (torch.randn(*shape),)
    return build


def _detection(name: str) -> Any:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        # min/max_size: the transform would otherwise resize to 800 px (ssdlite is fixed at
        # 320); 10 detections per image, not 100: a random Keypoint R-CNN keeps all 100, and
        # its keypoint head then takes 40 s per forward; score threshold 0, so that a random
        # model does return its 10 boxes (RetinaNet returned none) and they are compared
        kw: dict[str, Any] = ({} if name.startswith("ssd") else {"min_size": 128,
                                                                  "max_size": 128})
        rcnn = "rcnn" in name
        kw["box_detections_per_img" if rcnn else "detections_per_img"] = 10
        kw["box_score_thresh" if rcnn else "score_thresh"] = 0.0
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                             num_classes=5, **kw)
        return model, ([torch.rand(3, 128, 128), torch.rand(3, 128, 128)],)
    return build


def _flow(name: str) -> Any:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        model = torchvision.models.get_model(name, weights=None)
        # the flow head's correlation pyramid needs >= 128 px; 2 refinement steps (default 12)
        return model, (torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128), 2)
    return build


CASES: list[ZooCase] = (
    [ZooCase("torchvision", n, _classifier(n), smoke=n in SMOKE, export=EXPORT_EXCLUDED.get(n))
     for n in _names(torchvision.models)]
    + [ZooCase("torchvision", n, _segmentation(n), smoke=n in SMOKE, note="segmentation")
       for n in _names(torchvision.models.segmentation)]
    + [ZooCase("torchvision", n, _video(n), smoke=n in SMOKE, note="video")
       for n in _names(torchvision.models.video)]
    + [ZooCase("torchvision", n, _detection(n), note="detection (eval: post-processed boxes)")
       for n in _names(torchvision.models.detection)]
    + [ZooCase("torchvision", n, _flow(n), note="optical flow")
       for n in _names(torchvision.models.optical_flow)]
)
