"""Where batch statistics come from: one process, or every process of a ``torch.distributed`` group.

The layers' autograd Functions take a *reducer*: ``None`` for this process's batch alone, or a
:class:`ProcessGroupReducer` that sums per-channel vectors over a process group (float64 buffers,
so element counts stay exact integers) and gathers per-rank candidates. The sync layers
(:mod:`normswap.norms.sync`) differ from the plain ones only in returning a reducer from
``_reducer()``. :func:`global_moments` gives the Kalman layer the moments of the global batch
(Chan et al.'s parallel merge, one all-gather) with a backward that sums the gradients with
respect to the moments over the group. The maths is in docs/layers.md ("Synchronised layers").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._layout import channel_broadcast

__all__ = ["ProcessGroupReducer", "sync_active", "global_moments", "COMM_DTYPE"]

COMM_DTYPE = torch.float64
"""The dtype of every buffer the collectives carry."""


def sync_active(process_group: Any | None = None) -> bool:
    """Whether statistics would be reduced: a process group is initialised with > 1 process.

    Args:
        process_group: the group, or None for the default group.

    Returns:
        True inside an initialised ``torch.distributed`` group of two or more processes.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


class ProcessGroupReducer:
    """Sums and gathers per-channel statistics over a ``torch.distributed`` process group.

    Args:
        group: the process group, or None for the default group.
    """

    def __init__(self, group: Any | None = None) -> None:
        self.group = group

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        """The number of processes in the group."""
        return dist.get_world_size(self.group)

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the group, as a new float64 tensor (``t`` is unchanged)."""
        buf = t.to(COMM_DTYPE).contiguous()
        if buf is t:
            buf = buf.clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return buf

    def gather(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` (same shape everywhere) stacked into ``(world, *t.shape)``."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        return torch.stack(parts)


class _GlobalMomentsFn(torch.autograd.Function):
    """Global biased (mean, var) per channel by Chan's merge; backward all-reduces d/d moments."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, reducer: ProcessGroupReducer
                ) -> tuple[Tensor, Tensor, int, int]:
        C = x.shape[1]
        n_local = x.numel() // C
        if n_local:
            var_l, mean_l = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        else:
            var_l = mean_l = torch.zeros(C, dtype=x.dtype, device=x.device)
        head = torch.tensor([float(n_local), float(x.shape[0])], dtype=COMM_DTYPE,
                            device=x.device)
        local = torch.cat([head, mean_l.to(COMM_DTYPE), (var_l * n_local).to(COMM_DTYPE)])
        rows = reducer.gather(local)                               # (world, 2 + 2C)
        counts, means, m2s = rows[:, :1], rows[:, 2:2 + C], rows[:, 2 + C:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        m2 = (m2s + counts * (means - mean).square()).sum(0)
        var = m2 / n
        ctx.save_for_backward(x, mean.to(x.dtype))
        ctx.n = int(round(float(n)))
        ctx.reducer = reducer
        return mean.to(x.dtype), var.to(x.dtype), ctx.n, int(round(float(rows[:, 1].sum())))

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_var: Tensor | None, _gn: Any,
                 _gb: Any) -> tuple[Tensor | None, None]:
        x, mean = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        C = x.shape[1]
        gm = torch.zeros_like(mean) if grad_mean is None else grad_mean
        gv = torch.zeros_like(mean) if grad_var is None else grad_var
        total = ctx.reducer.sum(torch.cat([gm, gv])).to(x.dtype)
        n = ctx.n
        gm, gv = total[:C] / n, total[C:] * (2.0 / n)
        dx = channel_broadcast(gm, x) + (x - channel_broadcast(mean, x)) \
            * channel_broadcast(gv, x)
        return dx, None


def global_moments(x: Tensor, reducer: ProcessGroupReducer) -> tuple[Tensor, Tensor, int, int]:
    """Per-channel mean and biased variance of the global batch, differentiable.

    Must be called by every process of the group (it runs collectives). Gradients with respect
    to the returned moments are summed over the group in the backward pass.

    Args:
        x: this process's input (N_r, C, *) (float32 or float64; cast half input first).
        reducer: the group's reducer.

    Returns:
        ``(mean, var, n, batch)``: the moments (C,) in x's dtype, the global element count per
        channel and the global sample count (sum of the ``N_r``).
    """
    return _GlobalMomentsFn.apply(x, reducer)
