"""The Flax NNX model family (Llama, Qwen2, Qwen3, Qwen3-MoE, BailingMoeV2)."""
from llada2_jax.model.cache import KVCache
from llada2_jax.model.config import SUPPORTED_MODEL_TYPES, ModelConfig
from llada2_jax.model.transformer import ExpertBias, ModelOutput, Transformer

__all__ = ["ExpertBias", "KVCache", "ModelConfig", "ModelOutput", "SUPPORTED_MODEL_TYPES", "Transformer"]
