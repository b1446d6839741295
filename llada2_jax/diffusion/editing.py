"""The editing stream of the LLaDA2.1 objective: visible noisy-half tokens replaced by random ones.

API
  corrupt_positions(rng, visible, rate)               -> bool (B, L)  Bernoulli(rate) over `visible`
  random_tokens(rng, x0, vocab_size, mask_id)         -> int32 (B, L) uniform over V \\ {[MASK], x0}
  add_editing(batch, rng, rate, *, vocab_size, mask_id) -> DiffusionBatch with the noisy stream corrupted
                                                         and `edit_mask` set
  edit_weights(batch)                                 -> fp32 (B, L)  e / max(Σ e, 1)

Why: token-to-token decoding (inference.decode, `edit_threshold`) replaces a committed token when
the model's argmax there disagrees; the model learns that only if it is trained to put the right
token at a visible position holding a wrong one. The drafting stream ([MASK] -> token, the BDLM
loss) is left exactly as it is: corruption touches only eligible positions that are NOT masked,
only in the noisy stream (the clean copy x_0 still gives later blocks a clean prefix, as the frozen
earlier blocks do at inference), and targets stay x_0. The loss (`losses.diffusion_loss`,
`edit_weight`) adds edit_weight · mean CE over the corrupted positions. Choices not fixed by the
LLaDA2.1 report are listed in docs/DECISIONS.md ("Token editing").
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llada2_jax.diffusion.layout import DiffusionBatch


def check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"edit_rate={rate} must be in [0, 1]")


def corrupt_positions(rng, visible, rate: float) -> jax.Array:
    """I.i.d. Bernoulli(rate) over the `visible` positions: bool (B, L)."""
    visible = jnp.asarray(visible, bool)
    return visible & (jax.random.uniform(rng, visible.shape, jnp.float32) < rate)


def random_tokens(rng, x0, vocab_size: int, mask_id: int) -> jax.Array:
    """Per position a token drawn uniformly from the vocabulary minus [MASK] and the original x0.

    So a corrupted position is always wrong and never looks masked. Draw r in [0, V - 2), then step
    over the two excluded ids in increasing order (each skip keeps the draw uniform on the rest).
    """
    if vocab_size < 3:
        raise ValueError(f"vocab_size={vocab_size}: token editing needs at least 3 tokens")
    x0 = jnp.asarray(x0, jnp.int32)
    r = jax.random.randint(rng, x0.shape, 0, vocab_size - 2, jnp.int32)
    lo, hi = jnp.minimum(x0, mask_id), jnp.maximum(x0, mask_id)
    r = r + (r >= lo)
    return r + (r >= hi)


def add_editing(batch: DiffusionBatch, rng, rate: float, *, vocab_size: int, mask_id: int) -> DiffusionBatch:
    """`batch` with a fraction `rate` of its visible eligible noisy-stream tokens replaced by random tokens.

    Works for both layouts (the noisy stream is the first L tokens of [x_t ; x_0] or all of x_t), with
    packing (eligible already excludes padding and prompts) and with complementary views (each row
    is corrupted independently over its own visible positions).
    """
    check_rate(rate)
    k_pos, k_tok = jax.random.split(rng)
    length = batch.num_query_rows
    edit = corrupt_positions(k_pos, batch.eligible & ~batch.loss_mask, rate)
    noisy = jnp.where(edit, random_tokens(k_tok, batch.targets, vocab_size, mask_id), batch.tokens[:, :length])
    tokens = jnp.concatenate([noisy, batch.tokens[:, length:]], axis=-1)
    return dataclasses.replace(batch, tokens=tokens, edit_mask=edit)


def edit_weights(batch: DiffusionBatch) -> jax.Array:
    """Per-position weights of the editing loss: a plain mean over the batch's corrupted positions."""
    e = batch.edit_mask
    return e.astype(jnp.float32) / jnp.maximum(jnp.sum(e), 1)
