"""Model factories for the benchmarks (``--model-fn models:NAME`` from this folder), and the
median timer the conversion benchmarks share."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torchvision
from torch import nn

import normswap


@torch.no_grad()
def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters for every BatchNorm (in place): a fresh
    BN is almost the identity in eval, which would make any equivalence figure meaningless."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def _randomised_resnet50() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(torchvision.models.resnet50()).eval()


def resnet50_bn() -> nn.Module:
    """torchvision ResNet-50 with randomised BatchNorm statistics (the original)."""
    return _randomised_resnet50()


def resnet50_l1() -> nn.Module:
    """The same model converted to L1 batch-norm (eval-exact)."""
    return normswap.swap(_randomised_resnet50(), "l1")


def yolov8n() -> nn.Module:
    """ultralytics YOLOv8n (detect) built from its yaml, offline (no settings file in the user's
    home, no network), randomised BN statistics."""
    import os
    import tempfile

    if "YOLO_CONFIG_DIR" not in os.environ:
        os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="bench-ultralytics-")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics.nn.tasks import DetectionModel

    return randomise_bn(DetectionModel("yolov8n.yaml", verbose=False))


def median_seconds(fn: Callable[[], Any], repeat: int, warmup: int = 0) -> float:
    """Median wall time of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)
