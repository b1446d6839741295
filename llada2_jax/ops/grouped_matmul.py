"""`grouped_matmul(x, w, group_sizes, impl)`: the MoE expert matmul over expert-sorted rows."""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla", "xla_tiled", "pallas", "auto")


def grouped_matmul(x, w, group_sizes, impl: str = "xla", *, interpret: bool | None = None,
                   preferred_element_type=jnp.float32):
    """Rows of x (M, K) are sorted by group; group g multiplies w[g] (K, N). Returns (M, N).

    Rows beyond sum(group_sizes) produce zeros. "xla" is `jax.lax.ragged_dot` (the reference);
    "xla_tiled" pads groups to row tiles and runs one batched matmul (ragged_dot is slower than
    dense on CPU); "pallas" is the TPU megablox / GPU Pallas kernel; "auto" picks per backend.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped_matmul impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla_tiled"
    if impl == "xla_tiled":
        from kernels_pallas.grouped_matmul import xla_tiled
        return xla_tiled.grouped_matmul(x, w, group_sizes, preferred_element_type=preferred_element_type)
    if impl == "pallas":
        from kernels_pallas import dispatch
        return dispatch.grouped_matmul(x, w, group_sizes, interpret=interpret,
                                       preferred_element_type=preferred_element_type)
    return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32),
                              preferred_element_type=preferred_element_type)
