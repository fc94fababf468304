"""timm: one model per model family (``timm.models.<family>``) that holds a BatchNorm.

Families come from ``timm.list_modules()``; each family's model is the smallest non-test variant
(by parameter count, measured on the meta device) that holds a ``_BatchNorm`` module
(``BatchNormAct2d`` counts), built with ``pretrained=False``. The input is the smallest square
size among 64/96/.../the default that the model accepts (models with a fixed input size get
theirs). Regenerate the table with ``python -m tests.zoo.survey --timm-families`` (it also lists
the families without BatchNorm, written to docs/zoo.md).

Families with no BatchNorm module at all (LayerNorm/RmsNorm/GroupNorm transformers and MLPs,
or norm-free nets) are in :data:`NO_BATCHNORM`. ``nfnet`` and the BiT-style hybrid ViTs call
``F.batch_norm`` to standardise conv *weights* (``timm.layers.StdConv2d``/``ScaledStdConv2d``):
a functional batch_norm that is not an activation BatchNorm; they are in :data:`FUNCTIONAL`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._harness import ZooCase

__all__ = ["CASES", "EXPORT_EXCLUDED", "FAMILIES", "FUNCTIONAL", "NO_BATCHNORM"]

# family -> (model, input size); measured with timm 1.0.31
FAMILIES: dict[str, tuple[str, int]] = {
    "byoanet": ("halonet_h1", 256),               # halo attention needs 256
    "byobnet": ("mobileone_s1", 64),
    "convmixer": ("convmixer_768_32", 64),
    "cpubone": ("cpubone_nano", 64),
    "cspnet": ("cs3darknet_focus_s", 64),
    "cspnext": ("cspnext_tiny", 64),
    "densenet": ("densenet121", 64),
    "dla": ("dla46x_c", 64),
    "dpn": ("dpn48b", 64),
    "efficientformer": ("efficientformer_l1", 224),  # fixed input size
    "efficientformer_v2": ("efficientformerv2_s0", 64),  # built with img_size=64
    "efficientnet": ("mobilenetv2_035", 64),
    "efficientvim": ("efficientvim_m1", 64),
    "efficientvit_mit": ("efficientvit_b0", 64),
    "efficientvit_msra": ("efficientvit_m0", 64),  # built with img_size=64
    "fasternet": ("fasternet_t0", 64),
    "fastvit": ("fastvit_t8", 64),
    "ghostnet": ("ghostnet_050", 64),
    "hardcorenas": ("hardcorenas_b", 64),
    "hgnet": ("hgnetv2_b0", 64),
    "hrnet": ("hrnet_w18_small", 64),
    "iformer": ("iformer_t", 64),
    "inception_next": ("inception_next_atto", 64),
    "inception_resnet_v2": ("inception_resnet_v2", 96),
    "inception_v3": ("inception_v3", 96),
    "inception_v4": ("inception_v4", 96),
    "lcnetv2": ("lcnetv2_small", 64),
    "levit": ("levit_128s", 64),  # built with img_size=64
    "lowformer": ("lowformer_b0", 64),
    "maxxvit": ("maxvit_pico_rw_256", 64),  # built with img_size=64
    "mobilenetv3": ("mobilenetv3_small_050", 64),
    "mobilevit": ("mobilevit_xxs", 64),
    "nasnet": ("nasnetalarge", 64),                # the family's only model
    "nextvit": ("nextvit_small", 64),
    "pnasnet": ("pnasnet5large", 64),              # the family's only model
    "regnet": ("regnetx_002", 64),
    "repghost": ("repghostnet_050", 64),
    "repvit": ("repvit_m1", 64),
    "res2net": ("res2next50", 64),
    "resnest": ("resnest14d", 64),
    "resnet": ("resnet10t", 64),
    "resnetv2": ("resnetv2_18", 64),
    "rexnet": ("rexnet_100", 64),
    "selecsls": ("selecsls42", 64),
    "senet": ("legacy_seresnet18", 64),
    "shvit": ("shvit_s1", 64),
    "sknet": ("skresnet18", 64),
    "starnet": ("starnet_s050", 64),
    "swiftformer": ("swiftformer_xs", 64),  # built with img_size=64
    "tiny_vit": ("tiny_vit_5m_224", 64),
    "tresnet": ("tresnet_m", 64),
    "vgg": ("vgg11_bn", 64),
    "visformer": ("visformer_tiny", 64),  # built with img_size=64
    "vision_transformer_hybrid": ("vit_small_resnet50d_s16_224", 64),  # built with img_size=64
    "volo": ("volo_d1_224", 64),  # built with img_size=64
    "vovnet": ("ese_vovnet19b_slim_dw", 64),
    "xception": ("legacy_xception", 64),
    "xception_aligned": ("xception41p", 64),
    "xcit": ("xcit_nano_12_p8_224", 64),  # built with img_size=64
}

# families whose only batch_norm is F.batch_norm standardising conv weights (no BN module)
FUNCTIONAL: dict[str, tuple[str, int]] = {
    "nfnet": ("nf_regnet_b0", 64),                       # ScaledStdConv2d
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", 64),  # StdConv2dSame; img_size=64
}

# families without any BatchNorm module or call (their norms, as found on timm 1.0.31)
NO_BATCHNORM: dict[str, str] = {
    "beit": "LayerNorm", "cait": "LayerNorm", "coat": "LayerNorm", "convit": "LayerNorm",
    "convnext": "LayerNorm/LayerNorm2d, GlobalResponseNorm", "crossvit": "LayerNorm",
    "csatv2": "LayerNorm2d, GlobalResponseNorm", "davit": "LayerNorm/LayerNorm2d",
    "deepseek_vit": "RmsNorm", "deit": "LayerNorm", "edgenext": "LayerNorm/LayerNorm2d",
    "eva": "LayerNorm/RmsNorm", "focalnet": "LayerNorm2d", "gcvit": "LayerNorm/LayerNorm2d",
    "gemma4_vit": "RmsNorm", "hiera": "LayerNorm", "hieradet_sam2": "LayerNorm",
    "mambaout": "LayerNorm", "metaformer": "GroupNorm1/LayerNorm2d", "mlp_mixer": "LayerNorm",
    "mobilenetv5": "RmsNorm2d", "mvitv2": "LayerNorm", "naflexvit": "LayerNorm",
    "nest": "LayerNorm", "pit": "LayerNorm", "pvt_v2": "LayerNorm", "qwen3_vit": "LayerNorm",
    "rdnet": "LayerNorm2d", "sequencer": "LayerNorm", "swin_transformer": "LayerNorm",
    "swin_transformer_v2": "LayerNorm", "swin_transformer_v2_cr": "LayerNorm",
    "tnt": "LayerNorm", "twins": "LayerNorm", "vision_transformer": "LayerNorm/RmsNorm",
    "vision_transformer_relpos": "LayerNorm", "vision_transformer_sam": "LayerNorm/LayerNorm2d",
    "vitamin": "LayerNorm/LayerNorm2d",
}

# models with a fixed input size that take ``img_size=`` (position embeddings, attention
# biases and windows are built for it): built for 64x64 inputs, 10-50x faster than at 224
IMG_SIZE_KW = {"efficientformerv2_s0", "efficientvit_m0", "levit_128s", "maxvit_pico_rw_256",
               "swiftformer_xs", "visformer_tiny", "vit_small_resnet50d_s16_224", "volo_d1_224",
               "xcit_nano_12_p8_224", "vit_tiny_r_s16_p8_224"}

# fast enough (< 2 s for every check) to run in the default test run
SMOKE = {"resnet", "efficientnet"}


def _builder(model_name: str, size: int) -> Any:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        import timm

        kw = {"img_size": size} if model_name in IMG_SIZE_KW else {}
        model = timm.create_model(model_name, pretrained=False, **kw)
        return model, (torch.randn(2, 3, size, size),)
    return build


# check 4 (export) left out, with the reason
EXPORT_EXCLUDED: dict[str, str] = {
    "vgg": "133M parameters (a 266 MB fp16 file, ~60 s); Conv-BN-ReLU is exported by every "
           "other CNN here",
}

# FUNCTIONAL families hold no BatchNorm to convert (their F.batch_norm has no running
# statistics): test_zoo.py checks that a swap leaves them unchanged instead of sweeping them
CASES: list[ZooCase] = [
    ZooCase("timm", f"{family}/{name}", _builder(name, size), smoke=family in SMOKE,
            export=EXPORT_EXCLUDED.get(family))
    for family, (name, size) in FAMILIES.items()
]
