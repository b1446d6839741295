"""Model inputs for diffusion and AR training: tokens, positions and MaskSpec for one batch.

API
  DiffusionBatch                      pytree: tokens, positions, mask, targets, loss_mask,
                                      eligible, t, edit_mask (None unless token editing, see
                                      diffusion.editing); static num_query_rows (= L)
  build_diffusion_batch(x0, segment_ids, positions, eligible, noise_mask, t, *, mask_id,
                        block_size, vocab_size, force_two_copy=False) -> DiffusionBatch
  ar_batch(tokens, segment_ids, positions=None, eligible=None)       -> DiffusionBatch

Layouts (spec §2.2–§2.7, §5):
  block_size < L (or force_two_copy): T = 2L, tokens = [x_t ; x_0], identical positions in both
    halves, MaskSpec.block_diffusion with the block index from the global packed index.
  block_size == L: T = L, tokens = x_t, MaskSpec.bidirectional over documents (MDLM); equals the
    noisy half of the 2L layout because a single block never sees the clean copy.
Only the first L rows (the noisy stream) carry targets; `num_query_rows` tells the loss how many
rows of the hidden state to project. `block_size` is a static Python int, so a change of block
size recompiles (once per WSD phase), nothing else does.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llada2_jax.diffusion import masks, noising


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiffusionBatch:
    """One training batch in model layout.

    tokens (B, T) int32, positions (B, T) int32, mask: MaskSpec over the T tokens,
    targets (B, L) = x_0, loss_mask (B, L) bool = masked ∧ eligible (for AR: has a next token in
    the same document), eligible (B, L) bool, t (B,) float32 masking rate (1 for AR),
    edit_mask (B, L) bool or None: noisy-stream positions holding a random token that the editing
    loss asks to recover (`editing.add_editing`); None = no editing stream.
    num_query_rows = L (static).
    """
    tokens: jax.Array
    positions: jax.Array
    mask: masks.MaskSpec
    targets: jax.Array
    loss_mask: jax.Array
    eligible: jax.Array
    t: jax.Array
    edit_mask: jax.Array | None = None
    num_query_rows: int = dataclasses.field(metadata=dict(static=True), default=0)

    @property
    def two_copy(self) -> bool:
        return self.tokens.shape[-1] != self.num_query_rows

    def masked_input_positions(self) -> jax.Array:
        """bool (B, T): the [MASK] inputs (noisy stream only) — where mask-embedding noise goes."""
        if not self.two_copy:
            return self.loss_mask
        return jnp.concatenate([self.loss_mask, jnp.zeros_like(self.loss_mask)], axis=-1)


def check_token_id(name: str, token_id: int, vocab_size: int) -> None:
    if not 0 <= token_id < vocab_size:
        raise ValueError(f"{name}={token_id} is outside the vocabulary [0, {vocab_size})")


def _check_shapes(**arrays) -> tuple[int, int]:
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    ref = shapes["x0"]
    if len(ref) != 2:
        raise ValueError(f"x0 must be (batch, length); got shape {ref}")
    for name, shape in shapes.items():
        if shape != ref:
            raise ValueError(f"{name} has shape {shape}, expected {ref} (the shape of x0)")
    return ref


def build_diffusion_batch(x0, segment_ids, positions, eligible, noise_mask, t, *, mask_id: int,
                          block_size: int, vocab_size: int, force_two_copy: bool = False) -> DiffusionBatch:
    """Lay out one noised batch for the model.

    x0, segment_ids (0 = padding), eligible, noise_mask: (B, L); positions: (B, L) or None
    (= 0..L-1); t: (B,). The noise mask is intersected with `eligible`, so prompt and padding are
    never masked. Raises ValueError when L is not a multiple of block_size or mask_id lies outside
    [0, vocab_size).
    """
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(jnp.shape(x0)[-1], dtype=jnp.int32), jnp.shape(x0))
    _, length = _check_shapes(x0=x0, segment_ids=segment_ids, positions=positions,
                              eligible=eligible, noise_mask=noise_mask)
    masks.check_block_size(length, block_size)
    check_token_id("mask_id", mask_id, vocab_size)
    x0 = jnp.asarray(x0, jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    eligible = jnp.asarray(eligible, bool)
    loss_mask = jnp.asarray(noise_mask, bool) & eligible
    t = jnp.asarray(t, jnp.float32)
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t has shape {t.shape}, expected ({x0.shape[0]},) (one rate per sequence)")
    xt = noising.apply_mask(x0, loss_mask, mask_id)
    if block_size == length and not force_two_copy:
        tokens, pos, spec = xt, positions, masks.MaskSpec.bidirectional(segment_ids)
    else:
        tokens = jnp.concatenate([xt, x0], axis=-1)
        pos = jnp.concatenate([positions, positions], axis=-1)
        spec = masks.MaskSpec.block_diffusion(segment_ids, block_size)
    return DiffusionBatch(tokens, pos, spec, x0, loss_mask, eligible, t, num_query_rows=length)


def ar_batch(tokens, segment_ids, positions=None, eligible=None) -> DiffusionBatch:
    """Next-token training batch: causal attention within documents, targets[i] = tokens[i + 1].

    A position is in the loss only if its next token is in the same (non-padding) document and
    eligible (e.g. a response token in SFT-style AR training); targets are never taken across
    documents or past the end.
    """
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(jnp.shape(tokens)[-1], dtype=jnp.int32), jnp.shape(tokens))
    if eligible is None:
        eligible = jnp.ones(jnp.shape(tokens), bool)
    batch, length = _check_shapes(x0=tokens, segment_ids=segment_ids, positions=positions, eligible=eligible)
    tokens = jnp.asarray(tokens, jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    eligible = jnp.asarray(eligible, bool)

    def shift(a, fill):
        return jnp.concatenate([a[:, 1:], jnp.full_like(a[:, :1], fill)], axis=-1)

    next_segment = shift(segment_ids, 0)
    loss_mask = (next_segment == segment_ids) & (segment_ids != 0) & shift(eligible, False)
    return DiffusionBatch(tokens, jnp.asarray(positions, jnp.int32), masks.MaskSpec.causal(segment_ids),
                          shift(tokens, 0), loss_mask, eligible, jnp.ones((batch,), jnp.float32),
                          num_query_rows=length)
