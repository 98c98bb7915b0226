"""``KProdigy(capturable=True)``: the D state lives in persistent 0-dim device tensors.

Checked: bit-identical params, state and D against the default (Python float) optimizer over many
configurations; no host read inside ``step()`` (after a param's first step, which creates its
state); checkpoints in the default format, loading both ways and into prodigyopt; deepcopy;
invalid values; and, on a CUDA machine only, one step captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from collections.abc import Callable
from typing import Any

import prodigyopt
import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from kprodigy import KProdigy

FLOAT_KEYS = ("d", "d_max", "d_numerator", "d_denom", "d_hat", "effective_lr", "step_size")
INT_KEYS = ("k", "skipped_steps")
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")


def model_and_data(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(16, 5, generator=gen).to(dtype)
    y = torch.randn(16, 1, generator=gen).to(dtype)
    return model, X, y


def _step_without_host_reads(
    monkeypatch: pytest.MonkeyPatch,
    opt: KProdigy,
    params: list[Tensor],
    grads: list[list[Tensor]],
    in_cpp: bool = True,
) -> None:
    """One ``opt.step()`` per gradient list, with every host read of a tensor value raising; with
    ``in_cpp`` those inside C++ too (``_NoScalarReads``: not around compiled kernels, which
    torch.compile does not run under a dispatch mode)."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host synchronisation inside KProdigy.step with capturable=True")

    with monkeypatch.context() as patch, _NoScalarReads() if in_cpp else contextlib.nullcontext():
        for name in SYNCS:
            patch.setattr(Tensor, name, forbidden)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()


class _NoScalarReads(TorchDispatchMode):
    """Raises at a tensor read inside C++ (``aten._local_scalar_dense``: e.g. a 0-dim tensor given
    where an op takes a ``Scalar``), which the patched Python methods above do not see."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host read inside C++ in KProdigy.step with capturable=True")
        return func(*args, **(kwargs or {}))


def one_group(model: torch.nn.Module) -> Any:
    return model.parameters()


def two_groups(model: torch.nn.Module) -> Any:  # independent D: one per group
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}]


def shared_d(model: torch.nn.Module) -> Any:  # one D for two groups with different lr and decay
    return [
        {"params": model[0].parameters(), "d_group": "all"},
        {"params": model[2].parameters(), "d_group": "all", "lr": 0.5, "weight_decay": 0.01},
    ]


CONFIGS: dict[str, tuple[Callable[[torch.nn.Module], Any], dict[str, Any]]] = {
    "one group": (one_group, {}),
    "independent D": (two_groups, {}),
    "shared D (d_group)": (shared_d, {}),
    "d_update_freq=3": (one_group, {"d_update_freq": 3}),
    "decoupled weight decay": (one_group, {"weight_decay": 0.1}),
    "coupled weight decay": (one_group, {"weight_decay": 0.1, "decouple": False}),
    "betas[0]=0": (one_group, {"betas": (0.0, 0.999)}),
    "d_ratio_cap": (two_groups, {"d_ratio_cap": 1.5, "d_update_freq": 2}),
    "slice_p, no bias correction, safeguard": (
        one_group,
        {"slice_p": 3, "use_bias_correction": False, "safeguard_warmup": True, "growth_rate": 1.5},
    ),
    "maximize, shared D, d_update_freq=2": (shared_d, {"maximize": True, "d_update_freq": 2}),
}


def run(
    capturable: bool,
    config: str,
    *,
    steps: int = 20,
    nan_at: int | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> tuple[torch.nn.Module, KProdigy]:
    """Train ``steps`` steps; at step ``nan_at`` one gradient entry is NaN."""
    groups, options = CONFIGS[config]
    model, X, y = model_and_data(dtype)
    opt = KProdigy(groups(model), capturable=capturable, **options, **kwargs)
    for i in range(steps):
        opt.zero_grad()
        (-((model(X) - y) ** 2).mean() if options.get("maximize") else ((model(X) - y) ** 2).mean()).backward()
        if i == nan_at:
            model[0].weight.grad[0, 0] = math.nan
        opt.step()
    return model, opt


def assert_same(model: torch.nn.Module, opt: KProdigy, model_c: torch.nn.Module, opt_c: KProdigy) -> None:
    """Bit-identical params, per-param state and D keys; ``opt_c`` is the capturable one."""
    for p, q in zip(model.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
        state, state_c = opt.state[p], opt_c.state[q]
        assert state.keys() == state_c.keys()
        for key, value in state.items():
            if key == "step":
                assert isinstance(state_c[key], Tensor) and state_c[key].dtype == torch.int64
                assert int(state_c[key]) == value
            else:
                assert torch.equal(value, state_c[key]), key
    for group, group_c in zip(opt.param_groups, opt_c.param_groups):
        for key in FLOAT_KEYS + INT_KEYS:
            assert isinstance(group_c[key], Tensor) and group_c[key].dim() == 0, key
            assert group_c[key].item() == group[key], key  # exact: float32 D round-trips through a float


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_capturable_equals_default_bitwise(config: str, foreach: bool) -> None:
    model, opt = run(False, config, foreach=foreach)
    model_c, opt_c = run(True, config, foreach=foreach)
    assert_same(model, opt, model_c, opt_c)
    assert opt_c.param_groups[0]["k"].item() == 20
    assert opt_c.get_learning_rates() == opt.get_learning_rates()


@pytest.mark.parametrize("foreach", [False, True])
def test_capturable_equals_default_in_float64(foreach: bool) -> None:
    model, opt = run(False, "shared D (d_group)", dtype=torch.float64, foreach=foreach, d_update_freq=3)
    model_c, opt_c = run(True, "shared D (d_group)", dtype=torch.float64, foreach=foreach, d_update_freq=3)
    assert_same(model, opt, model_c, opt_c)
    assert opt_c.param_groups[0]["d"].dtype == torch.float64


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("config", ["one group", "d_update_freq=3", "shared D (d_group)"])
def test_nonfinite_gradient_is_skipped_on_the_device(config: str, foreach: bool) -> None:
    """A NaN gradient at step 5: that step changes nothing, skipped_steps counts it, no warning."""
    before_model, before_opt = run(True, config, steps=5, foreach=foreach)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default mode warns once; capturable cannot know
        at_model, at_opt = run(True, config, steps=6, nan_at=5, foreach=foreach)
    assert_same_capturable(before_model, before_opt, at_model, at_opt, skipped=1)
    with pytest.warns(UserWarning, match="skipped a step"):
        model, opt = run(False, config, nan_at=5, foreach=foreach)
    model_c, opt_c = run(True, config, nan_at=5, foreach=foreach)
    assert_same(model, opt, model_c, opt_c)
    assert opt_c.param_groups[0]["skipped_steps"].item() == 1 and opt_c.param_groups[0]["k"].item() == 19


def assert_same_capturable(
    model: torch.nn.Module, opt: KProdigy, model_b: torch.nn.Module, opt_b: KProdigy, *, skipped: int
) -> None:
    """Two capturable runs hold the same params, state and D, up to ``skipped`` more skipped steps in b
    (``effective_lr`` is not compared: a skipped step reports the step size it computed, as by default)."""
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key
    for group, group_b in zip(opt.param_groups, opt_b.param_groups):
        for key in ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k"):
            assert torch.equal(group[key], group_b[key]), key
        assert group_b["skipped_steps"].item() == group["skipped_steps"].item() + skipped


def test_group_keys_are_shared_device_tensors() -> None:
    model, X, y = model_and_data()
    groups = shared_d(model) + [{"params": [torch.nn.Parameter(torch.zeros(3))]}]
    opt = KProdigy(groups, capturable=True)
    assert opt.defaults["capturable"] is True
    a, b, c = opt.param_groups
    for key in FLOAT_KEYS[:-2] + INT_KEYS:  # bound at construction, before any step (the step keys: per group)
        assert isinstance(a[key], Tensor) and a[key] is b[key] and a[key] is not c[key], key
    assert a["k"].dtype == torch.int64 and a["d"].dtype == torch.float64  # D in float64, as prodigyopt's Python floats
    assert a["effective_lr"] is not b["effective_lr"] and a["step_size"] is not b["step_size"]  # per group
    d, address = a["d"], a["d"].data_ptr()
    for _ in range(4):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    assert a["d"] is d and b["d"] is d and d.data_ptr() == address  # updated in place
    assert float(a["d"]) > 1e-6 and opt.state[model[0].weight]["step"].item() == 4
    assert all(type(lr) is float for lr in opt.get_learning_rates())
    assert float(c["effective_lr"]) == 0.0 and c["k"].item() == 0  # no gradient: did not step


def test_moved_params_rebind_the_d_state() -> None:
    """A model converted after the optimizer was built: the D state is rebound (float64 D either way)."""
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters(), capturable=True)
    model.double()
    opt.zero_grad()
    ((model(X.double()) - y.double()) ** 2).mean().backward()
    opt.step()
    assert opt.param_groups[0]["d"].dtype == torch.float64 and opt.param_groups[0]["k"].item() == 1


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("config", ["shared D (d_group)", "d_ratio_cap", "d_update_freq=3", "betas[0]=0"])
def test_step_reads_nothing_on_the_host(monkeypatch: pytest.MonkeyPatch, config: str, foreach: bool) -> None:
    """After the first step (which creates the per-param state), step() never reads a tensor value
    on the host: .item(), .tolist(), bool(), float() and int() of a tensor raise inside it."""
    groups, options = CONFIGS[config]
    model, X, y = model_and_data()
    opt = KProdigy(groups(model), capturable=True, foreach=foreach, **options)
    params = list(model.parameters())
    grads = []
    for i in range(8):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        grads.append([p.grad.clone() for p in params])
        if i == 0:
            opt.step()  # warm-up: creates the state
    grads[4][0][0, 0] = math.inf  # a skipped step inside the checked region
    _step_without_host_reads(monkeypatch, opt, params, grads[1:])
    assert opt.param_groups[0]["k"].item() == 7 and opt.param_groups[0]["skipped_steps"].item() == 1


def test_step_parameter_capturable_equals_default_and_reads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused backward (step_parameter + finalize_step) in capturable mode, d_update_freq=2."""
    runs = []
    for capturable in (False, True):
        model, X, y = model_and_data()
        opt = KProdigy(shared_d(model), capturable=capturable, d_update_freq=2)
        for i in range(6):
            opt.zero_grad()
            ((model(X) - y) ** 2).mean().backward()
            with monkeypatch.context() as patch:
                if capturable and i > 0:
                    for name in SYNCS:
                        patch.setattr(Tensor, name, lambda *a, **k: pytest.fail("host sync"))
                for p in model.parameters():
                    opt.step_parameter(p)
                opt.finalize_step()
        runs.append((model, opt))
    assert_same(*runs[0], *runs[1])


def test_checkpoints_keep_the_default_format_and_load_both_ways() -> None:
    # one kernel family in both modes (the default mode's native path rounds differently), so
    # that a resumed run is compared bit for bit
    kernels = {"foreach": False, "fused": False}
    ref_model, ref_opt = run(False, "shared D (d_group)", steps=10, **kernels)

    def resume(first: bool, second: bool) -> tuple[torch.nn.Module, KProdigy]:
        model, opt = run(first, "shared D (d_group)", steps=5, **kernels)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        state_dict = torch.load(buffer, weights_only=True)
        for group in state_dict["param_groups"]:
            assert all(type(group[key]) is float for key in FLOAT_KEYS)
            assert all(type(group[key]) is int for key in INT_KEYS)
            assert group["capturable"] is first
        assert all(type(st["step"]) is int for st in state_dict["state"].values())
        fresh = KProdigy(shared_d(model), capturable=second, **kernels)
        fresh.load_state_dict(state_dict)
        assert all(g["capturable"] is second for g in fresh.param_groups)  # kept from the optimizer
        X, y = model_and_data()[1:]
        for _ in range(5):
            fresh.zero_grad()
            ((model(X) - y) ** 2).mean().backward()
            fresh.step()
        return model, fresh

    for first, second in ((True, False), (False, True), (True, True)):
        model, opt = resume(first, second)
        if second:
            assert_same(ref_model, ref_opt, model, opt)
            a, b = opt.param_groups
            assert a["d"] is b["d"] and a["d"].device == next(model.parameters()).device
        else:
            assert all(torch.equal(p, q) for p, q in zip(ref_model.parameters(), model.parameters()))
            assert opt.param_groups[0]["d"] == ref_opt.param_groups[0]["d"]


def test_checkpoint_loads_into_prodigyopt() -> None:
    model, opt = run(True, "one group", steps=5)
    state_dict = opt.state_dict()
    reference = prodigyopt.Prodigy(model.parameters())
    reference.load_state_dict(state_dict)
    assert reference.param_groups[0]["d"] == float(opt.param_groups[0]["d"])
    assert all(type(st["step"]) is int for st in reference.state.values())
    model[0].weight.grad = torch.ones_like(model[0].weight)
    reference.step()  # runs on the loaded state
    # and prodigyopt's checkpoint (which now says capturable=True) back into a default KProdigy
    back = KProdigy(model.parameters())
    back.load_state_dict(reference.state_dict())
    assert back.param_groups[0]["capturable"] is False and type(back.param_groups[0]["d"]) is float


def test_load_is_atomic_and_refuses_d_steps() -> None:
    model, opt = run(True, "one group", steps=3)
    _, other = run(False, "one group", steps=3, d_steps=2)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="checkpoint param group 0.*not supported with capturable=True"):
        opt.load_state_dict(other.state_dict())
    bad = opt.state_dict()
    bad["param_groups"][0]["d"] = math.nan
    with pytest.raises(ValueError, match="finite"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(
        torch.equal(v, after["state"][pid][k]) if isinstance(v, Tensor) else v == after["state"][pid][k]
        for pid, st in before["state"].items()
        for k, v in st.items()
    )


def test_deepcopy() -> None:
    model, opt = run(True, "shared D (d_group)", steps=4)
    model_c, opt_c = copy.deepcopy((model, opt))
    a, b = opt_c.param_groups
    assert a["d"] is b["d"] and a["d"] is not opt.param_groups[0]["d"]
    assert torch.equal(a["d"], opt.param_groups[0]["d"])
    X, y = model_and_data()[1:]
    for m, o in ((model, opt), (model_c, opt_c)):
        for _ in range(3):
            o.zero_grad()
            ((m(X) - y) ** 2).mean().backward()
            o.step()
    assert_same_capturable(model, opt, model_c, opt_c, skipped=0)


def test_invalid_values() -> None:
    model, _, _ = model_and_data()
    for value in ("yes", 1, None):
        with pytest.raises(ValueError, match="Invalid capturable"):
            KProdigy(model.parameters(), capturable=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not supported with capturable=True"):
        KProdigy(model.parameters(), capturable=True, d_steps=10)
    opt = KProdigy(model[0].parameters(), capturable=True)
    with pytest.raises(ValueError, match="not supported with capturable=True"):
        opt.add_param_group({"params": model[2].parameters(), "d_steps": 10})
    with pytest.raises(ValueError, match="Invalid capturable"):
        opt.add_param_group({"params": model[2].parameters(), "capturable": "yes"})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": model[2].parameters(), "capturable": False})  # its own D: allowed
    mixed = KProdigy(
        [{"params": model[0].parameters(), "d_group": 0}, {"params": model[2].parameters(), "d_group": 0}],
        capturable=True,
    )
    mixed.param_groups[1]["capturable"] = False
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="share one D but have capturable"):
        mixed.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("d_update_freq", [1, 3])
def test_cuda_graph_capture_matches_eager(d_update_freq: int) -> None:
    """Warm up on a side stream, capture one ``opt.step()``, replay it: the same as eager steps
    (including a skipped NaN step and D updates decided on the device)."""
    device = torch.device("cuda")
    shapes = [(16, 8), (16,), (1, 16)]
    gen = torch.Generator(device=device).manual_seed(0)
    init = [torch.randn(s, device=device, generator=gen) for s in shapes]
    grads = [[torch.randn(s, device=device, generator=gen) for s in shapes] for _ in range(12)]
    grads[7][0][0, 0] = math.nan
    warm = 3

    def make() -> tuple[list[torch.nn.Parameter], KProdigy]:
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.5}]
        return params, KProdigy(groups, capturable=True, d_update_freq=d_update_freq, weight_decay=0.01)

    eager_params, eager = make()
    for gs in grads:
        for p, g in zip(eager_params, gs):
            p.grad = g.clone()
        eager.step()

    params, opt = make()
    for p in params:
        p.grad = torch.zeros_like(p)  # static gradients: the graph reads these tensors

    def load(gs: list[Tensor]) -> None:
        for p, g in zip(params, gs):
            p.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for gs in grads[:warm]:
            load(gs)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for gs in grads[warm:]:
        load(gs)
        graph.replay()
    torch.cuda.synchronize()

    for p, q in zip(eager_params, params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=0)
    for group, group_g in zip(eager.param_groups, opt.param_groups):
        for key in FLOAT_KEYS:
            torch.testing.assert_close(group_g[key], group[key], rtol=1e-6, atol=0)
        assert group_g["k"].item() == group["k"].item() == len(grads) - 1
        assert group_g["skipped_steps"].item() == group["skipped_steps"].item() == 1


def test_fused_step_reads_nothing_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """capturable=True with the compiled kernels (small params: the packed layout): after warm-up,
    step() reads no tensor on the host, a skipped step included. (Host-to-device copies cannot be
    seen on CPU: the fused path makes its 0-dim betas with ``torch.full``, see ``_fused``.)"""
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters(), capturable=True, fused=True)
    params = list(model.parameters())
    for _ in range(2):  # warm-up: state, packing, compilation
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    grads = [[g * (1 + i) for g in (p.grad for p in params)] for i in range(3)]
    grads[1][0][0, 0] = math.nan  # a skipped step inside the checked region
    _step_without_host_reads(monkeypatch, opt, params, grads, in_cpp=False)
    assert opt.param_groups[0]["k"].item() == 4 and opt.param_groups[0]["skipped_steps"].item() == 1
