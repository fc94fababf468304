"""The command line, thin: parses arguments and calls the API.

    normswap demo
    normswap convert CKPT --arch torchvision:resnet50 --to l1 -o OUT.pt [--force]
    normswap inspect torchvision:resnet18 | CKPT --arch SPEC
    normswap load OUT.pt
    normswap export CKPT_OR_ARCH -o model.onnx [--arch SPEC] [--fp16] [--fold] [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import NormswapError

__all__ = ["main"]

log = logging.getLogger("normswap")


def _kv(items: Sequence[str]) -> dict[str, Any]:
    """Parse KEY=VALUE pairs; values are JSON when they parse, strings otherwise."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise NormswapError(f"option '{item}' is not KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError as exc:
        raise NormswapError(f"--input-shape '{text}' is not like 1,3,224,224") from exc


def _model_from(target: str, arch: str | None, arch_kwargs: dict[str, Any]) -> Any:
    """A model from an arch spec alone, or from a checkpoint plus --arch (or its header)."""
    from .checkpoint import build_arch, load, load_weights, read_state_dict

    if Path(target).is_file():
        sd, meta = read_state_dict(target)
        if "method" in meta:
            return load(arch, target, **arch_kwargs)
        if not arch:
            raise NormswapError(f"'{target}' is a plain checkpoint: pass --arch "
                                "(torchvision:NAME or module.path:factory)")
        model = build_arch(arch, **arch_kwargs)
        load_weights(model, sd, source=f"'{target}'")
        return model.eval()
    if ":" in target:
        return build_arch(target, **arch_kwargs).eval()
    raise NormswapError(f"'{target}' is neither a file nor an architecture spec")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_rows, run_demo

    rows = run_demo(export=not args.no_export, out_dir=args.out)
    print(format_rows(rows))
    bad = [r for r in rows if r.verdict.startswith("refused") or "FAIL" in r.verdict.upper()]
    return 1 if bad else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .api import swap
    from .checkpoint import build_arch, load_weights, read_state_dict, write_checkpoint

    arch_kwargs = _kv(args.arch_arg)
    out = Path(args.output)
    if out.exists() and not args.force:
        raise NormswapError(f"'{out}' already exists; pass --force to overwrite it")
    sd, _ = read_state_dict(args.checkpoint)
    model = build_arch(args.arch, **arch_kwargs)
    load_weights(model, sd, source=f"'{args.checkpoint}'")
    model.eval()
    shape = _shape(args.input_shape)
    example = torch.randn(*shape) if shape else None
    converted = swap(model, args.to, example_inputs=example, verify=not args.no_verify,
                     strict=not args.no_strict, leaf_modules=args.leaf_module or (),
                     **_kv(args.option))
    report = converted.normswap_report
    meta = {"arch": args.arch, "arch_kwargs": arch_kwargs, **converted.normswap_method,
            "source": str(args.checkpoint)}
    write_checkpoint(out, converted.state_dict(), meta, force=args.force)
    print(report.table())
    if args.report:
        Path(args.report).write_text(report.to_json())
    print(f"wrote {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .api import inspect

    model = _model_from(args.model, args.arch, _kv(args.arch_arg))
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

    model = load(args.arch, args.checkpoint, **_kv(args.arch_arg))
    print(model.normswap_report.table())
    n = sum(p.numel() for p in model.parameters())
    print(f"rebuilt {type(model).__name__} with {n} parameters from {args.checkpoint}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .api import fold
    from .export import export_onnx

    model = _model_from(args.model, args.arch, _kv(args.arch_arg))
    shape = _shape(args.input_shape) or (1, 3, 224, 224)
    example = (torch.randn(*shape),)
    if args.fold:
        model = fold(model, example_inputs=example)
    rep = export_onnx(model, example, args.output, fp16=args.fp16, force=args.force,
                      dynamic_batch=not args.static_batch)
    print(rep.table())
    return 0 if rep.passed in (True, None) else 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="normswap", description="Rewrite the normalisation of "
                                "trained PyTorch models.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="convert the embedded digits CNN with every method")
    d.add_argument("--out", default=None, help="folder for the demo's ONNX file")
    d.add_argument("--no-export", action="store_true")
    d.set_defaults(func=cmd_demo)

    def arch_opts(sp: argparse.ArgumentParser, required: bool = False) -> None:
        sp.add_argument("--arch", required=required,
                        help="torchvision:NAME or module.path:factory")
        sp.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="argument for the architecture factory (e.g. num_classes=10)")
        sp.add_argument("--leaf-module", action="append", metavar="NAME",
                        help="submodule the tracer must not enter (repeatable)")

    c = sub.add_parser("convert", help="convert a BatchNorm checkpoint")
    c.add_argument("checkpoint")
    arch_opts(c, required=True)
    c.add_argument("--to", required=True, help="method: l1, linf, kalman, normprop, selu")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--force", action="store_true", help="overwrite an existing output")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (e.g. k=10 for linf)")
    c.add_argument("--input-shape", help="example input for verification, e.g. 1,3,224,224")
    c.add_argument("--no-verify", action="store_true")
    c.add_argument("--no-strict", action="store_true",
                   help="keep layers that cannot be swapped (listed in the report)")
    c.add_argument("--report", help="also write the report as JSON here")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="what each method would do, per layer")
    i.add_argument("model", help="architecture spec or checkpoint")
    arch_opts(i)
    i.add_argument("--method", action="append")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    lo = sub.add_parser("load", help="rebuild a converted model from its checkpoint")
    lo.add_argument("checkpoint")
    lo.add_argument("--arch")
    lo.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE")
    lo.set_defaults(func=cmd_load)

    e = sub.add_parser("export", help="export (fp16) ONNX and validate in ONNX Runtime")
    e.add_argument("model", help="checkpoint or architecture spec")
    arch_opts(e)
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--fp16", action="store_true")
    e.add_argument("--fold", action="store_true", help="fold norms into weights first")
    e.add_argument("--input-shape", help="e.g. 1,3,224,224")
    e.add_argument("--static-batch", action="store_true")
    e.add_argument("--force", action="store_true")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normswap`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except NormswapError as exc:
        print(f"normswap: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
