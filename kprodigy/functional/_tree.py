"""Pytree boundary of the functional step: params as a list, a dict or any pytree of tensors.

The core works on lists; these wrappers flatten the params at the boundary and give the per-tensor
state fields the params' structure (params ``{"w": W, "b": b}``: ``exp_avg == {"w": m_W, "b":
m_b}``). Mirroring, not storing a treespec, keeps the state a plain pytree that ``vmap``,
``torch.compile`` and ``torch.save`` see through, and checkpoints readable by name.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .. import _compat
from . import _compact, _engine, _formats, _state
from ._hyperparams import Hyperparams
from ._single import Ts
from ._state import STATE_KEYS, Segment, SegmentResult, State, check_state

__all__ = ["init_ensemble_state", "init_state", "step", "step_"]

PyTree = Any  # a tensor, or a list/tuple/dict/registered pytree node of tensors
Flag = bool | None  # foreach, fused: None is automatic
Plan = _engine.Plan | None


def init_state(params: PyTree, hparams: Hyperparams, *, compact_p0: bool = True) -> State:
    """Initial state for ``params``, a pytree of tensors sharing one D (e.g.
    ``dict(model.named_parameters())``), whose structure the per-tensor fields mirror.
    ``compact_p0``: ``p0`` of an all-zero tensor a 0-dim zero (not inside ``torch.func.vmap``)."""
    leaves, spec = _flatten(params, "params")
    flat = _state.init_state(leaves, hparams, compact_p0=compact_p0)
    return _unflatten_state(flat, spec)


def init_ensemble_state(params: PyTree, hparams: Hyperparams, *, compact_p0: bool = True) -> State:
    """State of an ensemble of N models, for ``torch.func.vmap(step)``: one D per member.

    params: pytree of stacked tensors, each ``(N, *member_shape)`` (e.g. from
        ``torch.func.stack_module_state``); the state's tensors lead with N, the D fields are ``(N,)``.
    compact_p0: ``p0`` of shape ``(N,)`` for a tensor all zeros in every member.
    State is float32 ("auto" included: the compact formats do not run under ``vmap``).
    """
    if hparams.state_precision not in ("auto", "float32"):
        raise ValueError(_compact.UNDER_TRANSFORMS.format(hparams.state_precision))
    hparams = replace(hparams, state_precision="float32")
    leaves, spec = _flatten(params, "params")
    sizes = {x.shape[0] if x.dim() > 0 else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = [tuple(x.shape) for x in leaves]
        raise ValueError(
            f"init_ensemble_state needs tensors stacked along a leading ensemble dimension of one size N; "
            f"got shapes {shapes}"
        )
    flat = torch.func.vmap(lambda xs: _state.init_state(xs, hparams, compact_p0=False))(leaves)
    # vmap expands outputs that do not depend on the input (the D state) with stride 0: copy them
    flat = replace(flat, d=pytree.tree_map(lambda t: t.contiguous(), flat.d))
    if compact_p0:
        p0 = [p.new_zeros(p.shape[:1]) if not bool(x.any()) else p for x, p in zip(leaves, flat.p0)]
        flat = replace(flat, p0=p0)
    return _unflatten_state(flat, spec)


def step(
    params: PyTree,
    grads: PyTree,
    state: State,
    hparams: Hyperparams,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> tuple[PyTree, State]:
    """One pure K-Prodigy step over ``params``, a pytree of tensors sharing one D.

    params, grads: pytrees of one structure (grads shaped like their params), e.g. the dict given
        to ``torch.func.functional_call`` and the dict ``torch.func.grad`` returns for it
    state: from ``init_state(params, ...)`` or a previous ``step``
    Returns (new_params, new_state) in the structure of ``params``; no input is written to.
    """
    leaves, gleaves, flat, spec = _flatten_step(params, grads, state)
    new_leaves, new_flat, _ = _step_lists(leaves, gleaves, flat, hparams, foreach=foreach, fused=fused, pure=True)
    return _tree_unflatten(new_leaves, spec), _unflatten_state(new_flat, spec)


def step_(
    params: PyTree,
    grads: PyTree,
    state: State,
    hparams: Hyperparams,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> State:
    """One K-Prodigy step in place (params, state tensors, D tensors), at the speed of the ``KProdigy``
    class, for loops that need no pure step; arguments as ``step``. Returns the state to use next:
    ``state`` itself, except on a first call that lays the small params' state flat (as the class
    keeps it) or creates ``exp_avg`` (betas[0] raised from 0). The step's plan is kept with that
    state while its tensors and the settings that shape it stay."""
    leaves, gleaves, flat, spec = _flatten_step(params, grads, state)
    sig = _signature(leaves, gleaves, flat, hparams, foreach, fused)
    kept = _KEPT.get(id(state))
    plan = kept[1] if kept is not None and kept[0] == sig else None
    _, new_flat, plan = _step_lists(leaves, gleaves, flat, hparams, foreach=foreach, fused=fused, plan=plan)
    new_tensors = any(a is not b for a, b in zip(_state_leaves(new_flat), _state_leaves(flat)))
    if new_tensors or flat.exp_avg is None and new_flat.exp_avg:
        return _unflatten_state(new_flat, spec)  # new state tensors: kept from the next call on
    if isinstance(state.d.d, Tensor):
        state.d.assign(new_flat.d)
        if kept is None:  # one finalizer per state object, however often its plan is rebuilt
            weakref.finalize(state, _KEPT.pop, id(state), None)
        if kept is None or kept[1] is not plan:
            _KEPT[id(state)] = (sig, plan)
        return state
    return replace(state, d=new_flat.d)


_KEPT: dict[int, tuple[tuple[Any, ...], _engine.Plan]] = {}  # id(State) -> (signature, plan) of its in-place steps


def _signature(params: Ts, grads: Ts, state: State, hp: Hyperparams, foreach: Flag, fused: Flag) -> tuple[Any, ...]:
    """What a kept plan of ``step_`` was built from: the tensors (and their storage: ``x.data = ...``
    swaps it), the gradients' layout, grad mode, the flags and the settings that choose the backend
    and lay the state out."""
    layout = tuple((g.dtype, g.device, g.shape, g.is_contiguous(), x.requires_grad) for x, g in zip(params, grads))
    ids = tuple(map(id, params)), tuple(x.data_ptr() for x in params), tuple(map(id, _state_leaves(state)))
    return ids, layout, torch.is_grad_enabled(), foreach, fused, hp.slice_p, hp.betas[0] > 0, hp.stochastic_rounding


def _state_leaves(state: State) -> list[Tensor]:
    return [t for name in STATE_KEYS for t in getattr(state, name) or []]


def _step_lists(
    xs: Ts, gs: Ts, state: State, hp: Hyperparams, *, foreach: Flag, fused: Flag, pure: bool = False, plan: Plan = None
) -> tuple[list[Tensor], State, _engine.Plan]:
    """The step over lists (one D-group of one member): new tensors (``pure``) or in place, on a
    kept ``plan`` (its hyperparameters refreshed) or a new one."""
    if plan is not None and not torch.compiler.is_compiling():
        on_host = plan.on_host  # (``step_``'s signature holds what decides it: devices, grad mode, the tensors)
    else:
        on_host = len(xs) > 0 and _engine.d_on_host([*xs, *gs, *(t for t in [state.d.d] if isinstance(t, Tensor))])
    if plan is None or plan.on_host != on_host:
        _check_grads(xs, gs)
        exp_avg = state.exp_avg
        if hp.betas[0] > 0 and exp_avg is None:  # betas[0] raised from 0: the class's rule
            exp_avg = [_formats.zeros(x, "exp_avg", hp.state_precision) for x in xs]
        seg = Segment(xs, gs, exp_avg if hp.betas[0] > 0 else None, state.exp_avg_sq, state.s, state.p0, hp)
        plan = _engine.build([[seg]], on_host=on_host, foreach=[foreach], fused=[fused], pure=pure)
    elif plan.d_groups[0][0].seg.hparams is not hp:
        _engine.refresh(plan.d_groups[0][0], hp)
    ds = state.d.on_host() if on_host else state.d
    results, (new_d,) = _engine.step(plan, [[gs]], [ds])
    if on_host and isinstance(state.d.d, Tensor):
        new_d = new_d.on_device(state.d.d.device, state.d.d.dtype)
    laid = plan.d_groups[0][0].seg
    m, v, s = laid.exp_avg, laid.exp_avg_sq, laid.s
    res = results[0][0] if plan.pure else SegmentResult(list(laid.params), m, v, s)  # type: ignore[arg-type]
    new_m = res.exp_avg if hp.betas[0] > 0 else state.exp_avg  # (kept untouched while betas[0] == 0)
    return res.params, State(exp_avg=new_m, exp_avg_sq=res.exp_avg_sq, s=res.s, p0=list(laid.p0), d=new_d), plan


def _check_grads(params: Ts, grads: Ts) -> None:
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads; expected one grad per param")
    for i, (x, g) in enumerate(zip(params, grads)):
        if g.shape != x.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(x.shape)}")
        if g.layout != torch.strided:
            raise ValueError(f"grads[{i}] is {g.layout}; K-Prodigy needs dense gradients")
        if x.is_complex() or g.is_complex():
            raise ValueError(f"params[{i}] or grads[{i}] is complex; view them as real with torch.view_as_real")
        if not x.is_floating_point() or g.dtype != x.dtype:
            raise ValueError(f"grads[{i}] has dtype {g.dtype} and params[{i}] {x.dtype}; expected one floating dtype")
        if g.device != x.device:
            raise ValueError(f"grads[{i}] is on {g.device} but params[{i}] on {x.device}")


_FLAT_SPECS: dict[tuple[type, int], pytree.TreeSpec] = {}  # the spec of a list or tuple of n tensors


def _tree_flatten(tree: Any) -> tuple[list[Any], pytree.TreeSpec]:
    """``pytree.tree_flatten``; a list or tuple of tensors (the common case) without walking it,
    its spec made once per type and length (300 leaves: pytree's walk was a tenth of a pure step)."""
    if torch.compiler.is_compiling():  # (no global cache in a traced graph)
        return pytree.tree_flatten(tree)
    if type(tree) in (list, tuple) and all(isinstance(t, Tensor) for t in tree):
        key = (type(tree), len(tree))
        spec = _FLAT_SPECS.get(key)
        if spec is None:
            if len(_FLAT_SPECS) >= 64:
                _FLAT_SPECS.clear()
            spec = _FLAT_SPECS[key] = pytree.tree_flatten(tree)[1]
        return list(tree), spec
    return pytree.tree_flatten(tree)


def _tree_unflatten(leaves: list[Any], spec: pytree.TreeSpec) -> Any:
    """``pytree.tree_unflatten``; for a spec of ``_tree_flatten``'s cache, the list or tuple."""
    if not torch.compiler.is_compiling() and _FLAT_SPECS.get((spec.type, len(leaves))) is spec:
        return spec.type(leaves)
    return pytree.tree_unflatten(leaves, spec)


def _same(a: pytree.TreeSpec, b: pytree.TreeSpec) -> bool:
    return a is b or a == b


def _flatten(tree: PyTree, what: str) -> tuple[list[Tensor], pytree.TreeSpec]:
    if not isinstance(tree, Tensor) and _compat.tree_is_leaf(tree) and hasattr(tree, "__iter__"):
        tree = list(tree)  # an iterator such as model.parameters()
    leaves, spec = _tree_flatten(tree)
    if not all(isinstance(leaf, Tensor) for leaf in leaves):  # name the first culprit by its path
        path, leaf = next((p, x) for p, x in pytree.tree_flatten_with_path(tree)[0] if not isinstance(x, Tensor))
        raise TypeError(f"{what}{pytree.keystr(path)} is a {type(leaf).__name__}; expected a tensor")
    return leaves, spec


def _flatten_step(params: PyTree, grads: PyTree, state: State) -> tuple[list[Tensor], list[Tensor], State, Any]:
    """The leaves of ``params`` and ``grads``, the core's list ``State`` of ``state``, and the
    params' structure, which the grads and the state's fields must have (else a clear error)."""
    leaves, spec = _flatten(params, "params")
    gleaves, gspec = _flatten(grads, "grads")
    if not _same(gspec, spec):
        raise ValueError(
            f"grads have structure {_describe(gspec)} but params have structure {_describe(spec)}; "
            "expected one grad per param, in the same structure"
        )
    check_state(state)
    fields: dict[str, list[Tensor] | None] = {}
    for name in STATE_KEYS:
        value = getattr(state, name)
        if value is None:  # exp_avg where betas[0] == 0
            fields[name] = None
            continue
        fields[name], fspec = _tree_flatten(value)
        if not _same(fspec, spec):
            raise ValueError(
                f"state.{name} has structure {_describe(fspec)} but params have structure {_describe(spec)}; "
                "the state must come from init_state(params) of the same structure"
            )
    return leaves, gleaves, State(d=state.d, **fields), spec  # type: ignore[arg-type]


def _unflatten_state(flat: State, spec: pytree.TreeSpec) -> State:
    fields: dict[str, Any] = {}
    for name in STATE_KEYS:
        fields[name] = None if (leaves := getattr(flat, name)) is None else _tree_unflatten(leaves, spec)
    return State(d=flat.d, **fields)


def _describe(spec: pytree.TreeSpec) -> str:
    text = str(spec)
    return text if len(text) <= 200 else text[:200] + "..."
