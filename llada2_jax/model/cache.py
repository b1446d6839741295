"""KV cache for decoding: post-RoPE keys/values of every layer, written at absolute positions."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # (num_layers, B, S, Hkv, D)
    v: jax.Array

    @classmethod
    def create(cls, config, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.resolved_head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def grow(self, max_len: int) -> "KVCache":
        """The same cache with empty slots appended up to `max_len` (decoders grow it as they go)."""
        if max_len < self.max_len:
            raise ValueError(f"cannot shrink a KV cache from {self.max_len} to {max_len} slots")
        pad = [(0, 0)] * self.k.ndim
        pad[2] = (0, max_len - self.max_len)
        return KVCache(jnp.pad(self.k, pad), jnp.pad(self.v, pad))


def write(cache_k, cache_v, k, v, positions):
    """Write k/v (B, T, Hkv, D) into one layer's cache (B, S, Hkv, D) at slots positions (B, T)."""
    rows = jnp.arange(k.shape[0])[:, None]
    return (cache_k.at[rows, positions].set(k.astype(cache_k.dtype)),
            cache_v.at[rows, positions].set(v.astype(cache_v.dtype)))
