"""Models past protobuf's 2 GB limit: the external-data path, exercised with a low threshold."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from normswap.errors import ExportError
from normswap.export import export_onnx

sys.path.insert(0, str(Path(__file__).parent))
from test_auto import _model_and_input


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10)).eval()


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("fp16", [True, False])
def test_external_data_end_to_end(fp16: bool, tmp_path: Path) -> None:
    model, x = _mlp(), torch.randn(4, 32)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, x, path, fp16=fp16, external_data_threshold=10_000)
    assert report.passed is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert report.external_data_path == str(tmp_path / "model.onnx.data")
    assert any("external_data_threshold" in n.message for n in report.notes)
    cpu = next(e for e in report.validation.evaluators if "CPUExecutionProvider" in e.name)
    assert "basic graph optimisations, to bound memory" in cpu.description, cpu.description
    data = tmp_path / "model.onnx.data"
    assert path.stat().st_size < 20_000 < data.stat().st_size  # the weights are outside
    assert report.file_size_bytes == path.stat().st_size + data.stat().st_size
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(_run(path, x), ref, rtol=0, atol=2e-2 if fp16 else 1e-5)
    if fp16:
        assert report.fp16_initializer_fraction is not None
        assert report.fp16_initializer_fraction >= 0.9
        assert any(e.name == "fp16 emulated" and e.num_inputs for e in
                   report.validation.evaluators)


def test_external_data_needs_force_and_leaves_no_temp(tmp_path: Path) -> None:
    model, x = _mlp(), torch.randn(4, 32)
    path = tmp_path / "model.onnx"
    (tmp_path / "model.onnx.data").write_bytes(b"keep")
    with pytest.raises(ExportError, match=r"model\.onnx\.data.*force"):
        export_onnx(model, x, path, external_data_threshold=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx.data"]
    assert (tmp_path / "model.onnx.data").read_bytes() == b"keep"
    export_onnx(model, x, path, external_data_threshold=10_000, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    np.testing.assert_allclose(_run(path, x), model(x).detach().numpy(), atol=2e-2)


@pytest.mark.parametrize("streamed", [False, True], ids=["external", "streamed"])
def test_external_data_with_auto_search(tmp_path: Path, streamed: bool) -> None:
    model, x = _model_and_input()
    path = tmp_path / "auto.onnx"
    limits = {"stream_threshold": 1_000} if streamed else {"external_data_threshold": 1_000}
    report = export_onnx(model, x, path, fp16="auto", overflow_limit=1e9, **limits)
    assert report.passed is True and report.auto is not None and report.auto["nodes"]
    got = _run(path, x)
    assert np.isfinite(got).all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    if streamed:                      # one file, however the weights were staged
        assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.onnx"]


def test_cpu_validation_runs_each_weight_cast_next_to_its_consumer(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The ORT CPU check uses the priority-based execution order (ORT's default order casts
    every fp16 weight to fp32 before the first layer: all the fp32 copies alive at once), and
    falls back to the default order where a session refuses it."""
    made: list[ort.ExecutionOrder] = []
    real = ort.InferenceSession
    refuse = {"priority": True}

    def spy(source, opts=None, *args, **kwargs):
        made.append(opts.execution_order)
        if refuse["priority"] and opts.execution_order == ort.ExecutionOrder.PRIORITY_BASED:
            raise RuntimeError("this build refuses the priority-based order")
        return real(source, opts, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    model, x = _mlp(), torch.randn(4, 32)
    report = export_onnx(model, x, tmp_path / "a.onnx", fp16=True,
                         external_data_threshold=10_000)
    assert report.passed is True
    assert made[-2:] == [ort.ExecutionOrder.PRIORITY_BASED, ort.ExecutionOrder.DEFAULT]
    cpu = next(e for e in report.validation.evaluators if "CPUExecutionProvider" in e.name)
    assert "priority-based execution order was refused" in cpu.description   # in the report
    refuse["priority"] = False
    made.clear()
    report = export_onnx(model, x, tmp_path / "b.onnx", fp16=True)
    assert report.passed is True
    assert made[-1] == ort.ExecutionOrder.PRIORITY_BASED     # the last session: the CPU check


@pytest.mark.parametrize("fp16", [True, False])
def test_a_streamed_model_is_written_as_one_file_like_the_in_memory_path(fp16: bool,
                                                                        tmp_path: Path) -> None:
    """Past stream_threshold (and within external_data_threshold) a model is converted and
    validated through external-data files, then written as one self-contained file: the same
    graph and weights as the in-memory path, nothing else left in the directory."""
    model, x = _mlp(), torch.randn(4, 32)
    streamed = export_onnx(model, x, tmp_path / "s.onnx", fp16=fp16, stream_threshold=10_000)
    memory = export_onnx(model, x, tmp_path / "m.onnx", fp16=fp16)
    assert streamed.passed is True and memory.passed is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "s.onnx"]
    assert any("stream_threshold" in n.message for n in streamed.notes)
    assert not any("stream_threshold" in n.message for n in memory.notes)
    assert streamed.external_data_path in ("", None)
    assert streamed.file_size_bytes == (tmp_path / "s.onnx").stat().st_size
    cpu = next(e for e in streamed.validation.evaluators if "CPUExecutionProvider" in e.name)
    assert "basic graph optimisations" in cpu.description
    a, b = onnx.load(str(tmp_path / "s.onnx")), onnx.load(str(tmp_path / "m.onnx"))
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in a.graph.initializer)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    np.testing.assert_array_equal(_run(tmp_path / "s.onnx", x), _run(tmp_path / "m.onnx", x))


def test_the_streamed_single_file_equals_onnx_serialising_the_loaded_model(tmp_path: Path
                                                                          ) -> None:
    """write_inline streams the weights into one file; it parses to the same model that
    onnx.load of the external-data files gives, and runs alike."""
    from normswap.export._external import save_external, write_inline

    model, x = _mlp(), torch.randn(4, 32)
    export_onnx(model, x, tmp_path / "m.onnx", fp16=False)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    save_external(proto, tmp_path / "e.onnx", "e.onnx.data")
    graph = onnx.load(str(tmp_path / "e.onnx"), load_external_data=False)
    with open(tmp_path / "one.onnx", "wb") as fh:
        n = write_inline(graph, tmp_path, fh, chunk=1000)   # several chunks per weight
    assert n == (tmp_path / "one.onnx").stat().st_size
    got = onnx.load(str(tmp_path / "one.onnx"))
    want = onnx.load(str(tmp_path / "e.onnx"))      # external data loaded back
    assert got.graph.node == want.graph.node and got.graph.input == want.graph.input
    assert [t.name for t in got.graph.initializer] == [t.name for t in want.graph.initializer]
    for a, b in zip(got.graph.initializer, want.graph.initializer):
        assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
        assert a.data_location == onnx.TensorProto.DEFAULT and not a.external_data
    onnx.checker.check_model(got)
    np.testing.assert_array_equal(_run(tmp_path / "one.onnx", x), _run(tmp_path / "m.onnx", x))
    # a truncated data file is an error, not a short model
    data = tmp_path / "e.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with open(tmp_path / "bad.onnx", "wb") as fh, pytest.raises(ValueError, match="shorter"):
        write_inline(graph, tmp_path, fh)
