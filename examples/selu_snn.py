"""Klambauer et al. 2017 (self-normalizing networks): deep SELU MLPs train where plain ReLU
MLPs struggle, and normswap turns a trained BatchNorm MLP into a SELU network.

MLPs 784 → 256 × depth → 10 (depth = number of hidden layers: 8, 16, 32) on standardised MNIST,
SGD momentum 0.9, lr 0.01 decayed linearly to 0 over one epoch (the SELU nets diverge at lr 0.05
here), batch 128:

* ``selu``      Linear + SELU + AlphaDropout(p), LeCun normal init N(0, 1/fan_in), zero bias;
                p = ``--alpha-dropout``, default 0: with p = 0.05 (the SNN paper's MNIST value)
                the depth-32 net reached only 84.3 ± 1.2 % here vs 95.4 % without dropout
                (``examples/results/selu_snn_alpha_dropout_0.05.json``);
* ``relu_he``   Linear + ReLU, He init N(0, 2/fan_in), zero bias;
* ``relu_bn``   Linear + BatchNorm1d + ReLU, PyTorch's default init;
* ``bn→selu``   the trained ``relu_bn`` model converted with
                ``normswap.swap(model, "selu", init="calibrate", calibration_inputs=...)``
                (BN folded into the Linear layers, ReLU → SELU, each hidden unit rescaled to mean
                0 / variance 1 on 8 training batches) and then fine-tuned for one epoch
                (lr 0.01 → 0). Its accuracy straight after the conversion is reported too: the
                conversion is not function-preserving.

For every model the mean and variance of the last hidden layer's activations (the input of the
output layer) over the test set are reported: a self-normalizing net keeps them near 0 and 1.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import normswap  # noqa: E402

NAME = "selu_snn"
DEPTHS = (8, 16, 32)
WIDTH = 256
VARIANTS = ("selu", "relu_he", "relu_bn", "bn→selu")


def make_mlp(kind: str, depth: int, dropout: float = 0.0) -> nn.Sequential:
    """``784 → 256 × depth → 10`` MLP of one kind (``selu``, ``relu_he`` or ``relu_bn``)."""
    layers: list[tuple[str, nn.Module]] = []
    width_in = 784
    for i in range(1, depth + 1):
        fc = nn.Linear(width_in, WIDTH)
        if kind == "selu":
            nn.init.kaiming_normal_(fc.weight, mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(fc.bias)
            layers += [(f"fc{i}", fc), (f"act{i}", nn.SELU()),
                       (f"drop{i}", nn.AlphaDropout(dropout))]
        elif kind == "relu_he":
            nn.init.kaiming_normal_(fc.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(fc.bias)
            layers += [(f"fc{i}", fc), (f"act{i}", nn.ReLU())]
        elif kind == "relu_bn":
            layers += [(f"fc{i}", fc), (f"bn{i}", nn.BatchNorm1d(WIDTH)), (f"act{i}", nn.ReLU())]
        else:
            raise ValueError(f"unknown MLP kind {kind!r}")
        width_in = WIDTH
    layers.append(("out", nn.Linear(width_in, 10)))
    return nn.Sequential(OrderedDict(layers))


@torch.no_grad()
def last_hidden_moments(model: nn.Module, x: Tensor) -> tuple[float, float]:
    """Mean and variance (over samples and units) of the input of the output layer, eval mode."""
    out_layer = dict(model.named_modules())["out"]
    seen: list[Tensor] = []
    handle = out_layer.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach()))
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), 1000):
            model(x[i:i + 1000])
    finally:
        handle.remove()
        model.train(was)
    h = torch.cat(seen).double()
    return float(h.mean()), float(h.var())


def run_depth(depth: int, seed: int, data: common.Data, args: Any) -> dict[str, dict[str, Any]]:
    """All variants at one depth and seed."""
    out: dict[str, dict[str, Any]] = {}
    trained: dict[str, nn.Module] = {}
    for kind in ("selu", "relu_he", "relu_bn"):
        torch.manual_seed(seed)
        model = make_mlp(kind, depth, dropout=args.alpha_dropout)
        stats = common.train(model, data.x_train, data.y_train, lr=args.lr, seed=seed,
                             desc=f"{kind} depth {depth} seed {seed}",
                             progress=not args.no_progress)
        mean, var = last_hidden_moments(model, data.x_test)
        out[kind] = {"acc": common.evaluate(model, data.x_test, data.y_test),
                     "last_hidden_mean": mean, "last_hidden_var": var, **stats}
        trained[kind] = model
    trained_bn = trained["relu_bn"]
    calib = [data.x_train[i * 128:(i + 1) * 128] for i in range(8)]
    converted = normswap.swap(trained_bn.eval(), "selu", init="calibrate",
                              calibration_inputs=calib)
    report = converted.normswap_report
    acc0 = common.evaluate(converted, data.x_test, data.y_test)
    stats = common.train(converted, data.x_train, data.y_train, lr=args.lr, seed=seed,
                         desc=f"bn→selu depth {depth} seed {seed}", progress=not args.no_progress)
    mean, var = last_hidden_moments(converted, data.x_test)
    out["bn→selu"] = {"acc": common.evaluate(converted, data.x_test, data.y_test),
                      "acc_at_conversion": acc0, "last_hidden_mean": mean,
                      "last_hidden_var": var, "changes": len(report.changes),
                      "skips": len(report.skips), **stats}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.base_parser(__doc__.splitlines()[0], seeds=(0, 1, 2), train_size=46080)
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate")
    p.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    p.add_argument("--alpha-dropout", type=float, default=0.0,
                   help="AlphaDropout rate in the SELU nets (0.05 cost 10 points at depth 32 "
                        "here: examples/results/selu_snn_alpha_dropout_0.05.json)")
    args = p.parse_args(argv)
    common.setup(args)
    data = common.get_data(args, flatten=True)
    if args.quick:
        args.depths = [8]
    print(f"{data.note}\nSELU nets: AlphaDropout p = {args.alpha_dropout}; lr {args.lr} linear "
          "decay to 0 over one epoch, batch 128, SGD momentum 0.9; bn→selu = the trained relu_bn "
          "net converted by normswap and fine-tuned one epoch")
    runs: dict[int, list[dict[str, dict[str, Any]]]] = {d: [] for d in args.depths}
    for seed in args.seeds:
        for depth in args.depths:
            runs[depth].append(run_depth(depth, seed, data, args))

    def col(depth: int, variant: str, key: str) -> list[float]:
        return [r[variant][key] for r in runs[depth]]

    rows = []
    for depth in args.depths:
        rows.append([depth, *(common.fmt(col(depth, v, "acc")) for v in VARIANTS),
                     common.fmt(col(depth, "bn→selu", "acc_at_conversion")),
                     f"{common.mean_std(col(depth, 'selu', 'last_hidden_mean'))[0]:+.3f} / "
                     f"{common.mean_std(col(depth, 'selu', 'last_hidden_var'))[0]:.3f}"])
    table = common.print_table(
        ["depth", "SELU acc %", "ReLU+He acc %", "ReLU+BN acc %", "BN→SELU fine-tuned acc %",
         "BN→SELU at conversion %", "SELU last hidden mean / var"], rows,
        title=f"test accuracy, mean ± std over seeds {args.seeds}")
    moments_rows = [[depth, v, f"{common.mean_std(col(depth, v, 'last_hidden_mean'))[0]:+.3f}",
                     f"{common.mean_std(col(depth, v, 'last_hidden_var'))[0]:.3f}"]
                    for depth in args.depths for v in VARIANTS]
    moments_table = common.print_table(["depth", "model", "last hidden mean", "last hidden var"],
                                       moments_rows, title="last hidden layer, test set, eval mode")
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for v in VARIANTS:
        ms = [common.mean_std(col(d, v, "acc")) for d in args.depths]
        ax1.errorbar(args.depths, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o",
                     capsize=3, label=v)
    ax1.set(xlabel="hidden layers", ylabel="test accuracy %", xscale="log", ylim=(0, 100),
            title="one epoch, lr 0.01")
    ax1.minorticks_off()
    ax1.set_xticks(args.depths, [str(d) for d in args.depths])
    ax1.legend()
    deepest = max(args.depths)
    for v in VARIANTS:
        ax2.plot(common.smooth(runs[deepest][0][v]["losses"]), label=v)
    ax2.set(xlabel="step", ylabel="training loss (running mean)",
            title=f"depth {deepest}, seed {args.seeds[0]}")
    ax2.legend()
    png = common.save_figure(args, NAME, fig)
    payload = {
        "paper": "Klambauer, Unterthiner, Mayr, Hochreiter 2017, Self-Normalizing Neural Networks",
        "data": data.note, "lr": args.lr, "width": WIDTH, "alpha_dropout": args.alpha_dropout,
        "table": table,
        "moments_table": moments_table, "png": str(png),
        "depths": {str(d): {v: {k: [r[v][k] for r in runs[d]] for k in
                                ("acc", "last_hidden_mean", "last_hidden_var", "ms_per_step",
                                 "seconds", "nonfinite_steps")
                                + (("acc_at_conversion",) if v == "bn→selu" else ())}
                            for v in VARIANTS} for d in args.depths},
    }
    for d in args.depths:
        for v in VARIANTS:
            accs = payload["depths"][str(d)][v]["acc"]
            payload["depths"][str(d)][v]["acc_mean"], payload["depths"][str(d)][v]["acc_std"] = \
                common.mean_std(accs)
    common.save_json(args, NAME, payload)
    return payload


if __name__ == "__main__":
    main()
