"""Attention masks as data: small per-token integer features plus a rule.

One predicate (`allowed`) turns query/key features into allow/deny. The dense boolean matrix is
built from that same predicate only for references and small inputs; kernels evaluate it per tile
(see kernels_pallas and ops.xla_sparse) so that they can skip tiles that are entirely masked.

Features per token:
  stream   0 = noisy copy x_t, 1 = clean copy x_0 (only the block_diffusion rule reads it)
  block    block index ⌊global packed position / L_B⌋ (for "causal" the position itself)
  segment  document id, 0 = padding (padding attends to padding, so no softmax row is empty)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

RULES = ("causal", "bidirectional", "block_causal", "block_diffusion")
NOISY, CLEAN = 0, 1


def allowed(rule: str, q_stream, q_block, q_segment, k_stream, k_block, k_segment):
    """The mask predicate, broadcasting over any shapes (True = the query may attend the key)."""
    same_doc = q_segment == k_segment
    if rule == "bidirectional":
        return same_doc & jnp.ones_like(q_block == k_block)
    if rule in ("causal", "block_causal"):
        return same_doc & (k_block <= q_block)
    if rule == "block_diffusion":
        q_noisy, k_noisy = q_stream == NOISY, k_stream == NOISY
        diagonal = q_noisy & k_noisy & (q_block == k_block)  # M_BD
        offset_causal = q_noisy & ~k_noisy & (k_block < q_block)  # M_OBC
        clean_causal = ~q_noisy & ~k_noisy & (k_block <= q_block)  # M_BC
        return same_doc & (diagonal | offset_causal | clean_causal)
    raise ValueError(f"unknown mask rule {rule!r}; expected one of {RULES}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Query features (B, T), key features (B, S) and a static rule."""
    q_stream: jax.Array
    q_block: jax.Array
    q_segment: jax.Array
    k_stream: jax.Array
    k_block: jax.Array
    k_segment: jax.Array
    rule: str = dataclasses.field(metadata=dict(static=True), default="causal")

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown mask rule {self.rule!r}; expected one of {RULES}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.q_block.shape[0], self.q_block.shape[-1], self.k_block.shape[-1])

    def dense(self) -> jax.Array:
        """bool (B, T, S), True = may attend."""
        return allowed(self.rule,
                       self.q_stream[:, :, None], self.q_block[:, :, None], self.q_segment[:, :, None],
                       self.k_stream[:, None, :], self.k_block[:, None, :], self.k_segment[:, None, :])

    # ---- constructors for the layouts the project uses ----
    @classmethod
    def self_attention(cls, rule: str, stream, block, segment) -> "MaskSpec":
        stream, block, segment = (jnp.asarray(a, jnp.int32) for a in (stream, block, segment))
        return cls(stream, block, segment, stream, block, segment, rule)

    @classmethod
    def causal(cls, segment_ids, positions=None) -> "MaskSpec":
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        pos = _default_positions(segment_ids) if positions is None else positions
        return cls.self_attention("causal", jnp.zeros_like(segment_ids), pos, segment_ids)

    @classmethod
    def bidirectional(cls, segment_ids) -> "MaskSpec":
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        zeros = jnp.zeros_like(segment_ids)
        return cls.self_attention("bidirectional", zeros, zeros, segment_ids)

    @classmethod
    def block_causal(cls, segment_ids, block_size: int) -> "MaskSpec":
        """Decode canvas: a token in block a sees every token of blocks <= a of its document."""
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        block = _default_positions(segment_ids) // block_size
        return cls.self_attention("block_causal", jnp.zeros_like(segment_ids), block, segment_ids)

    @classmethod
    def block_diffusion(cls, segment_ids, block_size: int) -> "MaskSpec":
        """The [x_t ; x_0] layout of length 2L built from per-position document ids (B, L)."""
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        length = segment_ids.shape[-1]
        check_block_size(length, block_size)
        block = _default_positions(segment_ids) // block_size
        stream = jnp.concatenate([jnp.full_like(segment_ids, NOISY), jnp.full_like(segment_ids, CLEAN)], -1)
        return cls.self_attention("block_diffusion", stream, jnp.concatenate([block, block], -1),
                                  jnp.concatenate([segment_ids, segment_ids], -1))


def check_block_size(length: int, block_size: int) -> None:
    if block_size < 1 or length % block_size:
        raise ValueError(f"block_size={block_size} must be a positive divisor of the sequence length {length}")


def _default_positions(segment_ids):
    b, length = segment_ids.shape
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
