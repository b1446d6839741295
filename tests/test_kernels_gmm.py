"""Grouped matmul kernels (interpret mode) vs `jax.lax.ragged_dot`, incl. empty groups and rows
past sum(group_sizes), forward and gradients."""
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels_pallas.grouped_matmul import gpu as gmm_gpu
from kernels_pallas.grouped_matmul import tpu as gmm_tpu
from llada2_jax.ops import backends, xla_tiled

GROUPS = np.array([10, 0, 37, 5, 0, 20], np.int32)  # empty groups; 72 of 80 rows grouped


def _fwd_bwd(f, x, w, gs, dy):
    @jax.jit
    def run(x, w):
        out, vjp = jax.vjp(lambda x, w: f(x, w, gs), x, w)
        return (out, *vjp(dy))
    return run(x, w)


def _inputs(dtype, m=80, k=24, n=40):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(ks[0], (m, k), jnp.float32).astype(dtype)
    w = jax.random.normal(ks[1], (len(GROUPS), k, n), jnp.float32).astype(dtype)
    return x, w, jax.random.normal(ks[2], (m, n), jnp.float32)


def _reference(x, w, gs):
    return jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), gs)


KERNELS = {
    "pallas_gpu": functools.partial(gmm_gpu.grouped_matmul, interpret=True, block_m=16, block_n=16, block_k=16),
    "megablox_tpu": functools.partial(gmm_tpu.grouped_matmul, interpret=True),
    "xla_tiled": functools.partial(xla_tiled.grouped_matmul, block_m=8),
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_gmm_matches_ragged_dot(kernel, dtype, tol):
    if kernel == "megablox_tpu" and dtype == jnp.bfloat16:
        pytest.skip("one megablox interpret case is enough for CI time")
    x, w, dy = _inputs(dtype)
    gs = jnp.asarray(GROUPS)
    got = _fwd_bwd(KERNELS[kernel], x, w, gs, dy)
    want = _fwd_bwd(_reference, x, w, gs, dy)
    for name, g, r in zip(("out", "dx", "dw"), got, want):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.isfinite(g).all(), f"{name} not finite"
        err = np.abs(g - r).max() / np.abs(r).max()
        assert err <= tol, f"{name}: relative error {err:.2e}"
    assert np.all(np.asarray(got[0])[GROUPS.sum():] == 0), "rows past sum(group_sizes) must be 0"
    for g in np.flatnonzero(GROUPS == 0):
        assert np.all(np.asarray(got[2])[g] == 0), "an empty group gets a zero weight gradient"


def test_backend_table_gmm_validates_and_runs():
    x, w, _ = _inputs(jnp.float32)
    gs = jnp.asarray(GROUPS)
    pallas = backends.lookup("grouped_matmul", "pallas")  # interpret mode on CPU
    np.testing.assert_allclose(pallas(x, w, gs, preferred_element_type=jnp.float32), _reference(x, w, gs),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="group_sizes"):
        pallas(x, w, gs[:3], preferred_element_type=jnp.float32)


@pytest.mark.parametrize("block_m,capacity_factor", [(1, 0.25), (3, 0.0), (16, 0.25), (64, 1.0), (8, 8.0)])
def test_xla_tiled_traced_group_sizes(block_m, capacity_factor):
    """Group sizes as a traced jit argument (as in the model), random sizes with empty groups and
    groups spanning several tiles, tiles bigger than whole groups; every row in the tile loop
    (capacity 0), most rows overflowing small slabs, and slabs holding every group: forward and
    grads vs ragged_dot."""
    rng = np.random.default_rng(block_m)
    sizes = rng.multinomial(50, rng.dirichlet(np.full(7, 0.5))).astype(np.int32)  # 50 of 57 rows grouped
    x, w, dy = _inputs(jnp.float32, m=57, k=12, n=20)
    w = w[:1].repeat(7, 0) * jnp.arange(1, 8, dtype=jnp.float32)[:, None, None]

    @functools.partial(jax.jit, static_argnums=0)
    def run(f, x, w, gs):
        out, vjp = jax.vjp(lambda x, w: f(x, w, gs), x, w)
        return (out, *vjp(dy))

    capacity = xla_tiled.slab_capacity(57, 7, capacity_factor)
    assert (sizes.max() <= capacity) == (capacity_factor == 8.0)  # the other cases overflow their slabs
    gmm = functools.partial(xla_tiled.grouped_matmul, block_m=block_m, capacity_factor=capacity_factor)
    got = run(gmm, x, w, jnp.asarray(sizes))
    want = run(_reference, x, w, jnp.asarray(sizes))
    for name, g, r in zip(("out", "dx", "dw"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("impl", ["xla", "xla_tiled", "pallas", "auto"])
def test_ops_grouped_matmul_takes_plain_sizes_and_names_bad_ones(impl):
    """group_sizes as a Python list or numpy array; a numpy loop is the reference."""
    from llada2_jax import ops
    x, w, _ = _inputs(jnp.float32)
    want, start = np.zeros((x.shape[0], w.shape[2]), np.float32), 0
    for g, size in enumerate(GROUPS):
        want[start:start + size] = np.asarray(x)[start:start + size] @ np.asarray(w)[g]
        start += size
    for sizes in (GROUPS.tolist(), GROUPS):
        got = ops.grouped_matmul(x, w, sizes, impl=impl, interpret=True)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="sum to 100 rows but x has only 80"):
        ops.grouped_matmul(x, w, [20, 0, 37, 5, 18, 20], impl=impl)
    with pytest.raises(ValueError, match="group_sizes shape"):
        ops.grouped_matmul(x, w, [40, 40], impl=impl)
