"""The built-in methods, as data (imported by the registry on first use).

Each factory names every option it accepts; layers are imported inside the factories so that
importing normswap stays cheap. ``momentum="bn"`` keeps the BatchNorm's own momentum.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Mapping

from torch import Tensor, nn

from .passes._infra import PassStep
from .passes.fold_conv_bn import fold_conv_bn
from .passes.kalman_prior import propagate_kalman_priors
from .passes.strip_norm import alpha_dropout, selu_activations, selu_init
from .passes.to_bwn import to_bwn
from .passes.to_normprop import to_normprop
from .registry import Method, register_method, register_norm

Momentum = float | None | Literal["bn"]


def _overrides(momentum: Momentum) -> dict[str, Any]:
    return {} if isinstance(momentum, str) and momentum == "bn" else {"momentum": momentum}


@register_norm("l1", aliases=("l1bn", "l1batchnorm"),
               summary="L1 batch-norm (Hoffer et al. 2018): sqrt(pi/2)*mean|x-mu|; fp16-safe")
def _l1(bn: nn.Module, *, momentum: Momentum = "bn") -> nn.Module:
    """L1 batch-norm layer with the BN's statistics (eval-exact)."""
    from .norms.lp_batchnorm import l1_from_batchnorm

    return l1_from_batchnorm(bn, **_overrides(momentum))


@register_norm("linf", aliases=("topk", "max", "linfbn", "l_inf"),
               summary="L-inf / top-k batch-norm (Hoffer et al. 2018): C(n)*mean top-k |x-mu|")
def _linf(bn: nn.Module, *, k: int = 1, momentum: Momentum = "bn",
          calibration_batches: Iterable[Tensor] | None = None) -> nn.Module:
    """L-inf / top-k batch-norm layer with the BN's statistics (eval-exact)."""
    from .norms.lp_batchnorm import linf_from_batchnorm

    options: dict[str, Any] = {"k": k, **_overrides(momentum)}
    if calibration_batches is not None:
        options["calibration_batches"] = calibration_batches
    return linf_from_batchnorm(bn, **options)


def _kalman_needs_inline(options: Mapping[str, Any]) -> bool:
    return bool(options.get("priors", True))


@register_norm("kalman", aliases=("bkn", "batchkalman", "kalmanbn"),
               steps=(PassStep(propagate_kalman_priors),),
               inline_bn_subclasses=_kalman_needs_inline,
               summary="Batch Kalman Normalization (Wang et al. 2018): prior from the previous "
                       "layer mixed with batch moments; micro-batches")
def _kalman(bn: nn.Module, *, gain: float | str | None = None, fallback_ratio: float = 100.0,
            momentum: Momentum = "bn") -> nn.Module:
    """Batch Kalman Normalization layer with the BN's statistics (bit-exact in eval)."""
    from .norms.kalman import kalman_from_batchnorm

    options: dict[str, Any] = {"fallback_ratio": fallback_ratio, **_overrides(momentum)}
    if gain is not None:
        options["gain"] = gain
    return kalman_from_batchnorm(bn, **options)


register_method(Method(
    "normprop", steps=(PassStep(to_normprop),), needs_graph=True, inline_bn_subclasses=True,
    aliases=("np", "normalizationpropagation"),
    summary="Normalization Propagation (Arpit et al. 2016): data-independent, plain "
            "Conv/Linear-BN-ReLU chains"))

register_method(Method(
    "selu", steps=(PassStep(fold_conv_bn), PassStep(selu_activations), PassStep(alpha_dropout),
                   PassStep(selu_init)),
    needs_graph=True, eval_exact=False, inline_bn_subclasses=True,
    aliases=("snn", "selfnormalizing"),
    summary="Strip BN for a self-normalizing SELU net (Klambauer et al. 2017); changes the "
            "function, needs fine-tuning"))

register_method(Method(
    "bwn", steps=(PassStep(to_bwn),), aliases=("boundedweightnorm", "boundedwn", "meanonlybn"),
    summary="Bounded weight norm + mean-only BN (Hoffer et al. 2018): conv/linear -> BN pairs, "
            "no batch variance"))
