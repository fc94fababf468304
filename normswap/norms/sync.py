"""Synchronised (cross-process) L1, L-inf/top-k and Kalman batch normalisation.

Counterparts of :class:`torch.nn.SyncBatchNorm` for the normswap layers. In train mode, inside an
initialised ``torch.distributed`` process group of more than one process, the batch statistics
are reduced over the group (the default group or the layer's ``process_group``), so every process
normalises with the statistics of the *global* batch and every process updates its running
statistics with the same numbers. Outside a process group (or with a group of one), in eval mode
and when ``frozen``, each layer runs its non-sync parent's ``forward`` unchanged.

Per-rank batches may differ in size (also zero); every statistic is weighted by element counts.
Per channel, with rank ``r`` holding ``n_r`` of the ``n = sum_r n_r`` elements and
``d = x - mu``:

* **L1** (two all-reduces forward, one backward). ``mu = sum_r sum(x) / n`` (all-reduce 1 of
  ``[sum x, n_r]``), then ``s_raw = C_L1 * sum_r sum|d| / n`` (all-reduce 2 of
  ``[sum|d|, sum sign d]``). This is the exact two-pass definition; no one-pass form of the
  mean absolute deviation exists, because ``|x - mu|`` needs the global ``mu`` first.
* **L-inf / top-k** (one all-reduce and one all-gather forward, one all-reduce backward).
  ``mu`` as for L1; each rank takes its local top-``k`` of ``|d|`` (``k`` clamped to the global
  ``n``; a rank with fewer than ``k`` elements pads with NaN), all ranks all-gather the signed
  deviations ``(world, C, k)`` and take the top-``k`` of the gathered set: the exact global
  top-k (the global top-k is contained in the union of the local top-k sets), not an average
  of local ones. ``C(n)`` uses the global ``n``. The signs of the selected elements travel with
  the values, so the backward needs no extra exchange for them.
* **Kalman** (one all-gather forward, one all-reduce backward). Each rank computes its local
  ``(n_r, mean_r, M2_r)`` with a two-pass ``var_mean``; the ranks all-gather these and merge
  them with Chan et al.'s parallel update ``mean = sum n_r mean_r / n``,
  ``M2 = sum [M2_r + n_r (mean_r - mean)^2]`` in float64. Unlike ``sum x^2 - n mean^2`` this
  has no catastrophic cancellation when ``|mean| >> std`` (the ``sum / sum of squares`` scheme
  loses every digit of a float32 variance once ``mean / std`` exceeds ~4e3), and it costs the
  same single collective as :class:`torch.nn.SyncBatchNorm`'s gather of mean/invstd/count.
  The merged biased ``(mean, var)`` is then combined with the prior exactly as in
  :class:`~normswap.norms.kalman.KalmanBatchNorm`. The prior must be the same on every rank
  (it is when it is propagated from synchronised layers' statistics); the ``"auto"`` gain is
  resolved from the *global* sample count so that every rank uses the same gain.

Backward: as in ``SyncBatchNorm``, each custom autograd Function all-reduces the per-channel
sums its input gradient needs (L1, L-inf: ``sum g`` and ``sum g*d``; Kalman: the gradients of
the loss with respect to the global moments, which also carries gradients that reach the
moments through ``return_stats`` and downstream priors). The input gradient on rank ``r`` is
then ``d(sum_r' loss_r') / d x_r``: exactly the gradient of the single-process layer on the
concatenated batch. ``weight``/``bias`` gradients stay local (each rank's own contribution),
like ``SyncBatchNorm``: ``DistributedDataParallel`` averages them over the ranks.

Numerics: statistics accumulate in float32 for float16/bfloat16 input (float64 for float64),
and the collectives carry float64 buffers (a few ``C``-sized vectors), so the element counts
are exact integers at any scale. The outputs keep the input dtype. The element-wise work runs
as eager aten ops (the ``torch.compile`` fast path of :mod:`._functional` is not used here).

State: the sync classes subclass the non-sync ones, so parameters, buffers and ``state_dict``
keys are identical; ``process_group`` is not part of the state. See
:func:`normswap.distributed.convert_sync` and :func:`normswap.distributed.revert_sync`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._common import stats_dtype
from ._functional import C_L1, _param_grads, _params, linf_constant, topk_abs_deviation
from .kalman import (
    GAIN_LARGE_BATCH,
    GAIN_MICRO_BATCH,
    KalmanBatchNorm,
    Moments,
    kalman_moments,
)
from .lp_batchnorm import L1BatchNorm, LinfBatchNorm

__all__ = [
    "SyncL1BatchNorm",
    "SyncLinfBatchNorm",
    "SyncKalmanBatchNorm",
    "SYNC_CLASSES",
    "sync_active",
    "sync_l1_batch_norm",
    "sync_linf_batch_norm",
    "sync_moments",
]

logger = logging.getLogger(__name__)

ProcessGroup = Any  # torch.distributed.ProcessGroup; Any keeps the import optional at runtime
"""A ``torch.distributed`` process group, or None for the default (WORLD) group."""

_COMM_DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------
# communication helpers
# ---------------------------------------------------------------------------------------------
def sync_active(process_group: ProcessGroup | None = None) -> bool:
    """Whether statistics would be reduced: a process group is initialised with > 1 process.

    Args:
        process_group: the group, or None for the default group.

    Returns:
        True inside an initialised ``torch.distributed`` group of two or more processes.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


def _all_reduce_sum(t: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum ``t`` over the group in float64; returns the reduced float64 copy."""
    buf = t.to(_COMM_DTYPE).contiguous()
    if buf is t:
        buf = buf.clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf


def _all_gather(t: Tensor, group: ProcessGroup | None) -> Tensor:
    """Stack every rank's ``t`` (same shape on every rank) into ``(world, *t.shape)``."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)


def _reduce_dims(x: Tensor) -> list[int]:
    """All dimensions but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def _cb(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector (C,) shaped to broadcast against x (N, C, *)."""
    return v.reshape((v.shape[0],) + (1,) * (x.dim() - 2))


def _as3d(x: Tensor) -> Tensor:
    """(N, C, *) -> (N, C, R) (a view whenever the strides allow)."""
    return x.unsqueeze(2) if x.dim() == 2 else x.flatten(2)


def _global_mean(x: Tensor, acc: torch.dtype, group: ProcessGroup | None
                 ) -> tuple[Tensor, int]:
    """(global per-channel mean in ``acc``, global element count per channel): all-reduce 1."""
    C = x.shape[1]
    n_local = x.numel() // C if C else 0
    local = torch.cat([x.sum(_reduce_dims(x), dtype=acc).to(_COMM_DTYPE),
                       torch.tensor([float(n_local)], dtype=_COMM_DTYPE, device=x.device)])
    total = _all_reduce_sum(local, group)
    n = int(round(float(total[C])))
    _check_global_n(n, x, "sync batch norm")
    return (total[:C] / n).to(acc), n


def _check_global_n(n: int, x: Tensor, who: str) -> None:
    """Raise when the global batch has at most one value per channel (as BN does)."""
    if n < 2:
        raise ValueError(f"{who}: expected more than 1 value per channel in the global batch "
                         f"when training, got {n} (local input of shape {tuple(x.shape)}); "
                         "use eval mode or a larger batch")


def _local_sums_g_gd(grad_y: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Local (sum g, sum g*d) per channel in d's dtype."""
    dims = _reduce_dims(d)
    g = grad_y.to(d.dtype)
    return g.sum(dims), (g * d).sum(dims)


# ---------------------------------------------------------------------------------------------
# L1
# ---------------------------------------------------------------------------------------------
class _SyncL1Fn(torch.autograd.Function):
    """Sync L1 batch norm: forward returns (y, mu, s_raw, n); closed-form backward, all-reduced."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                group: ProcessGroup | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        acc = stats_dtype(x.dtype)
        mu, n = _global_mean(x, acc, group)
        d = x.to(acc) - _cb(mu, x)
        dims = _reduce_dims(x)
        local = torch.cat([d.abs().sum(dims), d.sign().sum(dims)])
        sums = _all_reduce_sum(local, group).to(acc)
        C = x.shape[1]
        sum_abs, sum_sign = sums[:C], sums[C:]
        s_raw = sum_abs * (C_L1 / n)
        s = s_raw + eps
        w, b = _params(x, weight, bias, acc)
        y = torch.addcmul(_cb(b, x), d, _cb(w / s, x)).to(x.dtype)
        ctx.save_for_backward(x, weight, bias, mu, s, sum_sign)
        ctx.n = n
        ctx.group = group
        count = _count_tensor(n, x)
        ctx.mark_non_differentiable(mu, s_raw, count)
        return y, mu, s_raw, count

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _gm: Any, _gs: Any, _gn: Any
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight, bias, mu, s, sum_sign = ctx.saved_tensors
        n = ctx.n
        d = x.to(mu.dtype) - _cb(mu, x)
        sum_g, sum_gd = _local_sums_g_gd(grad_y, d)
        gw, gb = _param_grads(weight, bias, sum_g, sum_gd, s, ctx.needs_input_grad)
        if not ctx.needs_input_grad[0]:
            return None, gw, gb, None, None
        C = x.shape[1]
        total = _all_reduce_sum(torch.cat([sum_g, sum_gd]), ctx.group).to(mu.dtype)
        sum_g, sum_gd = total[:C], total[C:]
        w, _ = _params(x, weight, None, mu.dtype)
        kappa = (C_L1 / n) * (w * sum_gd / s) / s
        alpha = w / s
        beta = -w * sum_g / (n * s) + kappa * sum_sign / n
        dx = grad_y.to(mu.dtype) * _cb(alpha, x) + _cb(beta, x)
        dx = dx.sub_(d.sign_().mul_(_cb(kappa, x)))
        return dx.to(x.dtype), gw, gb, None, None


def sync_l1_batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                       eps: float = 1e-5, process_group: ProcessGroup | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, int]:
    """Train-mode L1 batch norm of the local ``x`` with statistics of the global batch.

    Must be called by every process of the group (it runs collectives).

    Args:
        x: this process's input (N_r, C, *), channels at dim 1 (N_r may differ per process).
        weight: gamma (C,) or None.
        bias: beta (C,) or None.
        eps: added to the scale.
        process_group: the group, or None for the default group.

    Returns:
        ``(y, mu, s_raw, n)``: the local output, the global mean, ``C_L1 * mean|x - mu|`` over
        the global batch (both (C,), float32 or float64, identical on every rank, not
        differentiable) and the global element count per channel.
    """
    y, mu, s_raw, count = _SyncL1Fn.apply(x, weight, bias, float(eps), process_group)
    return y, mu, s_raw, int(count)


# ---------------------------------------------------------------------------------------------
# L-inf / top-k
# ---------------------------------------------------------------------------------------------
def _local_topk(x: Tensor, mu: Tensor, k: int, exact: bool) -> tuple[Tensor, Tensor]:
    """Local top-k of |x - mu| per channel: (signed d (C, k), flat (n, r) indices (C, k))."""
    x3 = _as3d(x)
    N, C, R = x3.shape
    if k == 0:
        empty = torch.empty(C, 0, dtype=mu.dtype, device=x.device)
        return empty, empty.long()
    if exact:
        dabs = (x3.to(mu.dtype) - mu[:, None]).abs().transpose(0, 1).reshape(C, N * R)
        flat = dabs.topk(k, dim=1).indices
    else:
        flat = topk_abs_deviation(x3, mu, k)[1]
    c_i = torch.arange(C, device=x.device)[:, None].expand_as(flat)
    signed = x3[flat // R, c_i, flat % R].to(mu.dtype) - mu[:, None]
    return signed, flat


def _index_full(x: Tensor, flat: Tensor, c_i: Tensor) -> tuple[Tensor, ...]:
    """Advanced-index tuple into x (N, C, *) for flat (n, r) indices and channels ``c_i``."""
    R = _as3d(x).shape[2]
    n_i, r_i = flat // R, flat % R
    spatial = x.shape[2:]
    if not spatial:
        return n_i, c_i
    return (n_i, c_i) + tuple(torch.unravel_index(r_i, spatial))


class _SyncLinfFn(torch.autograd.Function):
    """Sync L-inf/top-k batch norm: forward returns (y, mu, s_raw, n); global top-k selection."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                k: int, exact_topk: bool, group: ProcessGroup | None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        acc = stats_dtype(x.dtype)
        C = x.shape[1]
        mu, n = _global_mean(x, acc, group)
        k = max(1, min(int(k), n))
        n_local = x.numel() // C
        k_local = min(k, n_local)
        signed, flat = _local_topk(x, mu, k_local, exact_topk)
        pad = k - k_local
        if pad:
            nan = torch.full((C, pad), float("nan"), dtype=acc, device=x.device)
            signed = torch.cat([signed, nan], 1)
            flat = torch.cat([flat, torch.zeros(C, pad, dtype=torch.long, device=x.device)], 1)
        gathered = _all_gather(signed, group)                     # (world, C, k)
        world = gathered.shape[0]
        cand = gathered.permute(1, 0, 2).reshape(C, world * k)    # slot j = rank * k + i
        key = torch.nan_to_num(cand.abs(), nan=-1.0)              # padding is never selected
        top_vals, pick = key.topk(k, dim=1)
        sel_sign_sum = torch.gather(cand, 1, pick).sign().sum(1)
        s_raw = top_vals.sum(1) * (linf_constant(n) / k)
        s = s_raw + eps
        w, b = _params(x, weight, bias, acc)
        y = torch.addcmul(_cb(b, x), x.to(acc) - _cb(mu, x), _cb(w / s, x)).to(x.dtype)
        mine = (pick // k) == dist.get_rank(group)
        c_i = torch.arange(C, device=x.device)[:, None].expand_as(pick)[mine]
        my_flat = flat[c_i, (pick % k)[mine]]
        ctx.n, ctx.k, ctx.group = n, k, group
        ctx.save_for_backward(x, weight, bias, mu, s, sel_sign_sum, my_flat, c_i)
        count = _count_tensor(n, x)
        ctx.mark_non_differentiable(mu, s_raw, count)
        return y, mu, s_raw, count

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _gm: Any, _gs: Any, _gn: Any
                 ) -> tuple[Tensor | None, ...]:
        x, weight, bias, mu, s, sel_sign_sum, my_flat, c_i = ctx.saved_tensors
        n, k = ctx.n, ctx.k
        d = x.to(mu.dtype) - _cb(mu, x)
        sum_g, sum_gd = _local_sums_g_gd(grad_y, d)
        gw, gb = _param_grads(weight, bias, sum_g, sum_gd, s, ctx.needs_input_grad)
        if not ctx.needs_input_grad[0]:
            return None, gw, gb, None, None, None, None
        C = x.shape[1]
        total = _all_reduce_sum(torch.cat([sum_g, sum_gd]), ctx.group).to(mu.dtype)
        sum_g, sum_gd = total[:C], total[C:]
        w, _ = _params(x, weight, None, mu.dtype)
        coef = (linf_constant(n) / k) * (w * sum_gd / s) / s
        alpha = w / s
        beta = -w * sum_g / (n * s) + coef * sel_sign_sum / n
        dx = grad_y.to(mu.dtype) * _cb(alpha, x) + _cb(beta, x)
        if my_flat.numel():
            index = _index_full(x, my_flat, c_i)
            dx[index] = dx[index] - coef[c_i] * d[index].sign()
        return dx.to(x.dtype), gw, gb, None, None, None, None


def sync_linf_batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                         eps: float = 1e-5, k: int = 1, exact_topk: bool = False,
                         process_group: ProcessGroup | None = None
                         ) -> tuple[Tensor, Tensor, Tensor, int]:
    """Train-mode L-inf/top-k batch norm of the local ``x`` with the global batch's top-k.

    Must be called by every process of the group (it runs collectives).

    Args:
        x: this process's input (N_r, C, *), channels at dim 1.
        weight: gamma (C,) or None.
        bias: beta (C,) or None.
        eps: added to the scale.
        k: number of largest ``|x - mu|`` of the global batch averaged per channel; clamped
            to ``[1, n]`` with ``n`` the global element count per channel.
        exact_topk: select the local candidates with a full ``topk`` (slow reference path).
        process_group: the group, or None for the default group.

    Returns:
        ``(y, mu, s_raw, n)`` with ``s_raw = C(n) * mean(global top-k |x - mu|)``.

    Raises:
        ValueError: ``k < 1``.
    """
    if int(k) < 1:
        raise ValueError(f"sync_linf_batch_norm: k must be >= 1, got {k}")
    y, mu, s_raw, count = _SyncLinfFn.apply(x, weight, bias, float(eps), int(k),
                                            bool(exact_topk), process_group)
    return y, mu, s_raw, int(count)


def _count_tensor(n: int, x: Tensor) -> Tensor:
    """The global element count as a 0-d int64 tensor (a non-differentiable output)."""
    return torch.tensor(n, dtype=torch.long, device=x.device)


# ---------------------------------------------------------------------------------------------
# Kalman: global moments
# ---------------------------------------------------------------------------------------------
class _SyncMomentsFn(torch.autograd.Function):
    """Global biased (mean, var) per channel by Chan's merge; backward all-reduces d/d moments."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None
                ) -> tuple[Tensor, Tensor, Tensor]:
        C = x.shape[1]
        n_local = x.numel() // C
        if n_local:
            var_l, mean_l = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
        else:
            var_l = mean_l = torch.zeros(C, dtype=x.dtype, device=x.device)
        head = torch.tensor([float(n_local), float(x.shape[0])], dtype=_COMM_DTYPE,
                            device=x.device)
        local = torch.cat([head, mean_l.to(_COMM_DTYPE), (var_l * n_local).to(_COMM_DTYPE)])
        rows = _all_gather(local, group)                           # (world, 2 + 2C)
        counts, means, m2s = rows[:, :1], rows[:, 2:2 + C], rows[:, 2 + C:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        m2 = (m2s + counts * (means - mean).square()).sum(0)
        var = m2 / n
        totals = torch.stack([n, rows[:, 1].sum()]).round()
        ctx.save_for_backward(x, mean.to(x.dtype))
        ctx.n = int(totals[0])
        ctx.group = group
        ctx.mark_non_differentiable(totals)
        return mean.to(x.dtype), var.to(x.dtype), totals

    @staticmethod
    def backward(ctx: Any, grad_mean: Tensor | None, grad_var: Tensor | None, _gt: Any
                 ) -> tuple[Tensor | None, None]:
        x, mean = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        C = x.shape[1]
        gm = torch.zeros_like(mean) if grad_mean is None else grad_mean
        gv = torch.zeros_like(mean) if grad_var is None else grad_var
        total = _all_reduce_sum(torch.cat([gm, gv]), ctx.group).to(x.dtype)
        n = ctx.n
        gm, gv = total[:C] / n, total[C:] * (2.0 / n)
        dx = _cb(gm, x) + (x - _cb(mean, x)) * _cb(gv, x)
        return dx, None


def sync_moments(x: Tensor, process_group: ProcessGroup | None = None
                 ) -> tuple[Tensor, Tensor, int, int]:
    """Per-channel mean and biased variance of the global batch, differentiable.

    Must be called by every process of the group (it runs collectives). Gradients with respect
    to the returned moments are summed over the group in the backward pass.

    Args:
        x: this process's input (N_r, C, *) (float32 or float64; cast half input first).
        process_group: the group, or None for the default group.

    Returns:
        ``(mean, var, n, batch)``: the moments (C,) in x's dtype, the global element count per
        channel and the global sample count (sum of the ``N_r``).
    """
    mean, var, totals = _SyncMomentsFn.apply(x, process_group)
    return mean, var, int(totals[0]), int(totals[1])


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
class _SyncMixin:
    """Process-group plumbing shared by the sync layers (``process_group``, conversions)."""

    process_group: ProcessGroup | None
    _source_cls: type[nn.Module] | None
    training: bool

    def _need_sync(self) -> bool:
        """Reduce statistics now: train mode, batch statistics and a group of > 1 process."""
        return (self.training and self._uses_batch_stats()
                and sync_active(self.process_group))

    def _uses_batch_stats(self) -> bool:
        """Whether this forward normalises with batch statistics (not frozen/running ones)."""
        raise NotImplementedError

    @classmethod
    def from_module(cls, module: nn.Module, process_group: ProcessGroup | None = None) -> Any:
        """The sync variant of a non-sync layer, sharing its parameters, buffers and hooks.

        The new module is a new object whose parameters and buffers *are* the old module's
        tensors (as ``SyncBatchNorm.convert_sync_batchnorm`` does), so an optimizer built on the
        old parameters keeps working. All attributes (``k``, ``gain``, ``frozen``, hooks,
        train/eval mode ...) are carried over.

        Args:
            module: an instance of the non-sync parent class (or one of its 1d/2d/3d classes).
            process_group: the group to reduce over; None for the default group.

        Returns:
            The sync layer.

        Raises:
            TypeError: ``module`` is not an instance of the parent class, or is already sync.
        """
        parent = cls._parent()
        if not isinstance(module, parent) or isinstance(module, _SyncMixin):
            raise TypeError(f"{cls.__name__}.from_module: expected a non-sync "
                            f"{parent.__name__}, got {type(module).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update(_shallow_state(module))
        new.process_group = process_group
        new._source_cls = type(module)
        cls._adopt_input_check(new, type(module))
        return new

    def to_module(self) -> nn.Module:
        """The non-sync layer this one was made from (or the generic parent class), sharing
        parameters, buffers, hooks and attributes; the inverse of :meth:`from_module`."""
        target = self._source_cls or self._parent()
        old = target.__new__(target)
        state = _shallow_state(self)  # type: ignore[arg-type]
        for name in ("process_group", "_source_cls", "_expected_dims"):
            state.pop(name, None)
        old.__dict__.update(state)
        return old

    @classmethod
    def _parent(cls) -> type[nn.Module]:
        """The non-sync class this sync class extends."""
        raise NotImplementedError

    @staticmethod
    def _adopt_input_check(new: nn.Module, source: type[nn.Module]) -> None:
        """Keep the source class's input-rank check (the 1d/2d/3d variants)."""

    def _sync_repr(self) -> str:
        """``process_group=...`` for extra_repr when a group is set."""
        return "" if self.process_group is None else f", process_group={self.process_group}"


def _shallow_state(module: nn.Module) -> dict[str, Any]:
    """A module's ``__dict__`` with its dict-valued entries (parameters, buffers, hooks) copied."""
    return {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}


class _SyncScaleMixin(_SyncMixin):
    """Sync forward of the L1 / L-inf layers (``_ScaleNormBase`` running statistics)."""

    _expected_dims: tuple[int, ...] | None

    @staticmethod
    def _adopt_input_check(new: nn.Module, source: type[nn.Module]) -> None:
        new._expected_dims = getattr(source, "_expected_dims", None)

    def _uses_batch_stats(self) -> bool:
        return self._use_batch_stats()  # type: ignore[attr-defined]

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input``; in train mode under a process group, with global statistics."""
        if not self._need_sync():
            return super().forward(input)  # type: ignore[misc]
        self._check_input(input)  # type: ignore[attr-defined]
        y, mu, s_raw, n = self._sync_batch_forward(input)
        factor = self._update_factor()  # type: ignore[attr-defined]
        if factor is not None:
            self._ema_(self.running_mean, mu, factor)  # type: ignore[attr-defined]
            self._ema_(self.running_scale,  # type: ignore[attr-defined]
                       self._running_scale_sample(s_raw, n), factor)  # type: ignore
        return y

    def _sync_batch_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """(y, mu, s_raw, global n) from the global batch statistics."""
        raise NotImplementedError

    def to_batchnorm(self, cls: type[nn.modules.batchnorm._BatchNorm] | None = None
                     ) -> nn.modules.batchnorm._BatchNorm:
        """An eval-equivalent BatchNorm; by default ``nn.SyncBatchNorm`` on this layer's group.

        Args:
            cls: the BatchNorm class to build (default ``nn.SyncBatchNorm``).

        Returns:
            The BatchNorm (see the non-sync layer's ``to_batchnorm``).
        """
        bn = super().to_batchnorm(cls or nn.SyncBatchNorm)  # type: ignore[misc]
        if isinstance(bn, nn.SyncBatchNorm):
            bn.process_group = self.process_group
        return bn


class SyncL1BatchNorm(_SyncScaleMixin, L1BatchNorm):
    """L1 batch normalisation with statistics reduced over a ``torch.distributed`` group.

    Accepts any (N, C, *) input, like :class:`torch.nn.SyncBatchNorm`; a layer made by
    :meth:`from_module` keeps the input-rank check of its source class (L1BatchNorm2d ...).
    Without an initialised group of more than one process, in eval mode or frozen, it is
    exactly :class:`~normswap.norms.lp_batchnorm.L1BatchNorm`.

    Args:
        num_features: C.
        eps: added to the batch scale in train mode.
        momentum: running-statistics factor; None for a cumulative moving average.
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep running statistics.
        device: parameter/buffer device.
        dtype: parameter/buffer dtype.
        process_group: the group to reduce over (keyword only); None for the default group.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 *, process_group: ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self._source_cls = None

    @classmethod
    def _parent(cls) -> type[nn.Module]:
        return L1BatchNorm

    def _sync_batch_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """(y, mu, s_raw, global n) from the global batch statistics."""
        return sync_l1_batch_norm(x, self.weight, self.bias, self.eps, self.process_group)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sync_repr()


class SyncLinfBatchNorm(_SyncScaleMixin, LinfBatchNorm):
    """L-inf / top-k batch normalisation over the global top-k of a ``torch.distributed`` group.

    Args:
        num_features: C.
        eps: added to the batch scale in train mode.
        momentum: running-statistics factor; None for a cumulative moving average.
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep running statistics.
        device: parameter/buffer device.
        dtype: parameter/buffer dtype.
        k: how many of the largest ``|x - mu|`` of the *global* batch are averaged per channel.
        exact_topk: select local candidates with a full ``topk`` (slow reference path).
        process_group: the group to reduce over (keyword only); None for the default group.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 k: int = 1, exact_topk: bool = False, *,
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         k=k, exact_topk=exact_topk)
        self.process_group = process_group
        self._source_cls = None

    @classmethod
    def _parent(cls) -> type[nn.Module]:
        return LinfBatchNorm

    def _sync_batch_forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """(y, mu, s_raw, global n) from the global batch and its global top-k."""
        return sync_linf_batch_norm(x, self.weight, self.bias, self.eps, self.k,
                                    self.exact_topk, self.process_group)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sync_repr()


class SyncKalmanBatchNorm(_SyncMixin, KalmanBatchNorm):
    """Batch Kalman Normalization with global batch moments over a ``torch.distributed`` group.

    The batch moments are those of the global batch (Chan's parallel merge of the per-rank
    moments, float64), combined with the prior as in
    :class:`~normswap.norms.kalman.KalmanBatchNorm`; ``gain="auto"`` is resolved from the global
    sample count. The prior must be identical on every rank.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance before the square root.
        momentum: running-statistics momentum; None for a cumulative average.
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep running statistics.
        gain: the Kalman gain ``p`` or ``"auto"``.
        fallback_ratio: use the batch moments when ``mean(var_p / S) >= fallback_ratio``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        bias: with ``affine``, learn ``bias`` too (keyword only).
        process_group: the group to reduce over (keyword only); None for the default group.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 gain: float | str = GAIN_MICRO_BATCH, fallback_ratio: float = 100.0,
                 device: Any = None, dtype: torch.dtype | None = None, *, bias: bool = True,
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, gain,
                         fallback_ratio, device, dtype, bias=bias)
        self.process_group = process_group
        self._source_cls = None

    @classmethod
    def _parent(cls) -> type[nn.Module]:
        return KalmanBatchNorm

    def _uses_batch_stats(self) -> bool:
        return not self.frozen and (self.training or self.running_mean is None)

    def _batchnorm_class(self) -> type[nn.Module]:
        return nn.SyncBatchNorm

    def to_batchnorm(self) -> nn.Module:
        """Convert back to an eval-exact ``nn.SyncBatchNorm`` on this layer's group.

        Returns:
            The SyncBatchNorm (see :meth:`KalmanBatchNorm.to_batchnorm`).
        """
        bn = super().to_batchnorm()
        if isinstance(bn, nn.SyncBatchNorm):
            bn.process_group = self.process_group
        return bn

    def _check_input_dim(self, x: Tensor) -> None:
        source = self._source_cls or KalmanBatchNorm
        source._check_input_dim(self, x)  # type: ignore[attr-defined]

    def _global_gain(self, batch: int) -> float:
        """The gain for a global batch of ``batch`` samples (resolves ``"auto"``)."""
        if self.gain == "auto":
            return GAIN_MICRO_BATCH if batch < self.auto_gain_threshold else GAIN_LARGE_BATCH
        return float(self.gain)

    def _normalise_with_stats(self, x: Tensor, prior: Sequence[Tensor] | None,
                              want_stats: bool = True) -> tuple[Tensor, Moments | None]:
        """The forward pass; global moments in train mode under a process group."""
        if not self._need_sync():
            return super()._normalise_with_stats(x, prior, want_stats)
        self._check_input_dim(x)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        batch_mean, batch_var, n, batch = sync_moments(xf, self.process_group)
        _check_global_n(n, x, type(self).__name__)
        mean, var = batch_mean, batch_var
        if prior is not None:
            prior_mean, prior_var = self._check_prior(prior, batch_mean)
            mean, var = kalman_moments(batch_mean, batch_var, prior_mean, prior_var,
                                       self._global_gain(batch), self.fallback_ratio)
        if self.track_running_stats:
            self._update_running_stats(mean, var, n)
        y = self._affine_normalise(xf, mean, var).to(x.dtype)
        return y, (mean, var)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sync_repr()


SYNC_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    LinfBatchNorm: SyncLinfBatchNorm,
    L1BatchNorm: SyncL1BatchNorm,
    KalmanBatchNorm: SyncKalmanBatchNorm,
}
"""Non-sync base class -> sync class; ``LinfBatchNorm`` comes before its parent ``L1BatchNorm``."""
