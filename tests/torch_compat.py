"""What the tests need from torch that older releases spell differently (the library's own shims
are in ``kprodigy/_compat.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def fail_on_recompile() -> Iterator[None]:
    """Any recompilation inside raises: ``torch.compiler.set_stance("fail_on_recompile")`` (torch
    2.6+), ``torch._dynamo.config.error_on_recompile`` before."""
    if hasattr(torch.compiler, "set_stance"):
        with torch.compiler.set_stance("fail_on_recompile"):
            yield
        return
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def fully_shard():  # type: ignore[no-untyped-def]
    """FSDP2's ``fully_shard`` (``torch.distributed.fsdp`` from torch 2.6, ``_composable`` before)."""
    try:
        from torch.distributed.fsdp import fully_shard as fn
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard as fn
    return fn
