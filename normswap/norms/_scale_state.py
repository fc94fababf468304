"""BatchNorm-compatible state for layers that keep a running *scale* (L1, L-inf/top-k).

Inside the layer the spread statistic is ``running_scale`` = D, the eval-mode denominator
(``y = (x - running_mean) / D * weight + bias``). D has the size of sigma, so it stays finite in
float16 for sigma up to 65504, where a variance overflows past sigma ~ 256. It is a
*non-persistent* buffer: the state_dict carries BatchNorm's keys and meaning instead,

    weight, bias, running_mean, running_var, num_batches_tracked     (BatchNorm's order)

with ``running_var = D**2 - eps`` computed in float64, so that ``sqrt(running_var + eps) = D``.
A converted checkpoint therefore loads with strict ``load_state_dict`` into the original
BatchNorm architecture and computes the same eval function, and BatchNorm tooling
(``torch.nn.utils.fusion.fuse_conv_bn_eval``, ultralytics' ``fuse_conv_and_bn``) reads the
``running_var`` attribute, a property with a setter. ``running_var`` is float32 when the buffers
are float16/bfloat16 (a float16 variance would overflow) and the buffers' dtype otherwise.

Loading accepts ``running_var`` (BatchNorm and current checkpoints) and the legacy
``running_scale`` key of older normswap checkpoints. See docs/layers.md, "State".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.fx import _symbolic_trace

from ._common import BatchNormState
from .base import BatchStatNorm

__all__ = ["RunningScaleNorm", "running_var_from_scale", "scale_from_running_var"]

_LEGACY_KEY = "running_scale"


def running_var_from_scale(scale: Tensor, eps: float) -> Tensor:
    """BatchNorm's ``running_var`` for a running scale D: ``D**2 - eps`` (float64 maths).

    Where ``D**2 - eps`` is zero within D's own rounding (a BatchNorm channel with variance 0
    converted and read back), the result is exactly 0. It is negative where ``D < sqrt(eps)``
    (an L1/L-inf channel whose scale fell below sqrt(eps)); ``sqrt(var + eps)`` is still D.

    Args:
        scale: D per channel.
        eps: the layer's epsilon.

    Returns:
        The variance in float32 for half-precision ``scale``, in ``scale``'s dtype otherwise.
    """
    d64 = scale.detach().double()
    var = d64.square() - eps
    rounding = 4.0 * torch.finfo(scale.dtype).eps * d64.square()
    var = torch.where(var.abs() <= rounding, torch.zeros_like(var), var)
    out = torch.float32 if scale.dtype in (torch.float16, torch.bfloat16) else scale.dtype
    return var.to(out)


def scale_from_running_var(var: Tensor, eps: float) -> Tensor:
    """The running scale D = ``sqrt(running_var + eps)`` in float64."""
    return torch.sqrt(var.detach().double() + eps)


#: fx's "is symbolic tracing" test (torch >= 2.5 separates it from export's), looked up once:
#: the eval forward asks on every call
_fx_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or \
    _symbolic_trace.is_fx_tracing


def _tracing() -> bool:
    """Whether the forward is being captured (export, compile, ONNX export, tracing), where a
    Python branch on tensor data cannot be taken."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or _fx_tracing()
                or torch.onnx.is_in_onnx_export())


class RunningScaleNorm(BatchStatNorm):
    """:class:`BatchStatNorm` whose spread statistic is the running scale ``running_scale``.

    Eval output is ``(x - running_mean) / running_scale * weight + bias``; the state_dict and the
    ``running_var`` property speak BatchNorm (see the module docstring).
    """

    running_scale: Tensor | None

    def _init_spread(self, factory: dict[str, Any]) -> None:
        scale = torch.ones(self.num_features, **factory) if self.track_running_stats else None
        self.register_buffer("running_scale", scale, persistent=False)
        self._set_exact_var(None)

    # -- the BatchNorm variance it was converted from -----------------------------------------
    def _set_exact_var(self, var: Tensor | None) -> None:
        """Remember the exact ``running_var`` a BatchNorm (or a checkpoint) gave, valid until
        ``running_scale`` changes (tracked by its version counter): eval then runs BatchNorm's
        own arithmetic on it, bit for bit, instead of ``running_scale**2``."""
        if var is None or self.running_scale is None:
            self.register_buffer("_exact_var", None, persistent=False)
            self.register_buffer("_exact_scale", None, persistent=False)
            return
        self.register_buffer("_exact_var", var.detach().to(
            device=self.running_scale.device,
            dtype=torch.float64 if self.running_scale.dtype == torch.float64 else torch.float32
        ).clone(), persistent=False)
        self.register_buffer("_exact_scale", self.running_scale.detach().clone(),
                             persistent=False)

    def _exact(self) -> Tensor | None:
        """The converted ``running_var`` while ``running_scale`` is still the scale it gave
        (training, calibration or a cast changes it; copies and moves keep it)."""
        pair = self._exact_pair()
        if pair is None or not torch.equal(pair[1], self.running_scale):  # type: ignore[arg-type]
            return None
        return pair[0]

    def _exact_pair(self) -> tuple[Tensor, Tensor] | None:
        """The converted ``running_var`` and the ``running_scale`` it was valid for, when their
        kinds still match the current scale (the values are compared by the caller)."""
        var = getattr(self, "_exact_var", None)
        ref = getattr(self, "_exact_scale", None)
        scale = self.running_scale
        if var is None or ref is None or scale is None or ref.dtype != scale.dtype \
                or ref.device != scale.device:
            return None
        return var, ref

    def _reset_spread(self) -> None:
        self.running_scale.fill_(1.0)  # type: ignore[union-attr]

    def _load_spread(self, state: BatchNormState) -> None:
        scale = state.eval_scale()
        if scale is not None:
            self.running_scale.copy_(scale)  # type: ignore[union-attr]
            self._set_exact_var(state.running_var)

    def _eval_denominator(self) -> Tensor:
        exact = self._exact()
        if exact is not None and bool(torch.isfinite(exact).all()):
            return torch.sqrt(exact.double() + self.eps)
        return self.running_scale.detach().double()  # type: ignore[union-attr]

    # -- BatchNorm view ------------------------------------------------------------------------
    @property
    def running_var(self) -> Tensor | None:
        """BatchNorm's ``running_var`` (``running_scale**2 - eps``), computed; None without stats.

        A new tensor on each read: write through the setter (``layer.running_var = v``) or
        ``running_scale``, not in place.
        """
        if self.running_scale is None:
            return None
        exact = self._exact()
        if exact is not None:
            out = torch.float32 if self.running_scale.dtype in (torch.float16, torch.bfloat16) \
                else self.running_scale.dtype
            return exact.to(out).clone()
        return running_var_from_scale(self.running_scale, self.eps)

    @running_var.setter
    def running_var(self, value: Tensor | None) -> None:
        if value is None or self.running_scale is None:
            if value is not None:
                raise ValueError(f"{type(self).__name__}: no running statistics "
                                 "(track_running_stats=False) to set running_var on")
            return
        with torch.no_grad():
            self.running_scale.copy_(scale_from_running_var(torch.as_tensor(value), self.eps))
        self._set_exact_var(torch.as_tensor(value))

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.running_scale is None:
            return
        counter = destination.pop(prefix + "num_batches_tracked", None)
        destination[prefix + "running_var"] = self.running_var
        if counter is not None:
            destination[prefix + "num_batches_tracked"] = counter

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.running_scale is None:
            return  # keys of running statistics stay unexpected, as for BatchNorm
        var_key, legacy_key = prefix + "running_var", prefix + _LEGACY_KEY
        for key in (var_key, legacy_key):
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        if var_key in state_dict:
            key, value = var_key, state_dict[var_key]
            legacy = False
        elif legacy_key in state_dict:
            key, value = legacy_key, state_dict[legacy_key]
            legacy = True
        else:
            if strict:
                missing_keys.append(var_key)
            return
        if not isinstance(value, Tensor) or value.shape != self.running_scale.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape} "
                              "from checkpoint, the shape in current model is "
                              f"{tuple(self.running_scale.shape)}.")
            return
        with torch.no_grad():
            scale = value.detach() if legacy else scale_from_running_var(value, self.eps)
            self.running_scale.copy_(scale)
        self._set_exact_var(None if legacy else value)

    def _eval_forward(self, x: Tensor) -> Tensor:
        """``(x - running_mean) / running_scale * weight + bias`` via the native eval kernel."""
        # (a Proxy has no dtype while fx traces the layer: the statistics' dtype stands in)
        dtype = (self.running_mean.dtype  # type: ignore[union-attr]
                 if isinstance(x, torch.fx.Proxy) else x.dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        rm = self.running_mean.to(acc)  # type: ignore[union-attr]
        w = None if self.weight is None else self.weight.to(acc)
        b = None if self.bias is None else self.bias.to(acc)
        if _tracing():
            return self._traced_eval_forward(x, rm, w, b, acc)
        exact = self._exact()
        if exact is not None and bool(torch.isfinite(exact).all()):
            # the BatchNorm it came from, computed exactly as BatchNorm computes it
            return torch.nn.functional.batch_norm(x, rm, exact.to(acc), w, b, False, 0.0,
                                                  self.eps)
        var = self.running_scale.to(acc).square()  # type: ignore[union-attr]
        return torch.nn.functional.batch_norm(x, rm, var, w, b, False, 0.0, 0.0)

    def _traced_eval_forward(self, x: Tensor, rm: Tensor, w: Tensor | None, b: Tensor | None,
                             acc: torch.dtype) -> Tensor:
        """The eval forward without data-dependent branches (``torch.export``, ``torch.compile``,
        ONNX export, tracing): the choice between the converted variance and the running scale
        is a ``torch.where`` on the same condition, and the scale enters as ``scale² − eps``
        (BatchNorm's view of it, equal to within an ulp)."""
        scale = self.running_scale.to(acc)  # type: ignore[union-attr]
        from_scale = scale.square() - self.eps
        pair = self._exact_pair()
        if pair is not None:
            var, ref = pair
            valid = (ref == self.running_scale).all() & torch.isfinite(var).all()
            from_scale = torch.where(valid, var.to(acc), from_scale)
        return torch.nn.functional.batch_norm(x, rm, from_scale, w, b, False, 0.0, self.eps)
