"""Checkpoints: weights-only reading of every format, a header that never chooses code, fuzzed
readers, atomic writes, Hugging Face folders."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import normswap
import normswap.checkpoint as ckpt_mod
from normswap._fs import atomic_write
from normswap.arch import build_arch
from normswap.checkpoint import load, read_state_dict, write_checkpoint
from normswap.cli import main
from normswap.errors import CheckpointError
from normswap.passes._match import batchnorm_like_modules

from .conftest import randomize_bn, rel_err


class _RunsCode:
    """Unpickling this runs ``touch MARKER``: a weights-only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


def _resnet_ckpt(tmp_path: Path, suffix: str = ".pth") -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return model, path


def _tiny_sd() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.randn(4, 3, 3, 3), "bn.running_var": torch.rand(4) + 0.5}


# --------------------------------------------------------------------------- reading

def test_pickle_needing_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), path)  # pickles the classes
    with pytest.raises(CheckpointError, match="whole_model.pt' is not a PyTorch or safetensors "
                                              "checkpoint: .*needs code.*Sequential"):
        read_state_dict(path)


@pytest.mark.parametrize("variant", ["zip", "legacy", "raw_pickle"])
def test_pickle_running_os_system_is_refused_and_never_runs(tmp_path: Path, variant: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    payload = {"w": torch.ones(1), "x": _RunsCode(marker)}
    if variant == "zip":
        torch.save(payload, path)
    elif variant == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="evil.pt' is not a PyTorch or safetensors"):
        read_state_dict(path)
    assert not marker.exists()


def test_container_checkpoint_and_ddp_prefix(tmp_path: Path) -> None:
    model, _ = _resnet_ckpt(tmp_path)
    path = tmp_path / "train_state.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                           model.state_dict().items()}}, path)
    sd, meta = read_state_dict(path)
    assert meta == {"container_key": "state_dict", "stripped_prefix": "module."}
    assert set(sd) == set(model.state_dict())


def test_format_is_read_from_the_content_not_the_suffix(tmp_path: Path) -> None:
    sd = _tiny_sd()
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "really_safetensors.pt"))
    torch.save(sd, tmp_path / "really_torch.safetensors")
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    for name in ("really_safetensors.pt", "really_torch.safetensors", "legacy.bin"):
        got, _ = read_state_dict(tmp_path / name)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd), name


def test_big_files_are_memory_mapped_after_a_bounds_check(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    sd = _tiny_sd()
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    seen: list[bool] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("mmap", False))
        assert kwargs["weights_only"] is True
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "_MMAP_BYTES", 0)
    monkeypatch.setattr(torch, "load", spy)
    got, _ = read_state_dict(path)
    assert seen == [True] and torch.equal(got["conv.weight"], sd["conv.weight"])
    # a central directory that claims more data than the file holds is refused before torch
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data/0"))
    central = data.find(b"PK\x01\x02")
    while central != -1:
        name_len = struct.unpack("<H", data[central + 28:central + 30])[0]
        if data[central + 46:central + 46 + name_len].decode() == info.filename:
            data[central + 20:central + 28] = struct.pack("<II", 2**30, 2**30)
            break
        central = data.find(b"PK\x01\x02", central + 4)
    bad = tmp_path / "lying.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="lying.pt' is not a .*runs past the end"):
        read_state_dict(bad)
    assert seen == [True]


# --------------------------------------------------------------------------- fuzzing

def _valid_bytes(kind: str) -> bytes:
    sd = _tiny_sd()
    buf = io.BytesIO()
    if kind == "zip":
        torch.save(sd, buf)
    elif kind == "legacy":
        torch.save(sd, buf, _use_new_zipfile_serialization=False)
    else:
        from safetensors.torch import save

        return save(sd, metadata={"normswap": json.dumps({"method": "l1",
                                                          "arch": "torchvision:resnet18"})})
    return buf.getvalue()


_VALID = {k: _valid_bytes(k) for k in ("zip", "legacy", "safetensors")}


def _not_torch_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "hello")
        zf.writestr("weights/w.npy", b"\x93NUMPY")
    return buf.getvalue()


def _safetensors_with_header(length: int, body: bytes) -> bytes:
    return struct.pack("<Q", length) + body


_bad_input = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=512)),
    st.tuples(st.just("truncated"), st.sampled_from(sorted(_VALID)),
              st.floats(min_value=0.0, max_value=0.999)),
    st.tuples(st.just("huge_header"), st.sampled_from([2**60, 2**64 - 1, 2**31, 10**9]),
              st.binary(max_size=64)),
    st.tuples(st.just("corrupt_header"), st.sampled_from([b'{"a": [', b'{"x": {"dtype": 7}}',
                                                          (b'{"t": {"dtype": "F32", "shape": '
                                                           b'[99999999], "data_offsets": [0, '
                                                           b'4]}}'), b"{" + b"[" * 5000]),
              st.just(b"")),
    st.tuples(st.just("special"), st.sampled_from(["empty", "directory", "dangling_symlink",
                                                   "symlink_to_directory", "zip_not_torch",
                                                   "code_zip", "code_legacy", "code_raw",
                                                   "torchscript", "missing"])),
)
_suffix = st.sampled_from([".pt", ".pth", ".bin", ".safetensors", ".ckpt", ""])


def _materialise(case: tuple[Any, ...], folder: Path, suffix: str) -> tuple[Path, Path]:
    """Write one bad input; returns (its path, the marker that code execution would create)."""
    marker = folder / "code_ran"
    path = folder / f"input{suffix}"
    kind = case[0]
    if kind == "bytes":
        path.write_bytes(case[1])
    elif kind == "truncated":
        data = _VALID[case[1]]
        path.write_bytes(data[: int(len(data) * case[2])])
    elif kind == "huge_header":
        path.write_bytes(_safetensors_with_header(case[1], b"{" + case[2]))
    elif kind == "corrupt_header":
        path.write_bytes(_safetensors_with_header(len(case[1]), case[1]) + b"\0" * 8)
    else:
        special = case[1]
        if special == "empty":
            path.write_bytes(b"")
        elif special == "directory":
            path.mkdir()
        elif special == "dangling_symlink":
            path.symlink_to(folder / "nowhere")
        elif special == "symlink_to_directory":
            (folder / "adir").mkdir()
            path.symlink_to(folder / "adir")
        elif special == "zip_not_torch":
            path.write_bytes(_not_torch_zip())
        elif special == "torchscript":
            torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
        elif special.startswith("code_"):
            payload = {"w": torch.ones(1), "x": _RunsCode(marker)}
            if special == "code_zip":
                torch.save(payload, path)
            elif special == "code_legacy":
                torch.save(payload, path, _use_new_zipfile_serialization=False)
            else:
                path.write_bytes(pickle.dumps(payload, protocol=2))
    return path, marker


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_bad_input, suffix=_suffix)
def test_fuzz_readers_raise_checkpoint_error_naming_the_file(case: tuple[Any, ...],
                                                             suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path, marker = _materialise(case, Path(d), suffix)
        for reader in (read_state_dict, lambda p: load(None, p),
                       lambda p: load("torchvision:resnet18", p)):
            with pytest.raises(CheckpointError) as info:
                reader(path)
            msg = str(info.value)
            assert path.name in msg, msg
            assert ("is not a PyTorch or safetensors checkpoint" in msg
                    or "does not exist" in msg), msg
        assert not marker.exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=1, max_size=64), kind=st.sampled_from(sorted(_VALID)),
       where=st.floats(min_value=0.0, max_value=0.999))
@example(data=b"@", kind="zip", where=0.8193524025148756)  # zipfile: "zip file version 6.4"
def test_fuzz_damaged_checkpoints_load_or_raise_checkpoint_error(data: bytes, kind: str,
                                                                 where: float) -> None:
    """Overwriting bytes of a valid file either leaves it readable (tensor data hit) or gives
    a CheckpointError; never another exception."""
    blob = bytearray(_VALID[kind])
    at = int(len(blob) * where)
    blob[at:at + len(data)] = data
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "damaged.pt"
        path.write_bytes(bytes(blob[:len(_VALID[kind])]))
        try:
            sd, meta = read_state_dict(path)
        except CheckpointError as exc:
            assert "damaged.pt" in str(exc)
        else:
            assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
            assert isinstance(meta, dict)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_bad_input, suffix=_suffix)
def test_fuzz_cli_returns_2_with_one_line_and_writes_nothing(case: tuple[Any, ...],
                                                             suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as out_dir:
        path, marker = _materialise(case, Path(d), suffix)
        commands = [
            ["load", str(path)],
            ["inspect", str(path), "--arch", "torchvision:resnet18"],
            ["convert", str(path), "--arch", "torchvision:resnet18", "--to", "l1", "-o",
             str(Path(out_dir) / "out.pt"), "--report", str(Path(out_dir) / "r.json")],
            ["export", str(path), "--arch", "torchvision:resnet18", "-o",
             str(Path(out_dir) / "m.onnx")],
        ]
        for argv in commands:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(argv)
            lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("normswap: error")]
            assert rc == 2, (argv, err.getvalue())
            assert len(lines) == 1 and path.name in lines[0], err.getvalue()
            assert "Traceback" not in err.getvalue()
        assert os.listdir(out_dir) == []
        assert not marker.exists()


# --------------------------------------------------------------------------- the header

def _converted_ckpt(tmp_path: Path, header: dict[str, Any], suffix: str = ".pt") -> Path:
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    conv = normswap.swap(model, "l1", verify=False)
    path = tmp_path / f"converted{suffix}"
    header = {"format": 1, **conv.normswap_method, **header}  # written raw, as an attacker would
    sd = {k: v.contiguous() for k, v in conv.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={"normswap": json.dumps(header)})
    else:
        torch.save({"normswap": header, "state_dict": sd}, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_header_naming_os_system_never_runs(tmp_path: Path, suffix: str,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    path = _converted_ckpt(tmp_path, {"arch": "os:system",
                                      "arch_kwargs": {"command": f"touch '{marker}'"}}, suffix)
    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    with pytest.raises(CheckpointError, match="records architecture 'os:system'.*never "
                                              "imports code a file names.*arch='os:system'"):
        load(None, path)
    for argv in (["load", str(path)], ["inspect", str(path)],
                 ["export", str(path), "-o", str(tmp_path / "m.onnx")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "os:system" in err and err.count("normswap: error") == 1
    assert not calls and not marker.exists() and not (tmp_path / "m.onnx").exists()


def test_header_that_disagrees_with_arch_is_reported(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = _converted_ckpt(tmp_path, {"arch": "os:system", "arch_kwargs": {"command": "x"}})
    with caplog.at_level(logging.WARNING, logger="normswap"):
        model = load("torchvision:resnet18", path, num_classes=10)
    text = caplog.text
    assert "'os:system'" in text and "'torchvision:resnet18'" in text
    assert any("os:system" in w.message for w in model.normswap_report.warnings)
    assert not batchnorm_like_modules(model)


def test_builtin_header_rebuilds_with_plain_arguments_only(tmp_path: Path) -> None:
    ok = _converted_ckpt(tmp_path, {"arch": "torchvision:resnet18",
                                    "arch_kwargs": {"num_classes": 10}})
    assert not batchnorm_like_modules(load(None, ok))
    nested = tmp_path / "nested"
    nested.mkdir()
    bad = _converted_ckpt(nested, {"arch": "torchvision:resnet18",
                                   "arch_kwargs": {"num_classes": 10, "norm_layer": {"x": 1}}})
    with pytest.raises(CheckpointError, match="not JSON scalars"):
        load(None, bad)
    dl = tmp_path / "dl"
    dl.mkdir()
    download = _converted_ckpt(dl, {"arch": "torchvision:resnet18",
                                    "arch_kwargs": {"num_classes": 10, "weights": "DEFAULT"}})
    with pytest.raises(CheckpointError, match="would load or download weights"):
        load(None, download)


def test_header_options_must_be_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"normswap": {"method": "l1", "arch": "torchvision:resnet18",
                             "options": {"eps": [[1]]}}, "state_dict": _tiny_sd()}, path)
    with pytest.raises(CheckpointError, match="method options"):
        load(None, path)
    torch.save({"normswap": "os:system", "state_dict": _tiny_sd()}, path)
    with pytest.raises(CheckpointError, match="header is a str, not a mapping"):
        read_state_dict(path)


def test_user_factory_file_must_be_passed_again(tmp_path: Path) -> None:
    from .test_arch import write_factories

    spec = f"{write_factories(tmp_path / 'm')}:build"
    model = randomize_bn(build_arch(spec, width=6)).eval()
    conv = normswap.swap(model, "l1")
    path = normswap.save(conv, tmp_path / "tiny.pt", arch=spec, arch_kwargs={"width": 6})
    with pytest.raises(CheckpointError, match="records architecture .*factories.py:build"):
        load(None, path)
    back = load(spec, path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), conv.eval()(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- writing / API

@pytest.mark.parametrize("suffix,out_suffix", [(".pth", ".pt"), (".safetensors", ".safetensors")])
def test_convert_then_load_round_trip(tmp_path: Path, suffix: str, out_suffix: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    model, ckpt = _resnet_ckpt(tmp_path, suffix)
    out = tmp_path / f"converted{out_suffix}"
    rc = main(["convert", str(ckpt), "--arch", "torchvision:resnet18", "--arch-arg",
               "num_classes=10", "--to", "l1", "-o", str(out), "--report",
               str(tmp_path / "r.json")])
    assert rc == 0 and out.is_file()
    text = capsys.readouterr().out
    assert "BatchNorm2d -> L1BatchNorm2d" in text and "layer1.0.bn1" in text
    assert json.loads((tmp_path / "r.json").read_text())["entries"]
    rebuilt = normswap.load(None, out)
    assert not batchnorm_like_modules(rebuilt)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(rebuilt(x), model(x)) < 1e-5
    assert main(["load", str(out)]) == 0
    assert "rebuilt" in capsys.readouterr().out


def test_timm_checkpoint_round_trip(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    model = randomize_bn(timm.create_model("resnet18", pretrained=False, num_classes=4)).eval()
    path = tmp_path / "timm_r18.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "timm_r18_l1.pt"
    assert main(["convert", str(path), "--arch", "timm:resnet18", "--arch-arg",
                 "num_classes=4", "--to", "l1", "-o", str(out), "-q"]) == 0
    back = load(None, out)  # a timm: header may rebuild by itself
    assert back.pretrained_cfg["architecture"] == "resnet18"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(back(x), model(x)) < 1e-5


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


def test_missing_file() -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict("/nonexistent/ckpt.pt")


def test_save_and_load_api(tmp_path: Path) -> None:
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    conv = normswap.swap(model, "linf", k=4)
    path = normswap.save(conv, tmp_path / "m.pt", arch="torchvision:resnet18",
                         arch_kwargs={"num_classes": 10})
    back = normswap.load("torchvision:resnet18", path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), conv.eval()(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="not produced by normswap"):
        normswap.save(model, tmp_path / "n.pt", arch="torchvision:resnet18")


def test_tuple_arguments_are_recorded_as_lists(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_checkpoint(path, _tiny_sd(), {"method": "l1", "arch": "torchvision:resnet18",
                                        "arch_kwargs": {"widths": (8, 16), "act": None,
                                                        "obj": object()}})
    _, meta = read_state_dict(path)
    assert meta["arch_kwargs"] == {"widths": [8, 16], "act": None}


# --------------------------------------------------------------------------- Hugging Face

def _hf_resnet(folder: Path) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    num_labels=3)
    torch.manual_seed(0)
    model = randomize_bn(transformers.ResNetForImageClassification(cfg)).eval()
    model.save_pretrained(str(folder))
    return model


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return out.logits if hasattr(out, "logits") else out[0]


def test_hf_folder_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "resnet-hf"
    original = _hf_resnet(src)
    out = tmp_path / "resnet-hf-l1"
    assert main(["convert", f"{src}/", "--to", "l1", "-o", f"{out}/"]) == 0
    capsys.readouterr()
    assert {"config.json", "model.safetensors", "normswap.json"} <= set(os.listdir(out))
    header = json.loads((out / "normswap.json").read_text())
    assert header["method"] == "l1"
    assert header["arch"] == "transformers:ResNetForImageClassification"
    assert not [p for p in tmp_path.iterdir() if ".normswap-" in p.name]  # no temp left
    rebuilt = load(None, out)  # (b) normswap rebuilds the converted model from the folder
    assert not batchnorm_like_modules(rebuilt)
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(_logits(rebuilt, x), _logits(original, x)) < 1e-5
    assert main(["load", str(out)]) == 0
    assert "rebuilt ResNetForImageClassification" in capsys.readouterr().out
    # the folder is refused without --force, replaced with it
    assert main(["convert", str(src), "--to", "kalman", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert json.loads((out / "normswap.json").read_text())["method"] == "l1"
    assert main(["convert", str(src), "--to", "kalman", "-o", str(out), "--force", "-q"]) == 0
    assert json.loads((out / "normswap.json").read_text())["method"] == "kalman"


def test_hf_converted_folder_loads_into_the_plain_class(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "resnet-hf"
    original = _hf_resnet(src)
    out = tmp_path / "resnet-hf-l1"
    assert main(["convert", str(src), "--to", "l1", "-o", str(out), "-q"]) == 0
    # (a) Hugging Face loads the converted folder into the BatchNorm class it names
    plain = transformers.ResNetForImageClassification.from_pretrained(
        str(out), local_files_only=True)
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(_logits(plain, x), _logits(original, x)) < 1e-5


def test_hf_folder_output_is_not_written_over_a_foreign_folder(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    src = tmp_path / "resnet-hf"
    _hf_resnet(src)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["convert", str(src), "--to", "l1", "-o", str(foreign), "--force"]) == 2
    assert "normswap did not write" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert main(["convert", str(src), "--to", "l1", "-o", str(tmp_path / "x.pt")]) == 2
    assert "converts into a folder" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_hf_folder_permissions_follow_the_umask(tmp_path: Path) -> None:
    src = tmp_path / "resnet-hf"
    _hf_resnet(src)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert main(["convert", str(src), "--to", "l1", "-o", str(out), "-q"]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name


def test_plain_directory_and_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="Hugging Face folder without weights"):
        read_state_dict(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="shards outside the folder"):
        read_state_dict(tmp_path)


def test_load_weights_keeps_one_copy_and_ties() -> None:
    from normswap.checkpoint import load_weights

    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    dst = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    load_weights(dst, sd)
    # the checkpoint's tensors became the model's (no second copy), parameters stay trainable
    assert dst[0].weight.data_ptr() == sd["0.weight"].data_ptr()
    assert isinstance(dst[0].weight, nn.Parameter) and dst[0].weight.requires_grad
    # another dtype: copied and cast into the model's own tensors
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    dst2 = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    load_weights(dst2, half)
    assert dst2[0].weight.dtype == torch.float32
    assert torch.equal(dst2[0].weight, sd["0.weight"].half().float())

    # a tied model keeps its tie (the checkpoint holds two separate tensors)
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

    tied = Tied()
    w = torch.randn(4, 4)
    load_weights(tied, {"a.weight": w.clone(), "b.weight": w.clone()})
    assert tied.a.weight is tied.b.weight and torch.equal(tied.a.weight, w)
