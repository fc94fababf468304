"""Export keeps one copy of the weights: the model's parameters are shared with the copy it
runs, the size check does not serialise the model, and a staged (external-data) proto is
dropped for its weightless graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from normswap._modules import safe_deepcopy
from normswap.export import export_onnx
from normswap.export._external import estimated_size
from normswap.export.onnx_export import _Staging, export_fp32_proto

from tests.conftest import assert_same_state, randomize_bn, state_snapshot

SEEN: list[int] = []


class _Recorder(nn.Module):
    """A linear layer that records which weight tensor object each call sees."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append(id(self.lin.weight))
        self.calls = getattr(self, "calls", 0) + 1  # an attribute the forward sets
        return self.lin(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), _Recorder()))


def test_safe_deepcopy_can_share_parameters_only() -> None:
    model = _model()
    shared = safe_deepcopy(model, share_parameters=True)
    for (name, p), q in zip(model.named_parameters(), shared.parameters()):
        assert p is q, name
    for (name, b), c in zip(model.named_buffers(), shared.buffers()):
        assert b is not c and torch.equal(b, c), name  # buffers are still copied
    assert shared[0] is not model[0]
    full = safe_deepcopy(model)
    assert all(p is not q for p, q in zip(model.parameters(), full.parameters()))


def test_export_runs_the_models_own_weights_and_leaves_it_untouched(tmp_path: Path) -> None:
    model = _model().train()
    before = state_snapshot(model)
    flags = {n: m.training for n, m in model.named_modules()}
    SEEN.clear()
    report = export_onnx(model, torch.randn(2, 3, 12, 12), tmp_path / "m.onnx", fp16=True)
    assert report.passed is True
    assert id(model[5].lin.weight) in SEEN  # the eager runs used the model's own parameter
    assert_same_state(before, state_snapshot(model))
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert not hasattr(model[5], "calls")  # the attribute went to the copy


def test_estimated_size_is_the_serialised_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(10)).eval()
    x = torch.randn(1, 3, 16, 16)
    model(x)
    proto, _ = export_fp32_proto(model, (x,))
    exact = proto.ByteSize()
    assert abs(estimated_size(proto) - exact) <= 0.002 * exact


def test_staging_drops_the_saved_proto_for_its_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    proto, _ = export_fp32_proto(model, (torch.randn(1, 64),))
    size = estimated_size(proto)
    staging = _Staging(tmp_path / "m.onnx", tmp_path)
    light = staging.keep_fp32(proto, final=False)
    assert light is not proto
    assert all(len(t.raw_data) < 1024 for t in light.graph.initializer)  # weights on disk
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in light.graph.initializer)
    assert abs(estimated_size(light) - size) <= 0.01 * size  # shapes kept: same estimate
    loaded, in_place, base_dir = staging.fp32_for_conversion(light)
    # the conversion gets the graph alone: each weight is read from disk as it is converted
    assert in_place and base_dir == str(tmp_path)
    assert sum(len(t.raw_data) for t in loaded.graph.initializer) < 60_000
    source = staging.stage(loaded)
    released = staging.release(loaded)
    assert source == str(tmp_path / "m.onnx") and released is not loaded
    assert staging.release(released) is released  # released once
    assert staging.stage(released) == source  # already saved: not saved again
    assert [n.op_type for n in released.graph.node] == [n.op_type for n in light.graph.node]


def test_streamed_fp16_conversion_equals_the_in_memory_one(tmp_path: Path) -> None:
    from normswap.export.fp16 import convert_fp16

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    with torch.no_grad():
        model[0].weight[0, :2] = torch.tensor([1e-9, -1e-9])  # fp16 node: clamped to +-6e-8
        model[2].weight[0, 0] = 2e5  # past fp16's range: the node and its weights stay fp32
    proto, _ = export_fp32_proto(model, (torch.randn(1, 64),))
    in_memory = onnx.ModelProto()
    in_memory.CopyFrom(proto)
    want, want_plan = convert_fp16(in_memory, [], ranges={}, copy=False)
    staging = _Staging(tmp_path / "m.onnx", tmp_path)
    light = staging.keep_fp32(proto, final=False)
    graph, _, base_dir = staging.fp32_for_conversion(light)
    got, got_plan = convert_fp16(graph, [], ranges={}, copy=False, base_dir=base_dir)
    assert got_plan.clamped_initializers == want_plan.clamped_initializers != {}
    assert got_plan.fp32_nodes == want_plan.fp32_nodes and len(got_plan.fp32_nodes) == 1
    by_name = {t.name: t for t in want.graph.initializer}
    assert len(got.graph.initializer) == len(by_name)
    for t in got.graph.initializer:
        assert t.data_location == onnx.TensorProto.DEFAULT, t.name
        np.testing.assert_array_equal(numpy_helper.to_array(t),
                                      numpy_helper.to_array(by_name[t.name]))
        assert t.data_type == by_name[t.name].data_type
