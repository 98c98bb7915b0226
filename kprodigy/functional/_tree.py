"""Pytree boundary of the pure step: params as a list, a dict or any pytree of tensors.

The core (``_state.init_state``, ``_step.step``) works on lists. These wrappers flatten the
params with ``torch.utils._pytree`` at the boundary and give the per-tensor state fields
(``exp_avg``, ``exp_avg_sq``, ``s``, ``p0``) the params' own structure: for params
``{"w": W, "b": b}`` the state holds ``exp_avg == {"w": m_W, "b": m_b}``. Mirroring (rather than
storing a treespec) keeps the state a plain pytree that ``vmap``, ``torch.compile`` and
``torch.save`` see through, and keeps checkpoints readable by name. A list of params gives list
fields, exactly the core's ``State``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from .. import _compat
from . import _state
from . import _step as _core_step
from ._hyperparams import Hyperparams
from ._state import State

__all__ = ["init_ensemble_state", "init_state", "step"]

PyTree = Any  # a tensor, or a list/tuple/dict/registered pytree node of tensors

_PER_TENSOR = ("exp_avg", "exp_avg_sq", "s", "p0")


def init_state(params: PyTree, hparams: Hyperparams, *, compact_p0: bool = True) -> State:
    """Initial state for ``params``, a pytree of tensors sharing one D (e.g. ``dict(model.named_parameters())``).

    The per-tensor fields of the returned ``State`` mirror the structure of ``params``.
    compact_p0: store ``p0`` of an all-zero tensor as a 0-dim zero (default); False stores the
        full slice. Inside ``torch.func.vmap`` the full slice is always stored.
    """
    leaves, spec = _flatten(params, "params")
    flat = _state.init_state(leaves, hparams, compact_p0=compact_p0)
    return _unflatten_state(flat, spec)


def init_ensemble_state(params: PyTree, hparams: Hyperparams, *, compact_p0: bool = True) -> State:
    """State of an ensemble of N models, for ``torch.func.vmap(step)``: one D per member.

    params: pytree of stacked tensors, each ``(N, *member_shape)`` (e.g. from
        ``torch.func.stack_module_state``). Every tensor of the returned state has the leading
        dimension N; the D fields are ``(N,)``.
    compact_p0: a tensor that is all zeros in every member gets ``p0`` of shape ``(N,)`` (one zero
        per member); otherwise ``p0`` is the full ``(N, numel / slice_p)`` slice.
    """
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
    state: from ``init_state(params, ...)`` or a previous ``step``; not modified
    Returns (new_params, new_state), both in the structure of ``params``. No input is written to.
    """
    leaves, spec = _flatten(params, "params")
    gleaves, gspec = _flatten(grads, "grads")
    if gspec != spec:
        raise ValueError(
            f"grads have structure {_describe(gspec)} but params have structure {_describe(spec)}; "
            "expected one grad per param, in the same structure"
        )
    flat = _flatten_state(state, spec)
    new_leaves, new_flat = _core_step.step(leaves, gleaves, flat, hparams, foreach=foreach, fused=fused)
    return pytree.tree_unflatten(new_leaves, spec), _unflatten_state(new_flat, spec)


def _flatten(tree: PyTree, what: str) -> tuple[list[Tensor], pytree.TreeSpec]:
    if not isinstance(tree, Tensor) and _compat.tree_is_leaf(tree) and hasattr(tree, "__iter__"):
        tree = list(tree)  # an iterator such as model.parameters()
    path_leaves, spec = pytree.tree_flatten_with_path(tree)
    for path, leaf in path_leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{what}{pytree.keystr(path)} is a {type(leaf).__name__}; expected a tensor")
    return [leaf for _, leaf in path_leaves], spec


def _flatten_state(state: State, spec: pytree.TreeSpec) -> State:
    """The core's list ``State`` from a state mirroring ``spec``; a clear error if it does not."""
    if not isinstance(state, State):
        raise TypeError(f"state must be a kprodigy.functional.State, got {type(state).__name__}")
    fields: dict[str, list[Tensor] | None] = {}
    for name in _PER_TENSOR:
        value = getattr(state, name)
        if value is None:  # exp_avg when betas[0] == 0; the core checks that against hparams
            fields[name] = None
            continue
        leaves, fspec = pytree.tree_flatten(value)
        if fspec != spec:
            raise ValueError(
                f"state.{name} has structure {_describe(fspec)} but params have structure {_describe(spec)}; "
                "the state must come from init_state(params) of the same structure"
            )
        fields[name] = leaves
    return State(d=state.d, **fields)  # type: ignore[arg-type]


def _unflatten_state(flat: State, spec: pytree.TreeSpec) -> State:
    def mirror(leaves: list[Tensor] | None) -> Any:
        return None if leaves is None else pytree.tree_unflatten(leaves, spec)

    fields: dict[str, Any] = {name: mirror(getattr(flat, name)) for name in _PER_TENSOR}
    return State(d=flat.d, **fields)


def _describe(spec: pytree.TreeSpec) -> str:
    text = str(spec)
    return text if len(text) <= 200 else text[:200] + "..."
