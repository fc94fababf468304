"""Checkpoints and the command line: weights-only loading, clear errors, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import normswap
from normswap._fs import atomic_write
from normswap.checkpoint import read_state_dict, write_checkpoint
from normswap.cli import main
from normswap.errors import CheckpointError
from normswap.passes._match import batchnorm_like_modules

from .conftest import randomize_bn, rel_err


def _resnet(tmp_path: Path, suffix: str = ".pth") -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("suffix,out_suffix", [(".pth", ".pt"), (".safetensors", ".safetensors")])
def test_convert_then_load_round_trip(tmp_path: Path, suffix: str, out_suffix: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    model, ckpt = _resnet(tmp_path, suffix)
    out = tmp_path / f"converted{out_suffix}"
    rc = main(["convert", str(ckpt), "--arch", "torchvision:resnet18", "--arch-arg",
               "num_classes=10", "--to", "l1", "-o", str(out), "--report",
               str(tmp_path / "r.json")])
    assert rc == 0 and out.is_file()
    text = capsys.readouterr().out
    assert "BatchNorm2d -> L1BatchNorm2d" in text and "layer1.0.bn1" in text
    rebuilt = normswap.load(None, out)
    assert not batchnorm_like_modules(rebuilt)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(rebuilt(x), model(x)) < 1e-5
    assert main(["load", str(out)]) == 0
    assert "rebuilt" in capsys.readouterr().out


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, ckpt = _resnet(tmp_path)
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    args = ["convert", str(ckpt), "--arch", "torchvision:resnet18", "--arch-arg",
            "num_classes=10", "--to", "kalman", "-o", str(out)]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(args + ["--force"]) == 0
    sd, meta = read_state_dict(out)
    assert meta["method"] == "kalman" and "layer1.0.bn1.running_var" in sd


def test_pickle_needing_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), path)  # pickles the classes
    with pytest.raises(CheckpointError, match="whole_model.pt.*needs code"):
        read_state_dict(path)


def test_mismatched_checkpoint_lists_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    _, ckpt = _resnet(tmp_path)
    rc = main(["convert", str(ckpt), "--arch", "torchvision:resnet34", "--to", "l1", "-o",
               str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "missing keys" in err and "shape mismatches" in err and "num_classes" in err
    assert not (tmp_path / "x.pt").exists()


def test_container_checkpoint_and_ddp_prefix(tmp_path: Path) -> None:
    model, _ = _resnet(tmp_path)
    path = tmp_path / "train_state.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                           model.state_dict().items()}}, path)
    sd, meta = read_state_dict(path)
    assert meta == {"container_key": "state_dict", "stripped_prefix": "module."}
    assert set(sd) == set(model.state_dict())


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.pt"

    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert os.listdir(tmp_path) == []
    write_checkpoint(target, {"w": torch.ones(2)}, {"method": "l1"})
    with pytest.raises(CheckpointError, match="already exists"):
        write_checkpoint(target, {"w": torch.ones(2)}, {"method": "l1"})


def test_missing_file_and_bad_arch() -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict("/nonexistent/ckpt.pt")
    from normswap.checkpoint import build_arch

    with pytest.raises(CheckpointError, match="torchvision has no model"):
        build_arch("torchvision:resnet9000")
    with pytest.raises(CheckpointError, match="not of the form"):
        build_arch("resnet18")
    with pytest.raises(CheckpointError, match="has no callable"):
        build_arch("torch.nn:NoSuchFactory")


def test_inspect_prints_every_layer_per_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:resnet18", "--method", "l1", "--method",
                 "normprop"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1.bn2" in out and "L1BatchNorm2d" in out
    assert "kept" in out  # normprop declines the residual blocks, with a reason


def test_save_and_load_api(tmp_path: Path) -> None:
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    conv = normswap.swap(model, "linf", k=4)
    path = normswap.save(conv, tmp_path / "m.pt", arch="torchvision:resnet18",
                         arch_kwargs={"num_classes": 10})
    back = normswap.load("torchvision:resnet18", path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back(x), conv.eval()(x), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="not produced by normswap"):
        normswap.save(model, tmp_path / "n.pt", arch="torchvision:resnet18")


def test_cli_export_fp16_folded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    model, ckpt = _resnet(tmp_path)
    out = tmp_path / "r18.onnx"
    args = ["export", str(ckpt), "--arch", "torchvision:resnet18", "--arch-arg", "num_classes=10",
            "-o", str(out), "--fp16", "--fold", "--input-shape", "1,3,64,64"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "export onnx" in text
    proto = onnx.load(str(out))
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert main(args) == 2  # exists: refused without --force
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
