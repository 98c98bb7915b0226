"""Pure functional core of K-Prodigy.

``init_state(params, hparams)`` builds the state of tensors sharing one D (any pytree of tensors;
the state mirrors its structure); ``step(params, grads, state, hparams)`` returns ``(new_params,
new_state)`` and mutates nothing, so it composes with ``torch.func`` (``grad``, ``vmap``:
``init_ensemble_state``) and ``torch.compile(fullgraph=True)``; ``step_`` steps in place.
``state_to_dict``/``state_from_dict`` and ``to_/from_optimizer_state_dict`` checkpoint it.
These eleven names are the public API; the ``_`` modules (the engine that ``KProdigy`` shares,
its backends) may change in any release.
"""

from ._checkpoint import from_optimizer_state_dict, state_from_dict, state_to_dict, to_optimizer_state_dict
from ._hyperparams import Hyperparams
from ._state import DState, State
from ._tree import init_ensemble_state, init_state, step, step_  # taking any pytree

__all__ = [
    "DState",
    "Hyperparams",
    "State",
    "from_optimizer_state_dict",
    "init_ensemble_state",
    "init_state",
    "state_from_dict",
    "state_to_dict",
    "step",
    "step_",
    "to_optimizer_state_dict",
]
