"""`grouped_matmul(x, w, group_sizes, impl)`: the MoE expert matmul over expert-sorted rows."""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla", "xla_tiled", "pallas", "auto")


def grouped_matmul(x, w, group_sizes, impl: str = "xla", *, interpret: bool | None = None,
                   preferred_element_type=jnp.float32):
    """Rows of x (M, K) are sorted by group; group g multiplies w[g] (K, N). Returns (M, N).

    Rows beyond sum(group_sizes) produce zeros. "xla" is `jax.lax.ragged_dot` (the reference);
    "xla_tiled" multiplies per-group capacity slabs in one batched einsum and loops over row tiles
    for the overflow (the CPU choice: ragged_dot is slower than dense on CPU);
    "pallas" is the TPU megablox / GPU Pallas kernel; "auto" picks per backend. group_sizes may be
    any integer sequence; a concrete one summing past M is an error.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped_matmul impl {impl!r}; expected one of {IMPLS}")
    from kernels_pallas.grouped_matmul.shapes import check_shapes  # local: kernels are optional
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    check_shapes(x, w, group_sizes)
    _check_total(group_sizes, x.shape[0])
    if impl == "auto":
        impl = "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla_tiled"
    if impl == "xla_tiled":
        from kernels_pallas.grouped_matmul import xla_tiled
        return xla_tiled.grouped_matmul(x, w, group_sizes, preferred_element_type=preferred_element_type)
    if impl == "pallas":
        from kernels_pallas import dispatch
        return dispatch.grouped_matmul(x, w, group_sizes, interpret=interpret,
                                       preferred_element_type=preferred_element_type)
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=preferred_element_type)


def _check_total(group_sizes, rows: int) -> None:
    try:
        total = int(group_sizes.sum())
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return  # traced sizes (inside jit): nothing to check before running
    if total > rows:
        raise ValueError(f"group_sizes sum to {total} rows but x has only {rows}")
