"""Token proposal, filtering and acceptance rules against plain numpy definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llada2_jax.inference import sampling


@pytest.mark.parametrize("block_size,steps,want", [(32, 32, [1] * 32), (8, 3, [3, 3, 2]), (8, 5, [2, 2, 2, 1, 1]),
                                                   (4, 1, [4])])
def test_quota_schedule(block_size, steps, want):
    assert sampling.quota_schedule(block_size, steps).tolist() == want


def numpy_filter(logits, top_k, top_p):
    out = logits.copy()
    for row in out.reshape(-1, out.shape[-1]):
        if top_k is not None:
            row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
        if top_p is not None:
            order = np.argsort(-row, kind="stable")
            probs = np.exp(row[order] - row[order][0])
            probs /= probs.sum()
            before = np.cumsum(probs) - probs
            keep = order[before < top_p]
            row[row < row[keep].min()] = -np.inf
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), top_k=st.one_of(st.none(), st.integers(1, 12)),
       top_p=st.one_of(st.none(), st.floats(0.05, 1.0)))
def test_filter_logits_matches_numpy(seed, top_k, top_p):
    logits = np.random.default_rng(seed).normal(size=(2, 3, 12)).astype(np.float32) * 3
    got = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k, top_p))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(numpy_filter(logits, top_k, top_p)))
    np.testing.assert_array_equal(got[~np.isinf(got)], logits[~np.isinf(got)])


def numpy_accept(conf, masked, quota, threshold):
    out = np.zeros_like(masked)
    for b in range(conf.shape[0]):
        c = np.where(masked[b], conf[b], -np.inf)
        high = c > threshold
        if high.sum() >= quota[b]:
            out[b] = high
        else:
            out[b, np.argsort(-c, kind="stable")[:min(quota[b], masked[b].sum())]] = True
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]))
def test_accept_matches_numpy(seed, threshold):
    rng = np.random.default_rng(seed)
    conf = rng.choice([0.1, 0.4, 0.6, 0.95, rng.random()], size=(4, 8)).astype(np.float32)  # ties on purpose
    masked = rng.random((4, 8)) < 0.6
    quota = rng.integers(1, 5, size=4).astype(np.int32)
    got = sampling.accept(jnp.asarray(conf), jnp.asarray(masked), jnp.asarray(quota), threshold)
    np.testing.assert_array_equal(np.asarray(got), numpy_accept(conf, masked, quota, threshold))


def test_propose_greedy_excludes_mask_and_reports_probability():
    logits = jnp.asarray([[[0.0, 5.0, 1.0, 2.0]]])
    keys = jax.random.split(jax.random.PRNGKey(0), 1)[:, None]
    tok, conf = sampling.propose(logits, keys, temperature=1.0, greedy=True, exclude_id=1)
    p = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    assert int(tok[0, 0]) == 3
    np.testing.assert_allclose(float(conf[0, 0]), p[2], rtol=1e-6)


def test_propose_greedy_matches_numpy_with_ties():
    rng = np.random.default_rng(4)
    logits = rng.integers(-3, 4, size=(3, 7, 50)).astype(np.float32)  # many tied maxima
    keys = jax.random.split(jax.random.PRNGKey(0), 21).reshape(3, 7, -1)
    tok, conf = sampling.propose(jnp.asarray(logits), keys, temperature=1.0, greedy=True, exclude_id=2)
    ref = logits.copy()
    ref[..., 2] = -np.inf
    probs = np.exp(ref - ref.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(tok), np.argmax(ref, -1))  # numpy: first maximal index
    np.testing.assert_allclose(np.asarray(conf), probs.max(-1), rtol=1e-6)


def test_propose_sampling_draws_inside_the_filter_with_filtered_probability():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 500, 10)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(1), 1000).reshape(2, 500, -1)
    tok, conf = sampling.propose(logits, keys, temperature=0.7, greedy=False, top_k=3, exclude_id=0)
    filtered = numpy_filter(np.asarray(logits) / 0.7 + np.where(np.arange(10) == 0, -np.inf, 0.0), 3, None)
    probs = np.exp(filtered - filtered.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    drawn = np.take_along_axis(probs, np.asarray(tok)[..., None], -1)[..., 0]
    assert (drawn > 0).all()  # never outside the top 3, never the excluded id
    np.testing.assert_allclose(np.asarray(conf), drawn, rtol=1e-5)
    top = np.argmax(probs, -1)
    assert 0.3 < (np.asarray(tok) == top).mean() < 0.99  # really sampled, not argmax
