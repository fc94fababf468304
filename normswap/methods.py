"""Registers the built-in methods (imported by the registry on first use).

Layers are imported inside the factories so that importing normswap stays cheap.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from .registry import register_graph_method, register_norm
from .report import PassReport


def _kalman_priors(gm: fx.GraphModule, **options: Any) -> tuple[fx.GraphModule, PassReport]:
    """Wire each Kalman layer's prior from the graph (train mode)."""
    from .passes.kalman_prior import propagate_kalman_priors

    return propagate_kalman_priors(gm, **options)


@register_norm("l1", aliases=("l1bn", "l1batchnorm"),
               summary="L1 batch-norm (Hoffer et al. 2018): sqrt(pi/2)*mean|x-mu|; fp16-safe")
def _l1(bn: nn.Module, **options: Any) -> nn.Module:
    from .norms.lp_batchnorm import l1_from_batchnorm

    return l1_from_batchnorm(bn, **options)


@register_norm("linf", aliases=("topk", "max", "linfbn", "l_inf"),
               summary="L-inf / top-k batch-norm (Hoffer et al. 2018): C(n)*mean top-k |x-mu|")
def _linf(bn: nn.Module, **options: Any) -> nn.Module:
    from .norms.lp_batchnorm import linf_from_batchnorm

    return linf_from_batchnorm(bn, **options)


@register_norm("kalman", aliases=("bkn", "batchkalman", "kalmanbn"), post_pass=_kalman_priors,
               summary="Batch Kalman Normalization (Wang et al. 2018): prior from the previous "
                       "layer mixed with batch moments; micro-batches")
def _kalman(bn: nn.Module, **options: Any) -> nn.Module:
    from .norms.kalman import kalman_from_batchnorm

    return kalman_from_batchnorm(bn, **options)


@register_graph_method("normprop", aliases=("np", "normalizationpropagation"),
                       summary="Normalization Propagation (Arpit et al. 2016): data-independent, "
                               "plain Conv/Linear-BN-ReLU chains")
def _normprop(gm: fx.GraphModule, **options: Any) -> tuple[fx.GraphModule, PassReport]:
    from .passes.to_normprop import to_normprop

    return to_normprop(gm, **options)


@register_graph_method("selu", aliases=("snn", "selfnormalizing"), eval_exact=False,
                       summary="Strip BN for a self-normalizing SELU net (Klambauer et al. 2017); "
                               "changes the function, needs fine-tuning")
def _selu(gm: fx.GraphModule, **options: Any) -> tuple[fx.GraphModule, PassReport]:
    from .passes.strip_norm import strip_for_selu

    return strip_for_selu(gm, **options)


@register_graph_method("bwn", aliases=("boundedweightnorm", "boundedwn", "meanonlybn"),
                       summary="Bounded weight norm + mean-only BN (Hoffer et al. 2018): "
                               "conv/linear -> BN pairs, no batch variance")
def _bwn(gm: fx.GraphModule, **options: Any) -> tuple[fx.GraphModule, PassReport]:
    from .passes.to_bwn import to_bwn

    return to_bwn(gm, **options)
