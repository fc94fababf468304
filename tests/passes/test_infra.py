"""The pass runner: cleanup after each pass, option routing, errors named by pass."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from normswap.errors import MethodOptionError, UnsupportedNodeError
from normswap.passes._infra import PassStep, check_options, pass_options, run_passes
from normswap.report import PassReport


def _gm() -> fx.GraphModule:
    return fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def _add_dead_node(gm: fx.GraphModule, *, tag: str = "x") -> tuple[fx.GraphModule, PassReport]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        gm.graph.call_function(torch.neg, (out.args[0],))  # unused: DCE removes it
    rep = PassReport()
    rep.note(f"tag={tag}")
    return gm, rep


def _refuse(gm: fx.GraphModule) -> tuple[fx.GraphModule, PassReport]:
    raise UnsupportedNodeError("'1' (ReLU): refused")


def _crash(gm: fx.GraphModule) -> tuple[fx.GraphModule, PassReport]:
    raise ValueError("bad value")


def test_runner_cleans_up_after_each_pass_and_routes_options() -> None:
    report = PassReport()
    gm = run_passes(_gm(), [PassStep(_add_dead_node)], user_options={"tag": "y"}, report=report)
    assert not any(n.target is torch.neg for n in gm.graph.nodes)
    assert [n.message for n in report.notes] == ["tag=y"]
    fixed = run_passes(_gm(), [PassStep(_add_dead_node, options={"tag": "fixed"})],
                       user_options={}, report=PassReport())
    assert isinstance(fixed, fx.GraphModule)


def test_unknown_user_option_is_an_error_listing_the_accepted_ones() -> None:
    with pytest.raises(MethodOptionError, match="'tga'.*accepted options: tag"):
        run_passes(_gm(), [PassStep(_add_dead_node)], user_options={"tga": 1}, method="m")


def test_errors_name_the_pass_and_those_before_it_and_keep_their_type() -> None:
    with pytest.raises(UnsupportedNodeError, match=r"pass '_refuse' \(after _add_dead_node\)"):
        run_passes(_gm(), [PassStep(_add_dead_node), PassStep(_refuse)])
    with pytest.raises(ValueError, match=r"pass '_crash': bad value"):
        run_passes(_gm(), [PassStep(_crash)])


def test_a_pass_must_name_its_options() -> None:
    def loose(gm: fx.GraphModule, **kwargs: object) -> tuple[fx.GraphModule, PassReport]:
        return gm, PassReport()

    with pytest.raises(TypeError, match="loose takes \\*\\*kwargs"):
        pass_options(loose)
    with pytest.raises(MethodOptionError, match="'b'.*accepted options: a"):
        check_options("thing", {"b": 1}, ["a"])
