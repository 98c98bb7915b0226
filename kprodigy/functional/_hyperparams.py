"""Hyperparameters of one parameter group, validated once on construction."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["D_CONFIG", "STATE_PRECISIONS", "Hyperparams", "hparams"]

STATE_PRECISIONS = ("auto", "float32", "bfloat16", "int8")  # the values of ``state_precision``


@dataclass(frozen=True)
class Hyperparams:
    """Every hyperparameter of K-Prodigy for one parameter group, as plain Python numbers (a
    scheduler builds a new instance); an invalid value raises ``ValueError`` naming the field.

    The fields that act on the shared D (``d_config()``: ``beta3``, ``d0``, ``d_coef``,
    ``growth_rate``, ``d_update_freq``, ``d_steps``, ``skip_nonfinite``) must be equal in the
    groups sharing one D; there ``beta3=None`` means sqrt(betas[1]) of the first group.
    """

    lr: float = 1.0  # multiplier of the adapted step size D; 0 freezes the group
    betas: tuple[float, float] = (0.9, 0.999)  # EMA rates of the gradient and its square
    beta3: float | None = None  # EMA rate of the D statistics; None means sqrt(betas[1])
    eps: float = 1e-8  # added to the Adam denominator, in units of D: sqrt(v) + D * eps
    weight_decay: float = 0.0
    decouple: bool = True  # AdamW-style decay (True) or L2 added to the gradient (False)
    use_bias_correction: bool = False  # Adam's bias correction of the step size (prodigyopt's default: off)
    safeguard_warmup: bool = False  # leave lr out of the D denominator (helps warm-up)
    d0: float = 1e-6  # initial D
    d_coef: float = 1.0  # multiplier of the D estimate
    growth_rate: float = math.inf  # D grows at most by this factor per step
    d_update_freq: int = 1  # update the D statistics every this many steps
    d_steps: int | None = None  # freeze D once the step count k reaches this (None: never)
    slice_p: int = 1  # D statistics use every slice_p-th entry of each tensor
    maximize: bool = False
    skip_nonfinite: bool = True  # skip the D-group's step when a gradient holds NaN/inf (on device, no sync)
    stochastic_rounding: bool = False  # round bfloat16 param updates stochastically (unbiased)
    state_precision: str = "auto"  # how m, v, s are stored: one of STATE_PRECISIONS (``_formats``)
    fp32_state: bool | None = None  # deprecated alias: True is state_precision="float32", False "auto"

    def __post_init__(self) -> None:
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
        object.__setattr__(self, "betas", (_number("betas[0]", betas[0]), _number("betas[1]", betas[1])))
        for name in ("lr", "eps", "weight_decay", "d0", "d_coef", "growth_rate"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        if self.beta3 is not None:
            object.__setattr__(self, "beta3", _number("beta3", self.beta3))
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Invalid {name}: {getattr(self, name)!r}; expected True or False")
        if self.state_precision not in STATE_PRECISIONS:
            expected = " or ".join(map(repr, STATE_PRECISIONS))
            _check("state_precision", self.state_precision, False, expected)  # type: ignore[arg-type]
        if self.fp32_state is not None:
            object.__setattr__(self, "state_precision", _from_fp32_state(self.fp32_state, self.state_precision))
        for name in ("d_update_freq", "slice_p", "d_steps"):
            value = getattr(self, name)
            if name == "d_steps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _check(name, value, False, "None or an integer >= 1" if name == "d_steps" else "an integer >= 1")
        b1, b2 = self.betas
        _finite("lr", self.lr, strict=False)
        _check("betas[0]", b1, 0.0 <= b1 < 1.0, "a number in [0, 1)")
        _check("betas[1]", b2, 0.0 <= b2 < 1.0, "a number in [0, 1)")
        if self.beta3 is not None:
            _check("beta3", self.beta3, 0.0 <= self.beta3 < 1.0, "None or a number in [0, 1)")
        for name in ("eps", "weight_decay", "d0", "d_coef"):
            _finite(name, getattr(self, name), strict=name != "weight_decay")
        _check("growth_rate", self.growth_rate, self.growth_rate >= 1, "a number >= 1 (inf allowed)")

    @property
    def beta3_value(self) -> float:
        """``beta3``, with None resolved to ``sqrt(betas[1])``."""
        return math.sqrt(self.betas[1]) if self.beta3 is None else self.beta3

    @property
    def coupled_decay(self) -> bool:
        """Whether weight decay is added to the gradient (``decouple=False``), not to the params."""
        return self.weight_decay > 0 and not self.decouple

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return _FIELD_NAMES if cls is Hyperparams else tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any]) -> Hyperparams:
        """Build from a dict such as an optimizer param group; unrelated keys are ignored."""
        return cls(**{name: mapping[name] for name in cls.field_names() if name in mapping})

    def with_lr(self, lr: Any) -> Hyperparams:
        """This instance with another ``lr`` (what an lr schedule changes every step), validated
        alone: the other fields were validated already."""
        value = _number("lr", lr)
        _finite("lr", value, strict=False)
        new = copy.copy(self)
        object.__setattr__(new, "lr", value)
        return new

    def d_config(self) -> tuple[Any, ...]:
        """The fields that must agree among groups sharing one D (``D_CONFIG`` order)."""
        return tuple(getattr(self, name) for name in D_CONFIG)


_FIELD_NAMES = tuple(f.name for f in fields(Hyperparams))
D_CONFIG = ("beta3", "d0", "d_coef", "growth_rate", "d_update_freq", "d_steps", "skip_nonfinite")
_FLAGS = tuple(f.name for f in fields(Hyperparams) if f.type in ("bool", bool))  # the bool fields


def _from_fp32_state(fp32_state: Any, precision: str, stacklevel: int = 4) -> str:
    """``state_precision`` for the deprecated ``fp32_state`` (DeprecationWarning): True is
    "float32", False "auto" (at most prodigyopt's state); another explicit precision conflicts."""
    if not isinstance(fp32_state, bool):
        raise ValueError(f"Invalid fp32_state: {fp32_state!r}; expected None, True or False (deprecated)")
    mapped = "float32" if fp32_state else "auto"
    if precision not in ("auto", mapped):
        raise ValueError(
            f"Invalid fp32_state: {fp32_state!r} conflicts with state_precision={precision!r}; "
            "drop fp32_state (deprecated) and keep state_precision"
        )
    warnings.warn(
        f"fp32_state is deprecated; use state_precision={mapped!r} instead (state_precision='auto', the default, "
        "keeps float32 state for float32 params and bfloat16 state for 16-bit params)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return mapped


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r}; expected a Python number")
    return float(value)


def _check(name: str, value: float, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; expected {expected}")


def _finite(name: str, value: float, strict: bool) -> None:
    """``value`` finite and > 0 (``strict``) or >= 0."""
    ok = math.isfinite(value) and (value > 0 if strict else value >= 0)
    _check(name, value, ok, f"a finite number {'>' if strict else '>='} 0")


_HPARAMS: dict[tuple[Any, ...], Hyperparams] = {}  # validated Hyperparams by their mapping's values (a
# bounded memo of immutable values: like functools.lru_cache, it holds nothing else alive)
_HPARAMS_MAX = 256


def hparams(group: dict[str, Any]) -> Hyperparams:
    """``Hyperparams.from_mapping(group)``, validated once per distinct set of values and types
    (``True == 1`` must not hit); a new lr alone is validated alone (``with_lr``)."""
    values = tuple(map(group.get, _FIELD_NAMES, _MISSING))
    betas = values[_BETAS]
    try:
        key = (values, tuple(map(type, values)), tuple(map(type, betas)) if isinstance(betas, (tuple, list)) else None)
        hp = _HPARAMS.get(key)
    except TypeError:  # an unhashable value: validate it (and raise) without the cache
        return Hyperparams.from_mapping(group)
    if hp is None:
        # an lr schedule changes only lr: derive from the same values' last Hyperparams
        rest = key[0][:_LR] + key[0][_LR + 1 :], key[1][:_LR] + key[1][_LR + 1 :], key[2]
        same_rest = _BY_REST.get(rest) if values[_LR] is not _MISSING[0] else None
        hp = same_rest.with_lr(values[_LR]) if same_rest is not None else Hyperparams.from_mapping(group)
        if len(_HPARAMS) >= _HPARAMS_MAX:
            _HPARAMS.clear()
            _BY_REST.clear()
        _HPARAMS[key] = _BY_REST[rest] = hp
    return hp


_BETAS = _FIELD_NAMES.index("betas")
_LR = _FIELD_NAMES.index("lr")
_BY_REST: dict[tuple[Any, ...], Hyperparams] = {}  # the same, keyed by every value but lr
_MISSING = (object(),) * len(_FIELD_NAMES)  # group.get's default: a missing key is not None
