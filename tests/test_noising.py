"""Noising: t ranges, Bernoulli masks on eligible positions, complementary views, [MASK] noise."""
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from llada2_jax.diffusion import noising


@pytest.mark.parametrize("t_min,t_max,bad", [(0.0, 1.0, "t_min=0.0"), (-0.1, 0.5, "t_min=-0.1"),
                                              (0.1, 1.5, "t_max=1.5"), (0.8, 0.3, "t_min=0.8")])
def test_t_bounds_rejected(t_min, t_max, bad):
    with pytest.raises(ValueError, match=bad):
        noising.sample_t(jax.random.key(0), 4, t_min, t_max)


def test_sample_t_range_and_spread():
    t = np.asarray(noising.sample_t(jax.random.key(1), 4096, 0.3, 0.8))
    assert t.shape == (4096,) and t.min() >= 0.3 and t.max() <= 0.8
    assert abs(t.mean() - 0.55) < 0.01


def test_mask_rate_matches_t_on_eligible_only():
    b, length = 64, 256
    eligible = np.arange(length)[None, :] >= np.arange(b)[:, None]  # prompt of length b-row
    t = jnp.linspace(0.05, 0.95, b)
    mask = np.asarray(noising.sample_mask(jax.random.key(2), t, eligible))
    assert not (mask & ~eligible).any()
    rate = mask.sum(1) / eligible.sum(1)
    # binomial std <= 0.5/sqrt(192) ~ 0.036; 5 sigma
    np.testing.assert_allclose(rate, np.asarray(t), atol=0.18)
    assert abs((rate - np.asarray(t)).mean()) < 0.02


def test_at_least_one_mask_per_row():
    eligible = np.zeros((3, 16), bool)
    eligible[0, 5:] = True
    eligible[1, 3] = True  # a single eligible position
    # row 2: nothing eligible -> nothing masked
    mask = np.asarray(noising.sample_mask(jax.random.key(3), jnp.full((3,), 1e-6), eligible))
    assert mask[0].sum() == 1 and mask[0, 5:].sum() == 1
    assert mask[1].tolist() == eligible[1].tolist()
    assert not mask[2].any()
    unforced = np.asarray(noising.sample_mask(jax.random.key(3), jnp.full((3,), 1e-6), eligible, at_least_one=False))
    assert not unforced.any()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 1.0))
def test_complementary_views_cover_eligible_exactly_once(seed, rate):
    k1, k2 = jax.random.split(jax.random.key(seed))
    eligible = np.asarray(jax.random.bernoulli(k1, 0.7, (4, 24)))
    t = jnp.full((4,), rate)
    mask = noising.sample_mask(k2, t, eligible)
    both, rates = noising.complementary_pair(mask, t, eligible)
    both = np.asarray(both)
    counts = both[:4].astype(int) + both[4:].astype(int)
    np.testing.assert_array_equal(counts, eligible.astype(int))
    np.testing.assert_allclose(np.asarray(rates), np.concatenate([np.full(4, rate), np.full(4, 1 - rate)]), atol=1e-6)


def test_apply_mask():
    x0 = jnp.array([[5, 6, 7, 8]])
    got = noising.apply_mask(x0, jnp.array([[False, True, False, True]]), 99)
    np.testing.assert_array_equal(np.asarray(got), [[5, 99, 7, 99]])


def test_mask_embedding_noise_scale_placement_and_anneal():
    table = jax.random.normal(jax.random.key(4), (50, 32)) * 0.3
    rms = float(jnp.sqrt(jnp.mean(table ** 2)))
    pos = np.zeros((2, 400), bool)
    pos[:, ::2] = True
    noise = np.asarray(noising.mask_embedding_noise(jax.random.key(5), pos, table, 2.0, 0, 100))
    assert noise.shape == (2, 400, 32)
    assert not noise[~pos].any()
    np.testing.assert_allclose(noise[pos].std(), 2.0 * rms, rtol=0.03)
    half = np.asarray(noising.mask_embedding_noise(jax.random.key(5), pos, table, 2.0, 50, 100))
    np.testing.assert_allclose(half, noise * 0.5, rtol=1e-5, atol=1e-7)
    for step in (100, 1000):
        assert not np.asarray(noising.mask_embedding_noise(jax.random.key(5), pos, table, 2.0, step, 100)).any()
    assert not np.asarray(noising.mask_embedding_noise(jax.random.key(5), pos, table, 2.0, 0, 0)).any()


def test_mask_embedding_noise_traced_step():
    table = jnp.ones((8, 4))
    pos = jnp.ones((1, 3), bool)
    f = jax.jit(lambda step: noising.mask_embedding_noise(jax.random.key(0), pos, table, 1.0, step, 10))
    np.testing.assert_allclose(np.asarray(f(jnp.int32(5))), np.asarray(f(jnp.int32(0))) * 0.5, rtol=1e-6)


def test_stratified_t_covers_every_stratum_and_stays_in_range():
    b, lo, hi = 16, 0.2, 0.9
    for seed in range(5):
        t = np.asarray(noising.sample_t(jax.random.key(seed), b, lo, hi, stratified=True))
        assert t.shape == (b,) and (t >= lo).all() and (t <= hi).all()
        strata = np.floor((t - lo) / (hi - lo) * b).astype(int)
        assert sorted(strata.clip(0, b - 1)) == list(range(b))  # one row per stratum
    with pytest.raises(ValueError, match="1.5"):
        noising.sample_t(jax.random.key(0), 4, 0.1, 1.5, stratified=True)
