"""The layout of the per-tensor state: which state tensors lie back to back in one buffer.

The compiled kernels (``_fused``) and the native path's buckets (``_native``) step the state of
a run of small params on one flat buffer per key instead of gathering copies; the state entries
stay views of it (shaped as their params), so checkpoints and users see ordinary tensors.
"""

from __future__ import annotations

from typing import Any

from ._fused import flat_span, pack

__all__ = ["STATE_KEYS", "pack_states"]

STATE_KEYS = ("exp_avg", "exp_avg_sq", "s", "p0")  # the per-tensor state laid flat (``step`` is not)


def pack_states(states: list[dict[str, Any]]) -> None:
    """Lay each of ``exp_avg``, ``exp_avg_sq``, ``s`` and ``p0`` of these param states back to back
    in one new buffer (values unchanged) unless it already is, so that a kernel steps them on the
    buffer itself (``flat_span``): the layout of the fused path's small params and of the
    native path's buckets. A compact (0-dim) ``p0`` (all-zero param, e.g. LoRA B) stays compact:
    memory first (the kernels gather or copy it)."""
    for key in STATE_KEYS:
        if len(states) < 2 or not all(key in st for st in states):
            continue
        ts = [st[key] for st in states]
        if key == "p0" and any(t.dim() == 0 for t in ts):
            continue
        if flat_span(ts) is None:
            for st, packed in zip(states, pack(ts)):
                st[key] = packed
