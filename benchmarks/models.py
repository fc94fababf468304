"""Model factories for the benchmarks (``--model-fn models:NAME`` from this folder)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import normswap


@torch.no_grad()
def _randomised_resnet50() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def resnet50_bn() -> nn.Module:
    """torchvision ResNet-50 with randomised BatchNorm statistics (the original)."""
    return _randomised_resnet50()


def resnet50_l1() -> nn.Module:
    """The same model converted to L1 batch-norm (eval-exact)."""
    return normswap.swap(_randomised_resnet50(), "l1")
