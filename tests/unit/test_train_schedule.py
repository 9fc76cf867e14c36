"""Learning-rate schedule and phase arithmetic (pure functions)."""

from __future__ import annotations

import pytest

from bertscale.train.schedule import decay_factor, lr_factor, phase_at, phase_boundaries, warmup_factor


def test_warmup_rises_linearly_to_one():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_linear_decay_reaches_zero_at_the_last_step():
    factors = [lr_factor(s, 2, 10) for s in range(11)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and factors[10] == 0.0
    assert factors[6] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))


def test_polynomial_decay_is_below_linear_for_power_above_one():
    lin = lr_factor(6, 2, 10, "linear")
    poly = lr_factor(6, 2, 10, "polynomial", power=2.0)
    assert poly == pytest.approx(lin**2)
    assert poly < lin


def test_constant_after_warmup_and_no_negative_lr_past_the_end():
    assert lr_factor(500, 10, 100, "constant") == 1.0
    assert decay_factor(150, 10, 100) == 0.0


def test_phase_boundaries_and_lookup():
    starts = phase_boundaries(10, [6, 4], 2)
    assert starts == [0, 6]
    assert [phase_at(s, starts) for s in (0, 5, 6, 9)] == [0, 0, 1, 1]
    # Without phase_steps everything runs in the first phase.
    single = phase_boundaries(10, None, 2)
    assert all(phase_at(s, single) == 0 for s in range(10))
    # A zero-step phase is skipped.
    assert phase_at(3, phase_boundaries(8, [3, 0, 5], 3)) == 2
