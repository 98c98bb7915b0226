"""torch.optim conventions the shell follows as ``torch.optim.Adam`` does (issue 12, section 2).

Each test compares KProdigy with torch's own optimizer or with another KProdigy path (never with
hard-coded numbers): named params, empty param groups, ``torch.compile(opt.step)``, stable
save -> load -> save, non-dict state entries, and torch's wording for refused arguments.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from kprodigy import KProdigy


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))


def _backward(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        _backward(model, i)
        opt.step()


def _assert_state_dicts_equal(a: dict, b: dict) -> None:
    """Same keys and values, group by group and param by param (tensors bit-exactly)."""
    assert [sorted(g) for g in a["param_groups"]] == [sorted(g) for g in b["param_groups"]]
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid, st in a["state"].items():
        assert isinstance(st, dict) == isinstance(b["state"][pid], dict)
        if not isinstance(st, dict):
            assert st == b["state"][pid]
            continue
        assert st.keys() == b["state"][pid].keys()
        for key, value in st.items():
            other = b["state"][pid][key]
            if torch.is_tensor(value):
                assert torch.equal(value, other), (pid, key)
            else:
                assert value == other, (pid, key)


# ---------------------------------------------------------------------------------------------
# named parameters (torch >= 2.6)


def test_named_parameters_are_accepted_and_saved_like_adam() -> None:
    model, twin = _model(), _model()
    opt = KProdigy(model.named_parameters())
    plain = KProdigy(twin.parameters())
    adam = torch.optim.Adam(_model().named_parameters())
    assert opt.param_groups[0]["param_names"] == adam.param_groups[0]["param_names"]
    assert all(torch.is_tensor(p) for p in opt.param_groups[0]["params"])
    _train(model, opt, 3)
    _train(twin, plain, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)  # names are bookkeeping only
    saved = opt.state_dict()
    assert saved["param_groups"][0]["param_names"] == adam.state_dict()["param_groups"][0]["param_names"]
    fresh = KProdigy(_model().named_parameters())
    fresh.load_state_dict(saved)
    _assert_state_dicts_equal(fresh.state_dict(), saved)


def test_named_param_groups_and_mixing_errors_match_adam() -> None:
    model = _model()
    named = list(model.named_parameters())
    groups = [{"params": named[:2]}, {"params": named[2:], "lr": 0.5}]
    opt = KProdigy(groups)
    adam = torch.optim.Adam([{"params": named[:2]}, {"params": named[2:], "lr": 0.5}])
    assert [g["param_names"] for g in opt.param_groups] == [g["param_names"] for g in adam.param_groups]
    _train(model, opt, 2)
    # a group without names next to named ones, and names missing inside one group: Adam's errors
    unnamed = {"params": [torch.nn.Parameter(torch.zeros(2))]}
    half_named = {"params": [("x", torch.nn.Parameter(torch.zeros(2))), torch.nn.Parameter(torch.zeros(2))]}
    for bad in (unnamed, half_named):
        with pytest.raises(ValueError) as ours:
            opt.add_param_group(copy.copy(bad))
        with pytest.raises(ValueError) as theirs:
            adam.add_param_group(copy.copy(bad))
        assert str(ours.value) == str(theirs.value)
    assert len(opt.param_groups) == 2


# ---------------------------------------------------------------------------------------------
# empty param groups (HF Trainer's no-decay group when only LoRA weights train)


@pytest.mark.parametrize("independent_d", [False, True])
@pytest.mark.parametrize("capturable", [False, True])
def test_empty_param_groups_change_nothing(independent_d: bool, capturable: bool) -> None:
    model, twin = _model(), _model()
    opt = KProdigy(
        [{"params": []}, {"params": list(model.parameters())}], independent_d=independent_d, capturable=capturable
    )
    ref = KProdigy(twin.parameters(), capturable=capturable)
    opt.add_param_group({"params": []})
    assert [len(m) for m in opt.d_groups()] == ([1, 1, 1] if independent_d else [3])
    _train(model, opt, 3)
    _train(twin, ref, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert float(opt.param_groups[1]["d"]) == float(ref.param_groups[0]["d"])
    # a checkpoint with empty groups round-trips, and step_parameter steps the others
    saved = opt.state_dict()
    fresh = KProdigy(
        [{"params": []}, {"params": list(model.parameters())}, {"params": []}],
        independent_d=independent_d,
        capturable=capturable,
    )
    fresh.load_state_dict(saved)
    _assert_state_dicts_equal(fresh.state_dict(), saved)
    _backward(model, 3)
    for p in model.parameters():
        fresh.step_parameter(p)
    fresh.finalize_step()
    assert int(fresh.param_groups[1]["k"]) == 4


def test_an_optimizer_without_any_param_is_refused_like_adam() -> None:
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        torch.optim.Adam([])
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        KProdigy([])


# ---------------------------------------------------------------------------------------------
# torch.compile(opt.step)


@pytest.mark.parametrize("capturable", [False, True])
def test_compiled_step_equals_eager_and_does_not_recompile(capturable: bool) -> None:
    """PyTorch's recipe for a compiled optimizer step: same result as the eager step, eager
    stepping still works afterwards, the flags stay as set, and no recompile on an lr change."""
    torch._dynamo.reset()
    model, twin = _model(), _model()
    opt, ref = KProdigy(model.parameters(), capturable=capturable), KProdigy(twin.parameters(), capturable=capturable)
    compiled = torch.compile(opt.step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes about the profiler context
        for i in range(2):  # warm-up (the first step creates the state)
            _backward(model, i)
            compiled()
            _backward(twin, i)
            ref.step()
        with torch.compiler.set_stance("fail_on_recompile"):
            for i in range(2, 5):
                for o in (opt, ref):
                    o.param_groups[0]["lr"] = 0.5 + 0.1 * i  # a scheduler
                _backward(model, i)
                compiled()
                _backward(twin, i)
                ref.step()
    assert opt.param_groups[0]["capturable"] is capturable
    _train(model, opt, 1, start=5)  # eager after compiled
    _train(twin, ref, 1, start=5)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert float(opt.param_groups[0]["d"]) == pytest.approx(float(ref.param_groups[0]["d"]), rel=1e-6)
    assert int(opt.param_groups[0]["k"]) == int(ref.param_groups[0]["k"]) == 6


# ---------------------------------------------------------------------------------------------
# state_dict stability and non-dict state entries


@pytest.mark.parametrize("capturable", [False, True])
def test_save_load_save_and_deepcopy_are_stable(capturable: bool) -> None:
    model = _model()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 0.5}]
    opt = KProdigy([dict(g) for g in groups], capturable=capturable)
    _train(model, opt, 2)
    saved = opt.state_dict()
    defaults = dict(opt.defaults)
    fresh = KProdigy([dict(g) for g in groups], capturable=capturable)
    fresh.load_state_dict(saved)
    _assert_state_dicts_equal(fresh.state_dict(), saved)
    assert fresh.defaults == defaults
    clone = copy.deepcopy(opt)
    _assert_state_dicts_equal(clone.state_dict(), saved)
    assert clone.defaults == defaults
    assert all("differentiable" not in g for g in (*fresh.param_groups, *clone.param_groups))


def test_non_dict_state_entries_are_kept_like_adam() -> None:
    model = _model()
    opt, adam = KProdigy(model.parameters()), torch.optim.Adam(model.parameters())
    _train(model, opt, 1)
    for o in (opt, adam):
        o.state["extra"] = 3  # torch keeps state under keys that are not params, as it is
    assert opt.state_dict()["state"]["extra"] == adam.state_dict()["state"]["extra"] == 3
    fresh = KProdigy(model.parameters())
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state["extra"] == 3
    _train(model, fresh, 1, start=1)


# ---------------------------------------------------------------------------------------------
# refused arguments read like torch's errors


def test_tensor_lr_and_fused_with_foreach_are_refused_in_torch_words() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adam([w], lr=torch.tensor(0.1), foreach=True)
    assert str(theirs.value).startswith("lr as a Tensor is not supported")
    with pytest.raises(ValueError, match=r"^lr as a Tensor is not supported by KProdigy"):
        KProdigy([w], lr=torch.tensor(1.0))
    opt = KProdigy([w])
    with pytest.raises(ValueError, match=r"^lr as a Tensor is not supported by KProdigy"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": torch.tensor(1.0)})
    opt.param_groups[0]["lr"] = torch.tensor(0.5)  # set by a scheduler: refused before any change
    w.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"^param group 0: lr as a Tensor is not supported by KProdigy"):
        opt.step()
    with pytest.raises(RuntimeError) as theirs:
        torch.optim.Adam([w], fused=True, foreach=True)
    with pytest.raises(RuntimeError) as ours:
        KProdigy([w], fused=True, foreach=True)
    assert str(ours.value) == str(theirs.value) == "`fused` and `foreach` cannot be `True` together."
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together."):
        KProdigy([w], fused=True).add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "foreach": True})


@pytest.mark.parametrize(
    "flags",
    [{}, {"foreach": False}, {"foreach": True}, {"slice_p": 3}, {"state_precision": "bfloat16"}],
    ids=["default", "per_tensor", "foreach", "slice_p3", "bf16_state"],
)
def test_params_with_zero_elements_step_beside_the_others(flags: dict) -> None:
    """Params with no elements ((0,), (5, 0), (0, 3)) among small packed ones and a large sliced
    one step as prodigyopt steps them (torch.optim accepts them): the packed layouts and the
    gathers skip them. float64, D grows, prodigyopt 1.1.2 to 1e-9 (bfloat16 state: to its
    rounding, D only)."""
    prodigyopt = pytest.importorskip("prodigyopt")
    shapes = [(0,), (3, 4), (5, 0), (7,), (0, 3)] + [(16, 16)] * 6 + [(700, 400), (2,)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    pull = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    runs = []
    for cls, kw in ((KProdigy, flags), (prodigyopt.Prodigy, {"slice_p": flags.get("slice_p", 1)})):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = cls(ps, lr=1.0, **kw)
        for _ in range(25):
            for p, t in zip(ps, pull):
                p.grad = p.detach() - t
            opt.step()
        runs.append((ps, opt.param_groups[0]["d"]))
    (ours, d_ours), (theirs, d_theirs) = runs
    assert d_theirs > 10 * 1e-6
    if "state_precision" in flags:
        assert d_ours == pytest.approx(d_theirs, rel=1e-2)
        return
    assert d_ours == pytest.approx(d_theirs, rel=1e-9)
    for p, q in zip(ours, theirs):
        assert p.shape == q.shape
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-9)  # (scaled state: an entry near 0)


@pytest.mark.parametrize("state_precision", ["float32", "bfloat16", "int8"])
def test_params_with_zero_elements_only_among_the_small_ones_and_a_checkpoint(state_precision: str) -> None:
    """Every small param without elements ((0,), (2, 0)) beside a large one: the steps run (the
    compact backend had a bucket with nothing to step), and a checkpoint taken mid-run loads (its
    check divided by a zero last dimension) and continues as the run without it (bfloat16, int8:
    bit for bit)."""
    import io

    shapes = [(0,), (2, 0), (300, 400)]

    def run(reload: bool) -> list[torch.nn.Parameter]:
        torch.manual_seed(0)  # (stochastic rounding of the compact formats draws from it)
        gen = torch.Generator().manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
        opt = KProdigy(ps, state_precision=state_precision)
        for k in range(6):
            if reload and k == 3:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = KProdigy(ps, state_precision=state_precision)
                opt.load_state_dict(torch.load(buf))
            for p in ps:
                p.grad = p.detach() - 0.5 - 0.01 * k
            opt.step()
        return ps

    for p, q in zip(run(False), run(True)):  # (float32: the checkpoint normalizes the scaled state: last bits)
        assert p.shape == q.shape
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_param_data_swapped_mid_run_is_stepped_as_prodigyopt_steps_it() -> None:
    """``p.data = t`` between steps (``Module.to``/``.double()``, ``vector_to_parameters``, EMA
    swaps do it): the next steps move the new storage, as prodigyopt's do (the kept plan held views
    of the old one: a sliced large param stopped moving). float64, the same numbers."""
    import prodigyopt

    def run(cls: type) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        shapes = [(400, 400), (30,), (8, 4, 3, 3)]
        ps = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64)) for s in shapes]
        ps[2].data = ps[2].data.to(memory_format=torch.channels_last)
        opt = cls(ps)
        for k in range(8):
            if k == 3:
                for p in ps:
                    p.data = torch.full_like(p, 0.5)  # (a new storage, the same param)
            for p in ps:
                p.grad = (p.detach() - 1.0 - 0.01 * k).clone(memory_format=torch.preserve_format)
            opt.step()
        return [p.detach().clone() for p in ps]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (prodigyopt prints its weight decay mode)
        ours, theirs = run(KProdigy), run(prodigyopt.Prodigy)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_functional_step_inplace_follows_a_swapped_tensor_data() -> None:
    """``kprodigy.functional.step_`` keeps a plan per tensor set: a ``x.data = t`` swap between calls
    is stepped in the new storage, as the pure step does."""
    import kprodigy.functional as F

    hp = F.Hyperparams()
    results = []
    for inplace in (True, False):
        gen = torch.Generator().manual_seed(1)
        xs = [
            torch.randn(400, 400, generator=gen, dtype=torch.float64),
            torch.randn(30, generator=gen, dtype=torch.float64),
        ]
        state = F.init_state(xs, hp)
        for k in range(6):
            if k == 3:
                for x in xs:
                    x.data = torch.full_like(x, 0.5)
            grads = [x - 1.0 - 0.01 * k for x in xs]
            if inplace:
                state = F.step_(xs, grads, state, hp)
            else:
                xs, state = F.step(xs, grads, state, hp)
        results.append(xs)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_param_data_replaced_by_another_shape_raises_naming_it() -> None:
    """``p.data`` replaced by a tensor of another shape after the state was made: a ValueError
    naming the param, both shapes and the fix (it said slice_p had changed), nothing changed."""
    p = torch.nn.Parameter(torch.randn(400, 400))
    opt = KProdigy([p])
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    p.data = torch.randn(10, 10)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"param 0 of param group 0 has shape \(10, 10\) but its state .*\(400, 400\)"):
        opt.step()
    assert torch.equal(p.detach(), before)
