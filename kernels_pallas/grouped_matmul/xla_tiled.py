"""Grouped matmul in plain XLA for CPU: each group is padded to whole row tiles, then one batched
matmul multiplies every tile by its group's weight (gathered per tile).

Why: `jax.lax.ragged_dot` on CPU (jax 0.10) is several times slower than running every expert
densely (bench/moe.py), so dropless MoE on CPU needs another lowering. Work is
(M + E * (block_m - 1)) * K * N instead of E * M * K * N; static shapes because the number of
tiles is bounded by cdiv(M, block_m) + E. Memory: the gathered weights are
(cdiv(M, block_m) + E) / E times the expert weights. Differentiable by autodiff.
Rows past sum(group_sizes) give 0.
"""
from __future__ import annotations

import jax.numpy as jnp
from kernels_pallas.grouped_matmul.shapes import check_shapes


def grouped_matmul(x, w, group_sizes, *, block_m: int = 128, preferred_element_type=jnp.float32):
    """(M, K) rows sorted by group x (E, K, N) -> (M, N) in preferred_element_type."""
    m, kdim, e, n = check_shapes(x, w, group_sizes)
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    padded_sizes = -(-sizes // block_m) * block_m
    padded_ends = jnp.cumsum(padded_sizes)
    padded_starts = padded_ends - padded_sizes
    n_tiles = -(-m // block_m) + e
    rows = jnp.arange(m, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), e - 1)
    dest = jnp.where(rows < ends[-1], padded_starts[group] + rows - starts[group], n_tiles * block_m)
    xp = jnp.zeros((n_tiles * block_m, kdim), x.dtype).at[dest].set(x, mode="drop")
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(n_tiles) * block_m, side="right"), e - 1)
    y = jnp.einsum("tmk,tkn->tmn", xp.reshape(n_tiles, block_m, kdim), w[tile_group],
                   preferred_element_type=preferred_element_type).reshape(n_tiles * block_m, n)
    return jnp.take(y, dest, axis=0, mode="fill", fill_value=0).astype(preferred_element_type)
