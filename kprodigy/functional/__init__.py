"""Pure functional core of K-Prodigy.

``init_state(params, hparams)`` builds the state of a list of tensors sharing one D;
``step(params, grads, state, hparams)`` returns ``(new_params, new_state)`` and mutates nothing.
``step_d_group`` is the same step over several parameter groups sharing one D (what the
``KProdigy`` optimizer runs, in place), with a hook at the reduction seam.
"""

from ._hyperparams import Hyperparams
from ._scalars import Coefficients, coefficients, reduce_d
from ._state import DState, State, init_d_state, init_state, init_tensor_state
from ._step import Segment, SegmentResult, step, step_d_group, use_foreach

__all__ = [
    "Coefficients",
    "DState",
    "Hyperparams",
    "Segment",
    "SegmentResult",
    "State",
    "coefficients",
    "init_d_state",
    "init_state",
    "init_tensor_state",
    "reduce_d",
    "step",
    "step_d_group",
    "use_foreach",
]
