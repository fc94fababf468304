"""Shared test helpers: randomised BatchNorm statistics (a fresh BN in eval is ~identity, so
an unrandomised equivalence test proves nothing)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from normswap.passes._match import is_batchnorm


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN-family module random running stats and affine parameters (in place)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if not is_batchnorm(m):
            continue
        rm = getattr(m, "running_mean", None)
        if rm is None:
            continue
        c = rm.numel()
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        if getattr(m, "weight", None) is not None:
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        if getattr(m, "bias", None) is not None:
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
        nbt = getattr(m, "num_batches_tracked", None)
        if nbt is not None:
            nbt.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return model


# Triton's interpreter runs the Triton kernels' tests on the CPU; it must be switched on before
# triton is first imported (triton.language's own helpers are jit-decorated at import time).
if not torch.cuda.is_available():
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the state_dict, for 'never mutated' checks."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)
            ).item()


def swapped(report) -> list:  # type: ignore[no-untyped-def]
    """The report's BN replacements (not the Kalman prior wiring that follows them)."""
    return [c for c in report.changes if not c.before.startswith("Kalman")]


def fold_model(model: nn.Module, **kwargs: Any) -> tuple[nn.Module, Any]:
    """``normswap.fold`` without its equivalence check, returning ``(folded, report)``."""
    import normswap

    folded = normswap.fold(model, verify=False, **kwargs)
    return folded, folded.normswap_report


@pytest.fixture(autouse=True)
def _restore_method_registry() -> Any:
    """A method a test registers is gone after it (the registry is process-wide)."""
    from normswap import registry

    methods, aliases = dict(registry._METHODS), dict(registry._ALIASES)
    yield
    registry._METHODS.clear()
    registry._METHODS.update(methods)
    registry._ALIASES.clear()
    registry._ALIASES.update(aliases)
