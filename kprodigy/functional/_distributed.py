"""The distributed all-reduce that plugs into the reduction seam (``reduce_stats``)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from ._step import ReduceStats

__all__ = ["all_reduce_stats"]


def all_reduce_stats(group: Any = None) -> ReduceStats:
    """A ``reduce_stats`` hook summing the packed D statistics over ``group`` (None: the default group).

    One ``all_reduce(SUM)`` on the packed 1-D tensor, in place, on its device: no host sync.
    Every rank of ``group`` must call the step the same number of times with the same packing.
    """

    def reduce(stats: Tensor) -> Tensor:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        return stats

    return reduce
