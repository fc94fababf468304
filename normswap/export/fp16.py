"""Range-guarded float16 conversion of an fp32 ONNX model.

The conversion itself is ONNX Runtime's ``onnxruntime.transformers.float16
.convert_float_to_float16`` (no ``onnxconverter_common`` needed). What normswap adds:

1. **Measured ranges.** The fp32 model runs in ONNX Runtime on the calibration inputs with every
   float intermediate exposed as an output; per tensor we keep ``max|x|``, the smallest
   non-zero ``|x|`` and the count of non-finite values.
2. **A plan of fp32 nodes.** A tensor whose ``max|x|`` exceeds ``overflow_limit`` (default
   32752 = 65504/2: the calibration inputs are a sample, so half the fp16 range is kept as
   margin) would become ``inf``; a tensor whose non-zero values all lie below the smallest normal
   fp16 (6.1e-5) would lose its precision or flush to zero. Such a tensor stays fp32: its
   producer and *all* its consumers go on ONNX Runtime's ``node_block_list`` (a tensor crosses
   into fp16 wherever one end of it is fp16). Initialisers beyond 65504 (ORT would clamp them
   silently) or entirely subnormal keep their consumers in fp32 too, and op types with poor
   fp16 numerics (:data:`FP32_OP_TYPES`) are blocked by type.
3. **No fp32→fp16→fp32 round trips.** ORT's converter inserts ``Cast(to=fp16)`` after every
   blocked node and ``Cast(to=fp32)`` before every blocked consumer, so a value passed between
   two fp32 nodes still goes through fp16 (and overflows). :func:`remove_round_trip_casts`
   turns each such ``Cast(fp32)`` of a ``Cast(fp16)`` into an ``Identity`` of the fp32 source.
4. **A record.** Every node kept in fp32 with its reason, the fraction of float initialisers
   stored as fp16, initialisers ORT clamped, and the op types that have no fp16 kernel on the
   CPU provider (they run through inserted casts, slower than fp32 on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

__all__ = [
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "FP32_OP_TYPES",
    "TensorRange",
    "Fp16Plan",
    "name_nodes",
    "ProbeSession",
    "measure_ranges",
    "plan_fp32_nodes",
    "remove_round_trip_casts",
    "float_initializer_counts",
    "initializer_array",
    "topological_sort",
    "cpu_fp16_op_types",
    "convert_fp16",
]

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 6.103515625e-05
FP16_MIN_SUBNORMAL = 5.960464477539063e-08

#: Op types kept in fp32 by default: sums of squares / products / powers overflow fp16 long
#: before their inputs do (``var`` of fp16 data with σ = 300 is inf; docs/fp16_validation.md).
FP32_OP_TYPES: tuple[str, ...] = (
    "Pow", "ReduceSumSquare", "ReduceL2", "ReduceProd", "ReduceLogSumExp", "ReduceLogSum",
)


@dataclass
class TensorRange:
    """Observed range of one float tensor over the calibration inputs."""

    max_abs: float = 0.0
    min_abs_nonzero: float = float("inf")
    nonfinite: int = 0

    def update(self, values: np.ndarray) -> None:
        """Fold one observed array into the range."""
        arr = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(arr)
        self.nonfinite += int(arr.size - int(finite.sum()))
        mags = np.abs(arr[finite])
        if mags.size:
            self.max_abs = max(self.max_abs, float(mags.max()))
            nz = mags[mags > 0]
            if nz.size:
                self.min_abs_nonzero = min(self.min_abs_nonzero, float(nz.min()))


@dataclass
class Fp16Plan:
    """What the fp16 conversion kept in fp32, and why.

    Attributes:
        fp32_nodes: node name -> reason, for every node kept in fp32.
        op_types: node name -> op type (for the nodes in ``fp32_nodes``).
        clamped_initializers: initialiser name -> (values above 65504, non-zero values below
            5.96e-8) that ORT's converter clamps.
        ranges: the measured ranges (tensor name -> range).
        fp32_reference_nonfinite: tensors already non-finite in the fp32 model.
    """

    fp32_nodes: dict[str, str] = field(default_factory=dict)
    op_types: dict[str, str] = field(default_factory=dict)
    clamped_initializers: dict[str, tuple[int, int]] = field(default_factory=dict)
    ranges: dict[str, TensorRange] = field(default_factory=dict)
    fp32_reference_nonfinite: list[str] = field(default_factory=list)

    def keep(self, node: onnx.NodeProto, reason: str) -> None:
        """Keep ``node`` in fp32 (the first reason wins)."""
        self.fp32_nodes.setdefault(node.name, reason)
        self.op_types.setdefault(node.name, node.op_type)


def name_nodes(model: ModelProto) -> ModelProto:
    """Give every node a unique, non-empty name in place (the block list works by name).

    Args:
        model: the model to edit.

    Returns:
        ``model``.
    """
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return model


def _float_value_infos(model: ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every float32 tensor with a known type (inputs, intermediates, outputs)."""
    inferred = _inferred_skeleton(model)
    infos: dict[str, onnx.ValueInfoProto] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(
            inferred.graph.input):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            infos[vi.name] = vi
    inits = {i.name for i in model.graph.initializer}
    return {k: v for k, v in infos.items() if k not in inits}


class ProbeSession:
    """An ONNX Runtime CPU session of an fp32 model with every float intermediate as an output.

    Args:
        model: an fp32 model, or the path of one saved with external data (big models: the
            probe model is written beside it and shares its data file, the weights are not
            copied).
    """

    def __init__(self, model: ModelProto | str) -> None:
        import onnxruntime as ort

        path = model if isinstance(model, str) else None
        # the probe outputs are appended to the proto, serialised, and removed again: no copy
        # of the weights beyond the serialised bytes ONNX Runtime needs
        probe: ModelProto = (onnx.load(path, load_external_data=False) if path is not None
                             else model)  # type: ignore[assignment]
        self.infos = _float_value_infos(probe)
        self.existing = {o.name for o in probe.graph.output}
        produced = {o for n in probe.graph.node for o in n.output}
        n_out = len(probe.graph.output)
        for name, vi in self.infos.items():
            if name not in self.existing and name in produced:
                probe.graph.output.append(vi)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        probe_path = None
        source: bytes | str
        try:
            if path is not None:
                probe_path = os.path.join(os.path.dirname(path) or ".",
                                          ".probe-" + os.path.basename(path))
                onnx.save_model(probe, probe_path)
                source = probe_path
            else:
                source = probe.SerializeToString()
        finally:
            del probe.graph.output[n_out:]
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        finally:
            del source
            if probe_path is not None:
                os.unlink(probe_path)
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every float tensor (inputs included) of one run, by name."""
        values = {n: np.asarray(v) for n, v in feed.items()
                  if np.issubdtype(np.asarray(v).dtype, np.floating)}
        for name, value in zip(self.names, self.session.run(self.names, dict(feed))):
            if name in self.infos or name in self.existing:
                values[name] = value
        return values


def measure_ranges(model: ModelProto | str, feeds: Sequence[Mapping[str, np.ndarray]]
                   ) -> dict[str, TensorRange]:
    """Run the fp32 model in ONNX Runtime (CPU) and record the range of every float tensor.

    Args:
        model: an fp32 model or the path of one (see :class:`ProbeSession`).
        feeds: input dicts (graph input name -> array) to run.

    Returns:
        Tensor name -> observed range (graph inputs, intermediates and outputs).
    """
    from ..progress import iterate

    probe = ProbeSession(model)
    ranges: dict[str, TensorRange] = defaultdict(TensorRange)
    for feed in iterate(list(feeds), "measure ranges"):
        for name, value in probe.run(feed).items():
            ranges[name].update(value)
    return dict(ranges)


def _init_reason(arr: np.ndarray) -> str | None:
    """Why an initialiser cannot be stored in fp16 (None when it can)."""
    mags = np.abs(arr[np.isfinite(arr)].astype(np.float64))
    if mags.size == 0:
        return None
    if mags.max() > FP16_MAX:
        return f"weight max |w| = {mags.max():.3g} > {FP16_MAX:g} (fp16 inf; ORT would clamp it)"
    nz = mags[mags > 0]
    if nz.size and nz.max() < FP16_MIN_NORMAL:
        return (f"weight all-subnormal in fp16 (max |w| = {nz.max():.3g} < "
                f"{FP16_MIN_NORMAL:.3g}): precision lost or flushed")
    return None


def plan_fp32_nodes(model: ModelProto, ranges: Mapping[str, TensorRange], *,
                    overflow_limit: float = FP16_MAX / 2,
                    op_block_list: Iterable[str] = FP32_OP_TYPES,
                    node_block_list: Iterable[str] = (), base_dir: str | None = None
                    ) -> Fp16Plan:
    """Decide which nodes stay fp32.

    Args:
        model: the fp32 model (named nodes, see :func:`name_nodes`).
        ranges: measured tensor ranges (:func:`measure_ranges`).
        overflow_limit: a tensor with ``max|x|`` above this stays fp32.
        op_block_list: op types always kept in fp32.
        node_block_list: node names always kept in fp32.
        base_dir: where the model's external data lives (a graph-only model).

    Returns:
        The plan.
    """
    plan = Fp16Plan(ranges=dict(ranges))
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for o in node.output:
            producer[o] = node
        for i in node.input:
            consumers[i].append(node)
    ops = set(op_block_list)
    names = set(node_block_list)
    for node in model.graph.node:
        if node.op_type in ops:
            plan.keep(node, f"op type {node.op_type} is on the fp32 op list (poor fp16 numerics)")
        elif node.name in names:
            plan.keep(node, "named in node_block_list")
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        reason = _init_reason(initializer_array(init, base_dir))
        if reason:
            for node in consumers.get(init.name, []):
                plan.keep(node, f"input '{init.name}': {reason}")
    for name, rng in ranges.items():
        if rng.nonfinite:
            plan.fp32_reference_nonfinite.append(name)
        reason = None
        if rng.max_abs > overflow_limit:
            reason = (f"activation '{name}' reaches |x| = {rng.max_abs:.3g} > "
                      f"{overflow_limit:g} (fp16 max {FP16_MAX:g})")
        elif 0.0 < rng.max_abs < FP16_MIN_NORMAL:
            reason = (f"activation '{name}' is all-subnormal in fp16 (max |x| = "
                      f"{rng.max_abs:.3g} < {FP16_MIN_NORMAL:.3g})")
        if reason is None:
            continue
        if name in producer:
            plan.keep(producer[name], reason)
        for node in consumers.get(name, []):
            plan.keep(node, reason)
    return plan


def remove_round_trip_casts(model: ModelProto, fp32_nodes: Iterable[str]) -> int:
    """Replace ``Cast(fp32)`` of a ``Cast(fp16)`` of an fp32 node's output by an ``Identity``.

    Args:
        model: the converted model, edited in place.
        fp32_nodes: names of the nodes that compute in fp32.

    Returns:
        The number of round trips removed.
    """
    fp32 = set(fp32_nodes)
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_inputs = {i.name: i for i in model.graph.input}

    def cast_to(node: onnx.NodeProto) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    def is_fp32_source(name: str) -> bool:
        src = producer.get(name)
        if src is not None:
            return src.name in fp32
        vi = graph_inputs.get(name)
        return vi is not None and vi.type.tensor_type.elem_type == TensorProto.FLOAT

    removed = 0
    for node in model.graph.node:
        if cast_to(node) != TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or cast_to(first) != TensorProto.FLOAT16:
            continue
        if not is_fp32_source(first.input[0]):
            continue
        node.op_type = "Identity"
        del node.attribute[:]
        node.input[0] = first.input[0]
        removed += 1
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if cast_to(n) == TensorProto.FLOAT16
            and not any(o in used for o in n.output)]
    for n in dead:
        model.graph.node.remove(n)
    return removed


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names read inside a node's subgraphs (outer-scope dependencies included)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


def topological_sort(model: ModelProto) -> ModelProto:
    """Reorder ``model.graph.node`` so that every node follows its producers (in place).

    ORT's converter appends its Cast nodes at the end of the node list, which
    ``onnx.checker`` rejects. The original order is kept wherever it is already valid.

    Args:
        model: the model to reorder.

    Returns:
        ``model``.

    Raises:
        ValueError: the graph has a cycle or reads a tensor nobody produces.
    """
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps: list[set[int]] = []
    for i, n in enumerate(nodes):
        wanted = set(n.input) | _subgraph_inputs(n)
        deps.append({producer[x] for x in wanted if x in producer and producer[x] != i})
    users: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    remaining = [len(d) for d in deps]
    import heapq

    ready = [i for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle; cannot sort its nodes")
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)
    return model


def float_initializer_counts(model: ModelProto) -> dict[str, int]:
    """Count float initialisers (and their bytes) by precision.

    Returns:
        ``{"fp16": n, "fp32": n, "fp16_bytes": b, "fp32_bytes": b}``.
    """
    counts = {"fp16": 0, "fp32": 0, "fp16_bytes": 0, "fp32_bytes": 0}
    for init in model.graph.initializer:
        key = {TensorProto.FLOAT16: "fp16", TensorProto.FLOAT: "fp32"}.get(init.data_type)
        if key is None:
            continue
        counts[key] += 1
        counts[f"{key}_bytes"] += int(np.prod(init.dims, dtype=np.int64)) * (
            2 if key == "fp16" else 4)
    return counts


def cpu_fp16_op_types() -> set[str] | None:
    """Op types with a float16 kernel on ONNX Runtime's CPU provider (None if unknown)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        kernels = C.get_all_opkernel_def()
    except Exception:  # noqa: BLE001 - private API; absence only loses a warning
        return None
    ops: set[str] = set()
    for k in kernels:
        if k.provider != "CPUExecutionProvider" or k.domain not in ("", "ai.onnx"):
            continue
        if any("tensor(float16)" in types for types in k.type_constraints.values()):
            ops.add(k.op_name)
    return ops


def _clamp_report(model: ModelProto, plan: Fp16Plan, base_dir: str | None = None) -> None:
    """Record fp32 initialisers that ORT's converter will clamp into fp16 range."""
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        arr = initializer_array(init, base_dir).astype(np.float64)
        mags = np.abs(arr[np.isfinite(arr)])
        big = int((mags > FP16_MAX).sum())
        tiny = int(((mags > 0) & (mags < FP16_MIN_SUBNORMAL)).sum())
        if big or tiny:
            plan.clamped_initializers[init.name] = (big, tiny)


def initializer_array(init: TensorProto, base_dir: str | None = None) -> np.ndarray:
    """The values of an initialiser; one whose data is external is read from ``base_dir``
    through a copy of its (data-less) proto, so the model itself never holds the bytes."""
    if init.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(init)
    if base_dir is None:
        raise ValueError(f"initializer '{init.name}' has external data: pass base_dir")
    probe = TensorProto()
    probe.CopyFrom(init)
    return numpy_helper.to_array(probe, base_dir)


@contextlib.contextmanager
def _streamed_initializers(base_dir: str | None) -> Iterator[None]:
    """ORT's converter, reading each external fp32 initialiser only when it converts it.

    The converter converts initialisers one by one (``convert_tensor_float_to_float16``);
    with the model's weights left in the fp32 data file, each tensor's bytes are read, cast
    and stored as fp16 in turn: the fp32 weights are never all in memory, and never beside
    their fp16 copy (a protobuf keeps replaced bytes in its arena until it is freed).
    """
    if base_dir is None:
        yield
        return
    from onnxruntime.transformers import float16 as ort_fp16

    original = ort_fp16.convert_tensor_float_to_float16

    def convert(tensor: TensorProto, min_positive_val: float = 5.96e-08,
                max_finite_val: float = 65504.0) -> TensorProto:
        if tensor.data_location == TensorProto.EXTERNAL and tensor.data_type == \
                TensorProto.FLOAT:
            values = initializer_array(tensor, base_dir).ravel()
            half = ort_fp16.convert_np_to_float16(values, min_positive_val, max_finite_val)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            tensor.data_type = TensorProto.FLOAT16
            tensor.raw_data = half.tobytes()
            return tensor
        return original(tensor, min_positive_val, max_finite_val)

    ort_fp16.convert_tensor_float_to_float16 = convert
    try:
        yield
    finally:
        ort_fp16.convert_tensor_float_to_float16 = original


def convert_fp16(model: ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], *,
                 keep_io_types: bool = True, op_block_list: Iterable[str] | None = None,
                 node_block_list: Iterable[str] = (), overflow_limit: float = FP16_MAX / 2,
                 guard: bool = True, ranges: Mapping[str, TensorRange] | None = None,
                 copy: bool = True, base_dir: str | None = None) -> tuple[ModelProto, Fp16Plan]:
    """Convert an fp32 model to fp16, keeping range-critical nodes in fp32.

    Args:
        model: the fp32 model, with its weights loaded (not modified unless ``copy=False``).
        feeds: calibration input dicts (graph input name -> array).
        keep_io_types: keep graph inputs/outputs fp32 (casts inside the graph).
        op_block_list: op types kept in fp32; default :data:`FP32_OP_TYPES` plus ORT's
            ``DEFAULT_OP_BLOCK_LIST``. An explicit list replaces :data:`FP32_OP_TYPES` (ORT's
            default list is always added: those ops have no fp16 form).
        node_block_list: node names kept in fp32.
        overflow_limit: see :func:`plan_fp32_nodes`.
        guard: measure ranges and plan (False: a plain ORT conversion, for comparison).
        ranges: ranges already measured (:func:`measure_ranges`); ``feeds`` are then not run.
        copy: work on a copy (False: convert ``model`` in place and return it, which saves one
            copy of the weights on big models).
        base_dir: ``model`` is its graph only, its weights in external data files there (big
            models): each initialiser is read from disk as it is converted.

    Returns:
        ``(fp16_model, plan)``.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    if copy:
        src = ModelProto()
        src.CopyFrom(model)
    else:
        src = model
    name_nodes(src)
    ops = list(FP32_OP_TYPES if op_block_list is None else op_block_list)
    if guard:
        if ranges is None:
            ranges = measure_ranges(src, feeds) if feeds else {}
        plan = plan_fp32_nodes(src, ranges, overflow_limit=overflow_limit, op_block_list=ops,
                               node_block_list=node_block_list, base_dir=base_dir)
    else:
        plan = Fp16Plan()
        for node in src.graph.node:
            if node.name in set(node_block_list):
                plan.keep(node, "named in node_block_list")
    for node in src.graph.node:
        if node.op_type in DEFAULT_OP_BLOCK_LIST:
            plan.keep(node, f"op type {node.op_type} has no fp16 form (ORT default block list)")
    _clamp_report(src, plan, base_dir)
    # initialisers only feeding fp32 nodes are left fp32 by ORT, so they are not clamped
    blocked = set(plan.fp32_nodes)
    only_fp32 = {i.name for i in src.graph.initializer}
    for node in src.graph.node:
        if node.name not in blocked:
            only_fp32 -= set(node.input)
    for name in only_fp32:
        plan.clamped_initializers.pop(name, None)
    # type inference on the graph alone (no weights: works past protobuf's 2 GB limit), then
    # the converter runs in place without its own inference (which would copy the model)
    _infer_types_in_place(src)
    with _streamed_initializers(base_dir):
        converted = convert_float_to_float16(
            src, keep_io_types=keep_io_types, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
            node_block_list=sorted(blocked), disable_shape_infer=True)
    if base_dir is not None:  # the initialisers that stayed fp32 (and external)
        load_external_data_for_model(converted, base_dir)
    removed = remove_round_trip_casts(converted, blocked)
    topological_sort(converted)
    log.debug("fp16: %d nodes kept fp32, %d round-trip casts removed", len(blocked), removed)
    return converted, plan


def _inferred_skeleton(model: ModelProto) -> ModelProto:
    """``model`` with inferred ``value_info``, without its weights (shapes and types only)."""
    skeleton = ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g, src = skeleton.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for init in src.initializer:  # shapes only: type inference needs no weight values
        if init.data_type == TensorProto.INT64 and int(np.prod(init.dims, dtype=np.int64)) <= 64:
            g.initializer.append(init)  # small integer constants (Reshape shapes) keep values
            continue
        t = g.initializer.add()
        t.name, t.data_type = init.name, init.data_type
        t.dims.extend(init.dims)
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", "weights-not-loaded"
    return onnx.shape_inference.infer_shapes(skeleton)


def _infer_types_in_place(model: ModelProto) -> None:
    """Add inferred ``value_info`` to ``model`` without copying or serialising its weights."""
    inferred = _inferred_skeleton(model)
    src = model.graph
    known = {v.name for v in src.value_info}
    for vi in inferred.graph.value_info:
        if vi.name not in known:
            src.value_info.append(vi)
