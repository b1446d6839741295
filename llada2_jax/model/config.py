"""ModelConfig: one frozen description covering Llama, Qwen2, Qwen3, Qwen3-MoE and BailingMoeV2.

The HF `config.json` of each family maps onto the same fields so a single `Transformer` implements
all of them; `from_hf_config` / `to_hf_config` are the only places that know HF spellings.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from llada2_jax.ops import backends

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "bailing_moe_v2")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16", "float16")

# The execution settings (not architecture) and the values each accepts.
RUNTIME_CHOICES: dict[str, tuple[str, ...]] = {
    "param_dtype": DTYPES,
    "dtype": DTYPES,
    "remat_policy": REMAT_POLICIES,
    "attention_impl": backends.impls("attention"),
    "moe_impl": ("ragged", "dense"),
    "gmm_impl": backends.impls("grouped_matmul"),
}


def check_runtime(settings: Mapping[str, Any], prefix: str = "") -> None:
    """ValueError naming the first runtime setting that is unknown or not one of its choices.

    `prefix` is where the settings sit in the caller's config (e.g. "model.runtime.").
    """
    for field, value in settings.items():
        if field not in RUNTIME_CHOICES:
            raise ValueError(f"{prefix}{field} is not a runtime setting; expected one of: {', '.join(RUNTIME_CHOICES)}")
        if value not in RUNTIME_CHOICES[field]:
            raise ValueError(f"{prefix}{field}={value!r} is not one of: {', '.join(RUNTIME_CHOICES[field])}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # defaults to hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated (Bailing: 0.5)
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF dict
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3, Bailing)
    # --- MoE (num_experts == 0 means dense) ---
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    first_k_dense_replace: int = 0  # leading dense layers before the MoE layers
    score_function: str = "softmax"  # "softmax" (Qwen3-MoE) | "sigmoid" (Bailing)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    use_expert_bias: bool = False  # aux-loss-free balancing bias (selection only)
    # --- special tokens (optional) ---
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # --- numerics / execution (not part of the HF checkpoint) ---
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; softmax, router and logits stay fp32
    remat_policy: str = "none"
    attention_impl: str = "auto"  # "xla" (dense reference) | "xla_sparse" | "pallas" | "auto"
    moe_impl: str = "ragged"  # "ragged" (dropless sorted ragged_dot) | "dense" (test oracle)
    gmm_impl: str = "auto"  # backend of ops.grouped_matmul: "xla" | "xla_tiled" | "pallas" | "auto"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unknown model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        check_runtime({field: getattr(self, field) for field in RUNTIME_CHOICES})
        if self.is_moe:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]")
            if self.num_experts % self.n_group:
                raise ValueError(f"num_experts={self.num_experts} not divisible by n_group={self.n_group}")
            if self.score_function not in ("softmax", "sigmoid"):
                raise ValueError(f"score_function={self.score_function!r}; expected 'softmax' or 'sigmoid'")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dim {self.rotary_dim} (head_dim * partial_rotary_factor) must be even")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            tok = getattr(self, name)
            if tok is not None and not 0 <= tok < self.vocab_size:
                raise ValueError(f"{name}={tok} is outside the vocabulary [0, {self.vocab_size})")

    # ---- derived sizes ----
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.resolved_head_dim * self.partial_rotary_factor)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers) if self.is_moe else self.num_hidden_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **kw) -> "ModelConfig":
        if isinstance(kw.get("rope_scaling"), dict):
            kw["rope_scaling"] = _freeze(kw["rope_scaling"])
        return dataclasses.replace(self, **kw)

    # ---- HF interop ----
    @classmethod
    def from_hf_config(cls, hf: dict | str | os.PathLike, **overrides) -> "ModelConfig":
        """Build from an HF config dict, a config.json path or a checkpoint directory."""
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                hf = json.load(f)
        mt = hf.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unknown model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        kw: dict[str, Any] = dict(
            model_type=mt,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size", 0) or 0,
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(hf),
            partial_rotary_factor=hf.get("partial_rotary_factor", 1.0) or 1.0,
            rope_scaling=_freeze(_rope_scaling(hf)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            eos_token_id=_first_int(hf.get("eos_token_id")),
            pad_token_id=_first_int(hf.get("pad_token_id")),
            mask_token_id=_first_int(hf.get("mask_token_id")),
        )
        if mt == "llama":
            kw["attention_bias"] = bool(hf.get("attention_bias", False))
        elif mt == "qwen2":
            kw["attention_bias"] = True
        elif mt == "qwen3":
            kw.update(qk_norm=True, attention_bias=bool(hf.get("attention_bias", False)))
        elif mt == "qwen3_moe":
            if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
                raise ValueError("qwen3_moe with mlp_only_layers / decoder_sparse_step != 1 is not supported")
            kw.update(qk_norm=True, attention_bias=bool(hf.get("attention_bias", False)),
                      # transformers 5 writes `num_local_experts` for Qwen3-MoE; older files `num_experts`
                      num_experts=hf.get("num_experts") or hf["num_local_experts"],
                      num_experts_per_tok=hf["num_experts_per_tok"],
                      moe_intermediate_size=hf["moe_intermediate_size"], score_function="softmax",
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        elif mt == "bailing_moe_v2":
            if hf.get("use_qkv_bias") or hf.get("use_bias"):
                raise ValueError("bailing_moe_v2 with use_qkv_bias/use_bias is not supported")
            prf = hf.get("partial_rotary_factor")
            if prf is None and hf.get("rotary_dim"):
                prf = hf["rotary_dim"] / (hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
            kw.update(qk_norm=bool(hf.get("use_qk_norm", True)), partial_rotary_factor=prf or 1.0,
                      num_experts=hf["num_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                      moe_intermediate_size=hf["moe_intermediate_size"],
                      num_shared_experts=hf.get("num_shared_experts", 0) or 0,
                      first_k_dense_replace=hf.get("first_k_dense_replace", 0),
                      score_function=hf.get("score_function", "sigmoid"),
                      n_group=hf.get("n_group", 1) or 1, topk_group=hf.get("topk_group", 1) or 1,
                      routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
                      norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                      use_expert_bias=bool(hf.get("moe_router_enable_expert_bias", True)))
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict:
        """The HF `config.json` dict for this model (transformers can load Llama/Qwen families)."""
        archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "bailing_moe_v2": "BailingMoeV2ForCausalLM"}
        hf: dict[str, Any] = dict(
            architectures=[archs[self.model_type]], model_type=self.model_type,
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.resolved_head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling_dict, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu", torch_dtype="float32",
        )
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        if self.model_type in ("qwen3", "qwen3_moe"):
            hf["attention_bias"] = self.attention_bias
        if self.model_type == "qwen3_moe":
            hf.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                      moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=[])
        if self.model_type == "bailing_moe_v2":
            hf.update(partial_rotary_factor=self.partial_rotary_factor, use_qk_norm=self.qk_norm,
                      use_qkv_bias=False, use_bias=False, num_experts=self.num_experts,
                      num_experts_per_tok=self.num_experts_per_tok,
                      moe_intermediate_size=self.moe_intermediate_size,
                      num_shared_experts=self.num_shared_experts,
                      first_k_dense_replace=self.first_k_dense_replace,
                      score_function=self.score_function, n_group=self.n_group, topk_group=self.topk_group,
                      routed_scaling_factor=self.routed_scaling_factor, norm_topk_prob=self.norm_topk_prob,
                      moe_router_enable_expert_bias=self.use_expert_bias, router_dtype="fp32")
        for name in ("eos_token_id", "pad_token_id", "mask_token_id"):
            if getattr(self, name) is not None:
                hf[name] = getattr(self, name)
        return hf


def _freeze(d: dict | None):
    if not d:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def _rope_theta(hf: dict) -> float:
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters") or {}  # transformers >= 5 nests it here
    return float(params.get("rope_theta", 10000.0))


def _rope_scaling(hf: dict) -> dict | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs:
        return None
    rs = {k: v for k, v in rs.items() if k != "rope_theta"}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return None
    rs["rope_type"] = kind
    rs.pop("type", None)
    return rs


def _first_int(v):
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else None
    return None if v is None else int(v)
