"""Convert a trained BatchNorm CNN with every normswap method, check it, fine-tune, fold and
export it to fp16 ONNX validated in ONNX Runtime.

For each seed a BN CNN (conv 32-64-64 + BN + ReLU/max-pool, GAP, linear) is trained for one epoch
on standardised MNIST (SGD momentum 0.9, lr 0.05 → 0). Then, for each method:

1. ``normswap.swap(bn_model, method, ...)``: test accuracy at conversion (must equal the BN
   model's for the eval-exact methods l1, linf, kalman, normprop; ``selu`` changes the function)
   and the largest logit difference on the test set;
2. ``normswap.recalibrate(model, batches)``: running statistics re-estimated with the new norm's
   own statistic on 20 training batches (methods with running statistics only);
3. a short fine-tune in train mode (``--finetune-steps`` steps, lr ``--lr-finetune`` → 0);
4. ``normswap.fold(model)`` and ``normswap.export_onnx(folded, x, path, fp16=True)``; the fp16
   ONNX file is run in ONNX Runtime (CPU) on the whole test set.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import normswap  # noqa: E402
from normswap.calibrate import running_stat_modules  # noqa: E402

NAME = "convert_checkpoint"
METHODS = ("l1", "linf", "kalman", "normprop", "selu")
EVAL_EXACT = ("l1", "linf", "kalman", "normprop")
NORM_TYPES = ("BatchNorm", "L1BatchNorm", "LinfBatchNorm", "KalmanBatchNorm", "NormProp")


@torch.no_grad()
def logits(model: nn.Module, x: Tensor) -> Tensor:
    """Eval-mode logits over ``x`` in batches of 256."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
    model.train(was)
    return out


def accuracy(out: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in percent of logits ``out`` (non-finite rows count as wrong)."""
    ok = torch.isfinite(out).all(dim=1)
    return 100.0 * int(((out.argmax(1) == y) & ok).sum()) / len(y)


def ort_accuracy(path: Path, x: Tensor, y: Tensor) -> float:
    """Test accuracy of an ONNX file in ONNX Runtime (CPU)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    dtype = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
    correct = 0
    for i in range(0, len(x), 1000):
        out = sess.run(None, {name: x[i:i + 1000].numpy().astype(dtype)})[0]
        correct += int((out.argmax(1) == y[i:i + 1000].numpy()).sum())
    return 100.0 * correct / len(x)


def norm_layers_left(model: nn.Module) -> list[str]:
    """Names of normalisation layers still present (after folding)."""
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if any(type(m).__name__.startswith(t) for t in NORM_TYPES)]


def convert_one(method: str, bn: nn.Module, bn_logits: Tensor, bn_acc: float, seed: int,
                data: common.Data, args: Any, onnx_dir: Path) -> dict[str, Any]:
    """Every step for one method; the numbers of each."""
    example = data.x_train[:8]
    n_batches = min(20, len(data.x_train) // 128)
    batches = [data.x_train[i * 128:(i + 1) * 128] for i in range(n_batches)]
    options: dict[str, Any] = {}
    if method == "kalman":
        options["gain"] = args.kalman_gain
    if method == "selu":
        options.update(init="calibrate", calibration_inputs=batches[:8])
    t0 = time.perf_counter()
    model = normswap.swap(bn, method, example_inputs=example, **options)
    swap_s = time.perf_counter() - t0
    report = model.normswap_report
    out = logits(model, data.x_test)
    row: dict[str, Any] = {
        "swap_seconds": round(swap_s, 3),
        "changes": len(report.changes), "skips": len(report.skips),
        "verify_rel": report.metrics.get("verify.rel"),
        "acc_at_conversion": accuracy(out, data.y_test),
        "max_abs_logit_diff": float((out - bn_logits).abs().max()),
    }
    row["identical_acc"] = row["acc_at_conversion"] == bn_acc
    if running_stat_modules(model):
        normswap.recalibrate(model, batches, progress=False)
        row["acc_recalibrated"] = common.evaluate(model, data.x_test, data.y_test)
    else:
        row["acc_recalibrated"] = None
    ft = common.train(model, data.x_train, data.y_train, lr=args.lr_finetune, seed=seed,
                      max_steps=args.finetune_steps, desc=f"{method} fine-tune seed {seed}",
                      progress=not args.no_progress)
    row["acc_finetuned"] = common.evaluate(model, data.x_test, data.y_test)
    row["finetune_ms_per_step"] = ft["ms_per_step"]
    model.eval()
    folded = normswap.fold(model, example_inputs=example)
    row["fold_verify_rel"] = folded.normswap_report.metrics.get("verify.rel")
    row["norm_layers_after_fold"] = norm_layers_left(folded)
    row["acc_folded"] = common.evaluate(folded, data.x_test, data.y_test)
    path = onnx_dir / f"cnn_{method}_seed{seed}_fp16.onnx"
    exp = normswap.export_onnx(folded, example, path, fp16=True, force=True,
                               calibration_inputs=[data.x_test[:64]], exporter=args.exporter)
    row["onnx_exporter"] = exp.exporter
    row["onnx_passed"] = exp.passed
    worst = max(exp.validation.metrics, key=lambda m: m.rel) if exp.validation else None
    row["onnx_rel_err"] = worst.rel if worst else None
    row["onnx_top1_agreement"] = worst.top1_agreement if worst else None
    row["onnx_bytes"] = exp.file_size_bytes
    row["acc_onnx_fp16"] = ort_accuracy(path, data.x_test, data.y_test)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.base_parser(__doc__.splitlines()[0], seeds=(0, 1, 2), train_size=25600)
    p.add_argument("--lr", type=float, default=0.05, help="peak lr of the BN training")
    p.add_argument("--lr-finetune", type=float, default=0.005, help="peak lr of the fine-tune")
    p.add_argument("--finetune-steps", type=int, default=50)
    p.add_argument("--kalman-gain", type=float, default=0.05,
                   help="Kalman gain during the fine-tune (authors: 0.05 for large batches)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default=None,
                   help="ONNX exporter (default: normswap's 'auto'; --quick uses 'torchscript', "
                        "~10x faster to export)")
    p.add_argument("--onnx-dir", type=Path, default=None,
                   help="where to keep the ONNX files (default: a temporary directory)")
    args = p.parse_args(argv)
    common.setup(args)
    data = common.get_data(args)
    if args.quick:
        args.finetune_steps = 2
        args.exporter = args.exporter or "torchscript"
    args.exporter = args.exporter or "auto"
    print(f"{data.note}\nBN CNN: one epoch, lr {args.lr} → 0; fine-tune {args.finetune_steps} "
          f"steps at lr {args.lr_finetune} → 0")
    tmp = tempfile.TemporaryDirectory() if args.onnx_dir is None else None
    onnx_dir = Path(tmp.name) if tmp is not None else args.onnx_dir
    onnx_dir.mkdir(parents=True, exist_ok=True)
    per_seed: list[dict[str, Any]] = []
    try:
        for seed in args.seeds:
            torch.manual_seed(seed)
            bn = common.make_cnn(nn.BatchNorm2d)
            stats = common.train(bn, data.x_train, data.y_train, lr=args.lr, seed=seed,
                                 desc=f"bn seed {seed}", progress=not args.no_progress)
            bn.eval()
            bn_logits = logits(bn, data.x_test)
            bn_acc = accuracy(bn_logits, data.y_test)
            rows = {m: convert_one(m, bn, bn_logits, bn_acc, seed, data, args, onnx_dir)
                    for m in args.methods}
            per_seed.append({"seed": seed, "bn_acc": bn_acc, "bn_ms_per_step": stats["ms_per_step"],
                             "methods": rows})
    finally:
        if tmp is not None:
            tmp.cleanup()

    def col(method: str, key: str) -> list[Any]:
        return [s["methods"][method][key] for s in per_seed]

    def f(vals: list[Any]) -> str:
        return "-" if any(v is None for v in vals) else common.fmt(vals)

    bn_accs = [s["bn_acc"] for s in per_seed]
    table_rows = []
    for m in args.methods:
        same = all(col(m, "identical_acc"))
        table_rows.append([
            m, common.fmt(bn_accs), common.fmt(col(m, "acc_at_conversion")),
            ("yes" if same else "no") + ("" if m in EVAL_EXACT else " (not eval-exact)"),
            f"{max(col(m, 'max_abs_logit_diff')):.1e}", f(col(m, "acc_recalibrated")),
            common.fmt(col(m, "acc_finetuned")), common.fmt(col(m, "acc_folded")),
            common.fmt(col(m, "acc_onnx_fp16")),
            "pass" if all(col(m, "onnx_passed")) else "FAIL",
            len(col(m, "norm_layers_after_fold")[0])])
    table = common.print_table(
        ["method", "BN acc %", "acc at conversion %", "identical", "max |Δlogit|",
         "after recalibrate %", "after fine-tune %", "folded %", "fp16 ONNX (ORT) %",
         "ORT validation", "norm layers left after fold"], table_rows,
        title=f"mean ± std over seeds {args.seeds}")
    exact_ok = all(all(col(m, "identical_acc")) for m in args.methods if m in EVAL_EXACT)
    print(f"eval-exact methods keep the BN accuracy identically on every seed: {exact_ok}")
    for m in args.methods:
        left = col(m, "norm_layers_after_fold")[0]
        if left:
            print(f"  {m}: fold kept {len(left)} norm layer(s): {', '.join(left)}")
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    stages = [("acc_at_conversion", "at conversion"), ("acc_recalibrated", "recalibrated"),
              ("acc_finetuned", "fine-tuned"), ("acc_onnx_fp16", "fp16 ONNX (ORT)")]
    width = 0.8 / len(stages)
    xs = np.arange(len(args.methods))
    for i, (key, label) in enumerate(stages):
        vals = [np.nan if any(v is None for v in col(m, key)) else common.mean_std(col(m, key))[0]
                for m in args.methods]  # NaN: no bar (e.g. nothing to recalibrate)
        ax.bar(xs + (i - 1.5) * width, vals, width=width, label=label)
    ax.axhline(common.mean_std(bn_accs)[0], color="k", ls="--", lw=1, label="BN model")
    lo = min(min(col(m, "acc_at_conversion")) for m in args.methods)
    ax.set_xticks(xs, list(args.methods))
    ax.set(ylabel="test accuracy %", ylim=(max(0.0, min(lo, min(bn_accs)) - 5), 100),
           title="BN CNN converted with each method")
    ax.legend(loc="lower right", fontsize=8)
    png = common.save_figure(args, NAME, fig)
    payload = {
        "data": data.note, "lr": args.lr, "lr_finetune": args.lr_finetune,
        "finetune_steps": args.finetune_steps, "kalman_gain": args.kalman_gain,
        "eval_exact_identical": exact_ok, "table": table, "png": str(png),
        "bn_acc": bn_accs, "per_seed": per_seed,
        "methods": {m: {k: col(m, k) for k in per_seed[0]["methods"][m]} for m in args.methods},
    }
    common.save_json(args, NAME, payload)
    return payload


if __name__ == "__main__":
    main()
