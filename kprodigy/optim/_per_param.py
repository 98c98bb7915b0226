"""Per-parameter stepping (fused backward passes) for the shell, on ``functional._partial``:
``step_parameter`` accumulates one param, ``finalize`` finishes every D-group stepped so."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..functional import _partial, _scratch
from ..functional._scalars import cap_d_ratio
from . import _diagnostics, _group_keys, _plan
from ._checks import check_d_group_agrees, check_grads, check_group, hparams

__all__ = ["Pending", "finalize", "step_parameter"]


def step_parameter(opt: Any, p: Tensor, group: dict[str, Any] | None, i: int | None) -> None:
    index = _group_index(opt, p, group, i)
    members = next(m for m in opt.d_groups() if index in m)
    pending = opt._pending.get(tuple(members))
    if pending is not None and any(q is p for q in pending.params):
        if torch._C._current_graph_task_id() != -1:  # inside backward(): params must not move now
            raise RuntimeError(
                "step_parameter got a param already stepped since the last finalize_step(), during a "
                "backward pass: the params of the previous step move in finalize_step() (with the D of "
                "that step), so call optimizer.finalize_step() (or optimizer.step()) after each backward()"
            )
        opt.finalize_step()
        pending = None
    if p.grad is None:
        return
    own = opt.param_groups[index]
    check_grads({**own, "params": [p]}, index, opt.state)  # before any change
    if pending is None:
        groups = [opt.param_groups[j] for j in members]
        for j, g in zip(members, groups):
            check_group(g, j)
        check_d_group_agrees(groups, members)
        opt._bind()
        core = _partial.Pending.start(hparams(groups[0]), _group_keys.read(groups[0]), p.device)
        pending = opt._pending[tuple(members)] = Pending(groups, core)
    if pending.core.stats.device != p.device:
        raise RuntimeError(
            f"param groups {members} share one D but hold params on {pending.core.stats.device} and {p.device}; "
            "put them on one device or give the groups different d_group labels"
        )
    seg, _ = _plan.segment(opt.state, {**own, "params": [p]})
    with _scratch.owned_by(opt._scratch()):
        _partial.accumulate(pending.core, seg, foreach=own["foreach"])
    pending.params.append(p)
    if own["lr"] > 0:
        pending.moved.append(p)


def finalize(opt: Any) -> None:
    if not opt._pending:
        return
    pending, opt._pending = opt._pending, {}
    opt._opt_called = True  # what LR schedulers check to know the optimizer stepped (as step() does)
    members = opt.d_groups()
    groups = [[opt.param_groups[i] for i in m] for m in members]
    items = [pending.get(tuple(m)) for m in members]
    old = [_group_keys.read(g[0]) if item is None else item.core.d_state for g, item in zip(groups, items)]
    new = list(old)
    reduces = [
        None if item is None or item.core.update_d is False else opt._reduce_stats(item.params) for item in items
    ]
    # D on the host and no reduction over ranks: the statistics of all those D-groups in one host read
    cores = {j: item.core for j, item in enumerate(items) if item is not None and reduces[j] is None}
    local = [j for j, core in cores.items() if not isinstance(core.d_state.d, Tensor)]
    read = dict(zip(local, _partial.read_stats([cores[j] for j in local])))
    for j, item in enumerate(items):
        # as step(): a D-group none of whose groups with lr > 0 got a gradient changes nothing, k
        # included (unless it takes part in a reduction over ranks)
        takes_part = reduces[j] is not None and any(g["lr"] > 0 for g in groups[j])
        if item is not None and (item.moved or takes_part):
            with _scratch.owned_by(opt._scratch()):
                new[j] = _partial.finish(item.core, reduces[j], read.get(j))
    new = cap_d_ratio(old, new, [any(g["lr"] > 0 for g in gs) for gs in groups], opt.d_ratio_cap)
    for gs, item, o, n in zip(groups, items, old, new):
        opt._record(gs, item.moved if item is not None else [], o, n, [hparams(g) for g in gs])
    _diagnostics.after_step(opt, [item.groups for item in pending.values()])


def _group_index(opt: Any, p: Tensor, group: dict[str, Any] | None, i: int | None) -> int:
    """The index of p's param group; ``group`` and ``i`` (OneTrainer's form) must say where p is."""
    for j, g in enumerate(opt.param_groups):
        if group is not None and g is not group:
            continue
        if i is not None and group is not None:
            if not (0 <= i < len(g["params"]) and g["params"][i] is p):
                raise ValueError(f"step_parameter: param index {i} of the given param group is not the given tensor")
            return j
        if any(q is p for q in g["params"]):
            return j
    raise ValueError("step_parameter got a tensor that is not a param of this optimizer (or of the given group)")


class Pending:
    """A D-group between ``step_parameter`` calls and ``finalize_step``."""

    def __init__(self, groups: list[dict[str, Any]], core: _partial.Pending) -> None:
        self.groups, self.core = groups, core
        self.params: list[Tensor] = []  # the params stepped so far
        self.moved: list[Tensor] = []  # those of them in groups with lr > 0
