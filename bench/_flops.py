"""Model FLOP counts shared by the benches (matmuls only: norms, softmax, RoPE are not counted)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from llada2_jax.model import ModelConfig


def dense_layer_flops(mc: ModelConfig, tokens: int) -> float:
    """q, k, v, o projections and the SwiGLU of every layer, for `tokens` query tokens."""
    d, hq, hkv, hd, f = (mc.hidden_size, mc.num_attention_heads, mc.num_key_value_heads, mc.resolved_head_dim,
                         mc.intermediate_size)
    return 2.0 * tokens * mc.num_hidden_layers * (d * hq * hd + 2 * d * hkv * hd + hq * hd * d + 3 * d * f)


def attention_flops(mc: ModelConfig, queries: int, keys: int) -> float:
    """QK^T and PV of every layer, `queries` against `keys` (the full rectangle, masked or not)."""
    return 4.0 * mc.num_hidden_layers * queries * keys * mc.num_attention_heads * mc.resolved_head_dim


def head_flops(mc: ModelConfig, rows: int) -> float:
    """The vocabulary projection of `rows` positions."""
    return 2.0 * rows * mc.hidden_size * mc.vocab_size


def matmul_peak(n: int = 4096, reps: int = 3) -> float:
    """fp32 GFLOP/s of one jitted n x n x n jnp.dot (best of `reps`)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9
