"""HF checkpoint name ↔ our parameter name, one table per model family.

A `Rule` ties one HF tensor (a name template) to one or more of our parameters plus the pair of
transforms between the two layouts. Loading and saving walk the same table, so the two directions
cannot drift apart.

Our layouts (docs/ARCHITECTURE.md, "Contracts between packages"): top-level `embed (V,d)`,
`lm_head (d,V)`, `final_norm (d,)`; per-layer parameters in the `dense_layers` / `moe_layers` stacks carry a leading
`layers` axis that the tables do not mention (a rule describes one layer; `{i}` is the HF layer
index) and expert parameters carry a further `E` axis (`{e}` is the expert index).

PyTorch `Linear` weights are stored (out, in); ours are (in, out) with the head axis split out.
Transforms only use array methods (`.T`, `.reshape`, slicing) and `jnp.concatenate`, so they work
on numpy arrays, jax arrays and `jax.eval_shape` structs alike.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from llada2_jax.model.config import ModelConfig

MODEL, LAYER, EXPERT = "model", "layer", "expert"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor ↔ our parameter(s).

    hf: name template with `{i}` (HF layer index) and/or `{e}` (expert index).
    ours: our parameter names (top-level names for scope MODEL, per-layer names otherwise).
    to_ours: HF array -> tuple of our arrays (one per name in `ours`, without layer/expert axes).
    to_hf: our arrays (same order as `ours`) -> the HF array.
    scope: MODEL (one tensor), LAYER (one per layer) or EXPERT (one per layer and expert).
    """
    hf: str
    ours: tuple[str, ...]
    to_ours: Callable
    to_hf: Callable
    scope: str = LAYER


# ---- transforms (HF -> ours, ours -> HF) ----

def _same():
    return (lambda a: (a,)), (lambda a: a)


def _linear():
    """PyTorch Linear (out, in) <-> (in, out)."""
    return (lambda a: (a.T,)), (lambda a: a.T)


def _heads_in(heads: int, head_dim: int):
    """q/k/v projection: (H*D, d) <-> (d, H, D)."""
    return ((lambda a: (a.T.reshape(a.shape[1], heads, head_dim),)),
            (lambda a: a.reshape(a.shape[0], heads * head_dim).T))


def _heads_out(heads: int, head_dim: int):
    """Attention output projection: (d, H*D) <-> (H, D, d)."""
    return ((lambda a: (a.T.reshape(heads, head_dim, a.shape[0]),)),
            (lambda a: a.reshape(heads * head_dim, a.shape[-1]).T))


def _head_bias(heads: int, head_dim: int):
    """q/k/v bias: (H*D,) <-> (H, D)."""
    return (lambda a: (a.reshape(heads, head_dim),)), (lambda a: a.reshape(heads * head_dim))


def _fused_qkv(n_q: int, n_kv: int, head_dim: int):
    """Bailing `query_key_value`: ((n_q + 2 n_kv) * D, d), head-major [q heads | k heads | v heads]
    (spec §1.2) <-> wq (d, n_q, D), wk (d, n_kv, D), wv (d, n_kv, D)."""
    def to_ours(a):
        w = a.reshape(n_q + 2 * n_kv, head_dim, a.shape[-1]).transpose(2, 0, 1)  # (d, heads, D)
        return w[:, :n_q], w[:, n_q:n_q + n_kv], w[:, n_q + n_kv:]

    def to_hf(wq, wk, wv):
        w = jnp.concatenate([wq, wk, wv], axis=1)  # (d, heads, D)
        return w.transpose(1, 2, 0).reshape(-1, w.shape[0])
    return to_ours, to_hf


def _rule(hf, ours, transforms, scope=LAYER) -> Rule:
    ours = (ours,) if isinstance(ours, str) else tuple(ours)
    return Rule(hf, ours, transforms[0], transforms[1], scope)


# ---- tables ----

def _embedding_rules(embed_name: str) -> list[Rule]:
    return [
        _rule(embed_name, "embed", _same(), MODEL),
        _rule("model.norm.weight", "final_norm", _same(), MODEL),
        _rule("lm_head.weight", "lm_head", _linear(), MODEL),  # used only when untied
    ]


def _swiglu_rules(prefix: str, names: tuple[str, str, str], scope=LAYER) -> list[Rule]:
    gate, up, down = names
    return [_rule(f"{prefix}.gate_proj.weight", gate, _linear(), scope),
            _rule(f"{prefix}.up_proj.weight", up, _linear(), scope),
            _rule(f"{prefix}.down_proj.weight", down, _linear(), scope)]


def _llama_like_rules(cfg: ModelConfig) -> list[Rule]:
    """Llama / Qwen2 / Qwen3 / Qwen3-MoE: separate q/k/v/o projections under `self_attn`."""
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
    p = "model.layers.{i}"
    rules = _embedding_rules("model.embed_tokens.weight") + [
        _rule(f"{p}.input_layernorm.weight", "input_norm", _same()),
        _rule(f"{p}.post_attention_layernorm.weight", "post_norm", _same()),
        _rule(f"{p}.self_attn.q_proj.weight", "wq", _heads_in(hq, hd)),
        _rule(f"{p}.self_attn.k_proj.weight", "wk", _heads_in(hkv, hd)),
        _rule(f"{p}.self_attn.v_proj.weight", "wv", _heads_in(hkv, hd)),
        _rule(f"{p}.self_attn.o_proj.weight", "wo", _heads_out(hq, hd)),
        _rule(f"{p}.self_attn.q_proj.bias", "bq", _head_bias(hq, hd)),
        _rule(f"{p}.self_attn.k_proj.bias", "bk", _head_bias(hkv, hd)),
        _rule(f"{p}.self_attn.v_proj.bias", "bv", _head_bias(hkv, hd)),
        _rule(f"{p}.self_attn.q_norm.weight", "q_norm", _same()),
        _rule(f"{p}.self_attn.k_norm.weight", "k_norm", _same()),
    ] + _swiglu_rules(f"{p}.mlp", ("w_gate", "w_up", "w_down"))
    if cfg.model_type == "qwen3_moe":
        rules += [_rule(f"{p}.mlp.gate.weight", "router", _linear())]
        rules += _swiglu_rules(f"{p}.mlp.experts.{{e}}", ("e_gate", "e_up", "e_down"), EXPERT)
    return rules


def _bailing_rules(cfg: ModelConfig) -> list[Rule]:
    """BailingMoeV2 (spec §1.4): fused head-major QKV, `attention.*` names, shared experts."""
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
    p = "model.layers.{i}"
    return _embedding_rules("model.word_embeddings.weight") + [
        _rule(f"{p}.input_layernorm.weight", "input_norm", _same()),
        _rule(f"{p}.post_attention_layernorm.weight", "post_norm", _same()),
        _rule(f"{p}.attention.query_key_value.weight", ("wq", "wk", "wv"), _fused_qkv(hq, hkv, hd)),
        _rule(f"{p}.attention.dense.weight", "wo", _heads_out(hq, hd)),
        _rule(f"{p}.attention.query_layernorm.weight", "q_norm", _same()),
        _rule(f"{p}.attention.key_layernorm.weight", "k_norm", _same()),
        _rule(f"{p}.mlp.gate.weight", "router", _linear()),
        _rule(f"{p}.mlp.gate.expert_bias", "expert_bias", _same()),
    ] + (_swiglu_rules(f"{p}.mlp", ("w_gate", "w_up", "w_down"))
         + _swiglu_rules(f"{p}.mlp.experts.{{e}}", ("e_gate", "e_up", "e_down"), EXPERT)
         + _swiglu_rules(f"{p}.mlp.shared_experts", ("s_gate", "s_up", "s_down")))


def family_rules(cfg: ModelConfig) -> list[Rule]:
    """All rules that can apply to `cfg.model_type`; a rule is used when our model has its params."""
    if cfg.model_type in ("llama", "qwen3", "qwen3_moe") and cfg.attention_bias:
        raise ValueError(
            f"{cfg.model_type} with attention_bias=True (which also puts a bias on o_proj) is not "
            "supported: our Transformer has q/k/v biases only (the Qwen2 layout)")
    if cfg.model_type == "bailing_moe_v2":
        return _bailing_rules(cfg)
    return _llama_like_rules(cfg)
