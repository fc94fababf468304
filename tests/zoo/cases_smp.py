"""segmentation_models_pytorch: encoder x decoder pairs, ``encoder_weights=None``.

Every decoder of smp 0.6 on a ResNet-18 encoder (DPT needs a ViT encoder: left out, its
encoder has no BN), plus EfficientNet-B0, MobileNetV2 and a timm (``tu-``) encoder on the
decoders most used with them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._harness import ZooCase

__all__ = ["CASES"]

PAIRS: list[tuple[str, str]] = [
    *[("resnet18", d) for d in ("Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3",
                                "DeepLabV3Plus", "Linknet", "MAnet", "PAN", "UPerNet",
                                "Segformer")],
    ("efficientnet-b0", "Unet"), ("efficientnet-b0", "FPN"),
    ("mobilenet_v2", "Unet"), ("mobilenet_v2", "DeepLabV3Plus"),
    ("tu-mobilenetv3_small_050", "FPN"),
]

# PAN's feature pyramid attention pools the 1/32 map three more times (down to 1/256)
INPUT = {"PAN": 256}


def _builder(encoder: str, decoder: str) -> Any:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        import segmentation_models_pytorch as smp

        model = getattr(smp, decoder)(encoder_name=encoder, encoder_weights=None, classes=3)
        size = INPUT.get(decoder, 64)
        return model, (torch.randn(2, 3, size, size),)
    return build


CASES: list[ZooCase] = [
    ZooCase("smp", f"{enc}/{dec}", _builder(enc, dec), smoke=(enc, dec) == ("resnet18", "Unet"))
    for enc, dec in PAIRS
]
