"""The command line: every error path exits 2 with one line and writes nothing; outputs are
checked up front, written atomically with ordinary permissions; logging, progress, reports."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import normswap
import normswap.arch
from normswap.checkpoint import read_state_dict
from normswap.cli import _session, build_parser, main

from .conftest import randomize_bn
from .test_arch import write_factories


def _resnet_ckpt(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _tiny_ckpt(tmp_path: Path, factory: str = "build") -> tuple[str, Path]:
    """A tiny BN CNN from a local factories.py (not on sys.path) and its trained-looking state."""
    spec = f"{write_factories(tmp_path / 'models')}:{factory}"
    model = randomize_bn(normswap.arch.build_arch(spec)).eval()
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return spec, path


def _one_error(err: str) -> str:
    """The single ``normswap: error:`` line of a failed run (and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("normswap: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --------------------------------------------------------------------------- help

def test_help_documents_that_arch_runs_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "module.path:factory (imports module.path and so RUNS its code, like `python -m`)" in out
    assert "./file.py:factory / /abs/path/file.py:factory (RUNS that file" in out
    assert "VALUE is a Python literal (None, True, 10, 0.5, (8, 16, 32), 'text'), else JSON" in out
    assert "A checkpoint's own header never chooses code" in out


# --------------------------------------------------------------------------- error paths

def test_error_paths_exit_2_with_one_line_and_write_nothing(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    spec, ckpt = _tiny_ckpt(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "a_file").write_text("x")
    out = str(out_dir / "o.pt")
    base = ["convert", str(ckpt), "--arch", spec, "--to", "l1", "-o", out]
    cases: list[tuple[list[str], str]] = [
        (["convert", str(ckpt), "--arch", spec, "--to", "linf", "-o", out, "--option", "k=0"],
         "--option k=0: method 'linf' rejects it .*k must be an int >= 1"),
        (["convert", str(ckpt), "--arch", spec, "--to", "linf", "-o", out, "--option",
          "bogus=1"], "--option bogus=1: method 'linf' rejects it .*bogus"),
        (base + ["--option", "k"], "--option 'k' is not KEY=VALUE"),
        (base + ["--input-shape", "1,3,x"], "--input-shape '1,3,x' is not a list of integers"),
        (base + ["--input-shape", "1,3,0,4"], "every dimension must be a positive"),
        (base + ["--input-shape", "1,5,8,8"], (r"--input-shape 1,5,8,8: the model rejects an "
                                               r"input of shape \[1, 5, 8, 8\]")),
        (base + ["--input-shape", "100000,3,1000,1000"], "elements"),
        (base + ["--arch-arg", "width"], "--arch-arg 'width' is not KEY=VALUE"),
        (base + ["--arch-arg", "depth=3"], "rejects its arguments .*depth"),
        (base + ["--arch-arg", "width=8"], "shape mismatches"),
        (["convert", str(ckpt), "--arch", spec, "--to", "l3", "-o", out], "unknown method 'l3'"),
        (["convert", str(ckpt), "--to", "l1", "-o", out], "plain checkpoint: pass --arch"),
        (["convert", str(ckpt), "--arch", "./nowhere.py:build", "--to", "l1", "-o", out],
         "nowhere.py.*does not exist"),
        (base + ["--report", out], "--report and -o name the same file"),
        (["convert", str(ckpt), "--arch", spec, "--to", "l1", "-o", str(out_dir)],
         "is a directory; name a file inside it"),
        (["convert", str(ckpt), "--arch", spec, "--to", "l1", "-o",
          str(out_dir / "a_file" / "o.pt")], "a_file' is a file, not a directory"),
        (base + ["--report", str(out_dir / "a_file" / "r.json")], "--report.*is a file"),
        (["convert", str(ckpt), "--arch", spec, "--to", "l1", "-o", str(out_dir / "noext")],
         "has no suffix, so it names a folder"),
        (["inspect", "nonsense"], "neither an existing checkpoint"),
        (["export", str(ckpt), "--arch", spec, "-o", str(out_dir / "m.onnx"),
          "--input-shape", "2,2"], "the model rejects an input"),
    ]
    for argv, pattern in cases:
        before = _files(tmp_path)
        assert main(argv) == 2, argv
        line = _one_error(capsys.readouterr().err)
        assert re.search(pattern, line), (argv, line)
        assert _files(tmp_path) == before, argv


def test_existing_outputs_need_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec, ckpt = _tiny_ckpt(tmp_path)
    out, report = tmp_path / "out.pt", tmp_path / "report.json"
    report.write_text("precious report")
    args = ["convert", str(ckpt), "--arch", spec, "--to", "kalman", "-o", str(out),
            "--report", str(report)]
    assert main(args) == 2  # the report exists: refused before the checkpoint is written
    assert "--report" in _one_error(capsys.readouterr().err)
    assert not out.exists() and report.read_text() == "precious report"
    out.write_bytes(b"precious")
    assert main(args) == 2
    assert "--force" in _one_error(capsys.readouterr().err)
    assert out.read_bytes() == b"precious"
    assert main(args + ["--force"]) == 0
    sd, meta = read_state_dict(out)
    assert meta["method"] == "kalman" and "bn.running_var" in sd
    assert json.loads(report.read_text())["title"].endswith("kalman")


def test_mismatched_checkpoint_lists_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    _, ckpt = _resnet_ckpt(tmp_path)
    rc = main(["convert", str(ckpt), "--arch", "torchvision:resnet34", "--to", "l1", "-o",
               str(tmp_path / "x.pt")])
    err = _one_error(capsys.readouterr().err)
    assert rc == 2
    assert "missing keys" in err and "shape mismatches" in err and "num_classes" in err
    assert not (tmp_path / "x.pt").exists()


def test_unverifiable_conversion_exits_2_unless_no_verify(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    spec, ckpt = _tiny_ckpt(tmp_path, "build_fixed")  # takes 8x8 only: the guessed input fails
    out = tmp_path / "fixed_l1.pt"
    args = ["convert", str(ckpt), "--arch", spec, "--to", "l1", "-o", str(out)]
    assert main(args) == 2
    line = _one_error(capsys.readouterr().err)
    assert "could not run" in line and "--input-shape" in line and "--no-verify" in line
    assert not out.exists()
    assert main(args + ["--no-verify", "-q"]) == 0 and out.is_file()
    out.unlink()
    assert main(args + ["--input-shape", "1,3,8,8", "-q"]) == 0 and out.is_file()
    # a method that changes the function needs no check
    assert main(["convert", str(ckpt), "--arch", spec, "--to", "selu", "-o",
                 str(tmp_path / "selu.pt"), "-q"]) == 0


def test_unexpected_errors_are_one_line_unless_verbose(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    spec, ckpt = _tiny_ckpt(tmp_path)
    broken = spec.rsplit(":", 1)[0] + ":broken"
    argv = ["convert", str(ckpt), "--arch", broken, "--to", "l1", "-o", str(tmp_path / "o.pt")]
    assert main(argv) == 1
    line = _one_error(capsys.readouterr().err)
    assert "unexpected RuntimeError: a bug inside the factory" in line
    assert "run with -v for the traceback" in line
    assert main(argv + ["-v"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_argparse_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert"]) == 2
    assert "required" in capsys.readouterr().err


# --------------------------------------------------------------------------- outputs

def test_local_factory_file_with_literal_arguments(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, ckpt = _tiny_ckpt(tmp_path)
    monkeypatch.chdir(tmp_path)
    rel = "./models/factories.py:build"
    assert main(["convert", str(ckpt), "--arch", rel, "--arch-arg", "act=None", "--arch-arg",
                 "sizes=(8, 16, 32)", "--arch-arg", "flag=True", "--arch-arg", "name='x'",
                 "--to", "l1", "-o", "tiny_l1.pt", "-q"]) == 0
    assert capsys.readouterr().out == ""  # -q
    _, meta = read_state_dict("tiny_l1.pt")
    assert meta["arch"] == rel
    assert meta["arch_kwargs"] == {"act": None, "sizes": [8, 16, 32], "flag": True, "name": "x"}
    model = normswap.load(rel, "tiny_l1.pt")
    assert model.received == {"width": 4, "act": None, "sizes": [8, 16, 32], "flag": True,
                              "name": "x"}


def test_permissions_follow_the_umask_and_stale_temps_are_removed(tmp_path: Path) -> None:
    spec, ckpt = _tiny_ckpt(tmp_path)
    out, report = tmp_path / "o.pt", tmp_path / "reports" / "r.md"  # the folder is created
    stale = tmp_path / ".o.pt.normswap-abc123.tmp"
    stale.write_bytes(b"left by a killed run")
    old = os.umask(0o022)
    try:
        assert main(["convert", str(ckpt), "--arch", spec, "--to", "l1", "-o", str(out),
                     "--report", str(report), "-q"]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    assert report.stat().st_mode & 0o777 == 0o644
    assert not stale.exists()
    text = report.read_text()
    assert text.startswith("normswap swap -> l1") and "BatchNorm2d -> L1BatchNorm2d" in text


def test_report_format_follows_the_suffix(tmp_path: Path) -> None:
    spec, ckpt = _tiny_ckpt(tmp_path)
    for i, (name, is_json) in enumerate((("r.json", True), ("r.txt", False), ("r", True))):
        assert main(["convert", str(ckpt), "--arch", spec, "--to", "l1", "-o",
                     str(tmp_path / f"o{i}.pt"), "--report", str(tmp_path / name), "-q"]) == 0
        text = (tmp_path / name).read_text()
        if is_json:
            assert json.loads(text)["entries"]
        else:
            assert "changed  bn" in text


def test_demo_out_twice_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from normswap.demo import run_demo
    from normswap.errors import NormswapError

    rows = run_demo(methods=("l1",), out_dir=str(tmp_path))  # a first run writes the ONNX
    onnx = tmp_path / "demo_l1_fp16.onnx"
    assert "pass" in rows[-1].verdict and onnx.is_file()
    first = onnx.read_bytes()
    assert main(["demo", "--out", str(tmp_path)]) == 2  # refused before any work
    assert "--force" in _one_error(capsys.readouterr().err)
    assert onnx.read_bytes() == first
    with pytest.raises(NormswapError, match="already exists"):
        run_demo(methods=("l1",), out_dir=str(tmp_path))
    stamp = onnx.stat().st_mtime_ns
    run_demo(methods=("l1",), out_dir=str(tmp_path), force=True)
    assert onnx.stat().st_mtime_ns != stamp


# --------------------------------------------------------------------------- logging

def test_verbose_shows_normswap_steps_quiet_hides_them(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    spec, ckpt = _tiny_ckpt(tmp_path)
    assert main(["convert", str(ckpt), "--arch", spec, "--to", "l1", "-o",
                 str(tmp_path / "v.pt"), "-v"]) == 0
    captured = capsys.readouterr()
    assert "normswap.api: info: swap -> l1" in captured.err
    assert "wrote" in captured.out
    assert main(["convert", str(ckpt), "--arch", spec, "--to", "l1", "-o",
                 str(tmp_path / "q.pt"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_session_levels_and_restore() -> None:
    from normswap import progress

    pkg, third = logging.getLogger("normswap"), logging.getLogger("onnxscript")
    before = (pkg.level, pkg.propagate, len(pkg.handlers), third.level)
    with _session(verbose=False, quiet=False):
        assert pkg.isEnabledFor(logging.WARNING) and not pkg.isEnabledFor(logging.INFO)
        assert not third.isEnabledFor(logging.WARNING)  # third-party spam hidden
        assert progress.progress_enabled()
    with _session(verbose=True, quiet=False):
        assert pkg.isEnabledFor(logging.INFO) and third.isEnabledFor(logging.INFO)
    with _session(verbose=False, quiet=True):
        assert not pkg.isEnabledFor(logging.WARNING) and not progress.progress_enabled()
    assert (pkg.level, pkg.propagate, len(pkg.handlers), third.level) == before


# --------------------------------------------------------------------------- other commands

def test_inspect_prints_every_layer_per_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "torchvision:resnet18", "--method", "l1", "--method",
                 "normprop"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1.bn2" in out and "L1BatchNorm2d" in out
    assert "kept" in out  # normprop declines the residual blocks, with a reason


def test_cli_export_fp16_folded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    _, ckpt = _resnet_ckpt(tmp_path)
    out = tmp_path / "r18.onnx"
    args = ["export", str(ckpt), "--arch", "torchvision:resnet18", "--arch-arg", "num_classes=10",
            "-o", str(out), "--fp16", "--fold", "--input-shape", "1,3,64,64"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "export onnx" in text
    proto = onnx.load(str(out))
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert main(args) == 2  # exists: refused without --force, before any work
    assert "--force" in _one_error(capsys.readouterr().err)
    assert main(args + ["--force", "-q"]) == 0
