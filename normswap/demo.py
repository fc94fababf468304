"""The README's main job on an embedded default: a small BN CNN trained on real digits
(scikit-learn's bundled 8x8 digits, test split shipped inside the package) converted with every
method, verified, and scored before and after.

``python -m normswap.demo --retrain`` rebuilds the shipped checkpoint (needs scikit-learn).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import NormswapError

__all__ = ["DigitsCNN", "load_demo", "run_demo", "DemoRow"]

log = logging.getLogger(__name__)
_CKPT = "demo_digits_cnn.pt"
_DATA = "digits_split.pt"


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x3 with a max-pool, global average pool and a linear head (8x8 inputs)."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def _data_file(name: str) -> Any:
    return resources.files("normswap") / "data" / name


def load_demo() -> tuple[DigitsCNN, dict[str, torch.Tensor]]:
    """The shipped trained model (eval mode) and the digits split (uint8 images 0..16)."""
    with resources.as_file(_data_file(_CKPT)) as p:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    with resources.as_file(_data_file(_DATA)) as p:
        data = torch.load(str(p), map_location="cpu", weights_only=True)
    model = DigitsCNN()
    model.load_state_dict(sd)
    return model.eval(), data


def _images(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 16.0 - 0.3).view(-1, 1, 8, 8) / 0.35


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode (restores the model's mode)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(_images(x)).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 3,
             lr: float = 0.02, seed: int = 0) -> nn.Module:
    """A few epochs of SGD (momentum 0.9, lr decayed linearly to 0), batch 64."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(_images(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@dataclass
class DemoRow:
    method: str
    changed: int
    skipped: int
    rel_err: str
    acc_before: float
    acc_after: float
    acc_finetuned: str
    verdict: str


def run_demo(methods: tuple[str, ...] = ("l1", "linf", "kalman", "normprop", "selu"),
             export: bool = True, out_dir: str | None = None,
             force: bool = False) -> list[DemoRow]:
    """Convert the shipped model with each method and score it; returns the table rows.

    ``force`` replaces an existing ``demo_l1_fp16.onnx`` in ``out_dir``.
    """
    from .api import swap

    torch.manual_seed(0)
    model, data = load_demo()
    xte, yte = data["x_test"], data["y_test"]
    base = accuracy(model, xte, yte)
    rows: list[DemoRow] = []
    example = (_images(xte[:16]),)
    calib = [_images(data["x_train"][:512])]
    for name in methods:
        # selu changes the function: rescale each unit to mean 0 / variance 1 on training data
        opts = {"init": "calibrate", "calibration_inputs": calib} if name == "selu" else {}
        try:
            conv = swap(model, name, example_inputs=example, **opts)
        except NormswapError as exc:
            rows.append(DemoRow(name, 0, 0, "-", base, float("nan"), "-", f"refused: {exc}"))
            continue
        rep = conv.normswap_report
        rel = rep.metrics.get("verify.rel")
        acc = accuracy(conv, xte, yte)
        tuned = "-"
        verdict = "eval-exact, verified" if rel is not None else "function changed"
        if rel is None:
            finetune(conv, data["x_train"], data["y_train"], epochs=5, lr=0.01)
            tuned = f"{accuracy(conv, xte, yte):.4f}"
            verdict += " (calibrated init); fine-tuned 5 epochs"
        rows.append(DemoRow(name, int(rep.metrics.get("swapped", len(rep.changes))), len(rep.skips),
                            f"{rel:.1e}" if rel is not None else "n/a", base, acc, tuned,
                            verdict))
    if export:
        rows_export = _demo_export(model, example, out_dir, force)
        if rows_export:
            rows.append(rows_export)
    return rows


def _demo_export(model: nn.Module, example: tuple[torch.Tensor, ...],
                 out_dir: str | None, force: bool = False) -> DemoRow | None:
    """L1 swap -> fold -> fp16 ONNX -> ONNX Runtime validation, as one extra row."""
    try:
        from .api import fold, swap
        from .export import export_onnx
    except ImportError:  # pragma: no cover - export is part of the package
        return None
    _, data = load_demo()
    folded = fold(swap(model, "l1", example_inputs=example), example_inputs=example)
    fold_report = folded.normswap_report
    target = Path(out_dir or tempfile.mkdtemp(prefix="normswap-demo-")) / "demo_l1_fp16.onnx"
    rep = export_onnx(folded, example, target, fp16=True, force=force)
    verdict = {True: "pass", False: "FAIL", None: "not validated"}[rep.passed]
    evaluators = ", ".join(ev.name for ev in rep.validation.evaluators
                           if ev.checks_fp16) if rep.validation is not None else ""
    acc = float("nan")
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = _images(data["x_test"]).numpy()
        if "16" in inp.type:
            x = x.astype("float16")
        out = sess.run(None, {inp.name: x})[0]
        acc = float((torch.from_numpy(out).float().argmax(1) == data["y_test"]).float().mean())
    except Exception as exc:  # noqa: BLE001 - report, do not crash the demo
        log.warning("could not score the ONNX file: %s", exc)
    return DemoRow("l1 -> fold -> fp16 ONNX", len(fold_report.changes), len(fold_report.skips),
                   "-", accuracy(model, data["x_test"], data["y_test"]),
                   acc, "-", f"fp16 validation: {verdict} ({evaluators or 'no fp16 evaluator'})"
                   f"; wrote {target}")


def format_rows(rows: list[DemoRow]) -> str:
    """A fixed-width table of the demo rows."""
    head = ["method", "changed", "skipped", "eval rel err", "acc before", "acc after",
            "acc fine-tuned", "verdict"]
    body = [[r.method, str(r.changed), str(r.skipped), r.rel_err, f"{r.acc_before:.4f}",
             f"{r.acc_after:.4f}", r.acc_finetuned, r.verdict] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*b) for b in body]
    return "\n".join(lines)


def _retrain(out: Path, seed: int = 0) -> None:
    """Train the demo checkpoint on scikit-learn's digits and write the package data."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.uint8)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1437], perm[1437:]
    data = {"x_train": x[tr].clone(), "y_train": y[tr].clone(), "x_test": x[te].clone(),
            "y_test": y[te].clone()}
    model = DigitsCNN()
    finetune(model, data["x_train"], data["y_train"], epochs=30, lr=0.05, seed=seed)
    acc = accuracy(model, data["x_test"], data["y_test"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / _CKPT)
    torch.save(data, out / _DATA)
    print(f"demo model: test accuracy {acc:.4f}; written to {out}")  # noqa: T201 (script)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    args = ap.parse_args(argv)
    if args.retrain:
        _retrain(Path(args.out))
        return 0
    t0 = time.perf_counter()
    print(format_rows(run_demo()))  # noqa: T201 (script)
    print(f"({time.perf_counter() - t0:.1f} s)")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
