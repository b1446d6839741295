"""`attention(q, k, v, mask, impl)`: one entry point for every attention backend.

"xla" is the dense reference that runs anywhere; "xla_sparse" (ops.xla_sparse) and "pallas"
(kernels_pallas) consume the MaskSpec features directly (they never build the dense mask). The
backend comes from the table in `ops.backends`. The kernel impls are per-device, so they go
through `ops.sharded`, which runs them under `shard_map` (batch and heads split) when a
multi-device mesh is in context or on q.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llada2_jax.core.masks import MaskSpec
from llada2_jax.ops import backends, sharded
from llada2_jax.ops.reference import xla_attention

__all__ = ["attention", "dense_mask", "xla_attention"]


def attention(q, k, v, mask="causal", impl: str = "xla", *, scale: float | None = None,
              interpret: bool | None = None):
    """Softmax attention with GQA.

    q: (B, T, Hq, D); k, v: (B, S, Hkv, D) with Hq a multiple of Hkv (query head h uses kv head
    h // (Hq // Hkv)). mask: "causal" | "bidirectional" | bool (B, T, S) | MaskSpec; "causal"
    with T < S means the queries are the last T of the S keys (decode). A dense bool mask has no
    per-token features to build a tile map from, so every impl runs it on the dense path.
    Returns (B, T, Hq, D) in q's dtype; scores and softmax are computed in fp32.
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    backends.check("attention", impl)
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    if isinstance(mask, str):
        mask = _as_mask_spec(mask, b, t, s)
    if not isinstance(mask, MaskSpec):  # a dense bool mask has no features to build a tile map from
        return xla_attention(q, k, v, dense_mask(mask, b, t, s), scale=scale)
    if impl == "auto" and mask.rule != "block_diffusion":
        impl = "xla"  # only the block-diffusion layout leaves enough empty tiles to pay for a kernel
    kernel = functools.partial(backends.lookup("attention", impl, interpret), scale=scale)
    if backends.per_device("attention", impl):
        return sharded.attention(kernel, q, k, v, mask)
    return kernel(q, k, v, mask)


def _as_mask_spec(mask: str, b, t, s) -> MaskSpec:
    """"causal" (queries are the last t of s keys) or "bidirectional" as features."""
    if mask not in ("causal", "bidirectional"):
        raise ValueError(f"unknown mask {mask!r}; expected 'causal', 'bidirectional', a bool array or a MaskSpec")
    zeros_q, zeros_k = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    if mask == "bidirectional":
        return MaskSpec(zeros_q, zeros_q, zeros_q + 1, zeros_k, zeros_k, zeros_k + 1, "bidirectional")
    q_pos = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (b, t))
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return MaskSpec(zeros_q, q_pos, zeros_q + 1, zeros_k, k_pos, zeros_k + 1, "causal")


def dense_mask(mask, b: int, t: int, s: int) -> jax.Array:
    """Any accepted mask form -> bool (B, T, S)."""
    if isinstance(mask, MaskSpec):
        return mask.dense()
    if isinstance(mask, str):  # one definition of the string masks for every impl
        return _as_mask_spec(mask, b, t, s).dense()
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_ or mask.shape != (b, t, s):
        raise ValueError(f"a dense mask must be bool of shape {(b, t, s)}, got {mask.dtype} {mask.shape}")
    return mask
