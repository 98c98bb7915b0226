"""Shared setup of the distributed examples: gloo on CPU (nccl on GPU), a toy regression task."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def setup() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes in the environment; returns (rank, world, device)."""
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same initial params on every rank
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1)).to(device)


def batch(step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch: a different slice of the data on every rank."""
    g = torch.Generator().manual_seed(10_000 * step + rank)
    x = torch.randn(64, 32, generator=g)
    return x.to(device), x.sum(dim=1, keepdim=True).sin().to(device)


def report(rank: int, d_values: list[float], loss: float, label: str = "", names: str = "D") -> None:
    """Print every rank's D values (they must agree), after ``label`` (e.g. the step).

    ``names`` says what the values of one rank are, e.g. ``"[D of group 0, D of group 1]"``."""
    gathered: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [float(d) for d in d_values])
    if rank == 0:
        ranks = "; ".join(f"rank {r}: {', '.join(f'{d:.6g}' for d in ds or [])}" for r, ds in enumerate(gathered))
        print(f"{label + ': ' if label else ''}loss {loss:.4f}; {names} per rank: {ranks}")
