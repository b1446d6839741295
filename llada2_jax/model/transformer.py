"""The decoder-only Transformer shared by all five families (Flax NNX).

Layers are stored stacked (a leading `layers` axis on every weight) in two stacks, the leading
dense layers and the MoE layers, and run with `jax.lax.scan` under a remat policy, so compile time
does not grow with depth. The model knows nothing about diffusion: callers choose tokens,
positions, the mask and (optionally) noise added to the input embeddings.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llada2_jax import ops
from llada2_jax.core.masks import MaskSpec
from llada2_jax.model import cache as kv
from llada2_jax.model.config import ModelConfig
from llada2_jax.model.layers import apply_rope, rms_norm, rope_frequencies, swiglu
from llada2_jax.model.moe import moe_ffn


class ExpertBias(nnx.Variable):
    """Router selection bias: a buffer updated by the balancing rule, never by the optimizer."""


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # (B, T, V) fp32, or None when compute_logits=False
    hidden: jax.Array  # (B, T, d) after the final norm
    cache: kv.KVCache | None
    expert_load: jax.Array | None  # (num_moe_layers, E)


_REMAT = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs, shape, axes, dtype, std=0.02):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


def _ones(shape, axes, dtype):
    return nnx.Param(jnp.ones(shape, dtype), axes=axes)


def _zeros(shape, axes, dtype):
    return nnx.Param(jnp.zeros(shape, dtype), axes=axes)


class LayerStack(nnx.Module):
    """`n` identical decoder layers with stacked weights (leading axis = layer)."""

    def __init__(self, config: ModelConfig, n: int, moe: bool, *, rngs: nnx.Rngs):
        c, dt = config, jnp.dtype(config.param_dtype)
        d, hq, hkv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.resolved_head_dim
        self.num_layers, self.moe = n, moe
        self.input_norm = _ones((n, d), ("layers", "norm"), dt)
        self.post_norm = _ones((n, d), ("layers", "norm"), dt)
        self.wq = _param(rngs, (n, d, hq, hd), ("layers", "embed", "heads", "head_dim"), dt)
        self.wk = _param(rngs, (n, d, hkv, hd), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.wv = _param(rngs, (n, d, hkv, hd), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.wo = _param(rngs, (n, hq, hd, d), ("layers", "heads", "head_dim", "embed"), dt)
        if c.attention_bias:
            self.bq = _zeros((n, hq, hd), ("layers", "heads", "head_dim"), dt)
            self.bk = _zeros((n, hkv, hd), ("layers", "kv_heads", "head_dim"), dt)
            self.bv = _zeros((n, hkv, hd), ("layers", "kv_heads", "head_dim"), dt)
        if c.qk_norm:
            self.q_norm = _ones((n, hd), ("layers", "head_dim"), dt)
            self.k_norm = _ones((n, hd), ("layers", "head_dim"), dt)
        if not moe:
            f = c.intermediate_size
            self.w_gate = _param(rngs, (n, d, f), ("layers", "embed", "mlp"), dt)
            self.w_up = _param(rngs, (n, d, f), ("layers", "embed", "mlp"), dt)
            self.w_down = _param(rngs, (n, f, d), ("layers", "mlp", "embed"), dt)
            return
        e, i = c.num_experts, c.moe_intermediate_size
        self.router = _param(rngs, (n, d, e), ("layers", "embed", None), dt)
        if c.use_expert_bias:
            self.expert_bias = ExpertBias(jnp.zeros((n, e), jnp.float32), axes=("layers", None))
        self.e_gate = _param(rngs, (n, e, d, i), ("layers", "expert", "embed", "mlp"), dt)
        self.e_up = _param(rngs, (n, e, d, i), ("layers", "expert", "embed", "mlp"), dt)
        self.e_down = _param(rngs, (n, e, i, d), ("layers", "expert", "mlp", "embed"), dt)
        if c.num_shared_experts:
            s = i * c.num_shared_experts
            self.s_gate = _param(rngs, (n, d, s), ("layers", "embed", "mlp"), dt)
            self.s_up = _param(rngs, (n, d, s), ("layers", "embed", "mlp"), dt)
            self.s_down = _param(rngs, (n, s, d), ("layers", "mlp", "embed"), dt)

    def weights(self) -> dict[str, jax.Array]:
        """Every stacked array of this stack by name (params and the expert-bias buffer)."""
        return {name: var.get_value() for name, var in vars(self).items() if isinstance(var, nnx.Variable)}


def _decoder_layer(config, moe: bool, rope, mask, x, p, positions, cache_kv):
    """One pre-norm decoder layer (MoE feed-forward when `moe`). Returns (x, new (k, v) cache or
    None, expert load or None)."""
    dt = x.dtype
    a = rms_norm(x, p["input_norm"], config.rms_norm_eps)
    q = jnp.einsum("btd,dhk->bthk", a, p["wq"].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", a, p["wk"].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", a, p["wv"].astype(dt))
    if config.attention_bias:
        q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    if config.qk_norm:
        q = rms_norm(q, p["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], config.rms_norm_eps)
    inv_freq, rope_scale = rope
    q = apply_rope(q, positions, inv_freq, rope_scale)
    k = apply_rope(k, positions, inv_freq, rope_scale)
    new_cache = None
    if cache_kv is not None:
        new_cache = kv.write(*cache_kv, k, v, positions)
        k, v = new_cache
    o = ops.attention(q, k.astype(dt), v.astype(dt), mask, impl=config.attention_impl)
    x = x + jnp.einsum("bthk,hkd->btd", o, p["wo"].astype(dt))
    m = rms_norm(x, p["post_norm"], config.rms_norm_eps)
    if moe:
        y, load = moe_ffn(config, p, m)
    else:
        y, load = swiglu(m, p["w_gate"].astype(dt), p["w_up"].astype(dt), p["w_down"].astype(dt)), None
    return x + y, new_cache, load


class Transformer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        c, dt = config, jnp.dtype(config.param_dtype)
        self.config = config
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), dt)
        self.dense_layers = LayerStack(c, c.num_dense_layers, False, rngs=rngs) if c.num_dense_layers else None
        self.moe_layers = LayerStack(c, c.num_moe_layers, True, rngs=rngs) if c.num_moe_layers else None
        self.final_norm = _ones((c.hidden_size,), ("norm",), dt)
        self.lm_head = None if c.tie_word_embeddings else _param(
            rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), dt)
        self.frozen_layers = 0

    def freeze_bottom(self, n: int) -> None:
        """Let no gradient reach the bottom `n` layers or the input embedding lookup below them.

        Fine-tuning only the top of a model then skips the backward pass through the frozen
        layers altogether (the optimizer must also leave them alone: `training.state`). The
        forward is unchanged. `n` is static: changing it recompiles.
        """
        if not 0 <= n <= self.config.num_hidden_layers:
            raise ValueError(f"frozen layers={n} must be in [0, num_hidden_layers={self.config.num_hidden_layers}]")
        self.frozen_layers = n

    def __call__(self, tokens, positions=None, mask="causal"):
        return self.forward(tokens, positions, mask).logits

    def forward(self, tokens, positions=None, mask="causal", *, embed_noise=None,
                cache: kv.KVCache | None = None, compute_logits: bool = True) -> ModelOutput:
        c = self.config
        tokens = jnp.asarray(tokens, jnp.int32)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = jnp.asarray(positions, jnp.int32)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(c.dtype)
        if embed_noise is not None:
            x = x + embed_noise.astype(c.dtype)
        if self.frozen_layers:
            x = jax.lax.stop_gradient(x)
        mask = self._prepare_mask(mask, positions, cache)
        rope = rope_frequencies(c)
        new_k, new_v, loads = [], [], []
        offset = 0
        for stack in (self.dense_layers, self.moe_layers):
            if stack is None:
                continue
            layer_cache = None
            if cache is not None:
                layer_cache = (cache.k[offset:offset + stack.num_layers], cache.v[offset:offset + stack.num_layers])
            frozen = min(max(self.frozen_layers - offset, 0), stack.num_layers)
            x, stack_cache, load = self._run_stack(stack, x, positions, mask, rope, layer_cache, frozen)
            offset += stack.num_layers
            if stack_cache is not None:
                new_k.append(stack_cache[0])
                new_v.append(stack_cache[1])
            if load is not None:
                loads.append(load)
        hidden = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        new_cache = kv.KVCache(jnp.concatenate(new_k), jnp.concatenate(new_v)) if cache is not None else None
        logits = self.logits_from_hidden(hidden) if compute_logits else None
        return ModelOutput(logits, hidden, new_cache, jnp.concatenate(loads) if loads else None)

    def logits_from_hidden(self, hidden):
        """Project final-normed hidden states to fp32 logits (only the rows a loss needs)."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)

    def _prepare_mask(self, mask, positions, cache):
        """Build a dense mask once (outside the layer scan) unless a sparse backend consumes the spec."""
        b, t = positions.shape
        if cache is not None and isinstance(mask, str):
            if mask != "causal":
                raise ValueError("with a KV cache, mask must be 'causal', a bool (B, T, S) array or a MaskSpec")
            slots = jnp.arange(cache.max_len, dtype=jnp.int32)
            return slots[None, None, :] <= positions[:, :, None]
        if isinstance(mask, MaskSpec) and self.config.attention_impl != "xla":
            return mask
        s = cache.max_len if cache is not None else t
        return ops.dense_mask(mask, b, t, s)

    def _run_stack(self, stack, x, positions, mask, rope, layer_cache, frozen: int):
        """Scan the stack's layers; the first `frozen` run as a separate scan under stop_gradient."""
        c = self.config

        def body(h, layer_in):
            p, cache_kv = layer_in
            h, new_cache, load = _decoder_layer(c, stack.moe, rope, mask, h, p, positions, cache_kv)
            return h, (new_cache, load)

        if c.remat_policy != "none":
            body = jax.checkpoint(body, policy=_REMAT[c.remat_policy])
        inputs = (stack.weights(), layer_cache)
        if not frozen:
            x, (new_cache, load) = jax.lax.scan(body, x, inputs)
            return x, new_cache, load
        below = jax.tree.map(lambda a: jax.lax.stop_gradient(a[:frozen]), inputs)
        x, outs_below = jax.lax.scan(body, x, below)
        x = jax.lax.stop_gradient(x)
        if frozen == stack.num_layers:
            return x, *outs_below
        x, outs_above = jax.lax.scan(body, x, jax.tree.map(lambda a: a[frozen:], inputs))
        new_cache, load = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs_below, outs_above)
        return x, new_cache, load
