"""Block-diffusion / MDLM masks against the spec's worked matrices and a loop-based reference."""
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from llada2_jax.diffusion import masks

# spec §2.3: L = 4, L_B = 2, one document (rows = queries t0..t3, c0..c3)
SPEC_2_3 = np.array([
    [1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 1, 1, 0, 0],
    [0, 0, 0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 1, 1, 1, 1],
    [0, 0, 0, 0, 1, 1, 1, 1],
], bool)

# spec §5: L = 6, L_B = 2, doc A = positions 0-2, doc B = 3-5
SPEC_5 = np.array([
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0],
    [0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
], bool)


def test_spec_matrix_2_3():
    got = np.asarray(masks.bdlm_mask(jnp.ones((1, 4), jnp.int32), 2))[0]
    np.testing.assert_array_equal(got, SPEC_2_3)


def test_spec_matrix_5_documents():
    got = np.asarray(masks.bdlm_mask(jnp.array([[1, 1, 1, 2, 2, 2]]), 2))[0]
    np.testing.assert_array_equal(got, SPEC_5)


def reference_bdlm(segment_ids: np.ndarray, block_size: int) -> np.ndarray:
    """The paper's Eq. 3 AND the document mask, written as an explicit loop over (i, j) in [0, 2L)."""
    length = len(segment_ids)
    out = np.zeros((2 * length, 2 * length), bool)
    for i in range(2 * length):
        for j in range(2 * length):
            qi, kj = i % length, j % length
            if segment_ids[qi] != segment_ids[kj]:
                continue
            bq, bk = qi // block_size, kj // block_size
            if i < length and j < length:
                out[i, j] = bq == bk
            elif i < length:
                out[i, j] = bq > bk
            elif j >= length:
                out[i, j] = bq >= bk
    return out


@st.composite
def packed_layout(draw):
    """Random packing: a block size, L a multiple of it, contiguous documents, optional padding tail."""
    block_size = draw(st.sampled_from([1, 2, 3, 4]))
    length = block_size * draw(st.integers(1, 12 // block_size + 1))
    lengths, total = [], 0
    while total < length:
        n = draw(st.integers(1, length - total))
        lengths.append(n)
        total += n
    pad_docs = draw(st.integers(0, 1))  # last piece becomes padding (segment 0)
    seg = np.concatenate([np.full(n, k + 1) for k, n in enumerate(lengths)])
    if pad_docs and len(lengths) > 1:
        seg[-lengths[-1]:] = 0
    return seg.astype(np.int32), block_size


@settings(max_examples=25, deadline=None)
@given(packed_layout())
def test_bdlm_mask_properties(layout):
    seg, block_size = layout
    length = len(seg)
    got = np.asarray(masks.bdlm_mask(jnp.asarray(seg)[None], block_size))[0]
    np.testing.assert_array_equal(got, reference_bdlm(seg, block_size))

    doc = np.concatenate([seg, seg])
    assert not (got & (doc[:, None] != doc[None, :])).any(), "attention across documents"
    block = np.concatenate([np.arange(length), np.arange(length)]) // block_size
    noisy = np.arange(2 * length) < length
    sees_own_or_later_clean = noisy[:, None] & ~noisy[None, :] & (block[None, :] >= block[:, None])
    assert not (got & sees_own_or_later_clean).any(), "noisy query sees its own or a later clean block"
    assert not (got & ~noisy[:, None] & noisy[None, :]).any(), "clean query sees a noisy token"
    assert got.any(axis=1).all(), "a row with no allowed key"


@settings(max_examples=25, deadline=None)
@given(packed_layout())
def test_mdlm_mask_is_same_document(layout):
    seg, _ = layout
    got = np.asarray(masks.mdlm_mask(jnp.asarray(seg)[None]))[0]
    np.testing.assert_array_equal(got, seg[:, None] == seg[None, :])


def test_bdlm_at_full_block_noisy_half_is_mdlm():
    """L_B = L: the noisy half sees exactly the same-document noisy tokens and no clean token."""
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    full = np.asarray(masks.bdlm_mask(seg, 6))[0]
    np.testing.assert_array_equal(full[:6, :6], np.asarray(masks.mdlm_mask(seg))[0])
    assert not full[:6, 6:].any()


def test_block_size_must_divide_length():
    with pytest.raises(ValueError, match="block_size=4.*length 6"):
        masks.bdlm_mask(jnp.ones((1, 6), jnp.int32), 4)
