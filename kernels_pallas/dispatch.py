"""Backend choice for the kernels reached from `llada2_jax.ops`.

attention impl "xla_sparse" -> tile-skipping XLA path (any backend);
              "pallas"     -> on TPU the Mosaic kernel (block_sparse_attention/tpu.py), elsewhere
                              the Pallas/Triton kernel (gpu.py); interpret mode on CPU unless told
                              otherwise.
grouped_matmul -> megablox gmm on TPU, the Pallas/Triton kernel elsewhere (interpret on CPU).
Imports only jax/numpy and this repo, so the GPU check runs with a bare jax install.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llada2_jax.diffusion.masks import MaskSpec

ATTENTION_IMPLS = ("xla_sparse", "pallas")


def _backend() -> str:
    return jax.default_backend()


def _interpret(interpret: bool | None) -> bool:
    return _backend() == "cpu" if interpret is None else bool(interpret)


def attention(q, k, v, spec: MaskSpec, impl: str = "xla_sparse", scale: float | None = None,
              interpret: bool | None = None):
    """Masked attention driven by the MaskSpec tile map; see `llada2_jax.ops.attention`."""
    if not isinstance(spec, MaskSpec):
        raise ValueError(f"kernel attention needs a MaskSpec, got {type(spec).__name__}")
    if impl == "xla_sparse":
        from kernels_pallas import xla_sparse
        return xla_sparse.attention(q, k, v, spec, scale=scale)
    if impl != "pallas":
        raise ValueError(f"unknown kernel attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    interpret = _interpret(interpret)
    if _backend() == "tpu":
        from kernels_pallas.block_sparse_attention import tpu
        return tpu.attention(q, k, v, spec, scale=scale, interpret=interpret)
    from kernels_pallas.block_sparse_attention import gpu
    return gpu.attention(q, k, v, spec, scale=scale, interpret=interpret)


def grouped_matmul(x, w, group_sizes, interpret: bool | None = None, preferred_element_type=jnp.float32):
    """(M, K) rows sorted by group x (E, K, N) -> (M, N); rows past sum(group_sizes) are 0."""
    interpret = _interpret(interpret)
    if _backend() == "tpu" and not interpret:
        from kernels_pallas.grouped_matmul import tpu
        return tpu.grouped_matmul(x, w, group_sizes, preferred_element_type=preferred_element_type)
    from kernels_pallas.grouped_matmul import gpu
    return gpu.grouped_matmul(x, w, group_sizes, interpret=interpret,
                              preferred_element_type=preferred_element_type)
