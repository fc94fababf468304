"""fp16 ONNX export of folded models, range guards, atomic writes, ORT validation."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import Tensor, nn

from normswap._fs import atomic_write_bytes
from normswap.errors import ExportError, NormswapError, NumericalMismatchError
from normswap.export import FP16_TOLERANCES, Tolerances, ValidationError, export_onnx
from tests.conftest import fold_model


@torch.no_grad()
def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats and affine params for every BN (a fresh BN is ~identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def _seg() -> nn.Module:
    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None)


ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None),
    "lraspp_mobilenet_v3_large": _seg,
}


# each model is first swapped with a normswap method (the deploy path of a converted model)
SWAP = {"resnet18": "l1", "mobilenet_v3_small": "linf", "efficientnet_b0": "kalman",
        "lraspp_mobilenet_v3_large": "l1"}


# resnet18 runs by default; the other three take 20-30 s each (swap + fold + emulated fp16)
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "resnet18" else pytest.mark.slow)
                                  for n in ZOO])
def test_zoo_swapped_folded_fp16_export_validates(name: str, tmp_path: Path) -> None:
    import normswap

    torch.manual_seed(0)
    model = _randomise(ZOO[name]()).eval()
    x = torch.randn(2, 3, 64, 64)
    swapped = normswap.swap(model, SWAP[name], example_inputs=x)
    folded, fold_report = fold_model(swapped)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) or hasattr(m, "eval_scale_shift")
                   for m in folded.modules())
    assert not fold_report.skips
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(folded, x, path)
    assert report.passed is True
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert report.fp16_initializer_fraction is not None
    assert report.fp16_initializer_fraction >= 0.9
    assert report.file_size_bytes == path.stat().st_size
    metrics = report.validation.metrics if report.validation else []
    assert metrics and all(m.cosine_min >= 0.999 and m.nonfinite == 0 for m in metrics)
    for m in metrics:
        if m.top1_agreement is not None:
            assert m.top1_agreement == 1.0
    if name == "lraspp_mobilenet_v3_large":
        assert metrics[0].top1_agreement is None  # (N, C, H, W): not classifier-shaped
    else:
        assert all(m.top1_agreement == 1.0 for m in metrics)
    # the reference is the folded model; it must equal the original BN model too
    with torch.no_grad():
        ref = model(x)
        ref = ref["out"] if isinstance(ref, dict) else ref
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    cos = float(np.dot(got.ravel(), ref.numpy().ravel())
                / (np.linalg.norm(got) * np.linalg.norm(ref.numpy())))
    assert cos >= 0.999


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5)).eval()


def test_existing_file_is_refused_without_force(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(ExportError, match=r"model\.onnx.*force=True.*--force"):
        export_onnx(_tiny(), torch.randn(2, 3, 8, 8), path)
    assert path.read_bytes() == b"keep me"
    report = export_onnx(_tiny(), torch.randn(2, 3, 8, 8), path, force=True)
    assert report.passed and path.read_bytes() != b"keep me"
    onnx.checker.check_model(onnx.load(str(path)))


class _Unexportable(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("boom")


def test_export_failure_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="could not export"):
        export_onnx(_Unexportable(), torch.randn(2, 3), path)
    assert list(tmp_path.iterdir()) == []


def test_validation_failure_raises_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "strict.onnx"
    impossible = Tolerances(cosine_min=1.5)
    with pytest.raises(ValidationError, match="fails validation") as info:
        export_onnx(_tiny(), torch.randn(2, 3, 8, 8), path, tolerances=impossible)
    assert isinstance(info.value, NumericalMismatchError) and isinstance(info.value, NormswapError)
    assert info.value.report.passed is False
    assert list(tmp_path.iterdir()) == []
    report = export_onnx(_tiny(), torch.randn(2, 3, 8, 8), path, tolerances=impossible,
                         strict=False)
    assert report.passed is False and path.exists()


def test_interrupted_write_leaves_no_partial_file(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.onnx"

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_fp32_export_dynamic_batch_and_json(tmp_path: Path) -> None:
    path = tmp_path / "fp32.onnx"
    report = export_onnx(_tiny(), torch.randn(2, 3, 8, 8), path, fp16=False)
    assert report.passed and report.fp16_initializer_fraction is None
    assert report.initializer_counts["fp16"] == 0
    assert report.validation is not None and report.validation.tolerances.rel_max < 1e-3
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: np.random.randn(5, 3, 8, 8).astype("f4")})
    assert out[0].shape == (5, 5)
    data = json.loads(report.to_json())
    assert data["validation"]["passed"] is True and data["file_size_bytes"] > 0


def test_fp16_io_types_and_torchscript_exporter(tmp_path: Path) -> None:
    report = export_onnx(_tiny(), torch.randn(2, 3, 8, 8), tmp_path / "io16.onnx",
                         keep_io_types=False, exporter="torchscript")
    assert report.exporter == "torchscript" and report.passed
    sess = ort.InferenceSession(str(tmp_path / "io16.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float16)"
    assert "Conv" in report.cpu_fp16_fallback_ops
    assert any("no fp16 kernels" in w.message for w in report.warnings)


def test_default_fp16_tolerances_are_stated() -> None:
    assert FP16_TOLERANCES.cosine_min == 0.999 and FP16_TOLERANCES.top1_min == 1.0


class _SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = _randomise(nn.BatchNorm2d(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(self.conv(x)))


def test_unfoldable_norm_exports_as_mul_add_in_fp16(tmp_path: Path) -> None:
    folded, fold_report = fold_model(_SharedConv().eval())
    assert fold_report.skips
    report = export_onnx(folded, torch.randn(2, 3, 8, 8), tmp_path / "affine.onnx")
    assert report.passed
    ops = {n.op_type for n in onnx.load(str(tmp_path / "affine.onnx")).graph.node}
    assert {"Mul", "Add"} <= ops and "BatchNormalization" not in ops


class _NoOnnxOp(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.linalg.eigvals(x).real


def test_failed_export_names_the_class_and_each_exporters_first_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as info:
        export_onnx(_NoOnnxOp(), torch.randn(2, 3, 3), tmp_path / "e.onnx")
    message = str(info.value)
    assert message.startswith("could not export _NoOnnxOp to ONNX")
    assert "dynamo exporter: DispatchError" in message and "linalg_eig" in message
    assert "torchscript exporter: UnsupportedOperatorError" in message
    assert "\n" not in message  # first lines only
    assert list(tmp_path.iterdir()) == []
