"""Tile map vs the dense mask: never EMPTY with an allowed element, FULL only when all allowed."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax.numpy as jnp

from kernels_pallas import tilemap
from llada2_jax.core.masks import MaskSpec


def _documents(rng, batch, length, max_docs, pad_prob=0.5):
    """Contiguous documents 1..n, optionally a padding tail (segment 0)."""
    seg = np.zeros((batch, length), np.int32)
    for r in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=min(rng.integers(0, max_docs), length - 1),
                                      replace=False))  # a length-2 sequence has one cut point
        bounds = [0, *cuts, length]
        for d in range(len(bounds) - 1):
            seg[r, bounds[d]:bounds[d + 1]] = d + 1
        if rng.random() < pad_prob:
            seg[r, length - rng.integers(1, length // 2 + 1):] = 0
    return seg


def _decode(rng, batch, block, cache_len):
    filled = int(rng.integers(0, cache_len // block)) * block
    pos = np.arange(cache_len)
    k_seg = np.where(pos < filled + block, 1, -1)[None].repeat(batch, 0)
    full = lambda v: jnp.full((batch, block), v, jnp.int32)  # noqa: E731
    return MaskSpec(full(0), full(filled // block), full(1), jnp.zeros((batch, cache_len), jnp.int32),
                    jnp.asarray((pos // block)[None].repeat(batch, 0)), jnp.asarray(k_seg), "block_causal")


def _random_spec(rng, kind, length, block):
    seg = _documents(rng, 2, length, 4)
    if kind == "bdlm":
        return MaskSpec.block_diffusion(seg, block)
    if kind == "mdlm":
        return MaskSpec.bidirectional(seg)
    if kind == "causal":
        return MaskSpec.causal(seg)
    if kind == "block_causal":
        return MaskSpec.block_causal(seg, block)
    if kind == "decode":
        return _decode(rng, 2, block, length)
    # arbitrary features: random streams and non-monotone blocks stress the conservative bounds
    stream = rng.integers(0, 2, (2, length))
    blocks = rng.integers(0, 4, (2, length))
    return MaskSpec.self_attention("block_diffusion", stream, blocks, seg)


def _check(spec, bq, bk):
    feats = tilemap.pad_features(spec, bq, bk)
    classes = np.asarray(tilemap.classify(feats, bq, bk))
    dense = np.asarray(feats.dense())  # padded dense mask, the reference
    b, nq, nk = classes.shape
    tiles = dense.reshape(b, nq, bq, nk, bk).transpose(0, 1, 3, 2, 4).reshape(b, nq, nk, bq * bk)
    any_allowed, all_allowed = tiles.any(-1), tiles.all(-1)
    assert not np.any(any_allowed & (classes == tilemap.EMPTY)), "a tile with an allowed element is EMPTY"
    assert not np.any(~all_allowed & (classes == tilemap.FULL)), "a FULL tile has a masked element"
    # padding never makes a real element disappear
    _, t, s = spec.shape
    np.testing.assert_array_equal(dense[:, :t, :s], np.asarray(spec.dense()))
    return classes, any_allowed, all_allowed


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["bdlm", "mdlm", "causal", "block_causal", "decode", "random_bd"]),
       log_block=st.integers(0, 4), bq=st.sampled_from([4, 8, 16]), bk=st.sampled_from([4, 8, 16]))
def test_tilemap_is_conservative(seed, kind, log_block, bq, bk):
    rng = np.random.default_rng(seed)
    block = 2 ** log_block
    length = block * int(rng.integers(2, max(3, 64 // block)))
    _check(_random_spec(rng, kind, length, block), bq, bk)


@pytest.mark.parametrize("block,tile", [(4, 8), (8, 8), (16, 8)])
def test_aligned_bdlm_is_classified_exactly(block, tile):
    """Single document, tiles aligned with blocks and streams: every tile is decided exactly."""
    spec = MaskSpec.block_diffusion(np.ones((1, 64), np.int32), block)
    classes, any_allowed, all_allowed = _check(spec, tile, tile)
    np.testing.assert_array_equal(classes == tilemap.EMPTY, ~any_allowed)
    np.testing.assert_array_equal(classes == tilemap.FULL, all_allowed)


def test_tile_lists_order_full_then_partial():
    classes = jnp.asarray([[[tilemap.PARTIAL, tilemap.EMPTY, tilemap.FULL, tilemap.PARTIAL, tilemap.FULL]]],
                          jnp.int8)
    order, n_full, n_any = tilemap.tile_lists(classes)
    assert int(n_full[0, 0]) == 2 and int(n_any[0, 0]) == 4
    np.testing.assert_array_equal(np.asarray(order[0, 0]), [2, 4, 0, 3, 1])
