"""Grouped matmul in plain XLA for CPU: per-group capacity slabs in one batched matmul, plus a loop
over row tiles for the rows that overflow them.

Why: `jax.lax.ragged_dot` on CPU (jax 0.10) is several times slower than running every expert
densely (bench/moe.py), so dropless MoE on CPU needs another lowering.
- Slabs: the first C rows of every group are gathered into an (E, C, K) slab and multiplied by
  all E weights in one batched einsum, which XLA runs on every core; short groups leave zero rows.
  C = f*mean + 2*sqrt(f*mean), a multiple of 8 (mean = M / E, f = capacity_factor): with balanced
  routing a group's size spreads by about sqrt(mean), so few rows overflow.
- Overflow: rows past C in a group are cut into row tiles of block_m (a group's last tile overlaps
  the next group's rows, which are masked out of the write); a `fori_loop` visits only the tiles
  that exist, reading the group's weight in place, one (block_m, K) x (K, N) matmul each.
Every row movement is a gather, in both directions. Own backward: dx and dw from the same slab
layout (batched einsums) plus the same loop. Rows past sum(group_sizes) give 0.
capacity_factor = 0 runs every row through the loop.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.grouped_matmul.shapes import check_shapes

DEFAULT_BLOCK_M = 32  # best of 16 / 32 / 64 for E = 64, K = 256, N = 128 on the 2-core CPU
DEFAULT_CAPACITY_FACTOR = 1.0  # f*mean alone of 1.0 / 1.25 / 1.5: 1.25 best at 512 tokens, 1.0 at 2048-8192


def grouped_matmul(x, w, group_sizes, *, block_m: int = DEFAULT_BLOCK_M,
                   capacity_factor: float = DEFAULT_CAPACITY_FACTOR, preferred_element_type=jnp.float32):
    """(M, K) rows sorted by group x (E, K, N) -> (M, N) in preferred_element_type."""
    check_shapes(x, w, group_sizes)
    if capacity_factor < 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be >= 0 (0 = no slabs, every row in the tile loop)")
    capacity = slab_capacity(x.shape[0], w.shape[0], capacity_factor)
    return _gmm(x, w, group_sizes.astype(jnp.int32), block_m, capacity, jnp.dtype(preferred_element_type))


def slab_capacity(m: int, groups: int, capacity_factor: float) -> int:
    """Slab rows per group: f*mean + 2*sqrt(f*mean), rounded up to a multiple of 8, at most m."""
    if capacity_factor == 0:
        return 0
    rows = capacity_factor * m / groups
    round8 = lambda n: -(-n // 8) * 8
    return min(round8(math.ceil(rows + 2 * math.sqrt(rows))), round8(m))


class _Tiles(NamedTuple):
    start: jax.Array  # (n_max,) first row of each tile
    group: jax.Array  # (n_max,)
    end: jax.Array  # (n_max,) end row of the tile's group: rows at or past it belong to another group
    count: jax.Array  # () tiles that exist; entries past it are never visited


class _Layout(NamedTuple):
    slab_rows: jax.Array  # (E, C) row of x in each slab slot; M (a zero row of the padded x) for empty slots
    slab_index: jax.Array  # (M + block_m,) flat slab slot of each padded row; E * C (a zero row) outside the slabs
    tiles: _Tiles  # the rows past C of each group


def _tiles(starts, sizes, m: int, block_m: int) -> _Tiles:
    """Row tiles of block_m over each group's rows [starts[g], starts[g] + sizes[g])."""
    e = sizes.shape[0]
    per_group = -(-sizes // block_m)
    tile_ends = jnp.cumsum(per_group)
    index = jnp.arange(-(-m // block_m) + e, dtype=jnp.int32)  # static bound on the tile count
    group = jnp.minimum(jnp.searchsorted(tile_ends, index, side="right"), e - 1)
    start = starts[group] + (index - tile_ends[group] + per_group[group]) * block_m
    return _Tiles(start, group, starts[group] + sizes[group], tile_ends[-1])


def _layout(group_sizes, m: int, capacity: int, block_m: int) -> _Layout:
    e = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    col = jnp.arange(capacity, dtype=jnp.int32)
    slab_rows = jnp.where(col < group_sizes[:, None], starts[:, None] + col, m)
    row = jnp.arange(m + block_m, dtype=jnp.int32)  # the padded rows, so the gather needs no pad after it
    group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), e - 1)
    offset = row - starts[group]
    in_slab = (offset < capacity) & (row < ends[-1])
    slab_index = jnp.where(in_slab, group * capacity + offset, e * capacity)
    tiles = _tiles(starts + capacity, jnp.maximum(group_sizes - capacity, 0), m, block_m)
    return _Layout(slab_rows, slab_index, tiles)


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


def _unslab(slab, layout: _Layout):
    """(E, C, N) slab -> (M + block_m, N) rows (zero outside the slabs and in the padding)."""
    e, c, n = slab.shape
    return jnp.concatenate([slab.reshape(e * c, n), jnp.zeros((1, n), slab.dtype)])[layout.slab_index]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(x, w, group_sizes, block_m, capacity, out_dtype):
    return _gmm_fwd(x, w, group_sizes, block_m, capacity, out_dtype)[0]


def _gmm_fwd(x, w, group_sizes, block_m, capacity, out_dtype):
    m = x.shape[0]
    layout = _layout(group_sizes, m, capacity, block_m)
    xp = jnp.pad(x, ((0, block_m), (0, 0)))  # slices starting near M are never clamped; row M is the zero row
    y = _unslab(jnp.einsum("eck,ekn->ecn", xp[layout.slab_rows], w, preferred_element_type=out_dtype), layout)

    def body(start, g, mask, y):
        return _write_rows(y, start, mask, jnp.dot(_rows(xp, start, block_m), w[g], preferred_element_type=out_dtype))

    y = _tile_loop(layout.tiles, block_m, body, y)
    return y[:m], (xp, w, layout)


def _gmm_bwd(block_m, capacity, out_dtype, res, dy):
    xp, w, layout = res  # the padded rows and the layout of the forward
    m, acc = dy.shape[0], jnp.float32
    dyp = jnp.pad(dy, ((0, block_m), (0, 0)))
    # x's slab is gathered again rather than kept from the forward: an (E, C, K) residual per matmul
    x_slab, dy_slab = xp[layout.slab_rows], dyp[layout.slab_rows].astype(w.dtype)
    dx = _unslab(jnp.einsum("ecn,ekn->eck", dy_slab, w, preferred_element_type=acc), layout)
    dw = jnp.einsum("eck,ecn->ekn", x_slab, dy_slab, preferred_element_type=acc)

    def body(start, g, mask, carry):
        dx, dw = carry
        dy_rows = jnp.where(mask, _rows(dyp, start, block_m), 0).astype(w.dtype)
        dx = _write_rows(dx, start, mask, jnp.dot(dy_rows, w[g].T, preferred_element_type=acc))
        dw = dw.at[g].add(jnp.dot(_rows(xp, start, block_m).T, dy_rows, preferred_element_type=acc))
        return dx, dw

    dx, dw = _tile_loop(layout.tiles, block_m, body, (dx, dw))
    return dx[:m].astype(xp.dtype), dw.astype(w.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
