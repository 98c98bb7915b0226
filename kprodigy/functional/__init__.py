"""Pure functional core of K-Prodigy.

``init_state(params, hparams)`` builds the state of tensors sharing one D (a list, a dict or any
pytree of tensors; the state mirrors its structure); ``step(params, grads, state, hparams)``
returns ``(new_params, new_state)`` and mutates nothing, so it composes with ``torch.func``
(``grad``, ``vmap``: ``init_ensemble_state``) and ``torch.compile(fullgraph=True)``.
``state_to_dict``/``state_from_dict`` and ``to_/from_optimizer_state_dict`` checkpoint it.
``step_d_group`` is the same step over several parameter groups sharing one D (what the
``KProdigy`` optimizer runs, in place), with a hook at the reduction seam.
"""

from ._checkpoint import from_optimizer_state_dict, state_from_dict, state_to_dict, to_optimizer_state_dict
from ._distributed import all_reduce_stats
from ._hyperparams import Hyperparams
from ._partial import accumulate_segment, apply_segments, cap_d_ratio, effective_lrs, finish_d
from ._scalars import Coefficients, coefficients, reduce_d
from ._state import DState, State, init_d_state, init_tensor_state
from ._step import Segment, SegmentResult, step_d_group, step_d_groups, use_foreach
from ._tree import init_ensemble_state, init_state, step  # the list versions, taking any pytree

__all__ = [
    "Coefficients",
    "DState",
    "Hyperparams",
    "Segment",
    "SegmentResult",
    "State",
    "accumulate_segment",
    "all_reduce_stats",
    "apply_segments",
    "cap_d_ratio",
    "coefficients",
    "effective_lrs",
    "finish_d",
    "from_optimizer_state_dict",
    "init_d_state",
    "init_ensemble_state",
    "init_state",
    "init_tensor_state",
    "reduce_d",
    "state_from_dict",
    "state_to_dict",
    "step",
    "step_d_group",
    "step_d_groups",
    "to_optimizer_state_dict",
    "use_foreach",
]
