"""torch.distributed: DTensor params (FSDP2) and the all-reduce of the engine's reduction seam,
needed where ranks hold parts of the sums behind D (DTensor shards, FSDP1 flat params, ZeRO's
subsets), not where they hold whole params with averaged gradients (plain DDP).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._engine import ReduceStats
from ._hyperparams import Hyperparams
from ._state import init_tensor_state, state_dtype

try:  # DTensor: FSDP2 (fully_shard) and tensor-parallel params
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["all_reduce_stats", "enclosing_zero_group", "flat_local", "init_state", "is_dtensor", "local"]
__all__ += ["stats_reduction"]


def all_reduce_stats(group: Any = None) -> ReduceStats:
    """A ``reduce_stats`` hook: one in-place ``all_reduce(SUM)`` over ``group`` (no host sync)."""

    def reduce(stats: Tensor) -> Tensor:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        return stats

    return reduce


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2, tensor parallel)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def flat_local(t: Tensor) -> Tensor:
    """``s``/``p0`` as the kernels take them: a DTensor's local shard viewed 1-D (never a copy)."""
    return t.to_local().view(-1) if DTensor is not None and isinstance(t, DTensor) else t


def init_state(p: Tensor, hp: Hyperparams, factored: bool = False) -> dict[str, Tensor]:
    """Per-tensor state; a DTensor param's from its local shard, as DTensors laid out like it (so that
    distributed checkpoints reshard them): exp_avg, exp_avg_sq and, with slice_p == 1, ``s`` and
    ``p0`` (param-shaped, viewed 1-D by the kernels). With slice_p > 1, ``s`` and ``p0`` are plain
    per-rank tensors (torch.distributed.checkpoint would take them as replicated)."""
    if DTensor is None or not isinstance(p, DTensor):
        return init_tensor_state(p, hp, factored=factored)
    if factored:
        raise RuntimeError("factored=True does not support DTensor (FSDP2) params yet; use factored=False")
    if hp.state_precision == "int8":
        raise RuntimeError(
            "state_precision='int8' does not support DTensor (FSDP2) params yet (its blocks are not "
            "param-shaped); use state_precision='bfloat16'"
        )
    shard = p.to_local()
    state = init_tensor_state(shard, hp)
    if hp.slice_p == 1:
        state["s"], state["p0"] = torch.zeros_like(shard, dtype=state_dtype(shard.dtype, hp, "s")), shard.clone()
    for key in ("exp_avg", "exp_avg_sq") + (("s", "p0") if hp.slice_p == 1 else ()):
        if key in state:
            state[key] = DTensor.from_local(
                state[key], p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
    return state


def sharding_group(dtensors: list[Tensor]) -> Any:
    """The process group over which these DTensor params are sharded; None if none is sharded."""
    found: Any = None
    seen: set[tuple[int, tuple[Any, ...]]] = set()
    for p in dtensors:
        mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
        if (id(mesh), placements) in seen:
            continue
        seen.add((id(mesh), placements))
        dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
        if not dims:
            continue
        if len(dims) > 1:
            raise ValueError(
                f"a DTensor param is sharded over {len(dims)} mesh dimensions {placements}; KProdigy cannot "
                "choose one group for its D statistics: pass process_group= (the ranks holding disjoint shards)"
            )
        group = mesh.get_group(dims[0]) if mesh.ndim > 1 else mesh.get_group()
        if found is not None and group is not found:
            raise ValueError(
                "DTensor params are sharded over different process groups; one KProdigy sums its D "
                "statistics over one group: pass process_group= or use one optimizer per mesh"
            )
        found = group
    return found


def enclosing_zero_group() -> Any:
    """ZeroRedundancyOptimizer's process group if it is constructing this optimizer (one local
    optimizer per rank, built from its own methods: the caller frames hold that ``self``)."""
    # ZeRO can only be constructing us if its module was imported: importing it here would cost
    # every user torch.distributed.optim's import (and its deprecation warnings)
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if not dist.is_available() or module is None:
        return None
    ZeroRedundancyOptimizer = module.ZeroRedundancyOptimizer
    frame: Any = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, ZeroRedundancyOptimizer):
            return owner.process_group
        frame = frame.f_back
    return None


def stats_reduction(
    params: Sequence[Tensor], *, reduce_d_stats: bool | None, process_group: Any, forced: bool
) -> Callable[[Tensor], Tensor] | None:
    """The all-reduce of the D statistics if a step over ``params`` needs one (DTensor or FSDP1 flat
    params, a ``process_group``, ``forced`` or ``reduce_d_stats``), else None."""
    if reduce_d_stats is False or not (dist.is_available() and dist.is_initialized()):
        return None
    if process_group is not None:
        return all_reduce_stats(process_group)
    mesh_group = sharding_group([p for p in params if is_dtensor(p)])
    if mesh_group is not None:
        return all_reduce_stats(mesh_group)
    if forced or reduce_d_stats is True or any(hasattr(p, "_fsdp_flattened") for p in params):
        return all_reduce_stats(None)
    return None
