"""Hot operations with several backends behind one function each; `backends` holds the table."""
from llada2_jax.ops.attention import attention, dense_mask, xla_attention
from llada2_jax.ops.grouped_matmul import grouped_matmul

__all__ = ["attention", "dense_mask", "grouped_matmul", "xla_attention"]
