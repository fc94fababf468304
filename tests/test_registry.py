"""The method registry: every registered method is data that follows the pass contract."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
from torch import fx, nn

import normswap
from normswap.errors import MethodOptionError, UnknownMethodError
from normswap.passes._infra import pass_options
from normswap.registry import (
    CONTEXT_OPTIONS,
    available_methods,
    get_method,
    normalise_name,
)

from .conftest import randomize_bn


@pytest.mark.parametrize("name", available_methods())
def test_every_method_follows_the_pass_contract(name: str) -> None:
    m = get_method(name)
    assert m.steps, f"{name} has no passes"
    for step in m.steps:
        params = list(inspect.signature(step.fn).parameters.values())
        assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), step.name
        hints = typing.get_type_hints(step.fn)
        assert hints[params[0].name] is fx.GraphModule, step.name
        assert typing.get_origin(hints["return"]) is tuple, step.name
        pass_options(step.fn)  # raises on **kwargs
    if m.factory is not None:
        pass_options(m.factory)
    assert not set(m.options()) & CONTEXT_OPTIONS


@pytest.mark.parametrize("name", available_methods())
def test_unknown_option_is_refused_listing_the_accepted_ones(name: str) -> None:
    m = get_method(name)
    accepted = sorted(m.options())
    with pytest.raises(MethodOptionError, match="'bogus'.*accepted options: " +
                       (", ".join(accepted) if accepted else r"\(none\)")):
        normswap.swap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), name, bogus=1)


def test_invalid_option_value_is_refused_before_any_work() -> None:
    with pytest.raises(MethodOptionError, match="method 'linf': invalid option value.*k"):
        normswap.swap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "linf", k=0)


def test_names_are_normalised_and_unknown_names_listed() -> None:
    assert normalise_name("L1_BN") == "l1" and get_method("Kalman-BN").name == "kalman"
    with pytest.raises(UnknownMethodError, match="choose one of: .*kalman.*l1"):
        get_method("l3")


def test_options_reach_the_factory_and_the_passes() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 8, 8)
    linf = normswap.swap(model, "linf", k=3, example_inputs=x)
    assert all(getattr(mod, "k", 3) == 3 for mod in linf.modules())
    kal = normswap.swap(model, "kalman", gain=0.5, priors=False, example_inputs=x)
    assert {mod.gain for mod in kal.modules() if hasattr(mod, "gain")} == {0.5}
    assert isinstance(kal, nn.Sequential)  # no priors: no graph needed, the class is kept
