"""Block-wise threshold decoding with an exact KV cache, and an AR baseline decoder."""
from llada2_jax.inference.ar import generate_ar
from llada2_jax.inference.decode import generate
from llada2_jax.inference.result import GenerationResult

__all__ = ["GenerationResult", "generate", "generate_ar"]
