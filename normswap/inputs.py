"""Guess an example input for a model that was given none, from what the model declares.

:func:`guess_inputs` looks, in this order, at:

1. a timm ``pretrained_cfg`` / ``default_cfg`` ``input_size`` ``(C, H, W)``;
2. a Hugging Face ``model.config`` (``image_size``/``num_channels``/``input_size`` for vision
   models, ``vocab_size`` for text models: a batch of token ids);
3. a torchvision detection model (``transform`` is a ``GeneralizedRCNNTransform``): a list of
   ``3×H×W`` images, then a 4-D batch;
4. an ultralytics model (``model.yaml`` ``ch``/``channels`` and ``model.stride``): an image side
   that is a multiple of the largest stride;
5. the first layers the input reaches (Conv1d/2d/3d, Linear, BatchNorm, LayerNorm, GroupNorm,
   RNN, Embedding → token ids): channels from the layer, spatial sizes from a short list of
   candidates (``64, 224, 32, 128, 96, ...``: small first, it is cheap to run), channels-first
   before channels-last.

Each candidate is run once through the model, in eval mode under ``torch.no_grad`` (module
attributes, buffers, training flags and the global RNG state are restored afterwards), and the
first one that runs is kept. The result says where it came from, so that a report can say
"verified on a generated input of shape [2, 3, 224, 224] (from timm pretrained_cfg)". Nothing
here raises: when no candidate runs, :func:`guess_inputs` returns ``None`` and the reasons are
logged and appended to ``reasons``. See docs/verification.md.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from ._modules import ModuleStateGuard, module_device_dtype

__all__ = ["GuessedInputs", "guess_inputs", "default_example_inputs", "iter_tensors",
           "SPATIAL_SIZES"]

log = logging.getLogger(__name__)

#: Spatial sides tried for a 2-D input whose size nothing declares, in this order.
SPATIAL_SIZES: tuple[int, ...] = (64, 224, 32, 128, 96, 256, 160, 299, 512)
_LENGTHS_1D: tuple[int, ...] = (128, 256, 64, 32, 1024, 16000)
_SIZES_3D: tuple[tuple[int, int, int], ...] = ((8, 112, 112), (16, 112, 112), (8, 64, 64),
                                               (8, 32, 32), (16, 32, 32), (32, 32, 32))
_SEQ_LENGTHS: tuple[int, ...] = (16, 32, 8, 64, 128)
_MAX_INPUT_LAYERS = 3
_MAX_TRIES = 40


@dataclass(frozen=True)
class GuessedInputs:
    """An example input that ran through the model once, and where it came from.

    Attributes:
        args: positional inputs (``model(*args, **kwargs)``).
        kwargs: keyword inputs (a forward with a required keyword-only parameter).
        source: what the guess is based on (``"timm pretrained_cfg"``,
            ``"Hugging Face config (image_size=64, num_channels=3)"``, ``"first layer Conv2d
            'conv1'"`` ...).
        tried: the candidates that failed before this one (``"<source> <shape>: <error>"``).
        checked: whether the input was run through the model (False with ``run=False``).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    tried: tuple[str, ...] = ()
    checked: bool = True

    @property
    def shapes(self) -> list[list[int]]:
        """Shapes of every tensor in the input, in order."""
        return [list(t.shape) for t in iter_tensors((self.args, self.kwargs))]

    def describe(self) -> str:
        """``"a generated input of shape [2, 3, 224, 224] (from timm pretrained_cfg)"``."""
        return f"a generated input of {_describe_shapes(self.args, self.kwargs)} " \
               f"(from {self.source})"


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nest of tuples, lists and dicts (other values are passed over)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def _describe_shapes(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """``shape [2, 3, 64, 64]``, ``a list of 2 images of shape [3, 64, 64]`` ..."""
    parts = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            parts.append(f"shape {list(a.shape)}")
        elif isinstance(a, (list, tuple)) and a and all(isinstance(t, Tensor) for t in a):
            shapes = {tuple(t.shape) for t in a}
            inner = (f"shape {list(next(iter(shapes)))}" if len(shapes) == 1
                     else "shapes " + ", ".join(str(list(s)) for s in shapes))
            parts.append(f"a list of {len(a)} tensors of {inner}")
        else:
            parts.append(type(a).__name__)
    names = list(kwargs)
    if names:
        parts[-len(names):] = [f"{n}={p}" for n, p in zip(names, parts[-len(names):])]
    return ", ".join(parts) if parts else "no tensor"


# -- candidates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Candidate:
    """One input to try: a builder (so that large inputs are made only when tried)."""

    source: str
    label: str
    build: Callable[[], tuple[Any, ...]]


def _randn(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _rand(shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(*shape, generator=g).to(device=device, dtype=dtype)


def _token_ids(shape: Sequence[int], vocab: int, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, max(int(vocab), 1), tuple(shape), generator=g).to(device)


def _tensor_candidate(source: str, shape: Sequence[int], device: torch.device,
                      dtype: torch.dtype) -> _Candidate:
    shape = [int(s) for s in shape]
    return _Candidate(source, str(shape), lambda: (_randn(shape, device, dtype),))


def _ids_candidate(source: str, shape: Sequence[int], vocab: int,
                   device: torch.device) -> _Candidate:
    shape = [int(s) for s in shape]
    return _Candidate(source, f"{shape} token ids < {vocab}",
                      lambda: (_token_ids(shape, vocab, device),))


def _timm_candidates(model: nn.Module, batch: int, device: torch.device,
                     dtype: torch.dtype) -> list[_Candidate]:
    """timm: ``pretrained_cfg["input_size"]`` (or the older ``default_cfg``)."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping):
            size = cfg.get("input_size")
            if (isinstance(size, Sequence) and 2 <= len(size) <= 4
                    and all(isinstance(s, int) and s > 0 for s in size)):
                return [_tensor_candidate(f"timm {attr}", [batch, *size], device, dtype)]
    return []


def _pair(value: Any) -> tuple[int, int] | None:
    """An int or a 2-sequence of ints as (H, W); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value, value
    if (isinstance(value, Sequence) and len(value) == 2
            and all(isinstance(v, int) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    return None


def _hf_candidates(model: nn.Module, batch: int, device: torch.device,
                   dtype: torch.dtype) -> list[_Candidate]:
    """Hugging Face: vision configs (image size, channels) and text configs (vocabulary)."""
    config = getattr(model, "config", None)
    if config is None or not type(config).__module__.startswith("transformers"):
        return []
    channels = getattr(config, "num_channels", None)
    image = _pair(getattr(config, "image_size", None))
    input_size = getattr(config, "input_size", None)
    if (image is None and isinstance(input_size, Sequence) and len(input_size) == 3
            and all(isinstance(v, int) for v in input_size)):
        channels, image = input_size[0], (input_size[1], input_size[2])
    if isinstance(channels, int) and channels > 0 or image is not None:
        c = channels if isinstance(channels, int) and channels > 0 else 3
        if image is not None:
            src = f"Hugging Face config (image_size={list(image)}, num_channels={c})"
            return [_tensor_candidate(src, [batch, c, *image], device, dtype)]
        src = f"Hugging Face config (num_channels={c})"
        return [_tensor_candidate(src, [batch, c, s, s], device, dtype) for s in SPATIAL_SIZES]
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        limit = getattr(config, "max_position_embeddings", None)
        lengths = [n for n in _SEQ_LENGTHS if not isinstance(limit, int) or n <= limit] or [1]
        src = f"Hugging Face config (vocab_size={vocab})"
        return [_ids_candidate(src, [batch, n], vocab, device) for n in lengths]
    return []


def _torchvision_detection_candidates(model: nn.Module, batch: int, device: torch.device,
                                      dtype: torch.dtype) -> list[_Candidate]:
    """torchvision detection: a list of 3×H×W images in [0, 1], then a 4-D batch."""
    if "torchvision" not in sys.modules:
        return []
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    if not isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform):
        return []
    side = 224
    src = "torchvision detection model"

    def images() -> tuple[Any, ...]:
        batch_ = _rand([batch, 3, side, side], device, dtype)
        return (list(batch_.unbind(0)),)

    return [_Candidate(src, f"list of {batch} images [3, {side}, {side}]", images),
            _Candidate(src, f"[{batch}, 3, {side}, {side}]",
                       lambda: (_rand([batch, 3, side, side], device, dtype),))]


def _ultralytics_candidates(model: nn.Module, batch: int, device: torch.device,
                            dtype: torch.dtype) -> list[_Candidate]:
    """ultralytics: channels from ``model.yaml``, a side that the largest stride divides."""
    if not type(model).__module__.startswith("ultralytics"):
        return []
    spec = getattr(model, "yaml", None)
    if not isinstance(spec, Mapping):
        return []
    channels = spec.get("ch", spec.get("channels", 3))
    channels = channels if isinstance(channels, int) and channels > 0 else 3
    stride = getattr(model, "stride", None)
    try:
        max_stride = int(torch.as_tensor(stride).max().item()) if stride is not None else 32
    except (TypeError, ValueError, RuntimeError):
        max_stride = 32
    max_stride = max(max_stride, 1)
    small = max_stride * math.ceil(max(64, 2 * max_stride) / max_stride)
    src = f"ultralytics yaml (ch={channels}, max stride {max_stride})"
    return [_tensor_candidate(src, [batch, channels, s, s], device, dtype)
            for s in dict.fromkeys([small, 640])]


# -- first layers ----------------------------------------------------------------------------

def _conv_rank(m: nn.Module) -> int:
    """Spatial rank of a conv-like layer, also when ``kernel_size`` is a plain int."""
    name = type(m).__name__
    for rank in (1, 2, 3):
        if name.endswith(f"{rank}d"):
            return rank
    ks = getattr(m, "kernel_size", None)
    if isinstance(ks, Sequence) and 1 <= len(ks) <= 3:
        return len(ks)
    for sub in m.modules():
        w = getattr(sub, "weight", None)
        if isinstance(w, Tensor) and 3 <= w.dim() <= 5 and hasattr(sub, "kernel_size"):
            return w.dim() - 2
    return 2


def _spatial_sizes(rank: int) -> list[list[int]]:
    if rank == 1:
        return [[n] for n in _LENGTHS_1D]
    if rank == 3:
        return [list(s) for s in _SIZES_3D]
    return [[s, s] for s in SPATIAL_SIZES]


def _layer_shapes(m: nn.Module, batch: int) -> tuple[list[list[int]], int | None] | None:
    """Candidate input shapes for a first layer, and a vocabulary size for an Embedding."""
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) or (
            hasattr(m, "num_embeddings") and hasattr(m, "embedding_dim")):
        return [[batch, n] for n in _SEQ_LENGTHS], int(m.num_embeddings)
    if isinstance(m, nn.RNNBase) or (hasattr(m, "input_size") and hasattr(m, "batch_first")):
        f = int(m.input_size)
        return [([batch, n, f] if m.batch_first else [n, batch, f]) for n in _SEQ_LENGTHS], None
    if hasattr(m, "in_channels") and hasattr(m, "kernel_size"):
        c = getattr(m, "in_channels")
        if not isinstance(c, int) or c <= 0:
            return None
        sizes = _spatial_sizes(_conv_rank(m))
        first = [[batch, c, *s] for s in sizes]
        last = [[batch, *s, c] for s in sizes if c not in s]
        return first + last, None
    if hasattr(m, "in_features"):
        f = getattr(m, "in_features")
        if not isinstance(f, int) or f <= 0:
            return None
        return [[batch, f]] + [[batch, n, f] for n in _SEQ_LENGTHS[:2]], None
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or (
            hasattr(m, "num_features") and hasattr(m, "running_mean")):
        c = int(m.num_features)
        name = type(m).__name__
        if name.endswith("1d"):
            return [[batch, c]] + [[batch, c, n] for n in _LENGTHS_1D], None
        if name.endswith("3d"):
            return [[batch, c, *s] for s in _SIZES_3D], None
        return [[batch, c, s, s] for s in SPATIAL_SIZES] + [[batch, c]], None
    if isinstance(m, nn.LayerNorm):
        ns = list(m.normalized_shape)
        return [[batch, *ns]] + [[batch, n, *ns] for n in _SEQ_LENGTHS[:2]], None
    if isinstance(m, nn.GroupNorm):
        return [[batch, m.num_channels, s, s] for s in SPATIAL_SIZES], None
    return None


def _input_layers(model: nn.Module, graph: fx.Graph | None) -> list[tuple[str, nn.Module]]:
    """The first few layers that tell an input shape, in graph order when there is a graph."""
    modules = dict(model.named_modules())
    found: list[tuple[str, nn.Module]] = []
    if graph is not None:
        frontier = [n for n in graph.nodes if n.op == "placeholder"]
        seen: set[fx.Node] = set()
        while frontier and len(found) < _MAX_INPUT_LAYERS:
            node = frontier.pop(0)
            if node in seen:
                continue
            seen.add(node)
            if node.op == "call_module":
                m = modules.get(str(node.target))
                if m is not None and _layer_shapes(m, 1) is not None:
                    found.append((str(node.target), m))
            frontier.extend(node.users)
    if not found:
        for name, m in model.named_modules():
            if _layer_shapes(m, 1) is not None:
                found.append((name, m))
                if len(found) >= _MAX_INPUT_LAYERS:
                    break
    return found


def _layer_candidates(model: nn.Module, graph: fx.Graph | None, batch: int) -> list[_Candidate]:
    out: list[_Candidate] = []
    for name, layer in _input_layers(model, graph):
        spec = _layer_shapes(layer, batch)
        if spec is None:
            continue
        shapes, vocab = spec
        device, dtype = module_device_dtype(layer)
        src = f"first layer {type(layer).__name__} '{name or '<root>'}'"
        for shape in shapes:
            out.append(_ids_candidate(src, shape, vocab, device) if vocab is not None
                       else _tensor_candidate(src, shape, device, dtype))
    return out


# -- running a candidate ---------------------------------------------------------------------

def _signature_problem(model: nn.Module) -> tuple[str | None, str | None]:
    """(reason the model cannot take one generated input, name of a required keyword-only
    parameter to pass the input by)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None, None
    required = [p for p in sig.parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(required) > 1:
        names = ", ".join(p.name for p in required)
        return (f"forward() of {type(model).__name__} needs {len(required)} inputs ({names}); "
                "only a single input can be generated"), None
    if required and required[0].kind is required[0].KEYWORD_ONLY:
        return None, required[0].name
    return None, None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _try_run(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any],
             buffers: list[tuple[Tensor, Tensor]]) -> str | None:
    """Run ``model`` once in eval under no_grad, leaving no state behind; the error, or None."""
    devices = [t.device.index or 0 for t in iter_tensors((args, dict(kwargs)))
               if t.device.type == "cuda"]
    try:
        with ModuleStateGuard(model), torch.no_grad(), warnings.catch_warnings(), \
                torch.random.fork_rng(devices=sorted(set(devices))):
            warnings.simplefilter("ignore")
            model.eval()
            model(*args, **kwargs)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "this candidate does not fit"
        return _short(exc)
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                if buf.shape == saved.shape:
                    buf.copy_(saved)


def guess_inputs(model: nn.Module, *, graph: fx.Graph | fx.GraphModule | None = None,
                 batch: int = 2, run: bool = True,
                 reasons: list[str] | None = None) -> GuessedInputs | None:
    """Guess an example input from what ``model`` declares, checked by running it once.

    Never raises (an exception inside is turned into ``None`` and a reason). The model's
    attributes, buffers, training flags and the global RNG state are left as they were.

    Args:
        model: the model.
        graph: its fx graph (or a ``GraphModule``), to find the first layer the input reaches
            (without it, module order is used; a ``GraphModule`` model provides its own).
        batch: the batch size of the generated input.
        run: run each candidate and keep the first that runs (default); with ``False`` the
            first candidate is returned unchecked.
        reasons: a list that receives why each candidate failed (or why none exists).

    Returns:
        The input and where it came from, or ``None`` when no candidate runs.
    """
    notes: list[str] = [] if reasons is None else reasons
    try:
        return _guess(model, graph, batch, run, notes)
    except Exception as exc:  # noqa: BLE001 - guessing must never break the caller
        notes.append(f"guessing an input failed: {_short(exc)}")
        log.info("guess_inputs(%s): %s", type(model).__name__, notes[-1])
        return None


def _guess(model: nn.Module, graph: fx.Graph | fx.GraphModule | None, batch: int, run: bool,
           notes: list[str]) -> GuessedInputs | None:
    if isinstance(graph, fx.GraphModule):
        graph = graph.graph
    if graph is None and isinstance(model, fx.GraphModule):
        graph = model.graph
    problem, keyword = _signature_problem(model)
    if problem is not None:
        notes.append(problem)
        return None
    device, dtype = module_device_dtype(model)
    tried: list[str] = []
    candidates: list[_Candidate] = []
    sources: list[tuple[str, Callable[[], list[_Candidate]]]] = [
        ("timm pretrained_cfg", lambda: _timm_candidates(model, batch, device, dtype)),
        ("Hugging Face config", lambda: _hf_candidates(model, batch, device, dtype)),
        ("torchvision detection model",
         lambda: _torchvision_detection_candidates(model, batch, device, dtype)),
        ("ultralytics yaml", lambda: _ultralytics_candidates(model, batch, device, dtype)),
        ("first layers", lambda: _layer_candidates(model, graph, batch)),
    ]
    for name, source in sources:
        try:
            candidates.extend(source())
        except Exception as exc:  # noqa: BLE001 - a broken declaration: try the next source
            tried.append(f"{name}: could not be read ({_short(exc)})")
    if not candidates:
        notes.extend(tried)
        notes.append(f"{type(model).__name__} declares no input size (no timm/Hugging Face/"
                     "torchvision/ultralytics config) and has no Conv/Linear/BatchNorm/"
                     "Embedding layer to read one from")
        return None
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if run else []
    seen: set[str] = set()
    for cand in candidates:
        if cand.label in seen:  # the same shape from another source fails the same way
            continue
        seen.add(cand.label)
        if len(tried) >= _MAX_TRIES:
            tried.append(f"stopped after {_MAX_TRIES} candidates")
            break
        value = cand.build()
        args, kwargs = (((), {keyword: value[0]}) if keyword is not None else (value, {}))
        error = _try_run(model, args, kwargs, buffers) if run else None
        if error is None:
            guess = GuessedInputs(args, kwargs, cand.source, tuple(tried), checked=run)
            log.info("guessed %s", guess.describe())
            return guess
        tried.append(f"{cand.source} {cand.label}: {error}")
    notes.extend(tried)
    log.info("guess_inputs(%s): no candidate input ran (%d tried)", type(model).__name__,
             len(tried))
    return None


def default_example_inputs(model: nn.Module, gm: fx.GraphModule | None = None,
                           batch: int = 2) -> tuple[Any, ...] | None:
    """Positional inputs from :func:`guess_inputs` (None when no guess runs or the guess is a
    keyword input); kept for callers of the earlier API."""
    guess = guess_inputs(model, graph=gm, batch=batch)
    if guess is None or guess.kwargs:
        return None
    return guess.args
