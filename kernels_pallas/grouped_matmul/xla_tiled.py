"""Grouped matmul in plain XLA for CPU: a loop over row tiles, one (block_m, K) x (K, N) matmul each.

Why: `jax.lax.ragged_dot` on CPU (jax 0.10) is several times slower than running every expert
densely (bench/moe.py), so dropless MoE on CPU needs another lowering. Each group is cut into
row tiles of block_m (its last tile overlaps the next group's rows, which are masked out); a
`fori_loop` visits only the tiles that exist, reading the group's weight in place, so work is
about (M + E * block_m / 2) * K * N and every step's operands stay in cache (a batched einsum
over all tiles with gathered weights was 2-3x slower). Own backward: dx by the same loop with
the transposed weights, dw accumulated per tile. Rows past sum(group_sizes) give 0.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.grouped_matmul.shapes import check_shapes

DEFAULT_BLOCK_M = 32  # best of 32 / 64 / 128 for E = 64, K = 256, N = 128 on the 2-core CPU


def grouped_matmul(x, w, group_sizes, *, block_m: int = DEFAULT_BLOCK_M, preferred_element_type=jnp.float32):
    """(M, K) rows sorted by group x (E, K, N) -> (M, N) in preferred_element_type."""
    check_shapes(x, w, group_sizes)
    return _gmm(x, w, group_sizes.astype(jnp.int32), block_m, jnp.dtype(preferred_element_type))


class _Tiles(NamedTuple):
    start: jax.Array  # (n_max,) first row of each tile
    group: jax.Array  # (n_max,)
    end: jax.Array  # (n_max,) end row of the tile's group: rows at or past it belong to another group
    count: jax.Array  # () tiles that exist; entries past it are never visited


def _tiles(group_sizes, m: int, block_m: int) -> _Tiles:
    e = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    per_group = -(-group_sizes // block_m)
    tile_ends = jnp.cumsum(per_group)
    index = jnp.arange(-(-m // block_m) + e, dtype=jnp.int32)  # static bound on the tile count
    group = jnp.minimum(jnp.searchsorted(tile_ends, index, side="right"), e - 1)
    first_tile = tile_ends[group] - per_group[group]
    start = ends[group] - group_sizes[group] + (index - first_tile) * block_m
    return _Tiles(start, group, ends[group], tile_ends[-1])


def _tile_loop(tiles: _Tiles, block_m: int, body, carry):
    """body(start, group, row_mask (block_m, 1), carry) over the existing tiles."""
    rows = jnp.arange(block_m)

    def step(t, c):
        start = tiles.start[t]
        return body(start, tiles.group[t], (start + rows < tiles.end[t])[:, None], c)

    return jax.lax.fori_loop(0, tiles.count, step, carry)


def _rows(a, start, block_m):
    return jax.lax.dynamic_slice_in_dim(a, start, block_m)


def _write_rows(a, start, mask, value):
    """a[start:start+block_m] = value on masked rows (other rows belong to the next group's tile)."""
    return jax.lax.dynamic_update_slice_in_dim(a, jnp.where(mask, value, _rows(a, start, mask.shape[0])), start, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x, w, group_sizes, block_m, out_dtype):
    return _gmm_fwd(x, w, group_sizes, block_m, out_dtype)[0]


def _gmm_fwd(x, w, group_sizes, block_m, out_dtype):
    m = x.shape[0]
    tiles = _tiles(group_sizes, m, block_m)
    xp = jnp.pad(x, ((0, block_m), (0, 0)))  # slices starting near M are never clamped

    def body(start, g, mask, y):
        return _write_rows(y, start, mask, jnp.dot(_rows(xp, start, block_m), w[g], preferred_element_type=out_dtype))

    y = _tile_loop(tiles, block_m, body, jnp.zeros((m + block_m, w.shape[2]), out_dtype))
    return y[:m], (xp, w, tiles)


def _gmm_bwd(block_m, out_dtype, res, dy):
    xp, w, tiles = res  # the padded rows and the tile list of the forward
    m, acc = dy.shape[0], jnp.float32
    dyp = jnp.pad(dy, ((0, block_m), (0, 0)))

    def body(start, g, mask, carry):
        dx, dw = carry
        dy_rows = jnp.where(mask, _rows(dyp, start, block_m), 0).astype(w.dtype)
        dx = _write_rows(dx, start, mask, jnp.dot(dy_rows, w[g].T, preferred_element_type=acc))
        dw = dw.at[g].add(jnp.dot(_rows(xp, start, block_m).T, dy_rows, preferred_element_type=acc))
        return dx, dw

    dx, dw = _tile_loop(tiles, block_m, body, (jnp.zeros((m + block_m, xp.shape[1]), acc), jnp.zeros(w.shape, acc)))
    return dx[:m].astype(xp.dtype), dw.astype(w.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
