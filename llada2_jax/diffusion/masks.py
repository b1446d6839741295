"""Dense references of the diffusion masks, built from the shared `MaskSpec` (llada2_jax.core.masks).

The features, the predicate and `MaskSpec` live in the core leaf so that the model and the kernels
can use them without importing diffusion; they are re-exported here for `masks.MaskSpec` callers.
"""
from __future__ import annotations

import jax

from llada2_jax.core.masks import CLEAN, NOISY, RULES, MaskSpec, allowed, check_block_size

__all__ = ["CLEAN", "NOISY", "RULES", "MaskSpec", "allowed", "bdlm_mask", "check_block_size", "mdlm_mask"]


def bdlm_mask(segment_ids, block_size: int) -> jax.Array:
    """Dense reference of the [x_t ; x_0] block-diffusion mask with documents: bool (B, 2L, 2L)."""
    return MaskSpec.block_diffusion(segment_ids, block_size).dense()


def mdlm_mask(segment_ids) -> jax.Array:
    """Dense reference of the MDLM mask: same-document full attention, bool (B, L, L)."""
    return MaskSpec.bidirectional(segment_ids).dense()
