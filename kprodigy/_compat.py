"""Every difference between the torch releases K-Prodigy supports (2.7.1 and newer), in one place.

The library is written against the newest torch; the recent APIs it uses are reached through this
module where the oldest supported release lacks them (checked on the wheels of torch 2.7.1, 2.8.0
and 2.15.0):

- ``tree_is_leaf``: ``torch.utils._pytree.tree_is_leaf`` (from 2.8; ``_is_leaf`` in 2.7).
- ``compiler_disable``: ``torch.compiler.disable(reason=...)`` (the keyword is from 2.8).

Why not older releases (measured by ``scripts/compat.sh``'s suite, see
``benchmarks/results/compat.md``): on torch 2.6.0 dynamo cannot trace ``dataclasses.replace``
(the functional step under ``torch.compile(fullgraph=True)``) and FSDP2's ``fully_shard`` fails on
CPU; on 2.4.1 the compiled kernels of ``fused=True`` fail to trace a 0-dim tensor ``value=``, and
``register_dataclass`` and the public ``DTensor`` are missing.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["compiler_disable", "tree_is_leaf"]


def tree_is_leaf(tree: Any) -> bool:
    """Whether ``tree`` is a pytree leaf (not a registered container)."""
    fn = getattr(pytree, "tree_is_leaf", None) or pytree._is_leaf
    return bool(fn(tree))


_DISABLE_TAKES_REASON = "reason" in inspect.signature(torch.compiler.disable).parameters


def compiler_disable(*, reason: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``torch.compiler.disable(reason=reason)`` as a decorator of a function or a method.

    Where torch does not take ``reason`` (before 2.8) the reason is dropped, and the disabled
    function is called from a plain wrapper (torch 2.6 called a disabled method reached through
    ``torch.compile(obj.method)`` without its ``self``).
    """
    if _DISABLE_TAKES_REASON:
        return torch.compiler.disable(reason=reason)  # type: ignore[call-arg]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        disabled = torch.compiler.disable(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            return disabled(*args, **kwargs)

        return call

    return decorate
