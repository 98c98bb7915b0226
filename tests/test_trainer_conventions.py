"""The trainers' conventions, run as ``examples/trainer_conventions.py`` shows them: ``d *
effective_lr`` with the D of a step is the step applied (bias correction on and off, under a
schedule that moves every step), and ``step_parameter(p, group, i)`` from the gradient hooks,
then ``step()``, equals ``step()`` (no second step on the gradients left in ``.grad``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from kprodigy import KProdigy

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "trainer_conventions.py"


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("trainer_conventions", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_passes() -> None:
    assert _module().main() == 0


def test_d_of_the_step_times_effective_lr_is_the_measured_step() -> None:
    for bc in (False, True):
        rows = _module().applied_step_sizes(bc)
        assert rows[-1][1] > 100 * rows[0][1] or bc  # D grew (bias correction: the 1/k schedule wins)
        for from_keys, step_size, measured, _ in rows:
            assert abs(from_keys - step_size) <= 1e-12 * step_size
            assert abs(measured - step_size) <= 1e-9 * step_size


def test_supports_fused_back_pass_is_callable_and_true() -> None:
    opt = KProdigy([torch.nn.Parameter(torch.zeros(2))])
    assert opt.supports_fused_back_pass() is True and bool(opt.supports_fused_back_pass)


def test_step_parameter_checks_the_group_and_index_it_is_given() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = KProdigy([{"params": [a]}, {"params": [b]}])
    a.grad = torch.ones(2)
    try:
        opt.step_parameter(a, opt.param_groups[0], 1)
    except ValueError as e:
        assert "index 1" in str(e)
    else:
        raise AssertionError("a wrong index was accepted")
    opt.step_parameter(a, opt.param_groups[0], 0)
    opt.step()
    assert opt.param_groups[0]["k"] == 1 and not torch.equal(a.detach(), torch.ones(2))
