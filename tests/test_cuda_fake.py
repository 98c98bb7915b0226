"""The CUDA branch of every path, run without a GPU: params on a fake ``"cuda"`` device.

torch's ``FakeTensorMode`` makes ``device="cuda"`` tensors on a CPU-only build (shapes, dtypes and
devices propagated, no data), so a step runs the code a CUDA machine runs: the backend chosen for
CUDA, its device checks, ``torch._fused_adamw_``. Checked per path: the step runs; host reads per
steady step (exactly one for all D-groups by default, none with ``capturable=True``); no copy
between host and device inside a step (a synchronising copy, illegal in a CUDA graph); state and
D keys on the params' device. A fake tensor has no values, so the numerics are other tests'.

The harness (``fake_cuda``), for what FakeTensorMode on torch 2.13 CPU does not do by itself:

- Python indexing (``x[a:b]``, ``x[::p]``), ``Tensor.copy_`` and ``~x`` of a CUDA tensor raise
  "PyTorch is not linked with support for cuda devices" (their Python bindings take a CUDA device
  guard); ``_Bindings`` runs them as the aten ops they call (basic indexing: ints and slices).
- A host read raises ``DataDependentOutputException``; reads through ``item``, ``tolist``,
  ``__bool__``, ``__float__``, ``__int__`` are counted and answered with ``Watch.value`` (NaN: a
  non-finite step), one per call; a read inside C++ (``aten._local_scalar_dense``, e.g. a
  0-dim tensor given where an op takes a ``Scalar``) is counted as hidden.
- Device propagation of ``_foreach_*``/``_fused_*`` ops does not compare the lists' devices;
  ``Watch`` does, as the CUDA kernels do (a 0-dim CPU tensor is allowed where a kernel allows it).
- ``FakeTensor`` is a tensor subclass, which the native backend's ``_adamw.usable`` rejects (right
  for DTensor and the like): the tests let it pass for FakeTensor.

Not run here: the compiled backend (``fused=True``). torch 2.13 compiles nothing under a dispatch mode:
"torch.compile with fullgraph=True found no compiled frames. Skipped frames: - _statistics_1d
(kprodigy/functional/_fused.py:40): non-infra torch dispatch mode present, this is not supported
today in torch.compile"; and trying leaves dynamo unable to trace a later test's compiled step
even after ``torch._dynamo.reset()``. benchmarks/gpu_check.sh runs it on a GPU. What the tests
check of it: ``fused=None`` never chooses it, and ``fused=True`` without a compiler says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import kprodigy.functional as KF
from kprodigy import KProdigy
from kprodigy.functional import _adamw, _factored, _foreach, _fused, _single

READS = ("item", "tolist", "__bool__", "__float__", "__int__")
aten = torch.ops.aten


def _where() -> str:
    """The innermost kprodigy line on the stack."""
    frames = [(f.filename.replace("\\", "/"), f) for f in traceback.extract_stack()]
    mine = [(name.split("/kprodigy/")[-1], f) for name, f in frames if "/kprodigy/" in name]
    return f"{mine[-1][0]}:{mine[-1][1].lineno} {mine[-1][1].line}" if mine else "?"


def _basic_index(x: Tensor, index: Any) -> Tensor:
    out, dim = x, 0
    for i in index if isinstance(index, tuple) else (index,):
        if isinstance(i, bool) or not isinstance(i, (int, slice)):
            raise NotImplementedError(f"fake CUDA indexing takes ints and slices, got {type(i).__name__}")
        if isinstance(i, int):
            out = aten.select.int(out, dim, i)
        else:
            out, dim = aten.slice.Tensor(out, dim, i.start, i.stop, 1 if i.step is None else i.step), dim + 1
    return out


def _on_fake_device(*ts: Any) -> bool:
    return any(isinstance(t, FakeTensor) and t.device.type != "cpu" for t in ts)


class _Bindings(TorchFunctionMode):
    """Python bindings that take a CUDA device guard, run as their aten ops."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is Tensor.__getitem__ and _on_fake_device(args[0]):
            return _basic_index(*args)
        if func is Tensor.__invert__ and _on_fake_device(args[0]):
            return aten.bitwise_not.default(args[0])
        if func is Tensor.copy_ and _on_fake_device(*args[:2]):
            src = args[1]
            if not isinstance(src, Tensor):  # a Python number: a CPU tensor copied to the device
                src = torch.scalar_tensor(src, dtype=torch.float64 if isinstance(src, float) else torch.int64)
            return aten.copy_.default(args[0], src, *args[2:], **kwargs)
        return func(*args, **kwargs)


class Watch(TorchDispatchMode):
    """Counts host reads (``reads``: Python ones; ``hidden``: in C++, with where), cross-device
    copies (``copies``) and checks the devices of multi-tensor ops; ``value``: what a read returns."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.value, self.reads = value, 0
        self.hidden: list[str] = []
        self.copies: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self.hidden.append(_where())
            t = args[0]
            return True if t.dtype == torch.bool else self.value if t.dtype.is_floating_point else 1
        if func is aten._to_copy.default and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type != args[0].device.type:
                self.copies.append(f"{args[0].device} -> {kwargs['device']} at {_where()}")
        if func is aten.copy_.default and args[0].device.type != args[1].device.type:
            self.copies.append(f"{args[1].device} -> {args[0].device} at {_where()}")
        name = func.overloadpacket.__name__
        if name.startswith(("_foreach_", "_fused_")):
            self._check_devices(name, [a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple))])
        return func(*args, **kwargs)

    def _check_devices(self, name: str, lists: list[Any]) -> None:
        lists = [xs for xs in lists if xs and isinstance(xs[0], Tensor)]
        for xs in lists[1:]:
            for x, y in zip(lists[0], xs):
                cpu_scalar = name.startswith("_foreach_") and y.device.type == "cpu" and y.dim() == 0
                if y.device != x.device and not cpu_scalar:
                    raise RuntimeError(f"{name}: tensors on {x.device} and {y.device} at {_where()}")

    @contextlib.contextmanager
    def counting(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """Python host reads of fake tensors counted and answered."""
        with monkeypatch.context() as patch:
            for name in READS:
                original = getattr(Tensor, name)

                def read(t: Tensor, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                    if not isinstance(t, FakeTensor):
                        return _original(t, *args, **kwargs)
                    self.reads += 1
                    v = self.value
                    if _name == "tolist":
                        return _nested(list(t.shape), v)
                    return bool(v) if _name == "__bool__" else int(v) if _name == "__int__" else v

                patch.setattr(Tensor, name, read)
                if name in FakeTensor.__dict__:  # (FakeTensor.tolist: item() per element)
                    patch.setattr(FakeTensor, name, read)
            yield

    def total(self) -> int:
        return self.reads + len(self.hidden)


def _nested(shape: list[int], v: Any) -> Any:
    return v if not shape else [_nested(shape[1:], v) for _ in range(shape[0])]


@contextlib.contextmanager
def fake_cuda(monkeypatch: pytest.MonkeyPatch, value: float = 1.0) -> Iterator[Watch]:
    """Fake CUDA tensors, host reads counted (``Watch``), the compile probe not run (a fresh
    ``_fused`` status: no compiler here unless a test says otherwise)."""
    monkeypatch.setattr(_adamw, "Tensor", FakeTensor)  # (``usable``: FakeTensor as a plain tensor)
    monkeypatch.setattr(_fused, "_STATUS", {"cuda": "not probed under FakeTensorMode"})
    monkeypatch.setattr(_fused, "_WARNED", set())
    watch = Watch(value)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor", UserWarning)  # (flat_span)
        with FakeTensorMode(), watch, _Bindings(), watch.counting(monkeypatch):
            yield watch


SHAPES = [(40, 30), (30,), (300, 300), (7,)]  # small (packed state), a large one (sliced buckets)


def _model() -> tuple[list[torch.nn.Parameter], list[dict[str, Any]]]:
    """Params on the fake CUDA device in three groups (three D-groups with ``independent_d``)."""
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    return ps, [{"params": ps[:2]}, {"params": ps[2:3], "lr": 0.5}, {"params": ps[3:]}]


def _steps(opt: KProdigy, ps: list[Tensor], watch: Watch, n: int) -> list[tuple[int, list[str], list[str]]]:
    """``n`` steps on fresh gradients: per step (Python reads, hidden reads, copies)."""
    out = []
    for _ in range(n):
        for p in ps:
            p.grad = torch.randn_like(p)
        reads, hidden, copies = watch.reads, len(watch.hidden), len(watch.copies)
        opt.step()
        out.append((watch.reads - reads, watch.hidden[hidden:], watch.copies[copies:]))
    return out


def _backends(opt: KProdigy) -> set[Any]:
    assert opt._kept is not None
    return {part.backend for members in opt._kept.plan.d_groups for m in members for part in m.parts}


def _assert_on_device(opt: KProdigy, capturable: bool) -> None:
    """Every state tensor on the params' device; the D keys Python numbers, or (capturable)
    0-dim tensors there."""
    for p, st in opt.state.items():
        for key, t in st.items():
            if isinstance(t, Tensor):
                assert t.device == p.device, (key, t.device)
    for g in opt.param_groups:
        for key in ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k", "skipped_steps"):
            if capturable:
                assert isinstance(g[key], Tensor) and g[key].device.type == "cuda" and g[key].dim() == 0, key
            else:
                assert isinstance(g[key], (int, float)), (key, type(g[key]))


DEFAULT_PATHS: dict[str, tuple[dict[str, Any], Any]] = {
    "native (fused AdamW)": ({}, _adamw),
    "native slice_p d_update_freq": ({"slice_p": 3, "d_update_freq": 2}, _adamw),
    "native betas0=0 coupled maximize": (
        {"betas": (0.0, 0.99), "weight_decay": 0.1, "decouple": False, "maximize": True},
        _adamw,
    ),
    "native d_ratio_cap bias_correction": ({"d_ratio_cap": 2.0, "use_bias_correction": True}, _adamw),
    "foreach": ({"foreach": True}, _foreach),
    "per-tensor": ({"foreach": False}, _single),
    "factored": ({"factored": True}, _factored),
}


@pytest.mark.parametrize("name", list(DEFAULT_PATHS))
@pytest.mark.parametrize("independent_d", [True, False], ids=["3 D-groups", "1 D-group"])
def test_default_step_reads_the_host_once(monkeypatch: pytest.MonkeyPatch, name: str, independent_d: bool) -> None:
    """Default mode on CUDA: the path's backend steps; one host read per step for all D-groups
    (the first step also reads each param once: ``p0`` compact for an all-zero param); no copy
    between host and device; state and D keys where they belong."""
    flags, backend = DEFAULT_PATHS[name]
    with fake_cuda(monkeypatch) as watch:
        ps, groups = _model()
        opt = KProdigy(groups, independent_d=independent_d, **flags)
        counts = _steps(opt, ps, watch, 4)
        assert counts[0][0] == len(ps) + 1 and not counts[0][1]
        assert counts[1:] == [(1, [], [])] * 3
        assert backend in _backends(opt)
        _assert_on_device(opt, capturable=False)
        assert [g["k"] for g in opt.param_groups] == [4] * 3


CAPTURABLE_PATHS: dict[str, dict[str, Any]] = {
    "foreach": {},
    "per-tensor": {"foreach": False},
    "3 D-groups, d_update_freq, d_ratio_cap": {"independent_d": True, "d_update_freq": 2, "d_ratio_cap": 2.0},
    "slice_p, betas0=0, coupled decay": {"slice_p": 3, "betas": (0.0, 0.99), "weight_decay": 0.1, "decouple": False},
    "factored, bias_correction": {"factored": True, "use_bias_correction": True},
}


@pytest.mark.parametrize("name", list(CAPTURABLE_PATHS))
def test_capturable_step_reads_nothing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``capturable=True`` on CUDA: after the first step no host read (not even one in C++), no
    copy between host and device (a synchronising copy; both illegal in CUDA graph capture); D
    keys and ``step`` 0-dim tensors on the device."""
    with fake_cuda(monkeypatch) as watch:
        ps, groups = _model()
        opt = KProdigy(groups, capturable=True, **CAPTURABLE_PATHS[name])
        counts = _steps(opt, ps, watch, 4)
        assert counts[1:] == [(0, [], [])] * 3
        _assert_on_device(opt, capturable=True)


@pytest.mark.parametrize("flags", [{}, {"capturable": True}, {"slice_p": 2, "foreach": False}], ids=str)
def test_step_parameter_reads_the_host_once(monkeypatch: pytest.MonkeyPatch, flags: dict[str, Any]) -> None:
    """``step_parameter`` per param (a fused backward pass), then ``finalize_step``, with three
    D-groups: one host read per step for all of them (none with ``capturable``), no copy."""
    with fake_cuda(monkeypatch) as watch:
        ps, groups = _model()
        opt = KProdigy(groups, independent_d=True, **flags)
        counts = []
        for _ in range(3):
            before = watch.reads, len(watch.hidden), len(watch.copies)
            for p in ps:
                p.grad = torch.randn_like(p)
                opt.step_parameter(p)
                p.grad = None
            opt.finalize_step()
            counts.append((watch.reads - before[0], watch.hidden[before[1] :], watch.copies[before[2] :]))
        assert counts[1:] == [(0 if flags.get("capturable") else 1, [], [])] * 2
        _assert_on_device(opt, capturable=bool(flags.get("capturable")))
        if not flags.get("capturable"):
            assert [g["k"] for g in opt.param_groups] == [3] * 3


@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"foreach": False}, {"slice_p": 3}], ids=str)
def test_nonfinite_step_is_skipped(monkeypatch: pytest.MonkeyPatch, flags: dict[str, Any]) -> None:
    """Default mode, the host read answering NaN (a non-finite gradient): every D-group skips
    (``skipped_steps``, ``k`` kept), still with one read per step. (With ``capturable`` the skip is
    a select on the device, run on every step: the tests above run it.)"""
    with fake_cuda(monkeypatch, value=math.nan) as watch:
        ps, groups = _model()
        opt = KProdigy(groups, independent_d=True, **flags)
        with pytest.warns(UserWarning, match="skipped a step"):
            counts = _steps(opt, ps, watch, 3)
        assert counts[1:] == [(1, [], [])] * 2
        assert [(g["k"], g["skipped_steps"]) for g in opt.param_groups] == [(0, 3)] * 3
        _assert_on_device(opt, capturable=False)


@pytest.mark.parametrize("in_place", [False, True], ids=["step", "step_"])
@pytest.mark.parametrize("flags", [{}, {"foreach": False}], ids=["auto", "per-tensor"])
def test_functional_step(monkeypatch: pytest.MonkeyPatch, in_place: bool, flags: dict[str, Any]) -> None:
    """``kprodigy.functional.step``/``step_`` on CUDA tensors: D on the device, no host read after
    ``init_state`` (which reads each param once), no copy between host and device, new tensors on
    the device."""
    with fake_cuda(monkeypatch) as watch:
        params = {"w": torch.randn(40, 30, device="cuda"), "b": torch.randn(30, device="cuda")}
        hp = KF.Hyperparams(slice_p=2)
        state = KF.init_state(params, hp)
        reads, copies = watch.total(), len(watch.copies)
        for _ in range(3):
            grads = {k: torch.randn_like(v) for k, v in params.items()}
            if in_place:
                state = KF.step_(params, grads, state, hp, **flags)
            else:
                params, state = KF.step(params, grads, state, hp, **flags)
        assert (watch.total(), len(watch.copies)) == (reads, copies), (watch.hidden, watch.copies)
        tensors = [
            *params.values(),
            *(t for key in ("exp_avg", "exp_avg_sq", "s", "p0") for t in getattr(state, key).values()),
        ]
        assert all(t.device.type == "cuda" for t in tensors)
        d = [getattr(state.d, f.name) for f in dataclasses.fields(state.d)]
        assert all(isinstance(x, Tensor) and x.device.type == "cuda" and x.dim() == 0 for x in d), d


@pytest.mark.parametrize("flags", [{}, {"capturable": True}, {"factored": True, "slice_p": 3}], ids=str)
def test_cpu_checkpoint_loads_onto_cuda(monkeypatch: pytest.MonkeyPatch, flags: dict[str, Any]) -> None:
    """A checkpoint saved on CPU, loaded into an optimizer of CUDA params: the state moves to the
    device, the steps after it read the host as a steady step does (none with ``capturable``)."""
    with fake_cuda(monkeypatch) as watch:
        cpu = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
        saved = KProdigy([{"params": cpu[:2]}, {"params": cpu[2:]}], **flags)
        _steps(saved, cpu, watch, 2)
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
        opt = KProdigy([{"params": ps[:2]}, {"params": ps[2:]}], **flags)
        opt.load_state_dict(saved.state_dict())
        _assert_on_device(opt, capturable=bool(flags.get("capturable")))
        counts = _steps(opt, ps, watch, 2)
        assert counts == [(0 if flags.get("capturable") else 1, [], [])] * 2
        _assert_on_device(opt, capturable=bool(flags.get("capturable")))


BIG = (1 << 10, 1 << 10)  # a group of 2^20 elements: fused=None compiled it before 0.7


def _no_compiler(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("Cannot find a working triton installation (faked: no compiler)")


def test_fused_none_never_compiles_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused=None`` on a CUDA group of 2^20 elements takes the native path and never probes a
    compiler (Windows has no Triton; the first step costs what later ones cost), with no warning
    and one host read per step."""
    with fake_cuda(monkeypatch) as watch:
        monkeypatch.setattr(_fused, "_STATUS", {})
        monkeypatch.setattr(torch, "compile", _no_compiler)
        ps = [torch.nn.Parameter(torch.randn(BIG, device="cuda")), torch.nn.Parameter(torch.randn(30, device="cuda"))]
        opt = KProdigy(ps)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            counts = _steps(opt, ps, watch, 3)
        assert not [str(w.message) for w in record if "FakeTensor" not in str(w.message)]
        assert counts[1:] == [(1, [], [])] * 2
        assert _backends(opt) == {_adamw}
        assert _fused._STATUS == {}  # no compiler probed
        _assert_on_device(opt, capturable=False)


def test_channels_last_params_take_the_native_path_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """channels_last conv weights beside contiguous params: the fused-AdamW backend (their rows in
    one bucket per tensor on CUDA, copied in logical order for the statistics), one host read per
    step, state on the device, the layout kept."""
    with fake_cuda(monkeypatch) as watch:
        shapes = [(16, 8, 3, 3), (16,), (64, 32, 5, 5)]
        xs = [torch.randn(s, device="cuda") for s in shapes]
        ps = [torch.nn.Parameter(x.to(memory_format=torch.channels_last) if x.dim() == 4 else x) for x in xs]
        opt = KProdigy(ps)
        counts = _steps(opt, ps, watch, 3)
        assert counts[1:] == [(1, [], [])] * 2
        assert _backends(opt) == {_adamw}
        assert opt.state[ps[2]]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
        _assert_on_device(opt, capturable=False)


def test_fused_true_without_a_compiler_warns_and_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused=True`` without a compiler: one RuntimeWarning naming the cause, then foreach."""
    with fake_cuda(monkeypatch) as watch:
        monkeypatch.setattr(_fused, "_STATUS", {})
        monkeypatch.setattr(torch, "compile", _no_compiler)
        ps, groups = _model()
        opt = KProdigy(groups, fused=True)
        with pytest.warns(RuntimeWarning, match="fused step unavailable on cuda.*triton") as record:
            counts = _steps(opt, ps, watch, 3)
        assert len([w for w in record if "fused step unavailable" in str(w.message)]) == 1
        assert counts[1:] == [(1, [], [])] * 2
        assert _backends(opt) == {_foreach}


def test_the_harness_sees_hidden_reads_copies_and_device_mismatches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above can fail: a 0-dim tensor taken as a ``Scalar`` (a hidden read), a copy
    from the host, a CPU tensor in a multi-tensor op or in a CUDA op, a Python read."""
    with fake_cuda(monkeypatch) as watch:
        x, t = torch.randn(4, device="cuda"), torch.full((), 2.0, device="cuda")
        torch._foreach_add_([x], t)  # the Python binding picks the Scalar overload: t.item()
        assert len(watch.hidden) == 1
        x.copy_(torch.ones(4))
        torch.tensor(2.0, device="cuda")  # made on the host, copied
        assert len(watch.copies) == 2
        with pytest.raises(RuntimeError, match="tensors on cuda:0 and cpu"):
            torch._foreach_mul_([x], [torch.ones(4)])
        with pytest.raises(RuntimeError, match="devices"):
            x.add_(torch.ones(4))
        assert float(x.sum()) == 1.0 and watch.reads == 1
