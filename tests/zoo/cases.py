"""Every zoo's cases, by zoo (a zoo whose package is missing has none)."""

from __future__ import annotations

import importlib
import importlib.util
import logging

from ._harness import ZooCase

__all__ = ["ZOOS", "all_cases", "load_cases"]

log = logging.getLogger(__name__)

# zoo -> (module of its cases, the package it needs)
ZOOS: dict[str, tuple[str, str]] = {
    "timm": ("cases_timm", "timm"),
    "torchvision": ("cases_torchvision", "torchvision"),
    "ultralytics": ("cases_ultralytics", "ultralytics"),
    "hf": ("cases_hf", "transformers"),
    "smp": ("cases_smp", "segmentation_models_pytorch"),
}


def load_cases(zoo: str) -> list[ZooCase]:
    """The cases of one zoo; empty (and logged) when its package is not installed."""
    module, package = ZOOS[zoo]
    if importlib.util.find_spec(package) is None:
        log.warning("zoo %s: package %s not installed", zoo, package)
        return []
    return list(importlib.import_module(f"{__package__}.{module}").CASES)


def all_cases(zoos: list[str] | None = None) -> list[ZooCase]:
    """Cases of the given zoos (default: all), in zoo order."""
    return [c for z in (zoos or list(ZOOS)) for c in load_cases(z)]
