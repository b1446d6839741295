"""WSD block-size ladder and learning-rate schedules."""
import math

import numpy as np
import pytest

from llada2_jax.diffusion import schedules


def test_paper_ladder_for_256():
    phases = schedules.wsd_ladder(256, steps_per_warmup=10, stable_steps=100, steps_per_decay=5)
    assert [p.block_size for p in phases] == [1, 4, 32, 64, 256, 256, 128, 64, 32]
    assert [p.steps for p in phases] == [10] * 5 + [100] + [5] * 3
    assert phases[5].name.startswith("stable")
    assert all(256 % p.block_size == 0 for p in phases)


def test_ladder_4096_halves_to_32_and_zero_step_phases_drop():
    phases = schedules.wsd_ladder(4096, steps_per_warmup=1, stable_steps=0, steps_per_decay=1)
    assert [p.block_size for p in phases] == [1, 4, 32, 64, 4096, 2048, 1024, 512, 256, 128, 64, 32]


def test_ladder_rejects_sizes_not_dividing_length():
    with pytest.raises(ValueError, match="warmup block size=32 does not divide seq_len=48"):
        schedules.wsd_ladder(48, steps_per_warmup=1, stable_steps=1, steps_per_decay=1)
    with pytest.raises(ValueError, match="decay_min=32.*seq_len=96"):
        schedules.wsd_ladder(96, warmup_sizes=(1, 4), steps_per_warmup=1, stable_steps=1, steps_per_decay=1)


def test_phase_validation():
    with pytest.raises(ValueError, match="block_size=0"):
        schedules.Phase("x", 0, 1)


def test_lr_schedules_against_formulas():
    peak, warm, total, end = 1e-3, 10, 110, 1e-5
    const = schedules.lr_schedule("constant", peak, warm, total)
    cos = schedules.lr_schedule("cosine", peak, warm, total, end)
    for step in (0, 5, 10, 50, 109, 110):
        ramp = peak * step / warm if step < warm else peak
        np.testing.assert_allclose(float(const(step)), ramp, rtol=1e-5, atol=1e-9)
        if step >= warm:
            frac = (step - warm) / (total - warm)
            want = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))
        else:
            want = ramp
        np.testing.assert_allclose(float(cos(step)), want, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="kind='linear'"):
        schedules.lr_schedule("linear", peak, warm, total)
