"""Hugging Face ``transformers`` models with BatchNorm, built from shrunk default configs.

Nothing is downloaded: every model is ``<Class>(<Config>(...))`` with random weights. Widths and
depths are cut down so that one model builds and runs in well under a second; the architecture
(block types, heads, where the BatchNorms sit) is the default one.

Models of ``transformers`` that hold a BatchNorm but are not here, and why:

- detr, conditional_detr, dab_detr, deformable_detr, table_transformer, grounding_dino,
  mm_grounding_dino, omdet_turbo, mask2former, maskformer, oneformer: their backbones are
  built through ``timm`` or ``load_backbone`` (FrozenBatchNorm in a ResNet); covered by the
  HF ResNet, the timm and the torchvision detection cases; their set-prediction heads add no
  BatchNorm pattern of their own.
- d_fine, deimv2, lw_detr, rt_detr_v2, pp_doclayout_*: RT-DETR relatives (rt_detr is here).
- pp_ocrv5_*, pp_ocrv6_*, pp_lcnet_v3/v4, slanet, uvdoc: PaddleOCR ports built on the same
  HGNet/LCNet conv-BN blocks as hgnet_v2 and pp_lcnet (here).
- hubert, data2vec, wav2vec2_conformer's relatives, granite_speech*, parakeet, lasr,
  fastspeech2_conformer, seamless_m4t, speecht5, sam3_lite_text: speech/text models whose BN
  sits in a conformer convolution module: wav2vec2_conformer is here as the representative.
- informer, clap, align, groupvit, perceiver, layoutlmv2, emu3, sapiens2, vitmatte, vitpose,
  superglue, efficientloftr, depth_pro, zoedepth, glpn, beit, timm_backbone: their BN is one
  of the conv-BN / fusion-BN patterns already covered (dpt, efficientnet, resnet, segformer) or
  needs a timm/backbone download path; left out to keep the sweep short.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._harness import ZooCase

__all__ = ["CASES"]


def _img(size: int = 64, batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, size, size),)


def _resnet() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                       layer_type="bottleneck", num_labels=10)
    return ResNetForImageClassification(cfg), _img()


def _regnet() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import RegNetConfig, RegNetForImageClassification

    cfg = RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                       groups_width=8, num_labels=10)
    return RegNetForImageClassification(cfg), _img()


def _mobilenet_v1() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification

    cfg = MobileNetV1Config(depth_multiplier=0.25, image_size=64, num_labels=10)
    return MobileNetV1ForImageClassification(cfg), _img()


def _mobilenet_v2() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(depth_multiplier=0.35, image_size=64, num_labels=10)
    return MobileNetV2ForImageClassification(cfg), _img()


def _mobilenet_v2_seg() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import MobileNetV2Config, MobileNetV2ForSemanticSegmentation

    cfg = MobileNetV2Config(depth_multiplier=0.35, image_size=64, num_labels=5)
    return MobileNetV2ForSemanticSegmentation(cfg), _img()


def _mobilevit() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import MobileViTConfig, MobileViTForImageClassification

    cfg = MobileViTConfig(image_size=64, hidden_sizes=[32, 48, 64],
                          neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=10)
    return MobileViTForImageClassification(cfg), _img()


def _mobilevit_seg() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import MobileViTConfig, MobileViTForSemanticSegmentation

    cfg = MobileViTConfig(image_size=64, hidden_sizes=[32, 48, 64],
                          neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], aspp_out_channels=32,
                          num_labels=5)
    return MobileViTForSemanticSegmentation(cfg), _img()


def _mobilevitv2() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import MobileViTV2Config, MobileViTV2ForImageClassification

    cfg = MobileViTV2Config(image_size=64, width_multiplier=0.5, num_labels=10)
    return MobileViTV2ForImageClassification(cfg), _img()


def _levit() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import LevitConfig, LevitForImageClassificationWithTeacher

    cfg = LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2],
                      depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=10)
    return LevitForImageClassificationWithTeacher(cfg), _img()


def _efficientnet() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    cfg = EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.25,
                             hidden_dim=320, num_labels=10)
    return EfficientNetForImageClassification(cfg), _img()


def _swiftformer() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import SwiftFormerConfig, SwiftFormerForImageClassification

    cfg = SwiftFormerConfig(depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48], num_labels=10)
    return SwiftFormerForImageClassification(cfg), _img()


def _cvt() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import CvtConfig, CvtForImageClassification

    # depth [1, 2, 3]: transformers indexes the per-stage drop-path list by the stage number

    cfg = CvtConfig(embed_dim=[16, 32, 48], depth=[1, 2, 3], num_heads=[1, 1, 2],
                    num_labels=10)
    return CvtForImageClassification(cfg), _img()


def _segformer() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                          num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=32,
                          num_labels=5)
    return SegformerForSemanticSegmentation(cfg), _img()


def _dpt() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import DPTConfig, DPTForSemanticSegmentation

    cfg = DPTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=4,
                    num_attention_heads=2, intermediate_size=64,
                    backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
                    fusion_hidden_size=32, use_batch_norm_in_fusion_residual=True,
                    num_labels=5)
    return DPTForSemanticSegmentation(cfg), _img()


def _upernet() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import (
        ConvNextConfig,
        UperNetConfig,
        UperNetForSemanticSegmentation,
    )

    backbone = ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = UperNetConfig(backbone_config=backbone, hidden_size=32, auxiliary_channels=16,
                        num_labels=5, use_auxiliary_head=True)
    return UperNetForSemanticSegmentation(cfg), _img()


def _hgnet_v2() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import HGNetV2Config, HGNetV2ForImageClassification

    cfg = HGNetV2Config(stem_channels=[3, 8, 16], stage_in_channels=[16, 16, 32, 48],
                        stage_mid_channels=[8, 16, 24, 32], stage_out_channels=[16, 32, 48, 64],
                        stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[2, 2, 2, 2],
                        hidden_sizes=[16, 32, 48, 64], num_labels=10)
    return HGNetV2ForImageClassification(cfg), _img()


def _textnet() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import TextNetConfig, TextNetForImageClassification

    cfg = TextNetConfig(stem_out_channels=16, hidden_sizes=[16, 16, 32, 48, 64], num_labels=10)
    return TextNetForImageClassification(cfg), _img()


def _rt_detr() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    backbone = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64],
                                  depths=[1, 1, 1, 1], layer_type="basic",
                                  out_features=["stage2", "stage3", "stage4"])
    cfg = RTDetrConfig(backbone_config=backbone, encoder_in_channels=[32, 48, 64],
                       encoder_hidden_dim=32, encoder_ffn_dim=64, d_model=32,
                       decoder_ffn_dim=64, decoder_layers=1,
                       decoder_in_channels=[32, 32, 32], num_queries=20,
                       encoder_attention_heads=2, decoder_attention_heads=2,
                       num_labels=5, use_pretrained_backbone=False)
    return RTDetrForObjectDetection(cfg), _img()


def _patchtst() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import PatchTSTConfig, PatchTSTForPrediction

    cfg = PatchTSTConfig(num_input_channels=3, context_length=32, patch_length=8,
                         patch_stride=8, prediction_length=8, d_model=16, num_attention_heads=2,
                         num_hidden_layers=2, ffn_dim=32, norm_type="batchnorm")
    return PatchTSTForPrediction(cfg), (torch.randn(2, 32, 3),)


def _patchtsmixer() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import PatchTSMixerConfig, PatchTSMixerForPrediction

    cfg = PatchTSMixerConfig(num_input_channels=3, context_length=32, patch_length=8,
                             patch_stride=8, prediction_length=8, d_model=16, num_layers=2,
                             norm_mlp="BatchNorm")
    return PatchTSMixerForPrediction(cfg), (torch.randn(2, 32, 3),)


def _wav2vec2_conformer() -> tuple[nn.Module, tuple[Any, ...]]:
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel

    cfg = Wav2Vec2ConformerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, conv_dim=(16, 16, 16),
                                  conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
                                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                  conv_depthwise_kernel_size=7, position_embeddings_type="rotary")
    return Wav2Vec2ConformerModel(cfg), (torch.randn(2, 1600),)


CASES: list[ZooCase] = [
    ZooCase("hf", "resnet", _resnet, smoke=True),
    ZooCase("hf", "regnet", _regnet),
    ZooCase("hf", "mobilenet_v1", _mobilenet_v1),
    ZooCase("hf", "mobilenet_v2", _mobilenet_v2),
    ZooCase("hf", "mobilenet_v2-seg", _mobilenet_v2_seg, note="DeepLabV3 head"),
    ZooCase("hf", "mobilevit", _mobilevit, smoke=True),
    ZooCase("hf", "mobilevit-seg", _mobilevit_seg, note="DeepLabV3 head"),
    ZooCase("hf", "mobilevitv2", _mobilevitv2),
    ZooCase("hf", "levit", _levit, note="BatchNorm1d after Linear; distillation head"),
    ZooCase("hf", "efficientnet", _efficientnet),
    ZooCase("hf", "swiftformer", _swiftformer),
    ZooCase("hf", "cvt", _cvt, note="BN in the convolutional projections"),
    ZooCase("hf", "segformer", _segformer, note="BN in the all-MLP decode head only"),
    ZooCase("hf", "dpt", _dpt, note="BN in the fusion residuals and the segmentation head"),
    ZooCase("hf", "upernet", _upernet, note="ConvNeXt backbone (no BN), BN in the UPer head"),
    ZooCase("hf", "hgnet_v2", _hgnet_v2),
    ZooCase("hf", "textnet", _textnet),
    ZooCase("hf", "rt_detr", _rt_detr, note="RT-DETR ResNet backbone; top-k query selection"),
    ZooCase("hf", "patchtst", _patchtst, note="time series; BatchNorm1d over patches"),
    ZooCase("hf", "patchtsmixer", _patchtsmixer, note="time series; BatchNorm in the mixer"),
    ZooCase("hf", "wav2vec2_conformer", _wav2vec2_conformer,
            note="speech; BatchNorm1d in the conformer convolution module"),
]
