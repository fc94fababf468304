"""Sync L1 / L-inf / Kalman batch norm across 2 gloo processes, and convert_sync/revert_sync.

One ``torch.multiprocessing.spawn`` of 2 processes (gloo, ``file://`` rendezvous, this machine
only) runs every distributed case; each rank gets a slice of a fixed batch (equal halves,
unequal 3/5 and 0/6 splits) and writes its outputs to a file. The parent then checks, per case,
against one process running the *non-sync* layer on the concatenated batch:

* train-mode outputs (concatenated) and input gradients (concatenated),
* weight/bias (and prior) gradients summed over the ranks (what DDP's all-reduce gives, up to
  its 1/world averaging),
* running statistics: bitwise identical on both ranks and equal to the single process's.

Tolerances: float64 cases rtol/atol 1e-9 (only the summation order differs); float32 1e-5;
float16 2e-3 (one fp16 ulp at the output's magnitude).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from normswap.distributed import convert_sync, is_sync_layer, revert_sync
from normswap.norms.kalman import KalmanBatchNorm, KalmanBatchNorm2d
from normswap.norms.lp_batchnorm import (
    L1BatchNorm,
    L1BatchNorm1d,
    L1BatchNorm2d,
    LinfBatchNorm,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
)
from normswap.norms.sync import (
    SyncKalmanBatchNorm,
    SyncL1BatchNorm,
    SyncLinfBatchNorm,
    sync_active,
)

WORLD = 2
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}
_TOL = {"float64": 1e-9, "float32": 1e-5, "float16": 2e-3}
_PLAIN = {"l1": L1BatchNorm, "linf": LinfBatchNorm, "kalman": KalmanBatchNorm}
_SYNC = {"l1": SyncL1BatchNorm, "linf": SyncLinfBatchNorm, "kalman": SyncKalmanBatchNorm}

# name: (layer, options, full input shape, split of dim 0, dtype, extras)
# extras: prior (Kalman prior, trainable), stats_loss (rank 0 alone adds a loss on the
# returned moments: its gradient must reach rank 1's inputs), group (a new_group), eval,
# channels_last (input memory format).
CASES: dict[str, tuple[str, dict[str, Any], tuple[int, ...], tuple[int, int], str, set[str]]] = {
    "l1_equal": ("l1", {}, (8, 3, 4, 5), (4, 4), "float64", set()),
    "l1_unequal": ("l1", {}, (8, 3, 4, 5), (3, 5), "float64", set()),
    "l1_empty_rank": ("l1", {}, (6, 3, 4), (0, 6), "float64", set()),
    "l1_1d_group": ("l1", {"momentum": None}, (8, 5), (3, 5), "float64", {"group"}),
    "l1_float32": ("l1", {}, (8, 3, 4, 5), (3, 5), "float32", set()),
    "l1_float16": ("l1", {}, (8, 3, 4, 5), (3, 5), "float16", set()),
    "l1_eval": ("l1", {}, (8, 3, 4, 5), (3, 5), "float64", {"eval"}),
    "l1_channels_last": ("l1", {}, (8, 3, 4, 5), (3, 5), "float64", {"channels_last"}),
    "linf_k1_equal": ("linf", {"k": 1}, (8, 3, 4, 5), (4, 4), "float64", set()),
    "linf_k1_unequal": ("linf", {"k": 1}, (8, 3, 4, 5), (3, 5), "float64", set()),
    "linf_k3_unequal": ("linf", {"k": 3}, (8, 3, 4, 5), (3, 5), "float64", set()),
    "linf_k7_exact": ("linf", {"k": 7, "exact_topk": True}, (8, 3, 6), (5, 3), "float64",
                      set()),
    "linf_k4_padded": ("linf", {"k": 4}, (8, 5), (3, 5), "float64", set()),
    "linf_k2_empty_rank": ("linf", {"k": 2}, (6, 3, 4), (0, 6), "float64", set()),
    "linf_k3_float32": ("linf", {"k": 3}, (8, 3, 4, 5), (3, 5), "float32", set()),
    "linf_k2_float16": ("linf", {"k": 2}, (8, 3, 4, 5), (5, 3), "float16", set()),
    "linf_k5_channels_last": ("linf", {"k": 5}, (8, 3, 4, 5), (3, 5), "float64",
                              {"channels_last"}),
    "kalman_equal": ("kalman", {}, (8, 3, 4, 5), (4, 4), "float64", set()),
    "kalman_unequal": ("kalman", {}, (8, 3, 4, 5), (3, 5), "float64", set()),
    "kalman_prior_unequal": ("kalman", {"gain": 0.9}, (8, 3, 4, 5), (3, 5), "float64",
                             {"prior", "stats_loss"}),
    # 10 and 8 samples are micro-batches locally, 18 is a large batch: "auto" must use 18
    "kalman_prior_auto_group": ("kalman", {"gain": "auto"}, (18, 3, 2), (10, 8), "float64",
                                {"prior", "group"}),
    "kalman_channels_last": ("kalman", {}, (8, 3, 4, 5), (3, 5), "float32",
                             {"prior", "channels_last"}),
    "kalman_stats_loss": ("kalman", {}, (8, 3, 6), (3, 5), "float64", {"stats_loss"}),
    "kalman_empty_rank": ("kalman", {"gain": 0.5}, (6, 3, 4), (0, 6), "float64", {"prior"}),
    "kalman_float16": ("kalman", {"gain": 0.05}, (8, 3, 4, 5), (3, 5), "float16", {"prior"}),
    "kalman_eval": ("kalman", {}, (8, 3, 4, 5), (3, 5), "float64", {"eval"}),
}


# ---------------------------------------------------------------------------------------------
# case data, shared by the parent (reference) and the workers
# ---------------------------------------------------------------------------------------------
def _case_data(name: str) -> dict[str, Any]:
    """Deterministic inputs, upstream gradients, prior and a randomised layer state."""
    kind, options, shape, _, dtype_name, extras = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.5
    x = x * torch.linspace(0.5, 3.0, C, dtype=torch.float64).reshape(1, C, *(1,) * (len(shape) - 2))
    layer = _PLAIN[kind](C, **options, dtype=_param_dtype(name))
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=g) * 0.3)
        layer.running_mean.copy_(torch.randn(C, generator=g) * 0.2)
        spread = "running_var" if kind == "kalman" else "running_scale"
        getattr(layer, spread).copy_(torch.rand(C, generator=g) + 0.5)
        layer.num_batches_tracked.fill_(7)
    data = {
        "x": x.to(_DTYPES[dtype_name]),
        "grad_y": torch.randn(shape, generator=g, dtype=torch.float64).to(_DTYPES[dtype_name]),
        "state": layer.state_dict(),
        "prior": None,
        "grad_stats": (torch.randn(C, generator=g, dtype=torch.float64),
                       torch.randn(C, generator=g, dtype=torch.float64)),
    }
    if "prior" in extras:
        data["prior"] = (torch.randn(C, generator=g, dtype=torch.float64) * 0.3 + 0.5,
                         torch.rand(C, generator=g, dtype=torch.float64) * 4.0 + 1.0)
    return data


def _param_dtype(name: str) -> torch.dtype:
    """float64 parameters for float64 cases, float32 otherwise (half input, float params)."""
    return torch.float64 if CASES[name][4] == "float64" else torch.float32


def _run_layer(layer: nn.Module, name: str, data: dict[str, Any], lo: int, hi: int,
               stats_loss: bool) -> dict[str, Any]:
    """One train (or eval) step of ``layer`` on ``x[lo:hi]``; returns outputs and gradients."""
    kind, _, _, _, _, extras = CASES[name]
    layer.load_state_dict(data["state"])
    layer.train("eval" not in extras)
    x = data["x"][lo:hi].clone()
    if "channels_last" in extras:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    prior = None
    if data["prior"] is not None:
        prior = tuple(p.clone().requires_grad_(True) for p in data["prior"])
    if kind == "kalman":
        y, stats = layer(x, prior=prior, return_stats=True)
    else:
        y, stats = layer(x), None
    loss = (y.double() * data["grad_y"][lo:hi].double()).sum()
    if stats_loss and stats is not None:
        loss = loss + sum((s.double() * gs).sum() for s, gs in zip(stats, data["grad_stats"]))
    loss.backward()
    return {
        "y": y.detach(), "dx": x.grad,
        "dw": layer.weight.grad, "db": layer.bias.grad,
        "dprior": None if prior is None else tuple(p.grad for p in prior),
        "state": {k: v.clone() for k, v in layer.state_dict().items()},
    }


def _guarded(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or the traceback text if it raises (reported by the parent's test)."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - the parent turns it into a test failure
        import traceback

        return {"error": traceback.format_exc()}


def _check(result: dict[str, Any]) -> dict[str, Any]:
    """Fail with the worker's traceback if the case raised there."""
    if "error" in result:
        pytest.fail(f"worker raised:\n{result['error']}")
    return result


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: run every case with the sync layers and save the results."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    group = dist.new_group([0, 1])
    results: dict[str, Any] = {}
    try:
        results["_active"] = sync_active()
        for name, (kind, options, _, split, _, extras) in CASES.items():
            data = _case_data(name)
            lo = 0 if rank == 0 else split[0]
            hi = lo + split[rank]
            pg = group if "group" in extras else None
            layer = _SYNC[kind](data["x"].shape[1], **options, dtype=_param_dtype(name),
                                process_group=pg)
            stats_loss = "stats_loss" in extras and rank == 0
            results[name] = _guarded(_run_layer, layer, name, data, lo, hi, stats_loss)
        results["_model"] = _guarded(_model_step, rank)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# a small model: convert_sync + DistributedDataParallel against one process
# ---------------------------------------------------------------------------------------------
def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), L1BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), LinfBatchNorm2d(4, k=3), nn.ReLU(),
        nn.Conv2d(4, 4, 1), KalmanBatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2),
    )  # no nn.BatchNorm: DDP refuses SyncBatchNorm on CPU modules
    return model.double()


def _model_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return (torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64),
            torch.randn(8, 2, generator=g, dtype=torch.float64))


_MODEL_SPLIT = (3, 5)


def _model_step(rank: int) -> dict[str, Any]:
    """convert_sync, DDP, one backward on this rank's slice."""
    model = convert_sync(_model())
    ddp = nn.parallel.DistributedDataParallel(model)
    x, target = _model_batch()
    lo = 0 if rank == 0 else _MODEL_SPLIT[0]
    hi = lo + _MODEL_SPLIT[rank]
    out = ddp(x[lo:hi])
    (out * target[lo:hi]).sum().backward()
    return {
        "out": out.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "classes": [type(m).__name__ for m in model],
    }


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Spawn 2 gloo processes once; the per-rank result dicts."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    tmp = tmp_path_factory.mktemp("dist")
    init_file = tmp / "rendezvous"
    mp.spawn(_worker, args=(str(init_file), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _reference(name: str) -> dict[str, Any]:
    """The non-sync layer, one process, the concatenated batch."""
    kind, options, shape, split, _, extras = CASES[name]
    data = _case_data(name)
    layer = _PLAIN[kind](shape[1], **options, dtype=_param_dtype(name))
    if "eval" in extras:  # eval: each rank normalises alone, with the running statistics
        parts = [_run_layer(_PLAIN[kind](shape[1], **options, dtype=_param_dtype(name)), name,
                            data, lo, lo + n, False)
                 for lo, n in ((0, split[0]), (split[0], split[1]))]
        return {"y": torch.cat([p["y"] for p in parts]),
                "dx": torch.cat([p["dx"] for p in parts]),
                "dw": parts[0]["dw"] + parts[1]["dw"], "db": parts[0]["db"] + parts[1]["db"],
                "dprior": None, "state": parts[1]["state"]}
    return _run_layer(layer, name, data, 0, shape[0], "stats_loss" in extras)


# ---------------------------------------------------------------------------------------------
# distributed tests
# ---------------------------------------------------------------------------------------------
def test_group_is_active(dist_results: list[dict[str, Any]]) -> None:
    assert all(r["_active"] for r in dist_results)


@pytest.mark.parametrize("name", list(CASES))
def test_sync_matches_single_process(dist_results: list[dict[str, Any]], name: str) -> None:
    r0, r1 = (_check(r[name]) for r in dist_results)
    ref = _reference(name)
    tol = _TOL[CASES[name][4]]
    close = {"rtol": tol, "atol": tol}
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), ref["y"], **close)
    torch.testing.assert_close(torch.cat([r0["dx"], r1["dx"]]), ref["dx"], **close)
    torch.testing.assert_close(r0["dw"] + r1["dw"], ref["dw"], **close)
    torch.testing.assert_close(r0["db"] + r1["db"], ref["db"], **close)
    if ref["dprior"] is not None:
        for a, b, want in zip(r0["dprior"], r1["dprior"], ref["dprior"]):
            torch.testing.assert_close(a + b, want, **close)
    assert r0["state"].keys() == ref["state"].keys()
    for key, want in ref["state"].items():
        assert torch.equal(r0["state"][key], r1["state"][key]), f"{key} differs across ranks"
        torch.testing.assert_close(r0["state"][key], want, **close)


def test_linf_uses_global_topk_not_local(dist_results: list[dict[str, Any]]) -> None:
    """Guard against a silent fallback: local-only top-k would give a different scale."""
    name = "linf_k3_unequal"
    data = _case_data(name)
    layer = LinfBatchNorm(3, k=3, dtype=torch.float64)
    layer.load_state_dict(data["state"])
    local = layer(data["x"][:3]).detach()
    assert not torch.allclose(_check(dist_results[0][name])["y"], local, rtol=1e-6, atol=1e-6)


def test_convert_sync_model_with_ddp(dist_results: list[dict[str, Any]]) -> None:
    r0, r1 = (_check(r["_model"]) for r in dist_results)
    assert r0["classes"][1:8:3] == ["SyncL1BatchNorm", "SyncLinfBatchNorm", "SyncKalmanBatchNorm"]
    model = _model()
    x, target = _model_batch()
    out = model(x)
    (out * target).sum().backward()
    torch.testing.assert_close(torch.cat([r0["out"], r1["out"]]), out.detach(),
                               rtol=1e-9, atol=1e-9)
    for n, p in model.named_parameters():  # DDP averages: grad of the total loss / world
        torch.testing.assert_close(r0["grads"][n], p.grad / WORLD, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(r1["grads"][n], p.grad / WORLD, rtol=1e-9, atol=1e-9)
    for key, want in model.state_dict().items():
        torch.testing.assert_close(r0["state"][key], want, rtol=1e-9, atol=1e-9)
        assert torch.equal(r0["state"][key], r1["state"][key]), key


# ---------------------------------------------------------------------------------------------
# single process: no group
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["l1_unequal", "linf_k3_unequal", "kalman_prior_unequal",
                                  "l1_float16", "kalman_stats_loss"])
def test_without_group_identical_to_plain(name: str) -> None:
    assert not sync_active()
    kind, options, shape, _, _, extras = CASES[name]
    data = _case_data(name)
    dtype = _param_dtype(name)
    got = _run_layer(_SYNC[kind](shape[1], **options, dtype=dtype), name, data, 0, shape[0],
                     "stats_loss" in extras)
    want = _run_layer(_PLAIN[kind](shape[1], **options, dtype=dtype), name, data, 0, shape[0],
                      "stats_loss" in extras)
    for key in ("y", "dx", "dw", "db"):
        assert torch.equal(got[key], want[key]), key
    for key, value in want["state"].items():
        assert torch.equal(got["state"][key], value), key


@pytest.mark.parametrize("kind", list(_SYNC))
def test_state_dict_keys_identical(kind: str) -> None:
    plain, sync = _PLAIN[kind](4), _SYNC[kind](4)
    assert list(plain.state_dict()) == list(sync.state_dict())
    sync.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(sync.state_dict(), strict=True)


def _mixed_model() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), L1BatchNorm2d(4), nn.Conv2d(4, 4, 1),
        LinfBatchNorm2d(4, k=5), nn.Flatten(), nn.Linear(16, 6), LinfBatchNorm1d(6, k=2),
        nn.Linear(6, 6), L1BatchNorm1d(6), nn.Unflatten(1, (6, 1, 1)),
        KalmanBatchNorm2d(6, gain="auto"), nn.Flatten(), nn.BatchNorm1d(6),
    )
    with torch.no_grad():
        for i, t in enumerate(model.state_dict().values()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=torch.Generator().manual_seed(i)) + 0.5)
    model[3].frozen = True
    return model


def test_convert_revert_roundtrip() -> None:
    model = _mixed_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    classes = [type(m) for m in model]
    out = convert_sync(model, batchnorm=True)
    assert out is model
    assert [type(m).__name__ for m in model if is_sync_layer(m)] == [
        "SyncL1BatchNorm", "SyncLinfBatchNorm", "SyncLinfBatchNorm", "SyncL1BatchNorm",
        "SyncKalmanBatchNorm"]
    assert isinstance(model[12], nn.SyncBatchNorm)
    assert model[3].k == 5 and model[3].frozen and model[6].k == 2
    assert model[10].gain == "auto"
    assert [id(p) for p in model.parameters()] == params          # shared, not copied
    assert list(model.state_dict()) == list(before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="4-D"):                  # L1BatchNorm2d's check kept
        model[1](torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="4D"):                   # KalmanBatchNorm2d's check
        model[10](torch.randn(2, 6))
    model.eval()
    x = torch.randn(5, 3, 2, 2)
    y_sync = model(x)
    back = revert_sync(model, batchnorm=True)
    assert back is model
    assert [type(m) for m in model] == classes
    assert [id(p) for p in model.parameters()] == params
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(hasattr(m, "process_group") for m in model)
    torch.testing.assert_close(model(x), y_sync, rtol=0, atol=0)


def test_convert_root_layer_and_process_group() -> None:
    layer = L1BatchNorm2d(3)
    hook_calls: list[int] = []
    layer.register_forward_hook(lambda m, i, o: hook_calls.append(1))
    sentinel = object()
    sync = convert_sync(layer, process_group=sentinel)
    assert isinstance(sync, SyncL1BatchNorm) and sync.process_group is sentinel
    assert "process_group=" in repr(sync)
    sync(torch.randn(2, 3, 2, 2))                                 # no group: plain path
    assert hook_calls == [1]
    assert convert_sync(sync) is sync and sync.process_group is None
    back = revert_sync(sync)
    assert type(back) is L1BatchNorm2d
    assert type(revert_sync(SyncKalmanBatchNorm(3))) is KalmanBatchNorm


def test_convert_leaves_unknown_subclass(caplog: pytest.LogCaptureFixture) -> None:
    class MyL1(L1BatchNorm):
        pass

    model = nn.Sequential(MyL1(3), nn.BatchNorm2d(3))
    with caplog.at_level(logging.WARNING, logger="normswap.distributed"):
        convert_sync(model)
    assert type(model[0]) is MyL1 and type(model[1]) is nn.BatchNorm2d
    assert "MyL1" in caplog.text


def test_from_module_rejects_wrong_type() -> None:
    with pytest.raises(TypeError, match="LinfBatchNorm"):
        SyncLinfBatchNorm.from_module(L1BatchNorm(3))
    with pytest.raises(TypeError, match="non-sync"):
        SyncL1BatchNorm.from_module(SyncL1BatchNorm(3))


def test_sync_linf_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k must be"):
        SyncLinfBatchNorm(3, k=0)


@pytest.mark.parametrize("kind", list(_SYNC))
def test_to_batchnorm_gives_syncbatchnorm(kind: str) -> None:
    layer = _SYNC[kind].from_module(_case_layer(kind), process_group=None)
    layer.eval()
    bn = layer.to_batchnorm()
    assert type(bn) is nn.SyncBatchNorm and bn.process_group is None
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(bn.double()(x), layer(x), rtol=1e-6, atol=1e-6)


def _case_layer(kind: str) -> nn.Module:
    """A 2d non-sync layer with randomised state."""
    cls = {"l1": L1BatchNorm2d, "linf": LinfBatchNorm2d, "kalman": KalmanBatchNorm2d}[kind]
    layer = cls(3, dtype=torch.float64)
    with torch.no_grad():
        for i, t in enumerate(layer.state_dict().values()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=torch.Generator().manual_seed(i)) + 0.5)
    return layer
