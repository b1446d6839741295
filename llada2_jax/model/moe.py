"""Mixture-of-experts: routing (softmax or sigmoid group-limited), dropless dispatch, bias update.

Dispatch is dropless: every (token, expert) assignment is sorted by expert and multiplied with
`ops.grouped_matmul` (ragged_dot). `dense_experts` runs every expert on every token and is kept
only as a test oracle.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llada2_jax import ops


def route(config, x, router_w, expert_bias=None):
    """Select experts per token.

    x: (N, d); router_w: (d, E); expert_bias: (E,) or None (changes selection, never weights).
    Returns combine weights (N, k) fp32, expert ids (N, k) int32, and load (E,): the fraction of
    all N*k assignments that went to each expert.
    """
    logits = jnp.dot(x.astype(jnp.float32), router_w.astype(jnp.float32))
    if config.score_function == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
    choice = scores if expert_bias is None else scores + expert_bias.astype(jnp.float32)
    if config.n_group > 1:
        choice = _limit_groups(choice, config.n_group, config.topk_group)
    _, ids = jax.lax.top_k(choice, config.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * config.routed_scaling_factor
    load = jnp.zeros((config.num_experts,), jnp.float32).at[ids.reshape(-1)].add(1.0) / ids.size
    return weights, ids.astype(jnp.int32), load


def _limit_groups(choice, n_group: int, topk_group: int):
    """Keep the topk_group groups with the best sum-of-top-2 scores; others become -inf."""
    n, e = choice.shape
    grouped = choice.reshape(n, n_group, e // n_group)
    group_score = jax.lax.top_k(grouped, min(2, e // n_group))[0].sum(-1)  # (N, G)
    _, keep = jax.lax.top_k(group_score, topk_group)
    keep_mask = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], keep].set(True)
    return jnp.where(keep_mask[:, :, None], grouped, -jnp.inf).reshape(n, e)


def routed_experts(config, x, weights, ids, e_gate, e_up, e_down):
    """Dropless sorted dispatch: x (N, d) -> (N, d) = sum_k w_k * expert_{id_k}(x)."""
    n, d = x.shape
    k = ids.shape[-1]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs = x[order // k]  # (N*k, d) rows grouped by expert
    sizes = jnp.bincount(flat, length=config.num_experts).astype(jnp.int32)
    gmm = lambda a, w: ops.grouped_matmul(a, w.astype(x.dtype), sizes, impl=config.gmm_impl).astype(x.dtype)
    h = jax.nn.silu(gmm(xs, e_gate)) * gmm(xs, e_up)
    ys = gmm(h, e_down)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, d)
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights).astype(x.dtype)


def dense_experts(config, x, weights, ids, e_gate, e_up, e_down):
    """Oracle: every expert on every token, combined with the same weights."""
    dt = x.dtype
    h = jax.nn.silu(jnp.einsum("nd,edi->eni", x, e_gate.astype(dt))) * jnp.einsum("nd,edi->eni", x, e_up.astype(dt))
    y = jnp.einsum("eni,eid->end", h, e_down.astype(dt))
    combine = jnp.zeros((x.shape[0], config.num_experts), jnp.float32).at[
        jnp.arange(x.shape[0])[:, None], ids].add(weights)
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), combine).astype(dt)


def moe_ffn(config, p, x):
    """The MoE feed-forward of one layer. p holds this layer's router/expert/shared params.

    x: (B, T, d). Returns (y (B, T, d), load (E,)).
    """
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    weights, ids, load = route(config, flat, p["router"], p.get("expert_bias"))
    experts = dense_experts if config.moe_impl == "dense" else routed_experts
    y = experts(config, flat, weights, ids, p["e_gate"], p["e_up"], p["e_down"])
    if config.num_shared_experts:
        dt = x.dtype
        h = jax.nn.silu(flat @ p["s_gate"].astype(dt)) * (flat @ p["s_up"].astype(dt))
        y = y + h @ p["s_down"].astype(dt)
    return y.reshape(b, t, d), load


def update_expert_bias(bias, load, rate: float = 1e-3):
    """Aux-loss-free balancing (DeepSeek-V3 style): b += u * sign(mean(load) - load), per layer.

    bias, load: (..., E). Under-loaded experts get a higher selection bias.
    """
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load).astype(bias.dtype)
