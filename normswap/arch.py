"""Architecture specs: what ``--arch`` / ``arch=`` names, and how the model is built.

A spec names the code that builds the network; the weights always come from a checkpoint.

=======================  ==================================================================
spec                     what is run
=======================  ==================================================================
``torchvision:NAME``     ``torchvision.models.get_model(NAME, weights=None, **kwargs)``
``timm:NAME``            ``timm.create_model(NAME, pretrained=False, **kwargs)`` (the model
                         keeps timm's ``pretrained_cfg``)
``module.path:factory``  ``import module.path`` (**runs that module's code**, as ``python -m``
                         would), then ``factory(**kwargs)``
``./file.py:factory``    **runs that file** (``importlib.util.spec_from_file_location``; no
``/abs/file.py:factory`` ``PYTHONPATH`` needed, the file's folder is importable while it
                         runs), then ``factory(**kwargs)``
=======================  ==================================================================

Nothing downloads: ``weights``/``weights_backbone``/``pretrained``/``checkpoint_path`` style
arguments are refused, torchvision detection backbones are built with
``weights_backbone=None``.

Only the built-in namespaces (:data:`BUILTIN_NAMESPACES`) may be rebuilt from what a file
records, and then with JSON-scalar arguments only (:func:`check_recorded_kwargs`); every other
spec must come from the user. A Hugging Face ``save_pretrained`` folder is built by
:func:`build_hf_folder` from its own ``config.json`` (a class of the ``transformers`` package,
never the folder's own code: ``trust_remote_code`` stays off, nothing is downloaded).

Values of ``--arch-arg KEY=VALUE`` are Python literals (``None``, ``True``, ``(8, 16)``,
``'x'``, numbers), else JSON, else the plain string (:func:`parse_value`).
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .errors import ArchitectureError, NormswapError

__all__ = [
    "ARCH_ARG_HELP",
    "BUILTIN_NAMESPACES",
    "SPEC_HELP",
    "ArchSpec",
    "build_arch",
    "build_hf_folder",
    "check_recorded_kwargs",
    "hf_arch_name",
    "is_builtin",
    "is_hf_folder",
    "is_recordable",
    "parse_assignments",
    "parse_spec",
    "parse_value",
]

log = logging.getLogger(__name__)

BUILTIN_NAMESPACES = ("torchvision", "timm")
#: arguments that would fetch or read weights inside the factory; normswap builds the
#: architecture only (the weights come from the checkpoint), so these are refused
_WEIGHT_ARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone",
                "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")

SPEC_HELP = (
    "the architecture: torchvision:NAME (weights=None), timm:NAME (pretrained=False), "
    "module.path:factory (imports module.path and so RUNS its code, like `python -m`), or "
    "./file.py:factory / /abs/path/file.py:factory (RUNS that file; no PYTHONPATH needed). "
    "Only torchvision:/timm: are ever rebuilt from what a checkpoint records; any other "
    "architecture comes from this option")
ARCH_ARG_HELP = (
    "keyword argument for the architecture factory, repeatable. VALUE is a Python literal "
    "(None, True, 10, 0.5, (8, 16, 32), 'text'), else JSON (null, true, [1, 2]), else the "
    "plain string: num_classes=10 encoder_weights=None widths=(8,16,32) act=relu")

Kind = Literal["torchvision", "timm", "module", "file"]


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture spec.

    Attributes:
        text: the spec as given.
        kind: ``"torchvision"``, ``"timm"``, ``"module"`` or ``"file"``.
        where: the namespace, module path or file path.
        name: the model name or factory attribute (dotted for nested attributes).
    """

    text: str
    kind: Kind
    where: str
    name: str


_FORMS = ("torchvision:NAME, timm:NAME, module.path:factory or ./file.py:factory")


def _looks_like_file(where: str) -> bool:
    return (where.endswith(".py") or where.startswith((".", "~")) or "/" in where
            or "\\" in where or os.path.isabs(where))


def parse_spec(spec: str) -> ArchSpec:
    """Parse an architecture spec (see the module docstring for the forms).

    Raises:
        ArchitectureError: the text is not one of the forms.
    """
    text = str(spec).strip()
    if ":" not in text:
        raise ArchitectureError(f"architecture '{text}' is not of the form {_FORMS}")
    where, name = text.rsplit(":", 1)
    if not where or not name:
        raise ArchitectureError(f"architecture '{text}' is not of the form {_FORMS}")
    if where in BUILTIN_NAMESPACES:
        return ArchSpec(text, where, where, name)  # type: ignore[arg-type]
    if not all(part.isidentifier() for part in name.split(".")):
        raise ArchitectureError(f"architecture '{text}': '{name}' is not a Python name "
                                f"(expected {_FORMS})")
    if _looks_like_file(where):
        if not where.endswith(".py"):
            raise ArchitectureError(f"architecture '{text}': '{where}' is not a .py file "
                                    "(expected ./file.py:factory)")
        return ArchSpec(text, "file", where, name)
    if not all(part.isidentifier() for part in where.split(".")):
        raise ArchitectureError(f"architecture '{text}': '{where}' is not a module path "
                                f"(expected {_FORMS})")
    return ArchSpec(text, "module", where, name)


def is_builtin(spec: str) -> bool:
    """Whether ``spec`` names a built-in namespace (``torchvision:``/``timm:``)."""
    where = str(spec).split(":", 1)[0]
    return ":" in str(spec) and where in BUILTIN_NAMESPACES


# --------------------------------------------------------------------------- argument values

def parse_value(text: str) -> Any:
    """A command-line value: a Python literal, else JSON, else the string itself.

    ``"None"`` -> None, ``"True"`` -> True, ``"(8, 16)"`` -> (8, 16), ``"'x'"`` -> 'x',
    ``"1e-3"`` -> 0.001, ``"null"`` -> None, ``"relu"`` -> 'relu'.
    """
    with contextlib.suppress(ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return ast.literal_eval(text)
    with contextlib.suppress(ValueError, RecursionError):
        return json.loads(text)
    return text


def parse_assignments(items: Sequence[str], *, what: str = "--arch-arg") -> dict[str, Any]:
    """Parse ``KEY=VALUE`` items (values by :func:`parse_value`).

    Raises:
        NormswapError: an item is not ``KEY=VALUE`` with KEY a Python name.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise NormswapError(f"{what} '{item}' is not KEY=VALUE with KEY a Python name "
                                "(e.g. num_classes=10)")
        out[key] = parse_value(value)
    return out


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def is_recordable(value: Any) -> bool:
    """Whether a value may be recorded in, and rebuilt from, a checkpoint header: a JSON
    scalar (str/int/float/bool/None) or a list/tuple of them."""
    if isinstance(value, (list, tuple)):
        return all(_scalar(v) for v in value)
    return _scalar(value)


def check_recorded_kwargs(kwargs: Any, source: str) -> dict[str, Any]:
    """Validate architecture arguments read from a file: JSON scalars or lists of them.

    Raises:
        ArchitectureError: not a mapping of names to such values.
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ArchitectureError(f"{source}: recorded architecture arguments are a "
                                f"{type(kwargs).__name__}, not a mapping; pass the "
                                "arguments yourself (--arch-arg / arch_kwargs)")
    bad = [str(k) for k, v in kwargs.items()
           if not isinstance(k, str) or not k.isidentifier() or not is_recordable(v)]
    if bad:
        raise ArchitectureError(f"{source}: recorded architecture arguments {bad[:5]} are not "
                                "JSON scalars (str/int/float/bool/None or lists of them); "
                                "pass them yourself (--arch-arg / arch_kwargs)")
    return dict(kwargs)


# --------------------------------------------------------------------------- building

def _refuse_weight_args(spec: str, kwargs: Mapping[str, Any]) -> None:
    bad = [k for k in _WEIGHT_ARGS if kwargs.get(k) not in (None, False)]
    if bad:
        raise ArchitectureError(f"architecture '{spec}': argument(s) {bad} would load or "
                                "download weights; normswap builds the architecture only and "
                                "takes the weights from the checkpoint: drop them")


def _fmt_args(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"


def _call_factory(spec: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    """Call a factory; argument errors become one :class:`ArchitectureError` naming them."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as exc:
            params = [p for p in sig.parameters
                      if sig.parameters[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                        inspect.Parameter.VAR_KEYWORD)]
            raise ArchitectureError(
                f"architecture '{spec}' rejects its arguments ({_fmt_args(kwargs)}): {exc}; "
                f"it takes: {', '.join(params) or 'no arguments'}. Fix --arch-arg / "
                "arch_kwargs") from exc
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        what = (f"does not take argument '{bad.group(1)}'" if bad
                else f"rejects its arguments ({_fmt_args(kwargs)})")
        raise ArchitectureError(f"architecture '{spec}' {what}: {type(exc).__name__}: "
                                f"{exc}. Fix --arch-arg / arch_kwargs") from exc
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"architecture '{spec}' returned {type(model).__name__}, not "
                                "an nn.Module; point --arch at a function that builds the "
                                "network")
    return model


def _suggest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=4, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _build_torchvision(spec: ArchSpec, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ArchitectureError(f"'{spec.text}' needs torchvision: pip install "
                                "torchvision") from exc
    try:
        builder = torchvision.models.get_model_builder(spec.name)
    except ValueError as exc:
        raise ArchitectureError(
            f"torchvision has no model '{spec.name}' (architecture '{spec.text}')"
            f"{_suggest(spec.name, torchvision.models.list_models())}; "
            "torchvision.models.list_models() lists them") from exc
    params = inspect.signature(builder).parameters
    kwargs = {"weights": None, **kwargs}
    if "weights_backbone" in params:
        kwargs.setdefault("weights_backbone", None)  # never download a backbone
    return _call_factory(spec.text, builder, kwargs)


def _build_timm(spec: ArchSpec, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ArchitectureError(f"'{spec.text}' needs timm: pip install timm") from exc
    if not timm.is_model(spec.name):
        raise ArchitectureError(
            f"timm has no model '{spec.name}' (architecture '{spec.text}')"
            f"{_suggest(spec.name, timm.list_models())}; timm.list_models('*name*') "
            "searches them")

    def create(**kw: Any) -> nn.Module:
        return timm.create_model(spec.name, pretrained=False, **kw)

    return _call_factory(spec.text, create, kwargs)


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    """Put ``folder`` first on ``sys.path`` (as ``python file.py`` does), then restore it."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _resolve_attr(spec: ArchSpec, module: Any, label: str) -> Callable[..., Any]:
    obj: Any = module
    for part in spec.name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if obj is None or not callable(obj):
        public = sorted(n for n, v in vars(module).items()
                        if not n.startswith("_") and callable(v))
        raise ArchitectureError(
            f"{label} has no callable '{spec.name}' (architecture '{spec.text}')"
            f"{_suggest(spec.name, public)}; it defines: {', '.join(public[:12]) or 'none'}")
    return obj


def _load_file(spec: ArchSpec) -> Any:
    """Run a local .py file as a fresh module (its folder importable while it runs)."""
    path = Path(spec.where).expanduser()
    if not path.is_file():
        raise ArchitectureError(f"architecture '{spec.text}': file '{path}' does not exist "
                                f"(resolved from the current directory '{Path.cwd()}')")
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    modname = f"normswap_arch_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(modname, path)
    if module_spec is None or module_spec.loader is None:
        raise ArchitectureError(f"architecture '{spec.text}': cannot load '{path}' as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[modname] = module  # dataclasses, pickling and typing need the module known
    try:
        with _on_sys_path(path.parent):
            module_spec.loader.exec_module(module)
    except (ImportError, SyntaxError) as exc:
        sys.modules.pop(modname, None)
        raise ArchitectureError(f"running '{path}' for architecture '{spec.text}' failed: "
                                f"{type(exc).__name__}: {exc}") from exc
    except BaseException:
        sys.modules.pop(modname, None)
        raise
    return module


def _import_module(spec: ArchSpec) -> Any:
    try:
        return importlib.import_module(spec.where)
    except ModuleNotFoundError as exc:
        missing = exc.name or spec.where
        if spec.where == missing or spec.where.startswith(missing + "."):
            raise ArchitectureError(
                f"cannot import '{spec.where}' for architecture '{spec.text}' (no module "
                f"named '{missing}'): install the package, add its folder to PYTHONPATH, or "
                f"point at the file itself: --arch ./path/to/{spec.where.split('.')[-1]}.py:"
                f"{spec.name}") from exc
        raise ArchitectureError(f"importing '{spec.where}' for architecture '{spec.text}' "
                                f"failed: {exc}; install what it needs") from exc
    except ImportError as exc:
        raise ArchitectureError(f"importing '{spec.where}' for architecture '{spec.text}' "
                                f"failed: {exc}") from exc


def build_arch(spec: str, **kwargs: Any) -> nn.Module:
    """Build the network a spec names (see the module docstring), without weights.

    ``module.path:factory`` imports that module and ``./file.py:factory`` runs that file: pass
    only specs you trust, never one read from a file you did not write.

    Args:
        spec: ``torchvision:NAME``, ``timm:NAME``, ``module.path:factory`` or
            ``./file.py:factory``.
        **kwargs: arguments of the factory.

    Returns:
        The model (in the mode its factory left it).

    Raises:
        ArchitectureError: the spec is malformed, names nothing, cannot be imported, or the
            factory rejects its arguments; the message names the spec and the remedy.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "torchvision":
        _refuse_weight_args(parsed.text, kwargs)
        return _build_torchvision(parsed, kwargs)
    if parsed.kind == "timm":
        _refuse_weight_args(parsed.text, kwargs)
        return _build_timm(parsed, kwargs)
    if parsed.kind == "file":
        module = _load_file(parsed)
        factory = _resolve_attr(parsed, module, f"'{parsed.where}'")
        with _on_sys_path(Path(parsed.where).expanduser().resolve().parent):
            return _call_factory(parsed.text, factory, kwargs)
    module = _import_module(parsed)
    factory = _resolve_attr(parsed, module, f"'{parsed.where}'")
    return _call_factory(parsed.text, factory, kwargs)


# --------------------------------------------------------------------------- Hugging Face

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` (a ``save_pretrained`` folder)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def _hf_config(folder: Path) -> Any:
    try:
        from transformers import AutoConfig
    except ImportError as exc:
        raise ArchitectureError(f"'{folder}' is a Hugging Face folder: pip install "
                                "transformers") from exc
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                          trust_remote_code=False)
    except Exception as exc:
        raise ArchitectureError(f"'{folder}/config.json' is not a configuration transformers "
                                f"can read without running the folder's code: "
                                f"{type(exc).__name__}: {exc}") from exc


def _hf_class(folder: Path, config: Any) -> Any:
    """The transformers class named by ``config.architectures[0]``, else ``AutoModel``."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    if names:
        cls = getattr(transformers, str(names[0]), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
        log.warning("'%s' names architecture '%s', which is not a transformers model class; "
                    "using AutoModel", folder, names[0])
    return transformers.AutoModel


def hf_arch_name(folder: str | os.PathLike[str]) -> str:
    """``transformers:CLASS`` for the class a folder's ``config.json`` names (for display)."""
    p = Path(folder)
    cls = _hf_class(p, _hf_config(p))
    return f"transformers:{cls.__name__}"


def build_hf_folder(folder: str | os.PathLike[str], *, weights: bool = True) -> nn.Module:
    """Build the model of a local Hugging Face ``save_pretrained`` folder, nothing downloaded.

    Args:
        folder: a folder with ``config.json`` (and, for ``weights=True``, the weights).
        weights: load the folder's weights (``from_pretrained``); False builds the
            architecture from the configuration only.

    Returns:
        The model in eval mode.

    Raises:
        ArchitectureError: no transformers, an unreadable configuration, missing weights.
    """
    p = Path(folder)
    if not is_hf_folder(p):
        raise ArchitectureError(f"'{p}' is not a Hugging Face folder (no config.json)")
    config = _hf_config(p)
    cls = _hf_class(p, config)
    try:
        if not weights:
            build = getattr(cls, "from_config", None) or cls._from_config
            model = build(config)
        else:
            if not any((p / f).is_file() for f in _HF_WEIGHTS):
                raise ArchitectureError(f"Hugging Face folder '{p}' has no weights "
                                        f"({', '.join(_HF_WEIGHTS)})")
            model = cls.from_pretrained(str(p), local_files_only=True,
                                        trust_remote_code=False, weights_only=True)
    except NormswapError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ArchitectureError(f"transformers could not build '{p}' as "
                                f"{getattr(cls, '__name__', cls)}: {type(exc).__name__}: "
                                f"{exc}") from exc
    return model.eval()
