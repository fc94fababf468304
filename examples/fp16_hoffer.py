"""Hoffer et al. 2018 ("Norm matters"): L1 and L∞ batch-norm train in fp16 where an L2 BN
computed in fp16 arithmetic overflows.

Four versions of the same small CNN (conv 32-64-64 + norm + ReLU/max-pool, global average pool,
linear) are trained in fp16 on MNIST images scaled to 0–1000 (instead of 0–1):

* ``bn``       PyTorch's native ``nn.BatchNorm2d`` fed fp16 tensors;
* ``l2_fp16``  an L2 batch-norm whose mean and variance are computed *in fp16 arithmetic*
               (``torch.var_mean`` of fp16 tensors, written below): the paper's failure case;
* ``l1``       ``normswap.norms.lp_batchnorm.L1BatchNorm2d``;
* ``linf``     ``normswap.norms.lp_batchnorm.LinfBatchNorm2d`` (k = 1, pure L∞).

The L2 variance of channels with σ ≳ 256 is not representable in fp16 (65504 is the largest
value), so ``l2_fp16`` produces non-finite values; L1 (mean absolute deviation) and L∞ (max
absolute deviation) need no squares and stay finite. Native BN survives too, but only because
PyTorch computes its statistics in fp32 even for fp16 input (CPU and cuDNN alike): its success
is not a property of the L2 norm in fp16.

fp16 emulation (default; docs/RESULTS.md). Real ``.half()`` training is about 8× slower than fp32
on a CPU without fp16 arithmetic, so by default every tensor *between* layers is fp16, each
convolution/linear layer computes ``conv(x.float(), w.half().float()).half()`` (fp16 operands,
fp32 accumulation, fp16 result: what GPU tensor cores do), the norm layers compute on the fp16
tensors, and the master weights are fp32 (SGD updates them in fp32; gradients arriving at the
activations are fp16). ``--real-half`` runs true ``model.half()`` training instead (pure fp16
weights as in the paper; meant for a GPU, used when CUDA is available). No loss scaling is used;
a step whose loss or gradients are non-finite is skipped and counted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from normswap.norms.lp_batchnorm import L1BatchNorm2d, LinfBatchNorm2d  # noqa: E402

NAME = "fp16_hoffer"
NORMS = ("bn", "l2_fp16", "l1", "linf")
INPUT_SCALE = 1000.0


class L2BatchNormFP16(nn.Module):
    """An L2 batch-norm computed in fp16 arithmetic (mean and variance of fp16 tensors).

    Train: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with ``var, mean =
    torch.var_mean(x_fp16)``: the variance is an fp16 number, so it is ``inf`` as soon as
    σ > 255.9. Running statistics are kept in fp32 (from those fp16 values). Eval uses them.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.inf_channels = 0  # channels whose fp16 variance overflowed in the last train step

    def forward(self, x: Tensor) -> Tensor:
        xh = x.half()
        shape = (1, -1, 1, 1)
        if self.training:
            var, mean = torch.var_mean(xh, dim=(0, 2, 3), correction=0)  # fp16 results
            self.inf_channels = int((~torch.isfinite(var)).sum())
            with torch.no_grad():
                n = xh.numel() // xh.shape[1]
                m = self.momentum  # BatchNorm's rule; lerp_ would turn inf into nan
                self.running_mean.mul_(1 - m).add_(m * mean.float())
                self.running_var.mul_(1 - m).add_(m * var.float() * n / (n - 1))
        else:
            mean, var = self.running_mean.half(), self.running_var.half()
        y = (xh - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps)
        return y * self.weight.half().reshape(shape) + self.bias.half().reshape(shape)


class HalfEmuConv2d(nn.Conv2d):
    """Conv with fp16 operands, fp32 accumulation and an fp16 result; fp32 master weights."""

    def forward(self, x: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.half().float()
        return F.conv2d(x.float(), self.weight.half().float(), b, self.stride, self.padding,
                        self.dilation, self.groups).half()


class HalfEmuLinear(nn.Linear):
    """Linear with fp16 operands, fp32 accumulation and an fp16 result; fp32 master weights."""

    def forward(self, x: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.half().float()
        return F.linear(x.float(), self.weight.half().float(), b).half()


def nonfinite_statistics(model: nn.Module) -> bool:
    """True when a norm layer's statistics of the last step were non-finite.

    ``L2BatchNormFP16`` reports its batch variance directly; for the other layers a non-finite
    batch statistic would make their (fp32) running statistics non-finite, which is checked.
    """
    for m in model.modules():
        if isinstance(m, L2BatchNormFP16):
            if m.inf_channels:
                return True
        elif hasattr(m, "running_mean"):
            if any(not bool(torch.isfinite(b).all()) for b in m.buffers(recurse=False)
                   if b.is_floating_point()):
                return True
    return False


def norm_factory(name: str) -> Callable[[int], nn.Module]:
    """The norm layer class for each variant."""
    return {"bn": nn.BatchNorm2d, "l2_fp16": L2BatchNormFP16, "l1": L1BatchNorm2d,
            "linf": lambda c: LinfBatchNorm2d(c, k=1)}[name]


def build(name: str, real_half: bool, device: torch.device) -> nn.Module:
    """The CNN for one norm, in emulated or real fp16."""
    if real_half:
        return common.make_cnn(norm_factory(name)).to(device).half()
    return common.make_cnn(norm_factory(name), conv=HalfEmuConv2d, linear=HalfEmuLinear)


def run_one(name: str, seed: int, data: common.Data, args: Any, device: torch.device
            ) -> dict[str, Any]:
    """Train one model for one seed; its accuracy and non-finite step count."""
    torch.manual_seed(seed)
    model = build(name, args.real_half, device)

    def to_input(x: Tensor) -> Tensor:
        return (x * args.input_scale).to(device).half()

    stats = common.train(model, data.x_train, data.y_train.to(device), lr=args.lr, seed=seed,
                         input_fn=to_input, desc=f"{name} seed {seed}",
                         progress=not args.no_progress, check_fn=nonfinite_statistics)
    acc = common.evaluate(model, data.x_test, data.y_test.to(device), input_fn=to_input)
    inf_channels = {n: m.inf_channels for n, m in model.named_modules()
                    if isinstance(m, L2BatchNormFP16)}
    return {"acc": acc, "inf_variance_channels_last_step": inf_channels, **stats}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.base_parser(__doc__.splitlines()[0], seeds=(0, 1), train_size=None)
    p.add_argument("--real-half", action="store_true",
                   help="true model.half() training (use on a GPU; ~8x slower on CPU)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    p.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
    p.add_argument("--input-scale", type=float, default=INPUT_SCALE,
                   help="inputs are images in [0, 1) times this (1000: the overflow case)")
    args = p.parse_args(argv)
    common.setup(args)
    device = torch.device("cuda" if args.real_half and torch.cuda.is_available() else "cpu")
    if args.real_half and device.type == "cpu":
        print("warning: --real-half on CPU: fp16 convolutions are ~8x slower than fp32 here")
    # images in [0, 1) scaled to [0, 1000): no standardisation on purpose
    data = common.get_data(args, transform=lambda x: x)
    mode = ("real fp16 (model.half(), fp16 weights)" if args.real_half else
            "emulated fp16: fp16 activations, conv/linear = fp32 accumulation of fp16 operands, "
            "norms on fp16 tensors, fp32 master weights")
    print(f"{data.note}\ninputs scaled to 0-{args.input_scale:g}; {mode}; device {device}; "
          f"lr {args.lr} linear decay to 0 over one epoch, batch 128, SGD momentum 0.9; "
          "non-finite steps are skipped")
    if args.quick:
        args.norms = list(NORMS)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in args.norms}
    for seed in args.seeds:
        for name in args.norms:
            results[name].append(run_one(name, seed, data, args, device))
    rows = []
    for name in args.norms:
        runs = results[name]
        rows.append([name, common.fmt([r["acc"] for r in runs]),
                     " / ".join(f"{r['flagged_steps']}/{r['steps']}" for r in runs),
                     " / ".join(f"{r['nonfinite_steps']}" for r in runs),
                     f"{common.mean_std([r['ms_per_step'] for r in runs])[0]:.0f}"])
    table = common.print_table(
        ["norm", "test acc % (mean ± std)", "steps with non-finite statistics",
         "skipped steps (non-finite loss/grad)", "ms/step"], rows,
        title=f"fp16 training on inputs scaled to 0-{args.input_scale:g} "
              f"({len(args.seeds)} seeds: {args.seeds})")
    lines = []
    for name in args.norms:
        runs = results[name]
        flagged = sum(r["flagged_steps"] for r in runs)
        total = sum(r["steps"] for r in runs)
        line = (f"{name}: non-finite statistics on {flagged}/{total} steps, "
                f"test accuracy {common.fmt([r['acc'] for r in runs])}%")
        dead = [sum(r["inf_variance_channels_last_step"].values()) for r in runs]
        if name == "l2_fp16":
            line += (f"; channels whose fp16 variance was inf at the last step: {dead} "
                     "(they output their bias and get no gradient)")
        lines.append(line)
    lines.append("native nn.BatchNorm2d computes its statistics in fp32 even for fp16 input "
                 "(on CPU and in cuDNN): that, not the L2 norm, is why it does not overflow.")
    verdict = "\n".join(lines)
    print(verdict)
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in args.norms:
        losses = results[name][0]["losses"]
        ax1.plot(common.smooth(losses), label=f"{name} ({results[name][0]['flagged_steps']} "
                                              "steps with non-finite statistics)")
    ax1.set(xlabel="step", ylabel="training loss (running mean, finite steps)",
            title=f"fp16, inputs 0-{args.input_scale:g}, seed {args.seeds[0]}")
    ax1.legend()
    means = [common.mean_std([r["acc"] for r in results[n]]) for n in args.norms]
    ax2.bar(args.norms, [m for m, _ in means], yerr=[s for _, s in means], capsize=4)
    ax2.set(ylabel="test accuracy %", ylim=(0, 100), title="test accuracy after one epoch")
    for i, (m, _) in enumerate(means):
        ax2.text(i, m + 1, f"{m:.1f}", ha="center")
    png = common.save_figure(args, NAME, fig)
    payload = {
        "paper": "Hoffer, Banner, Golan, Soudry 2018, Norm matters",
        "data": data.note, "mode": mode, "real_half": args.real_half, "device": str(device),
        "input_scale": args.input_scale, "lr": args.lr, "table": table, "verdict": verdict,
        "png": str(png),
        "norms": {n: {"acc": [r["acc"] for r in results[n]],
                      "acc_mean": common.mean_std([r["acc"] for r in results[n]])[0],
                      "acc_std": common.mean_std([r["acc"] for r in results[n]])[1],
                      "nonfinite_stat_steps": [r["flagged_steps"] for r in results[n]],
                      "nonfinite_steps": [r["nonfinite_steps"] for r in results[n]],
                      "inf_variance_channels_last_step":
                          [r["inf_variance_channels_last_step"] for r in results[n]],
                      "steps": [r["steps"] for r in results[n]],
                      "ms_per_step": [r["ms_per_step"] for r in results[n]],
                      "seconds": [r["seconds"] for r in results[n]]}
                  for n in args.norms},
    }
    common.save_json(args, NAME, payload)
    return payload


if __name__ == "__main__":
    main()
