"""Range-guarded fp16 conversion: measured-range plan, round-trip cast removal, order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto
from torch import Tensor, nn

from normswap.export import export_onnx
from normswap.export.fp16 import convert_fp16, remove_round_trip_casts, topological_sort
from normswap.export.onnx_export import export_fp32_proto


class HotConvLayerNorm(nn.Module):
    """A conv whose activations exceed fp16 range, normalised back by a channels-last LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        with torch.no_grad():
            self.conv.weight.mul_(3e4)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 8, 3), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(y)


def _run(proto: onnx.ModelProto, x: Tensor) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_overflowing_activation_is_kept_fp32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = HotConvLayerNorm().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert float(model.conv(x).abs().max()) > 65504
    proto, _ = export_fp32_proto(model, (x,))
    naive, _ = convert_fp16(proto, [], guard=False)
    assert (~np.isfinite(_run(naive, x))).sum() > 0  # a plain fp16 conversion gives inf/NaN

    report = export_onnx(model, x, tmp_path / "hot.onnx")
    assert report.passed is True
    conv_nodes = [s for s in report.skips if s.op == "Conv"]
    assert conv_nodes and "reaches |x|" in conv_nodes[0].reason
    assert any(s.op == "LayerNormalization" for s in report.skips)
    assert set(report.fp32_nodes) == {s.node for s in report.skips}
    assert report.validation is not None
    assert all(m.nonfinite == 0 for m in report.validation.metrics)
    # the fp32 value between two fp32 nodes never round-trips through fp16
    saved = onnx.load(str(tmp_path / "hot.onnx"))
    producer = {o: n for n in saved.graph.node for o in n.output}
    for n in saved.graph.node:
        if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT:
            src = producer.get(n.input[0])
            assert not (src is not None and src.op_type == "Cast"
                        and src.attribute[0].i == TensorProto.FLOAT16)
    assert (~np.isfinite(_run(saved, torch.randn(4, 3, 16, 16)))).sum() == 0


def test_remove_round_trip_casts_unit() -> None:
    h = onnx.helper
    nodes = [h.make_node("Relu", ["x"], ["a"], name="fp32_relu"),
             h.make_node("Cast", ["a"], ["a16"], to=TensorProto.FLOAT16, name="c16"),
             h.make_node("Cast", ["a16"], ["a32"], to=TensorProto.FLOAT, name="c32"),
             h.make_node("Relu", ["a32"], ["y"], name="fp32_relu2")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = h.make_model(graph)
    assert remove_round_trip_casts(model, {"fp32_relu", "fp32_relu2"}) == 1
    assert [n.op_type for n in model.graph.node] == ["Relu", "Identity", "Relu"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([1e5, -1.0], dtype=np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], np.array([1e5, 0], np.float32))


def test_topological_sort_puts_producers_first() -> None:
    h = onnx.helper
    nodes = [h.make_node("Relu", ["a"], ["y"], name="second"),
             h.make_node("Neg", ["x"], ["a"], name="first")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = h.make_model(graph)
    topological_sort(model)
    assert [n.name for n in model.graph.node] == ["first", "second"]
    onnx.checker.check_model(model)
