"""`grouped_matmul(x, w, group_sizes, impl)`: the MoE expert matmul over expert-sorted rows."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.grouped_matmul.shapes import check_shapes
from llada2_jax.ops import backends


def grouped_matmul(x, w, group_sizes, impl: str = "xla", *, interpret: bool | None = None,
                   preferred_element_type=jnp.float32):
    """Rows of x (M, K) are sorted by group; group g multiplies w[g] (K, N). Returns (M, N).

    Rows beyond sum(group_sizes) produce zeros. "xla" is `jax.lax.ragged_dot` (the reference);
    "xla_tiled" multiplies per-group capacity slabs in one batched einsum and loops over row tiles
    for the overflow (the CPU choice: ragged_dot is slower than dense on CPU);
    "pallas" is the TPU megablox / GPU Pallas kernel; "auto" picks per platform (ops.backends).
    group_sizes may be any integer sequence; a concrete one summing past M is an error.
    """
    backends.check("grouped_matmul", impl)
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    check_shapes(x, w, group_sizes)
    _check_total(group_sizes, x.shape[0])
    backend = backends.lookup("grouped_matmul", impl, interpret)
    return backend(x, w, group_sizes, preferred_element_type=preferred_element_type)


def _check_total(group_sizes, rows: int) -> None:
    try:
        total = int(group_sizes.sum())
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return  # traced sizes (inside jit): nothing to check before running
    if total > rows:
        raise ValueError(f"group_sizes sum to {total} rows but x has only {rows}")
