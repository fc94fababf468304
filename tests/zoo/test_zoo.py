"""The zoo sweep: every model of tests/zoo/cases_*.py through the four checks of
``_harness`` (swap l1/linf/kalman exact and BN-free, Kalman graph priors, fold, fp16 export).

Each model is one test (``-m slow``; a few fast ones per zoo also run by default, without
the export check except on one). A check that
fails today and is listed in ``known_failures.json`` (written by ``python -m tests.zoo.survey
--write-known``, with the error it gave) makes the test xfail; an unlisted failure fails it. A
listed failure that now passes gives a warning (a fix, or a check whose time budgets reached
further on a faster machine); ``NORMSWAP_ZOO_RATCHET=1`` fails on it instead, so that the list
is regenerated. ``NORMSWAP_ZOO_STRICT=1`` fails on every failure, listed or not.

Per model, the capture strategy and the time of each step go to the junit properties
(``record_property``) and, with ``NORMSWAP_ZOO_RECORD=<file>``, one JSON line per model.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from ._harness import CHECKS, CaseResult, ZooCase, run_case, zoo_threads
from .cases import ZOOS, all_cases
from .cases_timm import (
    NO_BATCHNORM as TIMM_NO_BATCHNORM,  # imports timm only when building
)

KNOWN_FILE = Path(__file__).with_name("known_failures.json")
KNOWN: dict[str, dict[str, str]] = (json.loads(KNOWN_FILE.read_text())["failures"]
                                    if KNOWN_FILE.exists() else {})
STRICT = os.environ.get("NORMSWAP_ZOO_STRICT", "") not in ("", "0")
#: fail when a listed failure passes (else a warning): the list must then be regenerated
RATCHET = os.environ.get("NORMSWAP_ZOO_RATCHET", "") not in ("", "0")


@pytest.fixture(autouse=True)
def _threads() -> Any:
    """One torch thread per zoo test (see ``zoo_threads``), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(zoo_threads())
    yield
    torch.set_num_threads(before)


#: cases whose checks hold several GB (detection heads: their fp16 export check emulates
#: RoiAlign/NMS graphs): one xdist worker runs them one after the other (``--dist loadgroup``)
HEAVY = ("rcnn", "retinanet", "fcos", "ssd", "raft", "rt_detr")


def _params(smoke: bool) -> list[Any]:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xdist_group("heavy")]
                         if any(h in c.id for h in HEAVY) else [])
            for c in all_cases() if c.smoke or not smoke]


# the default run's smoke cases skip check 4 (an fp16 export + ONNX Runtime validation is
# 2-60 s per model on a busy 2-core machine), except on this one
SMOKE_EXPORT = "timm:resnet/resnet10t"


def _record(case: ZooCase, res: CaseResult, record_property: Any) -> None:
    l1 = res.checks.get("swap:l1")
    strategy = l1.info.get("strategy", "?") if l1 else "?"
    times = {"build": round(res.build_seconds, 3), "forward": round(res.forward_seconds, 3),
             **{k: round(c.seconds, 3) for k, c in res.checks.items()}}
    record_property("capture_strategy", strategy)
    record_property("seconds", json.dumps(times))
    path = os.environ.get("NORMSWAP_ZOO_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({**res.as_dict(), "strategy": strategy}) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("case", _params(smoke=False))
def test_zoo(case: ZooCase, tmp_path: Path, record_property: Any) -> None:
    checks = CHECKS if case.export is None else tuple(c for c in CHECKS if c != "export")
    _check_case(case, checks, tmp_path, record_property)


@pytest.mark.parametrize("case", _params(smoke=True))
def test_zoo_smoke(case: ZooCase, tmp_path: Path, record_property: Any) -> None:
    export = case.id == SMOKE_EXPORT and case.export is None
    _check_case(case, CHECKS if export else CHECKS[:-1], tmp_path, record_property)


def _check_case(case: ZooCase, checks: tuple[str, ...], tmp_path: Path,
                record_property: Any) -> None:
    """Run the checks; fail on what is not a listed known failure."""
    res = run_case(case, checks=checks, workdir=tmp_path)
    _record(case, res, record_property)
    assert not res.error, f"{case.id}: {res.error}"
    known = {} if STRICT else KNOWN.get(case.id, {})
    failed = {c.check: c for c in res.failures()}
    unexpected = [c for name, c in failed.items() if name not in known]
    fixed = [name for name in known if name in res.checks and name not in failed]
    problems = [f"{c.check}: {c.error}\n{c.detail}" for c in unexpected]
    stale = [f"{name}: passes now; remove it from {KNOWN_FILE.name} (was: {known[name]})"
             for name in fixed]
    if RATCHET:
        problems += stale
    elif stale:  # a fix, or a check whose time budgets ran further on a faster machine
        warnings.warn(f"{case.id}: " + "; ".join(stale), stacklevel=1)
        record_property("known_failure_passes", json.dumps(fixed))
    if problems:
        pytest.fail(f"{case.id}:\n" + "\n\n".join(problems), pytrace=False)
    if failed:
        pytest.xfail("known failures: " + "; ".join(f"{n}: {c.error}" for n, c in
                                                    failed.items()))


# -- the exclusions and the zoo lists hold ---------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")
def test_every_timm_family_is_classified() -> None:
    import timm

    from .cases_timm import FAMILIES, FUNCTIONAL

    listed = set(FAMILIES) | set(FUNCTIONAL) | set(TIMM_NO_BATCHNORM)
    assert set(timm.list_modules()) == listed, (
        f"new: {sorted(set(timm.list_modules()) - listed)}, "
        f"gone: {sorted(listed - set(timm.list_modules()))}")
    assert not set(FAMILIES) & set(TIMM_NO_BATCHNORM)
    for family, (name, _) in {**FAMILIES, **FUNCTIONAL}.items():
        assert name in timm.list_models(module=family), (family, name)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")
@pytest.mark.parametrize("family", sorted(TIMM_NO_BATCHNORM))
def test_timm_family_without_batchnorm(family: str) -> None:
    import timm
    from torch.nn.modules.batchnorm import _BatchNorm

    for name in timm.list_models(module=family):
        with torch.device("meta"):  # structure only: no memory, no weights
            model = timm.create_model(name, pretrained=False)
        bn = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
        assert not bn, f"{family}/{name} has BatchNorm {bn[:3]}: move it to FAMILIES"
        src = Path(__import__(f"timm.models.{family}", fromlist=["x"]).__file__).read_text()
        assert "StdConv" not in src, f"{family} uses StdConv (F.batch_norm): see FUNCTIONAL"


def test_torchvision_exclusions_have_no_batchnorm() -> None:
    import torchvision
    from torch.nn.modules.batchnorm import _BatchNorm

    from .cases_torchvision import NO_BATCHNORM

    for name in NO_BATCHNORM:
        # weights_backbone too: detection models would fetch ImageNet backbone weights
        params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
        extra = {"weights_backbone": None} if "weights_backbone" in params else {}
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None, **extra)
        assert not any(isinstance(m, _BatchNorm) for m in model.modules()), name


@pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None,
                    reason="ultralytics not installed")
def test_ultralytics_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from .cases_ultralytics import CASES, offline_env

    config_dir = offline_env()
    assert config_dir and Path(config_dir).is_dir()

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"ultralytics opened a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    model, inputs = CASES[0].build()
    with torch.no_grad():
        model.eval()(*inputs)
    from ultralytics.utils import SETTINGS, is_online

    assert not is_online()
    assert Path(SETTINGS.file).resolve().is_relative_to(Path(config_dir).resolve()), SETTINGS.file


def test_every_zoo_has_smoke_cases() -> None:
    for zoo, (_, package) in ZOOS.items():
        if importlib.util.find_spec(package) is None:
            continue
        cases = [c for c in all_cases([zoo])]
        assert cases and any(c.smoke for c in cases), zoo
        assert len({c.id for c in cases}) == len(cases), zoo


@pytest.mark.parametrize("family", ["nfnet", "vision_transformer_hybrid"])
def test_weight_standardisation_is_not_a_batchnorm(family: str) -> None:
    """NF-nets and BiT-style StdConv call F.batch_norm on conv weights, without running
    statistics: nothing trained to convert; the swap leaves them as they are, says so, and
    is verified."""
    pytest.importorskip("timm")
    import normswap

    from .cases_timm import FUNCTIONAL, _builder

    name, size = FUNCTIONAL[family]
    model, inputs = _builder(name, size)()
    model.eval()
    out = normswap.swap(model, "l1", example_inputs=inputs)
    report = out.normswap_report
    assert not report.changes and not report.skips
    # the call is named when the graph shows it (a no-trace leaf such as timm's StdConv2dSame
    # hides it: then there is simply no BatchNorm to find)
    assert any("without running statistics" in n.message or "no BatchNorm found" in n.message
               for n in report.notes)
    assert report.metrics["verify.passed"] is True
