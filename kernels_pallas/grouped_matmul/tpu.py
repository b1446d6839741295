"""Grouped matmul on TPU: `jax.experimental.pallas.ops.tpu.megablox` gmm (its custom_vjp gives
the backward). Rows, K and N are zero-padded to the 128 tiling; rows past sum(group_sizes) are
zeroed explicitly in value and gradient (megablox leaves them unspecified)."""
from __future__ import annotations

import jax.numpy as jnp
from kernels_pallas.grouped_matmul.shapes import check_shapes

TILE = 128


def grouped_matmul(x, w, group_sizes, *, preferred_element_type=jnp.float32, interpret: bool = False):
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    m, kdim, e, n = check_shapes(x, w, group_sizes)
    pad = lambda a: -(-a // TILE) * TILE - a  # noqa: E731
    xp = jnp.pad(x, ((0, pad(m)), (0, pad(kdim))))
    wp = jnp.pad(w, ((0, 0), (0, pad(kdim)), (0, pad(n))))
    group_sizes = group_sizes.astype(jnp.int32)
    in_group = jnp.arange(xp.shape[0])[:, None] < group_sizes.sum()
    xp = jnp.where(in_group, xp, 0)  # the select also zeroes megablox's unspecified dX rows
    out = megablox.gmm(xp, wp, group_sizes, preferred_element_type, (TILE, TILE, TILE), None, None,
                       False, interpret)
    return jnp.where(in_group, out, 0)[:m, :n].astype(preferred_element_type)
