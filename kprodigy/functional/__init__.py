"""Pure functional core of K-Prodigy.

``init_state(params, hparams)`` builds the state of a list of tensors sharing one D;
``step(params, grads, state, hparams)`` returns ``(new_params, new_state)`` and mutates nothing.
``step_d_group`` is the same step over several parameter groups sharing one D (what the
``KProdigy`` optimizer runs, in place), with a hook at the reduction seam.
"""

from ._distributed import all_reduce_stats
from ._hyperparams import Hyperparams
from ._partial import cap_d_ratio, effective_lrs, finish_d, step_segment
from ._scalars import Coefficients, coefficients, reduce_d
from ._state import DState, State, init_d_state, init_state, init_tensor_state
from ._step import Segment, SegmentResult, step, step_d_group, step_d_groups, use_foreach

__all__ = [
    "Coefficients",
    "DState",
    "Hyperparams",
    "Segment",
    "SegmentResult",
    "State",
    "all_reduce_stats",
    "cap_d_ratio",
    "coefficients",
    "effective_lrs",
    "finish_d",
    "init_d_state",
    "init_state",
    "init_tensor_state",
    "reduce_d",
    "step",
    "step_d_group",
    "step_d_groups",
    "step_segment",
    "use_foreach",
]
