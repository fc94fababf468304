"""Architecture specs: torchvision, timm, module and local-file factories, literal arguments."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from normswap.arch import (
    build_arch,
    check_recorded_kwargs,
    is_builtin,
    parse_assignments,
    parse_spec,
    parse_value,
)
from normswap.errors import ArchitectureError, CheckpointError, NormswapError

FACTORIES = '''
import torch
from torch import nn

from sibling_helper import DEFAULT_WIDTH   # a sibling module: the file's folder is importable


class Tiny(nn.Module):
    def __init__(self, width=DEFAULT_WIDTH, act=None, sizes=(1, 2), flag=False, name="x"):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 2)
        self.received = dict(width=width, act=act, sizes=sizes, flag=flag, name=name)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def build(width=DEFAULT_WIDTH, act=None, sizes=(1, 2), flag=False, name="x"):
    return Tiny(width, act, sizes, flag, name)


class Fixed(nn.Module):
    """Accepts 8x8 inputs only, so an input guessed from the first conv fails."""

    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width * 8 * 8, 2)

    def forward(self, x):
        return self.head(torch.flatten(self.bn(self.conv(x)), 1))


def build_fixed(width=4):
    return Fixed(width)


def broken():
    raise RuntimeError("a bug inside the factory")


def not_a_module():
    return 3
'''


def write_factories(folder: Path) -> Path:
    """A factories.py (and the sibling module it imports) in ``folder``; not on sys.path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sibling_helper.py").write_text("DEFAULT_WIDTH = 4\n")
    path = folder / "factories.py"
    path.write_text(FACTORIES)
    return path


@pytest.mark.parametrize("text,value", [
    ("None", None), ("True", True), ("False", False), ("10", 10), ("-3", -3), ("0.5", 0.5),
    ("1e-3", 1e-3), ("(8, 16, 32)", (8, 16, 32)), ("(8,16,32)", (8, 16, 32)),
    ("[1, 2]", [1, 2]), ("'x'", "x"), ('"x"', "x"), ("null", None), ("true", True),
    ('{"a": 1}', {"a": 1}), ("relu", "relu"), ("resnet34", "resnet34"), ("", ""),
    ("a b", "a b"), ("Infinity", float("inf")),
])
def test_parse_value_literals_then_json_then_string(text: str, value: object) -> None:
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_parse_assignments() -> None:
    got = parse_assignments(["encoder_weights=None", "num_classes=10", "widths=(8,16)",
                             "act=relu", "eq=a=b"])
    assert got == {"encoder_weights": None, "num_classes": 10, "widths": (8, 16), "act": "relu",
                   "eq": "a=b"}
    for bad in ("novalue", "=3", "not a name=1", "1x=2"):
        with pytest.raises(NormswapError, match="is not KEY=VALUE"):
            parse_assignments([bad])


def test_parse_spec_forms() -> None:
    assert parse_spec("torchvision:resnet18").kind == "torchvision"
    assert parse_spec("timm:resnet18.a1_in1k").name == "resnet18.a1_in1k"
    assert parse_spec("mypkg.models:build_net") == parse_spec("mypkg.models:build_net")
    assert parse_spec("mypkg.models:build_net").kind == "module"
    for spec in ("./factories.py:build", "/abs/f.py:build", "sub/f.py:make", "f.py:build"):
        assert parse_spec(spec).kind == "file", spec
    assert parse_spec("./f.py:build").where == "./f.py"
    assert is_builtin("timm:x") and is_builtin("torchvision:x")
    assert not is_builtin("os:system") and not is_builtin("timm")
    for bad, why in [("resnet18", "not of the form"), ("torchvision:", "not of the form"),
                     ("os:sys tem", "not a Python name"), ("./notpy.txt:f", "not a .py file"),
                     ("my-pkg:f", "not a module path")]:
        with pytest.raises(ArchitectureError, match=why):
            parse_spec(bad)


def test_torchvision_spec_and_errors() -> None:
    model = build_arch("torchvision:resnet18", num_classes=7)
    assert model.fc.out_features == 7
    with pytest.raises(ArchitectureError, match="torchvision has no model 'resnet9000'"):
        build_arch("torchvision:resnet9000")
    with pytest.raises(ArchitectureError, match="did you mean resnet18"):
        build_arch("torchvision:resnet1")
    with pytest.raises(ArchitectureError, match="does not take argument 'colour'"):
        build_arch("torchvision:resnet18", colour=3)
    with pytest.raises(ArchitectureError, match=r"\['weights'\] would load or download"):
        build_arch("torchvision:resnet18", weights="DEFAULT")


def test_torchvision_detection_backbone_is_not_downloaded(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import torch.hub

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = build_arch("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    assert isinstance(model, nn.Module)


def test_timm_spec_builds_without_weights_and_keeps_pretrained_cfg() -> None:
    pytest.importorskip("timm")
    model = build_arch("timm:resnet18", num_classes=5)
    assert model.fc.out_features == 5
    assert model.pretrained_cfg["architecture"] == "resnet18"
    with pytest.raises(ArchitectureError, match="timm has no model 'resnetx18'.*resnet18"):
        build_arch("timm:resnetx18")
    with pytest.raises(ArchitectureError, match="pretrained"):
        build_arch("timm:resnet18", pretrained=True)
    with pytest.raises(ArchitectureError, match="checkpoint_path"):
        build_arch("timm:resnet18", checkpoint_path="/tmp/x.pth")
    with pytest.raises(ArchitectureError, match="does not take argument 'nonsense'"):
        build_arch("timm:resnet18", nonsense=1)


def test_local_file_factory_without_pythonpath(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_factories(tmp_path / "models")
    assert str(path.parent) not in sys.path
    with pytest.raises(ImportError):
        importlib.import_module("factories")
    model = build_arch(f"{path}:build", act=None, sizes=(8, 16, 32), flag=True, name="x")
    assert type(model).__name__ == "Tiny"
    assert model.received == {"width": 4, "act": None, "sizes": (8, 16, 32), "flag": True,
                              "name": "x"}
    monkeypatch.chdir(tmp_path)
    rel = build_arch("./models/factories.py:build", width=6)
    assert rel.bn.num_features == 6
    assert str(path.parent) not in sys.path  # the folder was importable only while it ran
    with pytest.raises(ArchitectureError, match="does not exist"):
        build_arch("./models/nothere.py:build")


def test_factory_errors_name_spec_argument_and_remedy(tmp_path: Path) -> None:
    path = write_factories(tmp_path)
    spec = f"{path}:build"
    with pytest.raises(ArchitectureError, match=r"rejects its arguments \(depth=3\).*'depth'"
                                                r".*it takes: width, act, sizes, flag, name"):
        build_arch(spec, depth=3)
    with pytest.raises(ArchitectureError, match="has no callable 'nope'.*build, build_fixed"):
        build_arch(f"{path}:nope")
    with pytest.raises(ArchitectureError, match="returned int, not an nn.Module"):
        build_arch(f"{path}:not_a_module")
    with pytest.raises(RuntimeError, match="a bug inside the factory"):
        build_arch(f"{path}:broken")  # not an argument problem: the original error propagates
    (tmp_path / "bad.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(ArchitectureError, match="running '.*bad.py'.*not_installed_anywhere"):
        build_arch(f"{tmp_path / 'bad.py'}:f")


def test_module_spec_and_its_errors() -> None:
    model = build_arch("torch.nn:BatchNorm2d", num_features=3)
    assert isinstance(model, nn.BatchNorm2d)
    with pytest.raises(ArchitectureError, match=r"cannot import 'mypkg_absent.models'.*"
                                                r"PYTHONPATH.*--arch ./path/to/models.py:build"):
        build_arch("mypkg_absent.models:build")
    with pytest.raises(ArchitectureError, match="'torch.nn' has no callable 'NoSuchFactory'"):
        build_arch("torch.nn:NoSuchFactory")


def test_timm_name_is_not_looked_up_as_a_module_attribute() -> None:
    pytest.importorskip("timm")
    try:
        build_arch("timm:resnet18")
    except CheckpointError as exc:  # the old message: "'timm' has no callable 'resnet18'"
        pytest.fail(f"timm:resnet18 did not build: {exc}")


def test_recorded_kwargs_are_plain_data() -> None:
    assert check_recorded_kwargs({"num_classes": 10, "widths": [8, 16], "act": None},
                                 "f") == {"num_classes": 10, "widths": [8, 16], "act": None}
    assert check_recorded_kwargs(None, "f") == {}
    for bad in ({"x": {"nested": 1}}, {"x": [[1]]}, {"x": torch.ones(1)}, {"1x": 1}, [1]):
        with pytest.raises(ArchitectureError, match="f"):
            check_recorded_kwargs(bad, "f")
