"""Evaluate an fp16 ONNX graph in real fp16 arithmetic on the CPU (no GPU needed).

Why: ONNX Runtime's CPU provider has no fp16 kernel for most ops (Conv, Gemm, MatMul, pooling,
...). Its mandatory cast-insertion step runs those in fp32 and then removes the
fp32→fp16→fp32 cast pairs around them, at every optimisation level, so an "fp16" graph run there
is mostly an fp32 graph: it hides fp16 overflow and rounding (see docs/fp16_validation.md).

How: :class:`Fp16Emulator` runs the graph with ``onnx.reference.ReferenceEvaluator``, which
computes every op in the dtype of its inputs (numpy ``float16``: each elementwise result is
rounded to fp16; numpy accumulates fp16 sums in fp32 and rounds the result). The heavy ops are
replaced by faster kernels that follow what GPU fp16 kernels do:

* Conv, ConvTranspose, Gemm, MatMul: the fp16 operands are widened to fp32 (exactly), the
  products accumulated in fp32 with torch, and the result rounded to fp16, as tensor cores do;
* MaxPool, AveragePool, GlobalAveragePool: torch in fp32, result rounded to fp16 (max pooling is
  exact in any precision);
* Softmax, LogSoftmax, LayerNormalization: computed in fp32 and rounded to fp16 (cuDNN/ORT CUDA
  kernels and LayerNormalization's ``stash_type=1`` use fp32 internally);
* RoiAlign, NonMaxSuppression (with torchvision installed) and ScatterElements: vectorised
  versions of the reference kernels, which loop in Python (minutes per detection model);
  RoiAlign in fp32, rounded to fp16;
* Pad: negative pads (cropping) too, which the reference kernel refuses.

A node the fp16 plan kept in fp32 gets fp32 inputs and computes in fp32, as in the real graph.
An attribute combination a fast kernel does not cover falls back to the reference
implementation, run in fp32 on the fp16-rounded operands and rounded back (same semantics,
slower).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import ModelProto
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import _op_list

__all__ = ["Fp16Emulator", "EmulationRun", "EMULATED_OPS"]

log = logging.getLogger(__name__)


def _t(x: np.ndarray) -> torch.Tensor:
    """A float32 torch tensor of ``x`` (fp16 values widen exactly)."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _back(y: torch.Tensor, like: np.ndarray) -> np.ndarray:
    """The result rounded to the dtype of the op's input (fp16 stays fp16, fp32 stays fp32)."""
    return y.numpy().astype(like.dtype, copy=False)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "NOTSET")


def _same_pads(in_shape: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int], mode: str) -> list[int]:
    """Explicit ONNX pads (begins then ends) for ``auto_pad=SAME_UPPER/SAME_LOWER/VALID``."""
    n = len(kernel)
    if mode == "VALID":
        return [0] * (2 * n)
    begins, ends = [], []
    for size, k, s, d in zip(in_shape, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return begins + ends


def _pad_explicit(x: torch.Tensor, pads: Sequence[int], value: float = 0.0, *,
                  force: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Apply asymmetric (or, with ``force``, all) pads with ``F.pad``; return the tensor and the
    symmetric pads left for the kernel."""
    n = len(pads) // 2
    begins, ends = list(pads[:n]), list(pads[n:])
    if begins == ends and not force:
        return x, begins
    spec: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        spec += [b, e]
    return F.pad(x, spec, value=value), [0] * n


def _fp32_fallback(base: type, self: Any, *args: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
    """The reference implementation in fp32 on the given operands, rounded to their dtype."""
    dtype = next(a.dtype for a in args if isinstance(a, np.ndarray))
    wide = [a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == np.float16 else a
            for a in args]
    out = base._run(self, *wide, **kwargs)
    return tuple(o.astype(dtype) if isinstance(o, np.ndarray) and o.dtype == np.float32 else o
                 for o in out)


class Conv(_op_list.Conv):
    """Conv: fp16 operands, fp32 accumulation (torch), result rounded to fp16."""

    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None,  # noqa: ANN001
             kernel_shape=None, pads=None, strides=None):  # noqa: ANN001,ANN202
        n = X.ndim - 2
        if n not in (1, 2, 3):
            return _fp32_fallback(_op_list.Conv, self, X, W, B, auto_pad=auto_pad,
                                  dilations=dilations, group=group, kernel_shape=kernel_shape,
                                  pads=pads, strides=strides)
        strides = list(strides or [1] * n)
        dilations = list(dilations or [1] * n)
        mode = _s(auto_pad)
        pads = list(pads or [0] * (2 * n)) if mode == "NOTSET" else _same_pads(
            X.shape[2:], W.shape[2:], strides, dilations, mode)
        x, sym = _pad_explicit(_t(X), pads)
        fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
        y = fn(x, _t(W), None if B is None else _t(B), stride=strides, padding=sym,
               dilation=dilations, groups=int(group or 1))
        return (_back(y, X),)


class ConvTranspose(_op_list.ConvTranspose):
    """ConvTranspose: fp16 operands, fp32 accumulation (torch), result rounded to fp16."""

    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None,  # noqa: ANN001
             kernel_shape=None, output_padding=None, output_shape=None, pads=None,
             strides=None):  # noqa: ANN001,ANN202
        n = X.ndim - 2
        npads = list(pads or [0] * (2 * n))
        if (n not in (1, 2, 3) or output_shape is not None or _s(auto_pad) != "NOTSET"
                or npads[:n] != npads[n:]):
            return _fp32_fallback(_op_list.ConvTranspose, self, X, W, B, auto_pad=auto_pad,
                                  dilations=dilations, group=group, kernel_shape=kernel_shape,
                                  output_padding=output_padding, output_shape=output_shape,
                                  pads=pads, strides=strides)
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
        y = fn(_t(X), _t(W), None if B is None else _t(B), stride=list(strides or [1] * n),
               padding=npads[:n], output_padding=list(output_padding or [0] * n),
               groups=int(group or 1), dilation=list(dilations or [1] * n))
        return (_back(y, X),)


class Gemm(_op_list.Gemm_7):
    """Gemm: ``alpha·A'B' + beta·C`` accumulated in fp32, rounded once to fp16."""

    op_domain = ""

    def _run(self, A, B, C=None, alpha=None, beta=None, transA=None, transB=None  # noqa: ANN001
             ):  # noqa: ANN202
        a, b = _t(A), _t(B)
        if transA:
            a = a.T
        if transB:
            b = b.T
        y = a @ b
        if alpha not in (None, 1.0):
            y = y * float(alpha)
        if C is not None:
            y = y + _t(C) * float(1.0 if beta is None else beta)
        return (_back(y, A),)


class MatMul(_op_list.MatMul):
    """MatMul: fp16 operands, fp32 accumulation (torch), result rounded to fp16."""

    op_domain = ""

    def _run(self, a, b):  # noqa: ANN001,ANN202
        return (_back(torch.matmul(_t(a), _t(b)), a),)


class MaxPool(_op_list.MaxPool):
    """MaxPool with torch (exact in any precision)."""

    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None,  # noqa: ANN001
             kernel_shape=None, pads=None, storage_order=None, strides=None):  # noqa: ANN001,ANN202
        n = x.ndim - 2
        if n not in (1, 2, 3) or len(self.output) > 1 or storage_order:
            return _fp32_fallback(_op_list.MaxPool, self, x, auto_pad=auto_pad,
                                  ceil_mode=ceil_mode, dilations=dilations,
                                  kernel_shape=kernel_shape, pads=pads,
                                  storage_order=storage_order, strides=strides)
        kernel = list(kernel_shape)
        strides = list(strides or [1] * n)
        dilations = list(dilations or [1] * n)
        mode = _s(auto_pad)
        pads = list(pads or [0] * (2 * n)) if mode == "NOTSET" else _same_pads(
            x.shape[2:], kernel, strides, dilations, mode)
        # torch allows symmetric pads up to half the kernel: pad anything else explicitly
        force = any(2 * p > k for p, k in zip(list(pads[:n]) + list(pads[n:]), kernel * 2))
        t, sym = _pad_explicit(_t(x), pads, value=float("-inf"), force=force)
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
        y = fn(t, kernel, strides, sym, dilations, ceil_mode=bool(ceil_mode))
        return (_back(y, x),)


class AveragePool(_op_list.AveragePool_19):
    """AveragePool with torch in fp32, rounded to fp16."""

    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=None, count_include_pad=None,  # noqa: ANN001
             dilations=None, kernel_shape=None, pads=None, strides=None):  # noqa: ANN001,ANN202
        n = x.ndim - 2
        kernel = list(kernel_shape)
        npads = list(pads or [0] * (2 * n))
        if (n not in (1, 2, 3) or _s(auto_pad) != "NOTSET" or npads[:n] != npads[n:]
                or any(2 * p > k for p, k in zip(npads[:n], kernel))
                or (dilations is not None and any(d != 1 for d in dilations))):
            return _fp32_fallback(_op_list.AveragePool_19, self, x, auto_pad=auto_pad,
                                  ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                                  dilations=dilations, kernel_shape=kernel_shape, pads=pads,
                                  strides=strides)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        y = fn(_t(x), kernel, list(strides or [1] * n), npads[:n], ceil_mode=bool(ceil_mode),
               count_include_pad=bool(count_include_pad))
        return (_back(y, x),)


class GlobalAveragePool(_op_list.GlobalAveragePool):
    """Mean over the spatial axes in fp32, rounded to fp16."""

    op_domain = ""

    def _run(self, x):  # noqa: ANN001,ANN202
        dims = tuple(range(2, x.ndim))
        return (_back(_t(x).mean(dim=dims, keepdim=True), x),)


class Softmax(_op_list.Softmax):
    """Softmax in fp32, rounded to fp16."""

    op_domain = ""

    def _run(self, X, axis=None):  # noqa: ANN001,ANN202
        return (_back(torch.softmax(_t(X), dim=-1 if axis is None else int(axis)), X),)


class LogSoftmax(_op_list.LogSoftmax):
    """LogSoftmax in fp32, rounded to fp16."""

    op_domain = ""

    def _run(self, X, axis=None):  # noqa: ANN001,ANN202
        return (_back(torch.log_softmax(_t(X), dim=-1 if axis is None else int(axis)), X),)


class LayerNormalization(_op_list.LayerNormalization):
    """LayerNormalization computed in fp32 (``stash_type=1``), Y rounded to fp16."""

    op_domain = ""

    def _run(self, X, Scale, B=None, axis=None, epsilon=None, stash_type=None  # noqa: ANN001
             ):  # noqa: ANN202
        x = _t(X)
        ax = int(-1 if axis is None else axis) % X.ndim
        dims = tuple(range(ax, X.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        inv = torch.rsqrt(var + float(1e-5 if epsilon is None else epsilon))
        y = (x - mean) * inv * _t(Scale)
        if B is not None:
            y = y + _t(B)
        return (_back(y, X), mean.numpy(), inv.numpy())


def _torchvision_ops() -> Any:
    try:
        import torchvision.ops
    except Exception:  # noqa: BLE001 - not installed or broken: the reference kernel runs
        return None
    return torchvision.ops


class RoiAlign(_op_list.RoiAlign):
    """RoiAlign (average mode) by ``torchvision.ops.roi_align`` in fp32, rounded to the input
    dtype (the reference kernel is a Python loop: minutes per detection model)."""

    op_domain = ""

    def _run(self, X, rois, batch_indices, coordinate_transformation_mode=None,  # noqa: ANN001
             mode=None, output_height=None, output_width=None, sampling_ratio=None,  # noqa: ANN001
             spatial_scale=None):  # noqa: ANN001,ANN202
        ops = _torchvision_ops()
        transform = _s(coordinate_transformation_mode or self.coordinate_transformation_mode)
        kind = _s(mode or self.mode).lower()
        if ops is None or kind != "avg" or X.ndim != 4:
            return _fp32_fallback(_op_list.RoiAlign, self, X, rois, batch_indices,
                                  coordinate_transformation_mode=coordinate_transformation_mode,
                                  mode=mode, output_height=output_height,
                                  output_width=output_width, sampling_ratio=sampling_ratio,
                                  spatial_scale=spatial_scale)
        size = (int(output_height or self.output_height), int(output_width or self.output_width))
        boxes = torch.cat([torch.from_numpy(np.asarray(batch_indices)).float().reshape(-1, 1),
                           _t(rois)], 1)
        y = ops.roi_align(_t(X), boxes, size,
                          spatial_scale=float(spatial_scale or self.spatial_scale),
                          sampling_ratio=int(sampling_ratio or self.sampling_ratio),
                          aligned=transform.lower() == "half_pixel")
        return (_back(y, X),)


class NonMaxSuppression(_op_list.NonMaxSuppression):
    """NonMaxSuppression by ``torchvision.ops.nms`` per batch and class (fp32 IoU); the same
    selection and order as the reference kernel, which loops in Python."""

    op_domain = ""

    def _run(self, boxes, scores, max_output_boxes_per_class=None,  # noqa: ANN001
             iou_threshold=None, score_threshold=None, center_point_box=None):  # noqa: ANN001,ANN202
        ops = _torchvision_ops()
        if ops is None or max_output_boxes_per_class is None or \
                np.asarray(max_output_boxes_per_class).size == 0:
            return super()._run(boxes, scores, max_output_boxes_per_class, iou_threshold,
                                score_threshold, center_point_box=center_point_box)
        limit = max(int(np.asarray(max_output_boxes_per_class).reshape(-1)[0]), 0)
        iou = (float(np.asarray(iou_threshold).reshape(-1)[0])
               if iou_threshold is not None and np.asarray(iou_threshold).size else 0.0)
        floor = (float(np.asarray(score_threshold).reshape(-1)[0])
                 if score_threshold is not None and np.asarray(score_threshold).size else None)
        b = _t(boxes)
        if int(center_point_box if center_point_box is not None
               else self.center_point_box or 0) == 1:  # (xc, yc, w, h) -> corners
            b = torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)
        else:  # corners in either order, (y1, x1, y2, x2): IoU is symmetric in x and y
            b = torch.cat([torch.minimum(b[..., :2], b[..., 2:]),
                           torch.maximum(b[..., :2], b[..., 2:])], -1)
        sc = _t(scores)
        rows: list[torch.Tensor] = []
        for n in range(sc.shape[0]):
            for c in range(sc.shape[1]):
                cand = torch.arange(sc.shape[2])
                if floor is not None:
                    cand = cand[sc[n, c] > floor]
                keep = cand[ops.nms(b[n, cand], sc[n, c, cand], iou)][:limit]
                rows.append(torch.stack([torch.full_like(keep, n), torch.full_like(keep, c),
                                         keep], 1))
        out = torch.cat(rows) if rows else torch.empty((0, 3), dtype=torch.int64)
        return (out.numpy().astype(np.int64),)


class ScatterElements(_op_list.ScatterElements):
    """ScatterElements with numpy fancy indexing (the reference loops over every index)."""

    op_domain = ""

    def _run(self, data, indices, updates, axis=None, reduction=None):  # noqa: ANN001,ANN202
        ax = int(axis or 0) % data.ndim
        how = _s(reduction).lower() if reduction is not None else "none"
        at = {"add": np.add, "mul": np.multiply, "min": np.minimum, "max": np.maximum}
        if how not in ("none", "notset", *at):
            return super()._run(data, indices, updates, axis=axis, reduction=reduction)
        idx = list(np.indices(indices.shape, sparse=True))
        idx[ax] = np.where(indices < 0, indices + data.shape[ax], indices)
        where = tuple(np.broadcast_to(i, indices.shape) for i in idx)
        out = np.array(data, copy=True)
        if how in at:
            at[how].at(out, where, updates)
        else:
            out[where] = updates
        return (out,)


class Pad(_op_list.Pad_18):
    """Pad that also crops: ONNX allows negative pads (timm's ``Conv2dSame``/``MaxPool2dSame``
    export them), numpy's ``pad`` refuses them; pad by the positive part, then slice."""

    op_domain = ""

    def _run(self, data, pads, constant_value=None, axes=None, mode=None):  # noqa: ANN001,ANN202
        p = np.asarray(pads, dtype=np.int64).reshape(-1)
        if (p >= 0).all():
            return super()._run(data, pads, constant_value=constant_value, axes=axes,
                                mode=mode)
        (out,) = super()._run(data, np.maximum(p, 0), constant_value=constant_value,
                              axes=axes, mode=mode)
        dims = (list(range(data.ndim)) if axes is None else
                [int(a) % data.ndim for a in np.asarray(axes).reshape(-1)])
        index = [slice(None)] * data.ndim
        for i, d in enumerate(dims):
            start, stop = max(-int(p[i]), 0), max(-int(p[len(dims) + i]), 0)
            index[d] = slice(start, out.shape[d] - stop)
        return (out[tuple(index)],)


_OVERRIDES: tuple[type, ...] = (Conv, ConvTranspose, Gemm, MatMul, MaxPool, AveragePool,
                                GlobalAveragePool, Softmax, LogSoftmax, LayerNormalization,
                                RoiAlign, NonMaxSuppression, ScatterElements, Pad)

#: Op types replaced by the faster fp32-accumulating kernels above.
EMULATED_OPS: tuple[str, ...] = tuple(c.__name__ for c in _OVERRIDES)


@dataclass
class EmulationRun:
    """What one emulated evaluation covered.

    Attributes:
        outputs: per evaluated input, the graph outputs (fp32 arrays).
        evaluated: how many inputs were evaluated.
        requested: how many inputs were offered.
        seconds: wall time of the evaluations.
        stopped_by: ``""``, ``"max_inputs"`` or ``"time_budget"``.
    """

    outputs: list[list[np.ndarray]]
    evaluated: int
    requested: int
    seconds: float
    stopped_by: str = ""


class Fp16Emulator:
    """Run an (fp16) ONNX model in emulated fp16 arithmetic on the CPU.

    Args:
        model: the model proto, its serialised bytes, or a path (external data is loaded from
            beside the path).
    """

    def __init__(self, model: ModelProto | bytes | str) -> None:
        if isinstance(model, bytes):
            model = onnx.load_from_string(model)
        elif not isinstance(model, ModelProto):
            model = onnx.load(str(model))
        self.session = ReferenceEvaluator(model, new_ops=list(_OVERRIDES))
        self.input_names: list[str] = list(self.session.input_names)
        self.output_names: list[str] = list(self.session.output_names)
        self._input_types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}

    def _feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, value in feed.items():
            arr = np.asarray(value)
            if self._input_types.get(name) == onnx.TensorProto.FLOAT16:
                arr = arr.astype(np.float16)
            out[name] = arr
        return out

    def run(self, feed: Mapping[str, np.ndarray], *, intermediate: bool = False
            ) -> list[np.ndarray] | dict[str, np.ndarray]:
        """Evaluate one input dict.

        Args:
            feed: graph input name -> array.
            intermediate: return every computed tensor by name instead of the graph outputs.

        Returns:
            The graph outputs (in order), or all tensors by name when ``intermediate``.
        """
        with np.errstate(all="ignore"), torch.no_grad():
            if intermediate:
                return dict(self.session.run(None, self._feed(feed), intermediate=True))
            return list(self.session.run(None, self._feed(feed)))

    def run_many(self, feeds: Sequence[Mapping[str, np.ndarray]], *, max_inputs: int | None = None,
                 time_budget_s: float | None = None) -> EmulationRun:
        """Evaluate inputs in order until ``max_inputs`` or ``time_budget_s`` is reached.

        At least one input is always evaluated (when there is one).

        Returns:
            The outputs and what was covered.
        """
        from ..progress import iterate

        limit = len(feeds) if max_inputs is None else min(len(feeds), max(1, max_inputs))
        outputs: list[list[np.ndarray]] = []
        stopped = "max_inputs" if limit < len(feeds) else ""
        t0 = time.perf_counter()
        for feed in iterate(list(feeds[:limit]), "fp16 emulation"):
            if outputs and time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                stopped = "time_budget"
                break
            result = self.run(feed)
            outputs.append([np.asarray(o) for o in result])  # type: ignore[union-attr]
        return EmulationRun(outputs, len(outputs), len(feeds), time.perf_counter() - t0, stopped)
