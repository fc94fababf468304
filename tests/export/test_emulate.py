"""The fp16 emulation's fast kernels agree with the ONNX reference semantics."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from normswap.export.emulate import Fp16Emulator

RNG = np.random.default_rng(0)


def _model(op: str, shapes: list[tuple[int, ...]], attrs: dict[str, Any], dtype: int,
           consts: dict[str, np.ndarray] | None = None) -> Any:
    names = [f"i{k}" for k in range(len(shapes))]
    inputs = [helper.make_tensor_value_info(n, dtype, list(s)) for n, s in zip(names, shapes)]
    inits = [numpy_helper.from_array(v, k) for k, v in (consts or {}).items()]
    node = helper.make_node(op, names + list(consts or {}), ["y"], name="n", **attrs)
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("y", dtype, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


CASES = [
    ("Conv", [(2, 4, 9, 9), (6, 4, 3, 3), (6,)], {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ("Conv", [(1, 4, 8, 8), (4, 1, 3, 3)], {"group": 4, "strides": [2, 2],
                                            "auto_pad": "SAME_UPPER"}),
    ("Conv", [(2, 3, 10), (5, 3, 4)], {"pads": [1, 1]}),
    ("ConvTranspose", [(1, 4, 5, 5), (4, 3, 3, 3)], {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                     "output_padding": [1, 1]}),
    ("ConvTranspose", [(1, 4, 5, 5), (4, 2, 2, 2)], {"pads": [0, 1, 1, 0]}),  # fallback path
    ("Gemm", [(3, 5), (4, 5), (4,)], {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    ("MatMul", [(2, 3, 4, 5), (5, 6)], {}),
    ("MaxPool", [(2, 3, 9, 9)], {"kernel_shape": [3, 3], "strides": [2, 2],
                                 "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    ("MaxPool", [(1, 2, 7, 7)], {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1]}),
    ("AveragePool", [(2, 3, 8, 8)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                     "count_include_pad": 0}),
    ("AveragePool", [(2, 3, 8, 8)], {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("GlobalAveragePool", [(2, 5, 6, 6)], {}),
    ("Softmax", [(3, 7)], {"axis": 1}),
    ("LogSoftmax", [(3, 7)], {"axis": -1}),
]


@pytest.mark.parametrize("op,shapes,attrs", CASES, ids=[f"{c[0]}-{i}" for i, c in
                                                        enumerate(CASES)])
def test_fast_kernel_matches_reference_on_fp16_operands(op: str, shapes: list[tuple[int, ...]],
                                                        attrs: dict[str, Any]) -> None:
    feeds16 = {f"i{k}": RNG.standard_normal(s).astype(np.float16) for k, s in enumerate(shapes)}
    got = Fp16Emulator(_model(op, shapes, attrs, TensorProto.FLOAT16)).run(feeds16)[0]
    assert got.dtype == np.float16
    # ONNX Runtime in fp32 on the same (fp16) operands, rounded once to fp16 (the onnx
    # reference itself gets asymmetric MaxPool pads wrong: (1, 2, 6, 8) for the 7x7 case)
    sess = ort.InferenceSession(_model(op, shapes, attrs, TensorProto.FLOAT).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    ref = sess.run(None, {k: v.astype(np.float32) for k, v in feeds16.items()})[0].astype(
        np.float16)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=2e-3,
                               atol=2e-3)


def test_layer_norm_computes_in_fp32_where_fp16_squares_overflow() -> None:
    x = (RNG.standard_normal((2, 3, 16)) * 400).astype(np.float16)  # (x − μ)² > 65504
    scale = np.ones(16, np.float16)
    model = _model("LayerNormalization", [(2, 3, 16)], {"axis": -1}, TensorProto.FLOAT16,
                   {"scale": scale})
    got = Fp16Emulator(model).run({"i0": x})[0].astype(np.float64)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=5e-3)
    plain = ReferenceEvaluator(model).run(None, {"i0": x})[0]
    assert not np.isfinite(plain.astype(np.float64)).all() or np.abs(plain - ref).max() > 0.1


def test_fp32_node_stays_fp32_and_fp16_sums_round() -> None:
    x = np.full((1, 1, 1, 4), 1000.3, np.float32)
    w = np.ones((1, 1, 1, 1), np.float32)
    out32 = Fp16Emulator(_model("Conv", [x.shape, w.shape], {}, TensorProto.FLOAT)).run(
        {"i0": x, "i1": w})[0]
    assert out32.dtype == np.float32 and out32[0, 0, 0, 0] == np.float32(1000.3)
    out16 = Fp16Emulator(_model("Conv", [x.shape, w.shape], {}, TensorProto.FLOAT16)).run(
        {"i0": x, "i1": w})[0]
    assert out16.dtype == np.float16 and float(out16[0, 0, 0, 0]) == 1000.5  # fp16 spacing 0.5


def test_run_many_respects_the_budget() -> None:
    model = _model("Relu", [(2, 2)], {}, TensorProto.FLOAT16)
    feeds = [{"i0": np.ones((2, 2), np.float16)}] * 5
    emulator = Fp16Emulator(model)
    capped = emulator.run_many(feeds, max_inputs=3)
    assert (capped.evaluated, capped.requested, capped.stopped_by) == (3, 5, "max_inputs")
    timed = emulator.run_many(feeds, time_budget_s=0.0)
    assert timed.evaluated == 1 and timed.stopped_by == "time_budget"


# -- the detection ops: vectorised kernels against the reference loops ----------------------
def _graph(op: str, inputs: list[tuple[str, int, list[int]]], out_type: int,
           attrs: dict[str, Any]) -> Any:
    node = helper.make_node(op, [n for n, _, _ in inputs], ["y"], name="n", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, s)
                                            for n, t, s in inputs],
                              [helper.make_tensor_value_info("y", out_type, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("transform,ratio", [("half_pixel", 0), ("output_half_pixel", 2)])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_roi_align_matches_the_reference(transform: str, ratio: int, dtype: int) -> None:
    pytest.importorskip("torchvision")
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    x = RNG.standard_normal((2, 3, 12, 10)).astype(np_dtype)
    corners = RNG.uniform(0, 18, (5, 2, 2)).astype(np.float32)
    rois = np.concatenate([corners.min(1), corners.max(1)], 1).astype(np_dtype)
    batch = np.array([0, 1, 1, 0, 1], dtype=np.int64)
    model = _graph("RoiAlign", [("x", dtype, list(x.shape)), ("rois", dtype, [5, 4]),
                                ("b", TensorProto.INT64, [5])], dtype,
                   {"output_height": 3, "output_width": 4, "sampling_ratio": ratio,
                    "spatial_scale": 0.5, "coordinate_transformation_mode": transform})
    feed = {"x": x, "rois": rois, "b": batch}
    got = Fp16Emulator(model).run(feed)[0]
    wide = {"x": x.astype(np.float32), "rois": rois.astype(np.float32), "b": batch}
    ref = ReferenceEvaluator(_graph("RoiAlign", [("x", 1, list(x.shape)), ("rois", 1, [5, 4]),
                                                 ("b", 7, [5])], 1, {
        "output_height": 3, "output_width": 4, "sampling_ratio": ratio, "spatial_scale": 0.5,
        "coordinate_transformation_mode": transform})).run(None, wide)[0]
    assert got.dtype == np_dtype and got.shape == ref.shape == (5, 3, 3, 4)
    tol = 2e-3 if np_dtype == np.float16 else 1e-5
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("center", [0, 1])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_non_max_suppression_selects_as_the_reference(center: int,
                                                      threshold: float | None) -> None:
    pytest.importorskip("torchvision")
    from normswap.export.emulate import NonMaxSuppression

    xy = RNG.uniform(0, 10, (2, 40, 2))
    wh = RNG.uniform(1, 4, (2, 40, 2))
    boxes = (np.concatenate([xy, wh], -1) if center else
             np.concatenate([xy, xy + wh], -1)[..., [1, 0, 3, 2]]).astype(np.float32)
    if not center:
        boxes[0, ::3] = boxes[0, ::3][..., [2, 3, 0, 1]]  # corners given in the other order
    scores = RNG.uniform(0, 1, (2, 3, 40)).astype(np.float32)
    feed = {"a": boxes, "b": scores, "c": np.array([7], dtype=np.int64),
            "d": np.array([0.4], dtype=np.float32)}
    types = [("a", 1, list(boxes.shape)), ("b", 1, list(scores.shape)), ("c", 7, [1]),
             ("d", 1, [1])]
    if threshold is not None:
        feed["e"] = np.array([threshold], dtype=np.float32)
        types.append(("e", 1, [1]))
    model = _graph("NonMaxSuppression", types, TensorProto.INT64,
                   {"center_point_box": center})
    got = ReferenceEvaluator(model, new_ops=[NonMaxSuppression]).run(None, feed)[0]
    ref = ReferenceEvaluator(model).run(None, feed)[0]
    assert got.dtype == np.int64 and len(got) > 12
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("reduction", [None, "add", "mul", "max", "min"])
def test_scatter_elements_matches_the_reference(reduction: str | None) -> None:
    from onnx.reference.ops.op_scatter_elements import scatter_elements

    from normswap.export.emulate import ScatterElements

    data = RNG.standard_normal((4, 5, 3)).astype(np.float32)
    # distinct targets along the axis for the plain scatter (duplicates are undefined there)
    indices = np.stack([RNG.permutation(5)[:4] for _ in range(4 * 3)]).reshape(4, 3, 4)
    indices = indices.transpose(0, 2, 1) - 5 * (RNG.uniform(size=(4, 4, 3)) < 0.3)
    if reduction is not None:
        indices = RNG.integers(-5, 5, (4, 4, 3))
    updates = RNG.standard_normal(indices.shape).astype(np.float32)
    attrs: dict[str, Any] = {"axis": 1}
    if reduction is not None:
        attrs["reduction"] = reduction
    model = _graph("ScatterElements", [("a", 1, [4, 5, 3]), ("b", 7, [4, 4, 3]),
                                       ("c", 1, [4, 4, 3])], TensorProto.FLOAT, attrs)
    feed = {"a": data, "b": indices.astype(np.int64), "c": updates}
    got = ReferenceEvaluator(model, new_ops=[ScatterElements]).run(None, feed)[0]
    ref = scatter_elements(data, indices, updates, axis=1, reduction=reduction)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect"])
def test_pad_with_negative_pads_crops_like_onnx_runtime(mode: str) -> None:
    x = RNG.standard_normal((1, 2, 6, 7)).astype(np.float32)
    pads = np.array([0, 0, 2, -1, 0, 0, -2, 1], dtype=np.int64)
    model = _graph("Pad", [("x", 1, [1, 2, 6, 7]), ("p", 7, [8])], TensorProto.FLOAT,
                   {"mode": mode})
    got = Fp16Emulator(model).run({"x": x, "p": pads})[0]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x, "p": pads})[0]
    assert got.shape == ref.shape == (1, 2, 6, 7)
    np.testing.assert_array_equal(got, ref)
