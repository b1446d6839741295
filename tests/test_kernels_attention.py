"""Block-sparse attention (Pallas kernel in interpret mode, XLA tile-skipping path) vs the dense
reference `xla_attention(q, k, v, spec.dense())`, forward and gradients w.r.t. q, k, v."""
import functools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from llada2_jax.ops import backends, xla_sparse
from kernels_pallas.block_sparse_attention import gpu as pallas_attention
from llada2_jax.core.masks import MaskSpec
from llada2_jax.ops.attention import xla_attention

FP32_TOL = 2e-5
BF16_TOL = 2e-2


def _segments(rows):
    """Each row given as [(doc id, length), ...] -> int32 (B, L)."""
    return np.asarray([np.concatenate([np.full(n, d) for d, n in row]) for row in rows], np.int32)


def _decode_spec(batch, block, cache_len, filled):
    """Queries = the current block; keys = cache slots (unwritten ones belong to no document)."""
    pos = np.arange(cache_len)
    k_seg = np.where(pos < filled + block, 1, -1)[None].repeat(batch, 0)
    full = lambda v: jnp.full((batch, block), v, jnp.int32)  # noqa: E731
    return MaskSpec(full(0), full(filled // block), full(1), jnp.zeros((batch, cache_len), jnp.int32),
                    jnp.asarray((pos // block)[None].repeat(batch, 0)), jnp.asarray(k_seg), "block_causal")


LAYOUTS = {
    # 2L BDLM, two documents and a padding tail (segment 0) on the first row
    "bdlm": lambda: MaskSpec.block_diffusion(_segments([[(1, 14), (2, 10), (0, 8)], [(1, 32)]]), 4),
    "mdlm_docs": lambda: MaskSpec.bidirectional(_segments([[(1, 20), (2, 20), (0, 8)]])),
    "causal_docs": lambda: MaskSpec.causal(_segments([[(1, 25), (2, 15)], [(3, 40)]])),
    "decode": lambda: _decode_spec(2, 8, 64, 24),
}


def _inputs(spec, hq, hkv, d, dtype, seed=0):
    b, t, s = spec.shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    shape_q, shape_kv = (b, t, hq, d), (b, s, hkv, d)
    return tuple(jax.random.normal(key, shp, jnp.float32).astype(dtype)
                 for key, shp in zip(ks, (shape_q, shape_kv, shape_kv, shape_q)))


def _fwd_bwd(attn):
    @jax.jit
    def run(q, k, v, do, spec):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, spec), q, k, v)
        return (out, *vjp(do))
    return run


_REFERENCE = _fwd_bwd(lambda q, k, v, spec: xla_attention(q, k, v, spec.dense()))


def _assert_close(got, want, tol):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all(), f"{name} has non-finite values"
        err = np.abs(g - w).max() / (np.abs(w).max() + 1e-12)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def _check(attn, spec, hq, hkv, d, dtype=jnp.float32, tol=FP32_TOL):
    q, k, v, do = _inputs(spec, hq, hkv, d, dtype)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = _REFERENCE(f32(q), f32(k), f32(v), f32(do), spec)
    _assert_close(_fwd_bwd(attn)(q, k, v, do, spec), want, tol)


# ------------------------------------------------------------------ Pallas kernel (interpret mode)
def _pallas(block_q, block_k):
    return functools.partial(pallas_attention.attention, interpret=True, block_q=block_q, block_k=block_k)


def test_interpret_mode_poisons_outputs():
    """Makes the no-NaN checks below meaningful: an unwritten Pallas output stays NaN."""
    out = pl.pallas_call(lambda x_ref, o_ref: None, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                         interpret=True)(jnp.zeros((8,), jnp.float32))
    assert np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("layout,hq,hkv,d,bq,bk", [
    ("bdlm", 4, 2, 16, 16, 16),
    ("mdlm_docs", 2, 2, 16, 16, 32),
    ("causal_docs", 4, 1, 32, 32, 16),
    ("decode", 2, 1, 16, 16, 16),
])
def test_pallas_matches_dense_fp32(layout, hq, hkv, d, bq, bk):
    _check(_pallas(bq, bk), LAYOUTS[layout](), hq, hkv, d)


def test_pallas_matches_dense_bf16():
    _check(_pallas(16, 16), LAYOUTS["bdlm"](), 4, 2, 16, jnp.bfloat16, BF16_TOL)


def _with_empty_rows():
    """Some queries belong to a document (7) that no key has: their rows are fully masked."""
    base = MaskSpec.bidirectional(_segments([[(1, 16), (2, 16)]]))
    q_seg = base.q_segment.at[:, 20:28].set(7)
    return MaskSpec(base.q_stream, base.q_block, q_seg, base.k_stream, base.k_block, base.k_segment,
                    "bidirectional")


@pytest.mark.parametrize("impl", ["pallas", "xla_sparse"])
def test_fully_masked_rows_give_zero(impl):
    spec = _with_empty_rows()
    attn = _pallas(16, 16) if impl == "pallas" else functools.partial(xla_sparse.attention, block_q=8, block_k=8)
    q, k, v, do = _inputs(spec, 2, 1, 16, jnp.float32)
    got = _fwd_bwd(attn)(q, k, v, do, spec)
    assert np.all(np.asarray(got[0])[:, 20:28] == 0)
    _assert_close(got, _REFERENCE(q, k, v, do, spec), FP32_TOL)


# ------------------------------------------------------------------ XLA tile-skipping path
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_xla_sparse_matches_dense_fp32(layout):
    _check(functools.partial(xla_sparse.attention, block_q=8, block_k=16), LAYOUTS[layout](), 4, 2, 16)


def test_xla_sparse_bf16():
    _check(functools.partial(xla_sparse.attention, block_q=8, block_k=8), LAYOUTS["bdlm"](), 4, 1, 16,
           jnp.bfloat16, BF16_TOL)


def test_xla_sparse_concrete_features_use_exact_pair_count():
    """Called eagerly (features concrete) the pair list is exact; results match the traced path."""
    spec = LAYOUTS["bdlm"]()
    q, k, v, _ = _inputs(spec, 2, 1, 16, jnp.float32)
    eager = xla_sparse.attention(q, k, v, spec, block_q=8, block_k=8)
    np.testing.assert_allclose(eager, xla_attention(q, k, v, spec.dense()), rtol=0, atol=1e-5)


def test_xla_sparse_over_budget_falls_back_exactly():
    """Blocks much larger than the tile exceed the traced budget: the lax.cond takes the dense path."""
    spec = MaskSpec.block_diffusion(np.ones((1, 32), np.int32), 32)
    _check(functools.partial(xla_sparse.attention, block_q=8, block_k=8), spec, 2, 1, 16)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_block=st.integers(0, 3), group=st.sampled_from([1, 2, 4]),
       tile=st.sampled_from([8, 16]))
def test_xla_sparse_random_bdlm_layouts(seed, log_block, group, tile):
    rng = np.random.default_rng(seed)
    length = 32
    cut = sorted(rng.choice(np.arange(1, length), size=2, replace=False))
    seg = np.concatenate([np.full(cut[0], 1), np.full(cut[1] - cut[0], 2), np.zeros(length - cut[1])])
    spec = MaskSpec.block_diffusion(seg[None].astype(np.int32), 2 ** log_block)
    _check(functools.partial(xla_sparse.attention, block_q=tile, block_k=tile), spec, 2 * group, 2, 16)


# ------------------------------------------------------------------ backend table
def test_backend_table_routes_and_validates():
    spec = LAYOUTS["causal_docs"]()
    q, k, v, _ = _inputs(spec, 2, 1, 16, jnp.float32)
    want = xla_attention(q, k, v, spec.dense())
    for impl in ("xla", "xla_sparse", "pallas", "auto"):  # pallas defaults to interpret mode on CPU
        got = backends.lookup("attention", impl)(q, k, v, spec, scale=None)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="bogus"):
        backends.lookup("attention", "bogus")
    from llada2_jax import ops
    with pytest.raises(ValueError, match="bogus.*expected one of: auto, xla, xla_sparse, pallas"):
        ops.attention(q, k, v, spec.dense(), impl="bogus")


@pytest.mark.parametrize("impl", ["xla_sparse", "pallas", "auto"])
def test_ops_attention_accepts_every_mask_form(impl):
    """String masks become features for the kernels ("causal" with T < S: the queries are the last
    T keys, as in the dense reference); a dense bool mask runs on the dense path. Values and grads."""
    from llada2_jax import ops
    from llada2_jax.diffusion import masks
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    cases = [("causal", 24, 24), ("causal", 8, 40), ("bidirectional", 8, 40),
             (np.asarray(masks.bdlm_mask(_segments([[(1, 9), (2, 7)]]), 4)), 32, 32)]
    for mask, t, s in cases:
        q = jax.random.normal(keys[0], (1, t, 4, 16))
        k, v = jax.random.normal(keys[1], (1, s, 2, 16)), jax.random.normal(keys[2], (1, s, 2, 16))
        probe = jax.random.normal(keys[3], q.shape)

        def loss(impl_, q, k, v):
            return (ops.attention(q, k, v, mask, impl=impl_, interpret=True) * probe).sum()

        want = jax.value_and_grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
        got = jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=FP32_TOL, atol=FP32_TOL * float(jnp.abs(b).max()))
