"""Every difference between the torch versions K-Prodigy supports, in one place.

The library is written against the newest torch; the private or recent APIs it uses are reached
through this module, which falls back to what older releases have. What each shim covers, and the
oldest release that has the API itself (checked on the wheels of torch 2.4.1, 2.6.0 and 2.15.0):

- ``register_dataclass``: ``torch.utils._pytree.register_dataclass`` (not in 2.6.0); older releases
  get the same node from ``register_pytree_node`` with the dataclass fields as children.
- ``tree_is_leaf``: ``torch.utils._pytree.tree_is_leaf`` (not in 2.6.0; ``_is_leaf`` before).
- ``compiler_disable``: ``torch.compiler.disable(reason=...)`` (the keyword is not in 2.7.1).
- ``recompile_limit`` / ``set_recompile_limit``: ``torch._dynamo.config.recompile_limit``, called
  ``cache_size_limit`` up to 2.6.
- ``DTensor``: ``torch.distributed.tensor.DTensor`` (public from 2.5; ``torch.distributed._tensor``
  in 2.4); None only in a torch built without distributed support.

``torch._fused_adamw_`` runs on CPU from torch 2.4, the oldest release supported.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["DTensor", "compiler_disable", "recompile_limit", "register_dataclass", "set_recompile_limit",
           "tree_is_leaf"]

def register_dataclass(cls: type) -> None:
    """Register a dataclass as a pytree node whose children are its fields, in order."""
    if hasattr(pytree, "register_dataclass"):
        pytree.register_dataclass(cls)
        return
    names = [f.name for f in dataclasses.fields(cls)]

    def flatten(obj: Any) -> tuple[list[Any], Any]:
        return [getattr(obj, n) for n in names], names

    def unflatten(values: Any, context: Any) -> Any:
        return cls(**dict(zip(context, values)))

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], Any]:
        return [(pytree.GetAttrKey(n), getattr(obj, n)) for n in names], names

    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
                                flatten_with_keys_fn=flatten_with_keys)


def tree_is_leaf(tree: Any) -> bool:
    """Whether ``tree`` is a pytree leaf (not a registered container)."""
    fn = getattr(pytree, "tree_is_leaf", None) or pytree._is_leaf
    return bool(fn(tree))


_DISABLE_TAKES_REASON = "reason" in inspect.signature(torch.compiler.disable).parameters


def compiler_disable(*, reason: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``torch.compiler.disable(reason=reason)`` as a decorator of a function or a method.

    Where torch does not take ``reason`` (before 2.8) the reason is dropped, and the disabled
    function is called from a plain wrapper: torch 2.6 calls a disabled method reached through
    ``torch.compile(obj.method)`` without its ``self``.
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


def _limit_name() -> str:
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def recompile_limit() -> int:
    """dynamo's limit on recompilations per function."""
    return int(getattr(torch._dynamo.config, _limit_name()))


def set_recompile_limit(value: int) -> None:
    setattr(torch._dynamo.config, _limit_name(), value)


DTensor: Any
try:  # DTensor: FSDP2 (fully_shard) and tensor-parallel params
    from torch.distributed.tensor import DTensor
except ImportError:
    try:  # torch 2.4
        from torch.distributed._tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        DTensor = None
