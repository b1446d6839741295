"""Batch layouts: [x_t ; x_0] vs single-copy MDLM, positions, AR targets, input validation."""
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from llada2_jax.diffusion import layout, masks

MASK_ID = 63


def _inputs():
    x0 = jnp.array([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 0, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]])
    eligible = jnp.array([[0, 1, 1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]], bool)
    noise = jnp.array([[1, 1, 0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 1, 1, 1, 1]], bool)
    return x0, seg, eligible, noise


def test_two_copy_layout():
    x0, seg, eligible, noise = _inputs()
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 0]])  # per document, as packed data has
    b = layout.build_diffusion_batch(x0, seg, pos, eligible, noise, jnp.array([0.5, 0.25]),
                                     mask_id=MASK_ID, block_size=2, vocab_size=64)
    loss_mask = np.asarray(noise & eligible)
    np.testing.assert_array_equal(np.asarray(b.loss_mask), loss_mask)
    xt = np.where(loss_mask, MASK_ID, np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(b.tokens), np.concatenate([xt, np.asarray(x0)], 1))
    np.testing.assert_array_equal(np.asarray(b.positions), np.concatenate([pos, pos], 1))
    np.testing.assert_array_equal(np.asarray(b.mask.dense()), np.asarray(masks.bdlm_mask(seg, 2)))
    np.testing.assert_array_equal(np.asarray(b.targets), np.asarray(x0))
    assert b.num_query_rows == 8 and b.two_copy
    # prompt / padding never masked: their noisy tokens are the clean tokens
    assert not (np.asarray(b.tokens)[:, :8][~np.asarray(eligible)] == MASK_ID).any()
    inputs = np.asarray(b.masked_input_positions())
    np.testing.assert_array_equal(inputs, np.concatenate([loss_mask, np.zeros_like(loss_mask)], 1))
    np.testing.assert_array_equal(inputs, np.asarray(b.tokens) == MASK_ID)


def test_full_block_uses_single_copy_mdlm_layout():
    x0, seg, eligible, noise = _inputs()
    b = layout.build_diffusion_batch(x0, seg, None, eligible, noise, jnp.array([0.5, 0.25]),
                                     mask_id=MASK_ID, block_size=8, vocab_size=64)
    assert b.tokens.shape == (2, 8) and not b.two_copy
    np.testing.assert_array_equal(np.asarray(b.mask.dense()), np.asarray(masks.mdlm_mask(seg)))
    np.testing.assert_array_equal(np.asarray(b.positions), np.tile(np.arange(8), (2, 1)))
    forced = layout.build_diffusion_batch(x0, seg, None, eligible, noise, jnp.array([0.5, 0.25]),
                                          mask_id=MASK_ID, block_size=8, vocab_size=64, force_two_copy=True)
    assert forced.tokens.shape == (2, 16) and forced.two_copy


def test_bad_inputs_name_the_value():
    x0, seg, eligible, noise = _inputs()
    t = jnp.array([0.5, 0.5])
    kw = dict(mask_id=MASK_ID, block_size=3, vocab_size=64)
    with pytest.raises(ValueError, match="block_size=3.*length 8"):
        layout.build_diffusion_batch(x0, seg, None, eligible, noise, t, **kw)
    with pytest.raises(ValueError, match="mask_id=64.*vocabulary"):
        layout.build_diffusion_batch(x0, seg, None, eligible, noise, t, mask_id=64, block_size=2, vocab_size=64)
    with pytest.raises(ValueError, match="mask_id=-1"):
        layout.build_diffusion_batch(x0, seg, None, eligible, noise, t, mask_id=-1, block_size=2, vocab_size=64)
    with pytest.raises(ValueError, match="segment_ids has shape"):
        layout.build_diffusion_batch(x0, seg[:, :4], None, eligible, noise, t, mask_id=1, block_size=2, vocab_size=64)
    with pytest.raises(ValueError, match="t has shape"):
        layout.build_diffusion_batch(x0, seg, None, eligible, noise, t[:1], mask_id=1, block_size=2, vocab_size=64)


segments = st.lists(st.integers(0, 3), min_size=1, max_size=16).map(lambda s: np.array(sorted(s), np.int32))


@settings(max_examples=25, deadline=None)
@given(segments, st.integers(0, 2**16))
def test_ar_batch_targets_never_cross_documents(seg, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50, seg.shape)
    eligible = rng.random(seg.shape) < 0.8
    b = layout.ar_batch(jnp.asarray(tokens)[None], jnp.asarray(seg)[None], eligible=jnp.asarray(eligible)[None])
    length = len(seg)
    loss_mask, targets = np.asarray(b.loss_mask)[0], np.asarray(b.targets)[0]
    for i in range(length):
        has_next = i + 1 < length and seg[i + 1] == seg[i] and seg[i] != 0 and eligible[i + 1]
        assert loss_mask[i] == has_next
        if has_next:
            assert targets[i] == tokens[i + 1]
    np.testing.assert_array_equal(np.asarray(b.mask.dense())[0],
                                  (seg[:, None] == seg[None, :]) & np.tri(length, dtype=bool))
