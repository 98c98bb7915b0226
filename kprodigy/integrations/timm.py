"""timm: register KProdigy in timm's optimizer registry, so that
``timm.optim.create_optimizer_v2(model, "kprodigy")`` (and ``train.py --opt kprodigy``) builds it.

    from kprodigy.integrations.timm import register
    register()                                   # once, before create_optimizer_v2
    opt = timm.optim.create_optimizer_v2(model, "kprodigy", lr=1.0, weight_decay=0.05)

Needs timm >= 1.0.12 (``timm.optim.OptimizerRegistry``; older versions hard-code their list).
timm splits the name on ``_`` (``lookahead_kprodigy`` wraps it in Lookahead), so the name has no
``_``. timm's ``train.py`` computes an lr from ``--lr-base`` (0.1 per 256 samples, linear for
names without "ada"/"lamb") when ``--lr`` is not given: pass ``--lr 1.0``. With ``weight_decay``
timm builds two param groups (decay / no decay) at the same lr: one D for both (the default).
"""

from __future__ import annotations

from typing import Any

from ..optim import KProdigy

__all__ = ["DESCRIPTION", "register"]

DESCRIPTION = "K-Prodigy: Adam with the step size D estimated while training (Prodigy); leave lr=1.0"


def register(registry: Any = None, name: str = "kprodigy") -> Any:
    """Register KProdigy under ``name`` (idempotent); returns the ``OptimInfo`` registered.

    registry: a ``timm.optim.OptimizerRegistry`` (default: timm's ``default_registry``, the one
    ``create_optimizer_v2`` uses). timm passes ``lr``, ``weight_decay``, ``eps`` (``--opt-eps``),
    ``betas`` (``--opt-betas``, two values) and ``foreach`` through, not ``momentum``.
    """
    if not isinstance(name, str) or not name or "_" in name or name != name.lower():
        raise ValueError(f"Invalid name: {name!r}; timm names are lowercase without '_' (it splits on '_')")
    try:
        from timm.optim import OptimInfo
    except ImportError as e:  # timm missing, or older than the registry
        raise ImportError(f"kprodigy.integrations.timm needs timm >= 1.0.12 (timm.optim.OptimInfo): {e}") from e
    if registry is None:
        from timm.optim import _optim_factory

        registry = _optim_factory.default_registry
    info = OptimInfo(
        name=name,
        opt_class=KProdigy,
        description=DESCRIPTION,
        has_eps=True,
        has_momentum=False,
        has_betas=True,
        num_betas=2,
    )
    registry.register(info)
    return info
