"""Hoffer et al. 2018 ("Norm matters"): bounded weight normalisation + mean-only BatchNorm, in
fp16, from scratch and after converting a trained BN model.

The small CNN of the other examples (conv 32-64-64 + norm + ReLU/max-pool, global average pool,
linear), trained in emulated fp16 (as in ``fp16_hoffer.py``: fp16 tensors between layers,
conv/linear with fp16 operands and fp32 accumulation, norms on fp16 tensors, fp32 master
weights) on MNIST in two input settings: images scaled to 0–1000 (the fp16-overflow setting of
``fp16_hoffer.py``) and standardised images.

1. From scratch, three norms:

   * ``bn``   PyTorch's ``nn.BatchNorm2d`` (it accumulates its statistics in fp32);
   * ``l1``   ``normswap.norms.lp_batchnorm.L1BatchNorm2d``;
   * ``bwn``  every conv parametrised with ``normswap.norms.bwn.apply_bounded_weight_norm``
              (``learn_gain="bounded"``, the authors' form: ``w_c = ρ·sqrt(C)·(g_c/‖g‖)·v_c/‖v_c‖``,
              ``ρ`` fixed at the initial root-mean-square channel norm) followed by
              ``MeanOnlyBatchNorm2d``: no batch variance anywhere.

   Initialisation (``--init``): by default BN and L1 keep PyTorch's default conv init (as in
   ``fp16_hoffer.py``) and BWN gets He (fan-in) init, which its bound ``ρ`` then keeps: a
   mean-only BN does not restore the activation scale, and PyTorch's default init shrinks it by
   ~2.4× per layer. ``--init he`` gives all three nets the He init (a BN net's function does not
   depend on the weight scale, but its effective learning rate ``∝ lr/‖w‖²`` does).

2. Conversion: each seed's trained ``bn`` model goes through ``normswap.swap(bn, "bwn")`` and
   ``normswap.swap(bn, "l1")`` (accuracy at conversion), ``--finetune-steps`` steps of fine-tuning
   in train mode in the same fp16 emulation (lr ``--lr-finetune`` → 0), and for BWN
   ``normswap.fold`` (no norm layer and no parametrization left).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from fp16_hoffer import HalfEmuConv2d, HalfEmuLinear, nonfinite_statistics  # noqa: E402

import normswap  # noqa: E402
from normswap.norms.bwn import MeanOnlyBatchNorm, MeanOnlyBatchNorm2d, apply_bounded_weight_norm  # noqa: E402
from normswap.norms.lp_batchnorm import L1BatchNorm2d  # noqa: E402

NAME = "bwn_hoffer"
NORMS = ("bn", "l1", "bwn")
METHODS = ("bwn", "l1")
SETTINGS: dict[str, tuple[float, Callable[[Tensor], Tensor] | None]] = {
    # name: (input scale, transform of the [0, 1) images; None = standardise)
    "0-1000": (1000.0, lambda x: x),
    "standardised": (1.0, None),
}


def build(name: str, init: str = "standard") -> nn.Module:
    """The emulated-fp16 CNN for one norm (BWN: He init and bounded WN on every conv; BN/L1:
    PyTorch's default init, or He with ``init="he"``)."""
    norm = {"bn": nn.BatchNorm2d, "l1": L1BatchNorm2d, "bwn": MeanOnlyBatchNorm2d}[name]
    model = common.make_cnn(norm, conv=HalfEmuConv2d, linear=HalfEmuLinear)
    for m in model.modules():
        if isinstance(m, HalfEmuConv2d):
            if name == "bwn" or init == "he":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if name == "bwn":
                apply_bounded_weight_norm(m, learn_gain="bounded")
    return model


@torch.no_grad()
def logits(model: nn.Module, x: Tensor, input_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Eval-mode fp32 logits over ``x`` in batches of 256."""
    was = model.training
    model.eval()
    out = torch.cat([model(input_fn(x[i:i + 256])).float() for i in range(0, len(x), 256)])
    model.train(was)
    return out


def accuracy(out: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in percent (non-finite rows count as wrong)."""
    ok = torch.isfinite(out).all(dim=1)
    return 100.0 * int(((out.argmax(1) == y) & ok).sum()) / len(y)


def leftovers(model: nn.Module) -> list[str]:
    """Norm layers and parametrized modules still in ``model``."""
    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, MeanOnlyBatchNorm))
            or parametrize.is_parametrized(m)]


def convert_one(method: str, bn: nn.Module, bn_logits: Tensor, seed: int, data: common.Data,
                input_fn: Callable[[Tensor], Tensor], args: Any) -> dict[str, Any]:
    """swap → accuracy, fine-tune → accuracy, (bwn) fold → accuracy."""
    # the emulated-fp16 layers are defined here, not in torch.nn: fx would trace into them
    layers = [n for n, m in bn.named_modules() if isinstance(m, (HalfEmuConv2d, HalfEmuLinear))]
    model = normswap.swap(bn, method, example_inputs=input_fn(data.x_train[:8]),
                          leaf_modules=layers)
    report = model.normswap_report
    out = logits(model, data.x_test, input_fn)
    row: dict[str, Any] = {
        "changes": len(report.changes), "skips": len(report.skips),
        "verify_rel": report.metrics.get("verify.rel"),
        "acc_at_conversion": accuracy(out, data.y_test),
        "max_abs_logit_diff": float((out - bn_logits).abs().max()),
    }
    ft = common.train(model, data.x_train, data.y_train, lr=args.lr_finetune, seed=seed,
                      max_steps=args.finetune_steps, input_fn=input_fn,
                      desc=f"{method} fine-tune seed {seed}", progress=not args.no_progress,
                      check_fn=nonfinite_statistics)
    row.update(acc_finetuned=accuracy(logits(model, data.x_test, input_fn), data.y_test),
               finetune_nonfinite_steps=ft["nonfinite_steps"],
               finetune_flagged_steps=ft["flagged_steps"], finetune_losses=ft["losses"])
    if method == "bwn":
        model.eval()
        folded = normswap.fold(model, example_inputs=input_fn(data.x_train[:8]),
                               leaf_modules=layers)
        row["fold_verify_rel"] = folded.normswap_report.metrics.get("verify.rel")
        row["left_after_fold"] = leftovers(folded)
        row["acc_folded"] = accuracy(logits(folded, data.x_test, input_fn), data.y_test)
    return row


def run_setting(setting: str, args: Any) -> dict[str, Any]:
    """From-scratch runs of every norm and the conversions, for one input setting."""
    scale, transform = SETTINGS[setting]
    data = common.get_data(args, transform=transform)

    def to_input(x: Tensor) -> Tensor:
        return (x * scale).half()

    scratch: dict[str, list[dict[str, Any]]] = {n: [] for n in NORMS}
    converted: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    bn_accs: list[float] = []
    for seed in args.seeds:
        models = {}
        for name in NORMS:
            torch.manual_seed(seed)
            model = build(name, args.init)
            stats = common.train(model, data.x_train, data.y_train, lr=args.lr, seed=seed,
                                 input_fn=to_input, desc=f"{setting} {name} seed {seed}",
                                 progress=not args.no_progress, check_fn=nonfinite_statistics)
            stats["acc"] = common.evaluate(model, data.x_test, data.y_test, input_fn=to_input)
            scratch[name].append(stats)
            models[name] = model
        bn = models["bn"].eval()
        bn_logits = logits(bn, data.x_test, to_input)
        bn_accs.append(accuracy(bn_logits, data.y_test))
        for method in METHODS:
            converted[method].append(convert_one(method, bn, bn_logits, seed, data, to_input,
                                                 args))
    return {"data": data.note, "input_scale": scale, "scratch": scratch,
            "converted": converted, "bn_acc": bn_accs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.base_parser(__doc__.splitlines()[0], seeds=(0, 1), train_size=25600)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate from scratch")
    p.add_argument("--lr-finetune", type=float, default=0.005, help="peak lr of the fine-tune")
    p.add_argument("--finetune-steps", type=int, default=50)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--init", choices=("standard", "he"), default="standard",
                   help="standard: PyTorch's default init for BN/L1, He for BWN; he: He for all")
    args = p.parse_args(argv)
    common.setup(args)
    if args.quick:
        args.finetune_steps = 2
    print("emulated fp16: fp16 activations, conv/linear = fp32 accumulation of fp16 operands, "
          f"norms on fp16 tensors, fp32 master weights; lr {args.lr} -> 0 over one epoch, "
          f"batch 128, SGD momentum 0.9; fine-tune {args.finetune_steps} steps at lr "
          f"{args.lr_finetune} -> 0; non-finite steps are skipped; init {args.init}")
    results = {s: run_setting(s, args) for s in args.settings}
    print(results[args.settings[0]]["data"])

    rows = []
    for s in args.settings:
        r = results[s]
        for name in NORMS:
            runs = r["scratch"][name]
            rows.append([s, f"{name} from scratch", common.fmt([x["acc"] for x in runs]),
                         " / ".join(f"{x['flagged_steps']}/{x['steps']}" for x in runs),
                         " / ".join(str(x["nonfinite_steps"]) for x in runs),
                         f"{common.mean_std([x['ms_per_step'] for x in runs])[0]:.0f}"])
    table = common.print_table(
        ["inputs", "model", "test acc % (mean ± std)", "steps with non-finite statistics",
         "skipped steps (non-finite loss/grad)", "ms/step"], rows,
        title=f"from scratch in emulated fp16 ({len(args.seeds)} seeds: {args.seeds})")
    conv_rows = []
    for s in args.settings:
        r = results[s]
        for m in METHODS:
            runs = r["converted"][m]
            conv_rows.append([
                s, f"bn → {m}", common.fmt(r["bn_acc"]),
                common.fmt([x["acc_at_conversion"] for x in runs]),
                f"{max(x['max_abs_logit_diff'] for x in runs):.1e}",
                common.fmt([x["acc_finetuned"] for x in runs]),
                " / ".join(str(x["finetune_nonfinite_steps"]) for x in runs),
                common.fmt([x["acc_folded"] for x in runs]) if m == "bwn" else "-",
                str(len(runs[0]["left_after_fold"])) if m == "bwn" else "-"])
    conv_table = common.print_table(
        ["inputs", "conversion", "BN acc %", "acc at conversion %", "max |Δlogit|",
         "after fine-tune %", "skipped fine-tune steps", "folded %",
         "norm layers / parametrizations left after fold"], conv_rows,
        title=f"trained BN converted, then fine-tuned {args.finetune_steps} steps in fp16")

    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(args.settings) + 1, figsize=(5 * (len(args.settings) + 1), 4))
    for ax, s in zip(axes, args.settings):
        for name in NORMS:
            run = results[s]["scratch"][name][0]
            ax.plot(common.smooth(run["losses"]), label=f"{name} ({run['nonfinite_steps']} "
                                                         "skipped steps)")
        ax.set(xlabel="step", ylabel="training loss (running mean, finite steps)",
               title=f"from scratch, inputs {s}, seed {args.seeds[0]}", yscale="log")
        ax.legend(fontsize=8)
    ax = axes[-1]
    labels, vals, errs = [], [], []
    for s in args.settings:
        r = results[s]
        for name in NORMS:
            m, e = common.mean_std([x["acc"] for x in r["scratch"][name]])
            labels.append(f"{name}\n{s}")
            vals.append(m)
            errs.append(e)
        for meth in METHODS:
            m, e = common.mean_std([x["acc_finetuned"] for x in r["converted"][meth]])
            labels.append(f"bn→{meth}\n{s}")
            vals.append(m)
            errs.append(e)
    xs = np.arange(len(labels))
    ax.bar(xs, vals, yerr=errs, capsize=3,
           color=["C0", "C1", "C2", "C3", "C4"] * len(args.settings))
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set(ylabel="test accuracy %", ylim=(0, 100), title="test accuracy (conversions: fine-tuned)")
    for i, v in enumerate(vals):
        ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=7)
    png = common.save_figure(args, NAME, fig)

    def summary(r: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"data": r["data"], "input_scale": r["input_scale"],
                               "bn_acc": r["bn_acc"], "scratch": {}, "converted": {}}
        for name, runs in r["scratch"].items():
            accs = [x["acc"] for x in runs]
            out["scratch"][name] = {
                "acc": accs, "acc_mean": common.mean_std(accs)[0],
                "acc_std": common.mean_std(accs)[1],
                "nonfinite_stat_steps": [x["flagged_steps"] for x in runs],
                "nonfinite_steps": [x["nonfinite_steps"] for x in runs],
                "steps": [x["steps"] for x in runs],
                "ms_per_step": [x["ms_per_step"] for x in runs],
                "final_loss": [x["final_loss"] for x in runs],
                "losses_seed0": runs[0]["losses"]}
        for meth, runs in r["converted"].items():
            out["converted"][meth] = {k: [x.get(k) for x in runs] for k in runs[0]
                                      if k != "finetune_losses"}
        return out

    payload = {
        "paper": "Hoffer, Banner, Golan, Soudry 2018, Norm matters (bounded weight norm)",
        "lr": args.lr, "lr_finetune": args.lr_finetune, "finetune_steps": args.finetune_steps,
        "init": args.init,
        "table": table, "conversion_table": conv_table, "png": str(png),
        "settings": {s: summary(results[s]) for s in args.settings},
    }
    common.save_json(args, NAME, payload)
    return payload


if __name__ == "__main__":
    main()
