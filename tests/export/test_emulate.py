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
