"""The command line, thin: parses arguments, checks every output up front, calls the API.

    normswap demo [--out DIR] [--force]
    normswap convert CKPT --arch torchvision:resnet50 --to l1 -o OUT.pt [--force]
    normswap convert ./hf-folder/ --to l1 -o ./hf-folder-l1/
    normswap inspect torchvision:resnet18 | CKPT --arch SPEC | ./hf-folder/
    normswap load OUT.pt | ./hf-folder-l1/
    normswap export CKPT_OR_ARCH -o model.onnx [--arch SPEC] [--fp16] [--fold] [--force]

Errors print one line, ``normswap: error: ...``, and exit with status 2; nothing is written.
Unexpected failures print one line too (exit 1); ``-v`` shows their traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import progress
from ._fs import check_output_dir, check_output_path, check_output_paths
from .arch import ARCH_ARG_HELP, SPEC_HELP, is_hf_folder, parse_assignments, parse_spec
from .errors import MethodOptionError, NormswapError, VerificationError

__all__ = ["build_parser", "main"]

log = logging.getLogger("normswap")

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_TEXT_REPORT_SUFFIXES = (".md", ".txt")
_MAX_INPUT_ELEMENTS = 2**28  # a check input larger than 1 GiB of float32 is a typo
_THIRD_PARTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo",
                        "torch.fx", "transformers", "timm", "huggingface_hub")
_SECURITY_NOTE = (
    "Architectures: --arch module.path:factory imports that module and so runs its code, like "
    "`python -m module.path`; --arch ./file.py:factory runs that file. Pass only code you "
    "trust. A checkpoint's own header never chooses code: it is rebuilt from it only for "
    "torchvision:NAME and timm:NAME (with plain-data arguments); any other architecture must "
    "be given with --arch. Checkpoints load with torch.load(weights_only=True) or from "
    "safetensors.")


# --------------------------------------------------------------------------- argument values

def _shape(text: str | None, what: str = "--input-shape") -> tuple[int, ...] | None:
    """``1,3,224,224`` (or ``1x3x224x224``) as a tuple of positive ints."""
    if not text:
        return None
    try:
        dims = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError as exc:
        raise NormswapError(f"{what} '{text}' is not a list of integers like "
                            "1,3,224,224") from exc
    if not dims or any(d < 1 for d in dims):
        raise NormswapError(f"{what} '{text}': every dimension must be a positive integer")
    if math.prod(dims) > _MAX_INPUT_ELEMENTS:
        raise NormswapError(f"{what} '{text}' has {math.prod(dims)} elements; a check input "
                            f"needs far fewer (at most {_MAX_INPUT_ELEMENTS})")
    return dims


def _example(model: nn.Module, shape: tuple[int, ...], text: str) -> torch.Tensor:
    """A random input of ``shape``, run once through ``model`` so a bad shape fails here."""
    x = torch.randn(*shape)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise NormswapError(f"--input-shape {text}: the model rejects an input of shape "
                            f"{list(shape)} ({type(exc).__name__}: {first}); give the shape "
                            "the model takes, e.g. 1,3,224,224") from exc
    return x


# --------------------------------------------------------------------------- models

def _model_from(target: str, arch: str | None, arch_kwargs: dict[str, Any]) -> nn.Module:
    """A model from an arch spec alone, a checkpoint (+ --arch or its header) or a folder."""
    from .arch import build_arch, build_hf_folder
    from .checkpoint import HEADER_FILE, load, load_weights, read_state_dict

    p = Path(target)
    if is_hf_folder(p) and not arch:
        if (p / HEADER_FILE).is_file():
            return load(None, p, **arch_kwargs)
        if arch_kwargs:
            raise NormswapError("--arch-arg does not apply to a Hugging Face folder (its "
                                "config.json describes the model)")
        return build_hf_folder(p, weights=True)
    if not (p.exists() or p.is_symlink() or p.suffix in _CHECKPOINT_SUFFIXES or ":" in target):
        raise NormswapError(f"'{target}' is neither an existing checkpoint or folder nor an "
                            "architecture spec (torchvision:NAME, timm:NAME, "
                            "module.path:factory, ./file.py:factory)")
    if p.exists() or p.is_symlink() or p.suffix in _CHECKPOINT_SUFFIXES:
        sd, meta = read_state_dict(p)
        if "method" in meta:
            return load(arch, p, **arch_kwargs)
        if not arch:
            raise NormswapError(f"'{target}' is a plain checkpoint: pass --arch "
                                "(torchvision:NAME, timm:NAME, module.path:factory or "
                                "./file.py:factory)")
        model = build_arch(arch, **arch_kwargs)
        load_weights(model, sd, source=f"'{target}'")
        return model.eval()
    parse_spec(target)
    return build_arch(target, **arch_kwargs).eval()


def _swap(model: nn.Module, method: str, options: dict[str, Any], raw_options: Sequence[str],
          **kwargs: Any) -> nn.Module:
    """``normswap.swap``; a method rejecting its --option values becomes one clear error."""
    from .api import swap

    try:
        return swap(model, method, **kwargs, **options)
    except (ValueError, TypeError) as exc:
        if not options or (isinstance(exc, NormswapError)
                           and not isinstance(exc, MethodOptionError)):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        raise NormswapError(f"--option {' '.join(raw_options)}: method '{method}' rejects it "
                            f"({first})") from exc


def _require_verified(report: Any, method: Any, args: argparse.Namespace) -> None:
    """An eval-exact conversion is written only when its equivalence check ran and passed."""
    if args.no_verify or not method.eval_exact:
        return
    passed = report.metrics.get("verify.passed")
    if passed is True:
        return
    why = next((w.message for w in reversed(report.warnings) if "verif" in w.message
                or "differ" in w.message), "no check ran")
    state = "did not pass" if passed is False else "could not run"
    raise VerificationError(f"the equivalence check of '{method.name}' {state} ({why}); "
                            "nothing was written. Pass --input-shape (e.g. 1,3,224,224) so "
                            "it can run, or --no-verify to write the model unchecked")


# --------------------------------------------------------------------------- outputs

def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text)


def _write_report(report: Any, path: str, force: bool) -> None:
    from ._fs import atomic_write_text

    text = report.table() + "\n" if Path(path).suffix in _TEXT_REPORT_SUFFIXES else report.to_json()
    atomic_write_text(path, text, force=force, what="--report")


def _output_is_folder(args: argparse.Namespace, hf_input: bool) -> bool:
    """Whether ``-o`` is written as a folder (a Hugging Face input, or a name without suffix)."""
    out = Path(args.output)
    if hf_input:
        if out.suffix in _CHECKPOINT_SUFFIXES:
            raise NormswapError(f"-o '{out}': a Hugging Face folder converts into a folder; "
                                "name -o without a suffix (e.g. ./model-l1/)")
        return True
    return not out.suffix and not out.is_dir()


def _check_convert_outputs(args: argparse.Namespace, folder: bool) -> None:
    """Every output of ``convert`` checked before any work is done."""
    from .checkpoint import HEADER_FILE

    if not folder:
        check_output_paths([("-o", args.output), ("--report", args.report)], force=args.force)
        return
    out = check_output_dir(args.output, force=args.force, what="-o", marker=HEADER_FILE)
    if args.report:
        report = check_output_path(args.report, force=args.force, what="--report")
        o, r = Path(os.path.abspath(out)), Path(os.path.abspath(report))
        if r == o or o in r.parents:
            raise NormswapError(f"--report '{report}' lies inside the output folder '{out}'; "
                                "put it elsewhere")


# --------------------------------------------------------------------------- commands

def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_rows, run_demo

    if args.out and not args.no_export:
        check_output_path(Path(args.out) / "demo_l1_fp16.onnx", force=args.force, what="--out")
    rows = run_demo(export=not args.no_export, out_dir=args.out, force=args.force)
    print(format_rows(rows))
    bad = [r for r in rows if r.verdict.startswith("refused") or "FAIL" in r.verdict.upper()]
    return 1 if bad else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .arch import build_arch, build_hf_folder, hf_arch_name
    from .checkpoint import (
        load_weights,
        read_state_dict,
        write_checkpoint,
        write_hf_folder,
    )
    from .registry import get_method

    method = get_method(args.to)
    arch_kwargs = parse_assignments(args.arch_arg, what="--arch-arg")
    options = parse_assignments(args.option, what="--option")
    shape = _shape(args.input_shape)
    src = Path(args.model)
    hf_input = is_hf_folder(src)
    folder = _output_is_folder(args, hf_input)
    _check_convert_outputs(args, folder)
    if not hf_input and not args.arch:
        raise NormswapError(f"'{src}' is a plain checkpoint: pass --arch (torchvision:NAME, "
                            "timm:NAME, module.path:factory or ./file.py:factory)")
    if hf_input and not args.arch:
        if arch_kwargs:
            raise NormswapError("--arch-arg does not apply to a Hugging Face folder (its "
                                "config.json describes the model)")
        model = build_hf_folder(src, weights=True)
        arch_name = hf_arch_name(src)
    else:
        sd, meta = read_state_dict(src)
        if "method" in meta:
            raise NormswapError(f"'{src}' is already converted (method '{meta['method']}'); "
                                "convert the original BatchNorm checkpoint")
        model = build_arch(args.arch, **arch_kwargs)
        load_weights(model, sd, source=f"'{src}'")
        arch_name = args.arch
    model.eval()
    if folder and not callable(getattr(model, "save_pretrained", None)):
        raise NormswapError(f"-o '{args.output}' has no suffix, so it names a folder, which is "
                            "written only for Hugging Face models; name a .pt or "
                            ".safetensors file")
    example = _example(model, shape, args.input_shape) if shape else None
    converted = _swap(model, method.name, options, args.option, example_inputs=example,
                      verify=not args.no_verify, strict=not args.no_strict,
                      leaf_modules=args.leaf_module or ())
    report = converted.normswap_report
    _require_verified(report, method, args)
    meta = {"arch": arch_name, "arch_kwargs": arch_kwargs, **converted.normswap_method,
            "source": str(src)}
    if folder:
        out = write_hf_folder(converted, args.output, meta, force=args.force, template=model)
    else:
        out = write_checkpoint(args.output, converted.state_dict(), meta, force=args.force)
    if args.report:
        _write_report(report, args.report, args.force)
    _say(args, report.table())
    _say(args, f"wrote {out}" + (f" and {args.report}" if args.report else ""))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .api import inspect

    model = _model_from(args.model, args.arch, parse_assignments(args.arch_arg))
    reports = inspect(model, args.method or None, leaf_modules=args.leaf_module or ())
    if args.json:
        print(json.dumps({k: v.to_dict() for k, v in reports.items()}, indent=2))
        return 0
    nodes: list[str] = []
    for rep in reports.values():
        for e in rep.entries:
            if getattr(e, "node", "") and e.kind != "note" and e.node not in nodes:
                nodes.append(e.node)
    cols = list(reports)
    cell: dict[tuple[str, str], str] = {}
    for m, rep in reports.items():
        for e in rep.entries:
            if e.kind == "change":
                cell[(e.node, m)] = e.after
            elif e.kind == "skip":
                cell[(e.node, m)] = f"kept: {e.reason[:40]}"
    w0 = max([4] + [len(n) for n in nodes])
    width = 30

    def fit(text: str) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    print(f"{'node':<{w0}}  " + "  ".join(f"{c:<{width}}" for c in cols))
    for n in nodes:
        print(f"{n:<{w0}}  " + "  ".join(f"{fit(cell.get((n, c), '-')):<{width}}" for c in cols))
    print("(--json prints every reason in full)")
    for m, rep in reports.items():
        for w in rep.warnings:
            print(f"[{m}] warning: {w.message}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from .checkpoint import load

    model = load(args.arch, args.checkpoint, **parse_assignments(args.arch_arg))
    _say(args, model.normswap_report.table())
    n = sum(p.numel() for p in model.parameters())
    print(f"rebuilt {type(model).__name__} with {n} parameters from {args.checkpoint}")
    return 0


def _export_example(model: nn.Module, text: str | None) -> tuple[Any, ...]:
    """The export's example input: ``--input-shape``, else guessed from the model (batch 1)."""
    if text:
        shape = _shape(text)
        return (_example(model, shape, text),)
    from .inputs import guess_inputs

    reasons: list[str] = []
    guess = guess_inputs(model, batch=1, reasons=reasons)
    if guess is None or guess.kwargs:
        why = "; ".join(reasons[:2]) or "the model declares no input"
        raise NormswapError(f"could not guess an example input ({why}); pass --input-shape, "
                            "e.g. 1,3,224,224")
    log.info("export input: %s", guess.describe())
    return tuple(guess.args)


def _plot_path(report_path: Path) -> Path:
    return report_path.with_name(report_path.stem + ".ranges.png")


def cmd_export(args: argparse.Namespace) -> int:
    from .api import fold
    from .export import export_onnx

    fp16: bool | str = {"auto": "auto", "on": True, "off": False}[args.fp16]
    report_path = Path(args.report) if args.report else None
    plot = report_path is not None and fp16 and _has_matplotlib()
    check_output_paths([("-o", args.output), ("--report", report_path),
                        ("--report (plot)", _plot_path(report_path) if plot else None)],
                       force=args.force)
    model = _model_from(args.model, args.arch, parse_assignments(args.arch_arg))
    example = _export_example(model, args.input_shape)
    if args.fold:
        model = fold(model, example_inputs=example)
    rep = export_onnx(model, example, args.output, fp16=fp16, force=args.force,
                      dynamic_batch=not args.static_batch, strict=not args.write_failed)
    _say(args, rep.table())
    if report_path is not None:
        rep.write(report_path, force=args.force)
        _say(args, f"wrote {report_path}")
        if plot:
            rep.plot_ranges(_plot_path(report_path), force=args.force)
            _say(args, f"wrote {_plot_path(report_path)}")
    return 0 if rep.passed in (True, None) else 2


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    """The ``normswap`` argument parser."""
    p = argparse.ArgumentParser(prog="normswap", description="Rewrite the normalisation of "
                                "trained PyTorch models.", epilog=_SECURITY_NOTE)
    verbosity = argparse.ArgumentParser(add_help=False)
    for parser, default in ((p, False), (verbosity, argparse.SUPPRESS)):
        group = parser.add_mutually_exclusive_group()
        group.add_argument("-v", "--verbose", action="store_true", default=default,
                           help="show normswap's steps, third-party logs and tracebacks")
        group.add_argument("-q", "--quiet", action="store_true", default=default,
                           help="print nothing but errors (and the result of inspect/load)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text,
                              parents=[verbosity], epilog=_SECURITY_NOTE)

    d = add("demo", "convert the embedded digits CNN with every method")
    d.add_argument("--out", default=None, help="folder for the demo's ONNX file")
    d.add_argument("--no-export", action="store_true")
    d.add_argument("--force", action="store_true", help="replace an existing ONNX file")
    d.set_defaults(func=cmd_demo)

    def arch_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--arch", metavar="SPEC", help=SPEC_HELP)
        sp.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE",
                        help=ARCH_ARG_HELP)

    def leaf_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--leaf-module", action="append", metavar="NAME",
                        help="submodule the tracer must not enter (repeatable)")

    c = add("convert", "convert a BatchNorm checkpoint or Hugging Face folder")
    c.add_argument("model", metavar="CHECKPOINT",
                   help="a .pt/.pth/.bin/.safetensors state_dict (with --arch), or a local "
                        "Hugging Face save_pretrained folder (config.json + weights)")
    arch_opts(c)
    leaf_opt(c)
    c.add_argument("--to", required=True, help="method: l1, linf, kalman, normprop, selu")
    c.add_argument("-o", "--output", required=True,
                   help="a .pt/.pth or .safetensors file; a folder (no suffix) for a Hugging "
                        "Face model, written with its save_pretrained plus normswap.json")
    c.add_argument("--force", action="store_true", help="overwrite existing outputs")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, value parsed like --arch-arg (e.g. k=10 for linf)")
    c.add_argument("--input-shape", help="example input for verification, e.g. 1,3,224,224")
    c.add_argument("--no-verify", action="store_true",
                   help="write the result even if its equivalence could not be checked")
    c.add_argument("--no-strict", action="store_true",
                   help="keep layers that cannot be swapped (listed in the report)")
    c.add_argument("--report", help="also write the report here: a table for .md/.txt, JSON "
                                    "otherwise")
    c.set_defaults(func=cmd_convert)

    i = add("inspect", "what each method would do, per layer")
    i.add_argument("model", help="architecture spec, checkpoint or Hugging Face folder")
    arch_opts(i)
    leaf_opt(i)
    i.add_argument("--method", action="append")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    lo = add("load", "rebuild a converted model from its checkpoint or folder")
    lo.add_argument("checkpoint")
    arch_opts(lo)
    lo.set_defaults(func=cmd_load)

    e = add("export", "export (fp16) ONNX and validate in ONNX Runtime")
    e.add_argument("model", help="checkpoint, architecture spec or Hugging Face folder")
    arch_opts(e)
    leaf_opt(e)
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--fp16", nargs="?", const="on", default="off", choices=("on", "off", "auto"),
                   help="convert to fp16 with range guards; '--fp16 auto' also searches for the "
                        "few nodes to keep in fp32 when the fp16 verdict fails")
    e.add_argument("--fold", action="store_true", help="fold norms into weights first")
    e.add_argument("--input-shape", help="e.g. 1,3,224,224 (default: guessed from the model)")
    e.add_argument("--static-batch", action="store_true")
    e.add_argument("--report", metavar="PATH",
                   help="also write the export report: .json, .md or .html by suffix; with "
                        "--fp16 and matplotlib installed, PATH's stem + .ranges.png plots every "
                        "node's activation range against the fp16 limits")
    e.add_argument("--write-failed", action="store_true",
                   help="write the ONNX file even when validation fails (exit code 2)")
    e.add_argument("--force", action="store_true")
    e.set_defaults(func=cmd_export)
    return p


# --------------------------------------------------------------------------- main

class _LowerLevel(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.levellower = record.levelname.lower()
        return super().format(record)


@contextlib.contextmanager
def _session(verbose: bool, quiet: bool) -> Iterator[None]:
    """Logging, warnings and progress for one command; everything restored afterwards."""
    pkg = logging.getLogger("normswap")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerLevel("%(name)s: %(levellower)s: %(message)s"))
    # the progress lines already show each stage; do not log them twice
    handler.addFilter(lambda r: not (r.name == "normswap.progress" and r.levelno == logging.INFO
                                     and progress.progress_enabled()))
    saved = (pkg.level, pkg.propagate)
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING)
    pkg.propagate = False
    others = {name: logging.getLogger(name).level for name in _THIRD_PARTY_LOGGERS}
    for name in others:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    root_handler: logging.Handler | None = None
    if verbose:
        root_handler = logging.StreamHandler(sys.stderr)
        root_handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        logging.getLogger().addHandler(root_handler)
    env_set = []
    if not verbose:  # read when transformers / huggingface_hub are first imported
        for key, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                           ("TRANSFORMERS_VERBOSITY", "error")):
            if key not in os.environ:
                os.environ[key] = value
                env_set.append(key)
    saved_progress = progress._enabled
    progress.set_progress(not quiet)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        progress.set_progress(saved_progress)
        for key in env_set:
            os.environ.pop(key, None)
        if root_handler is not None:
            logging.getLogger().removeHandler(root_handler)
        for name, level in others.items():
            logging.getLogger(name).setLevel(level)
        pkg.removeHandler(handler)
        pkg.setLevel(saved[0])
        pkg.propagate = saved[1]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normswap`` command; returns the exit status.

    0 success; 2 a usage, input or verification error (one line on stderr, nothing written);
    1 an unexpected failure (one line; ``-v`` prints the traceback); 130 interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message
        return int(exc.code) if isinstance(exc.code, int) else 2
    with _session(args.verbose, args.quiet):
        try:
            return int(args.func(args))
        except (NormswapError, ValueError, TypeError) as exc:
            if args.verbose:
                traceback.print_exc()
            print(f"normswap: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("normswap: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - one line unless -v
            if args.verbose:
                traceback.print_exc()
                print(f"normswap: error: unexpected {type(exc).__name__}: {_one_line(exc)}",
                      file=sys.stderr)
            else:
                print(f"normswap: error: unexpected {type(exc).__name__}: {_one_line(exc)} "
                      "(run with -v for the traceback)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
