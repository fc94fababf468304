"""ultralytics YOLOv8 and YOLO11: detect, seg, pose, cls, obb, built from the package's yaml.

Nothing is downloaded and no network or user settings file is touched: before ultralytics is
first imported, :func:`offline_env` sets ``YOLO_OFFLINE=1`` (its ``is_online()`` then answers
False without a DNS query), ``YOLO_CONFIG_DIR`` to a private temporary folder (where it writes its
``settings.json`` on import) and ``YOLO_VERBOSE=False``. ``test_zoo.py::test_ultralytics_offline``
checks that it holds, with sockets blocked while a model is built and run.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import torch
from torch import nn

from ._harness import ZooCase

__all__ = ["CASES", "offline_env"]


def offline_env() -> str:
    """Set ultralytics' offline/settings environment (once, before its import); returns the
    config folder it will use."""
    if "ultralytics" not in sys.modules and "NORMSWAP_ZOO_YOLO_DIR" not in os.environ:
        os.environ["NORMSWAP_ZOO_YOLO_DIR"] = tempfile.mkdtemp(prefix="zoo-ultralytics-")
        os.environ["YOLO_CONFIG_DIR"] = os.environ["NORMSWAP_ZOO_YOLO_DIR"]
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_VERBOSE"] = "False"
    return os.environ.get("YOLO_CONFIG_DIR", "")


offline_env()

_TASKS = {"": "DetectionModel", "-seg": "SegmentationModel", "-pose": "PoseModel",
          "-cls": "ClassificationModel", "-obb": "OBBModel"}


def _builder(yaml: str, cls_name: str) -> Any:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        offline_env()
        from ultralytics.nn import tasks

        model = getattr(tasks, cls_name)(yaml, verbose=False)
        return model, (torch.randn(2, 3, 64, 64),)
    return build


CASES: list[ZooCase] = [
    ZooCase("ultralytics", f"{base}{suffix}", _builder(f"{base}{suffix}.yaml", cls),
            smoke=(base, suffix) == ("yolov8n", ""), note=cls)
    for base in ("yolov8n", "yolo11n") for suffix, cls in _TASKS.items()
]
