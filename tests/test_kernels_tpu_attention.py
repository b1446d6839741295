"""TPU (Mosaic) block-sparse attention kernel in interpret mode on CPU vs the dense reference
`xla_attention(q, k, v, spec.dense())`: forward and gradients w.r.t. q, k, v, plus a check that
the compiled (interpret=False) kernel lowers for the TPU platform."""
import functools
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import tilemap
from kernels_pallas.block_sparse_attention import tpu
from llada2_jax.core.masks import MaskSpec
from llada2_jax.ops import backends
from llada2_jax.ops.attention import xla_attention

from test_kernels_attention import (BF16_TOL, FP32_TOL, LAYOUTS as _SHARED_LAYOUTS,  # shared layouts, checks
                                   _REFERENCE, _assert_close, _fwd_bwd, _inputs, _segments)


LAYOUTS = {
    **_SHARED_LAYOUTS,
    # longer BDLM so that 128-multiple tiles (the compiled-mode sizes) see several tiles
    "bdlm_long": lambda: MaskSpec.block_diffusion(_segments([[(1, 150), (2, 106)]]), 32),
}


def _kernel(block_q, block_k):
    return functools.partial(tpu.attention, interpret=True, block_q=block_q, block_k=block_k)


def _check(spec, hq, hkv, d, bq, bk, dtype=jnp.float32, tol=FP32_TOL):
    q, k, v, do = _inputs(spec, hq, hkv, d, dtype)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = _REFERENCE(f32(q), f32(k), f32(v), f32(do), spec)
    _assert_close(_fwd_bwd(_kernel(bq, bk))(q, k, v, do, spec), want, tol)


def test_interpret_mode_poisons_outputs():
    """Makes the no-NaN checks meaningful: with the TPU grid spec an unwritten output stays NaN."""
    spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=(2,),
                                        in_specs=[pl.BlockSpec((8, 128), lambda i, s: (s[i], 0))],
                                        out_specs=pl.BlockSpec((8, 128), lambda i, s: (i, 0)))
    out = pl.pallas_call(lambda s_ref, x_ref, o_ref: None, grid_spec=spec, interpret=True,
                         out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32)
                         )(jnp.zeros((2,), jnp.int32), jnp.zeros((16, 128), jnp.float32))
    assert np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("layout,hq,hkv,d,bq,bk", [
    ("bdlm", 4, 2, 16, 8, 16),          # GQA 2, partial + full tiles, padding tail
    ("bdlm_long", 2, 1, 32, 128, 256),  # 128-multiple tiles: lane tiling path (bk = 2 x 128)
    ("mdlm_docs", 3, 3, 24, 16, 8),     # MHA, head dim not a multiple of 8
    ("causal_docs", 4, 2, 16, 16, 16),  # GQA 2, two rows
    ("decode", 2, 1, 16, 8, 16),        # T != S, unwritten cache slots (empty key tiles)
])
def test_matches_dense_fp32(layout, hq, hkv, d, bq, bk):
    _check(LAYOUTS[layout](), hq, hkv, d, bq, bk)


def test_matches_dense_bf16():
    _check(LAYOUTS["bdlm"](), 4, 1, 16, 16, 8, jnp.bfloat16, BF16_TOL)


@pytest.mark.parametrize("seed", [2, 5])  # GQA 4 with L_B 2; GQA 2 with L_B 8
def test_random_bdlm_layouts(seed):
    """Random documents, block size, GQA ratio, tiles; traced features (budgeted lists)."""
    rng = np.random.default_rng(seed)
    length = 32
    cuts = np.sort(rng.choice(np.arange(1, length), size=2, replace=False))
    seg = np.concatenate([np.full(cuts[0], 1), np.full(cuts[1] - cuts[0], 2), np.zeros(length - cuts[1])])
    spec = MaskSpec.block_diffusion(seg[None].astype(np.int32), int(2 ** rng.integers(0, 4)))
    hkv, group = int(rng.integers(1, 3)), int(rng.choice([1, 2, 4]))
    _check(spec, hkv * group, hkv, 16, int(rng.choice([8, 16])), int(rng.choice([8, 16, 32])))


def test_over_budget_falls_back_exactly():
    """L_B much larger than the tile exceeds the traced step budget: lax.cond runs the full list."""
    spec = MaskSpec.block_diffusion(np.ones((1, 32), np.int32), 32)
    t = spec.shape[1]
    assert tpu._traced_budgets(spec.rule, t, t, 8, 8)[0] < int(
        tpu._steps(tilemap.classify(tilemap.pad_features(spec, 8, 8), 8, 8))[1].max())
    _check(spec, 2, 1, 16, 8, 8)


def _with_empty_rows():
    """Queries 16:24 (one whole 8-tile) belong to a document (7) that no key has: fully masked."""
    base = MaskSpec.bidirectional(_segments([[(1, 16), (2, 16)]]))
    q_seg = base.q_segment.at[:, 16:24].set(7)
    return MaskSpec(base.q_stream, base.q_block, q_seg, base.k_stream, base.k_block, base.k_segment,
                    "bidirectional")


def test_fully_masked_rows_give_zero():
    spec = _with_empty_rows()
    q, k, v, do = _inputs(spec, 2, 1, 16, jnp.float32)
    got = _fwd_bwd(_kernel(8, 8))(q, k, v, do, spec)
    assert np.all(np.asarray(got[0])[:, 16:24] == 0) and np.all(np.asarray(got[1])[:, 16:24] == 0)
    _assert_close(got, _REFERENCE(q, k, v, do, spec), FP32_TOL)


def test_eager_call_uses_exact_lists():
    """Concrete features: exact step count (no lax.cond, the longest row has no padding steps)."""
    spec = LAYOUTS["decode"]()
    q, k, v, _ = _inputs(spec, 2, 1, 16, jnp.float32)
    got = tpu.attention(q, k, v, spec, interpret=True, block_q=8, block_k=8)
    np.testing.assert_allclose(got, xla_attention(q, k, v, spec.dense()), rtol=0, atol=2e-5)


def test_step_lists_visit_each_nonempty_tile_once():
    spec = LAYOUTS["bdlm"]()
    classes = np.asarray(tilemap.classify(tilemap.pad_features(spec, 8, 8), 8, 8))
    packed, total = (np.asarray(x) for x in tpu._steps(jnp.asarray(classes)))
    row, col = packed >> tpu._OUTER_SHIFT, (packed >> tpu._KIND_BITS) & ((1 << tpu._INNER_BITS) - 1)
    kind = packed & 3
    for b in range(classes.shape[0]):
        assert np.all(np.diff(row[b]) >= 0)  # grouped by row: each output block is one run
        visited = kind[b] != tilemap.EMPTY
        got = sorted(zip(row[b][visited], col[b][visited], kind[b][visited]))
        want = sorted((i, j, classes[b, i, j]) for i, j in zip(*np.nonzero(classes[b] != tilemap.EMPTY)))
        assert got == want
        n_rows = classes.shape[1]
        assert total[b] == visited.sum() + np.sum(~(classes[b] != tilemap.EMPTY).any(-1))
        assert set(row[b][: total[b]]) == set(range(n_rows))  # every row (output block) visited
        tail = slice(total[b], None)  # padding: no work, same blocks as the last real step
        assert np.all(kind[b][tail] == tilemap.EMPTY)
        assert np.all(row[b][tail] == row[b][total[b] - 1]) and np.all(col[b][tail] == col[b][total[b] - 1])


@pytest.mark.parametrize("layout,dtype", [("bdlm_long", jnp.bfloat16), ("decode", jnp.float32)])
def test_compiled_kernel_lowers_for_tpu(layout, dtype):
    """interpret=False lowers fwd + bwd to Mosaic for the TPU platform (no TPU needed): checks the
    (8, 128) block rules and that every in-kernel op has a Mosaic lowering."""
    spec = LAYOUTS[layout]()
    b, t, s = spec.shape

    def fwd_bwd(q, k, v, do, spec):
        out, vjp = jax.vjp(lambda q, k, v: tpu.attention(q, k, v, spec, block_q=128, block_k=256), q, k, v)
        return (out, *vjp(do))

    sds = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    lowered = jax.jit(fwd_bwd).trace(sds(b, t, 4, 64), sds(b, s, 2, 64), sds(b, s, 2, 64), sds(b, t, 4, 64),
                                     spec).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") >= 3  # forward, dQ, dK/dV


def test_compiled_block_sizes_validated():
    spec = LAYOUTS["bdlm"]()
    q, k, v, _ = _inputs(spec, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        tpu.attention(q, k, v, spec, block_q=64)


def test_backend_table_uses_tpu_kernel_on_tpu(monkeypatch):
    calls = []
    monkeypatch.setattr(backends, "platform", lambda: "tpu")
    monkeypatch.setattr(tpu, "attention", lambda *a, **kw: calls.append(kw) or "tpu-kernel")
    spec = LAYOUTS["causal_docs"]()
    q, k, v, _ = _inputs(spec, 2, 1, 16, jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no TPU kernel" fallback warning any more
        assert backends.lookup("attention", "pallas")(q, k, v, spec, scale=None) == "tpu-kernel"
    assert calls[0]["interpret"] is False
