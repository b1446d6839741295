"""Monte-Carlo ELBO estimate of per-sequence log-likelihood for evaluating diffusion LMs.

API
  mc_elbo_loglik(model, tokens, segment_ids, eligible, *, block_size, n_samples, rng, mask_id,
                 vocab_size=None, t_min=1e-3, positions=None) -> (mean (B,), stderr (B,))

log p(x_eligible | rest) >= E_{t ~ U[t_min, 1], mask ~ Bernoulli(t)} [ Σ_i m_i / t · log p(x_0^i | x_t, clean earlier blocks) ].
Each sample draws a fresh t per sequence and an unforced Bernoulli mask (no "at least one"
correction, so the estimator stays unbiased for the bound), laid out with the block-diffusion
layout of `block_size` (single-copy MDLM layout when block_size == L).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llada2_jax.diffusion import layout, losses, noising


@functools.partial(nnx.jit, static_argnames=("block_size", "mask_id", "vocab_size", "t_min"))
def _one_sample(model, tokens, segment_ids, eligible, positions, key, *, block_size, mask_id, vocab_size, t_min):
    k_t, k_mask = jax.random.split(key)
    t = noising.sample_t(k_t, tokens.shape[0], t_min, 1.0)
    noise_mask = noising.sample_mask(k_mask, t, eligible, at_least_one=False)
    batch = layout.build_diffusion_batch(tokens, segment_ids, positions, eligible, noise_mask, t, mask_id=mask_id,
                                         block_size=block_size, vocab_size=vocab_size)
    return losses.sequence_elbo(model, batch)


def mc_elbo_loglik(model, tokens, segment_ids, eligible, *, block_size: int, n_samples: int, rng, mask_id: int,
                   vocab_size: int | None = None, t_min: float = 1e-3, positions=None):
    """Mean and standard error over `n_samples` of the per-sequence ELBO (fp32 (B,) each).

    tokens, segment_ids, eligible: (B, L); eligible marks the tokens whose likelihood is scored
    (e.g. the response). `vocab_size` defaults to `model.config.vocab_size`; positions (B, L)
    default to 0..L-1.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be >= 1")
    if vocab_size is None:
        vocab_size = model.config.vocab_size
    noising.check_t_range(t_min, 1.0)
    layout.check_token_id("mask_id", mask_id, vocab_size)
    tokens = jnp.asarray(tokens, jnp.int32)
    batch_size, length = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    segment_ids, eligible = jnp.asarray(segment_ids, jnp.int32), jnp.asarray(eligible, bool)
    samples = jnp.stack([
        _one_sample(model, tokens, segment_ids, eligible, positions, key, block_size=block_size, mask_id=mask_id,
                    vocab_size=vocab_size, t_min=float(t_min))
        for key in jax.random.split(rng, n_samples)])
    stderr = jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(n_samples) if n_samples > 1 else jnp.zeros(batch_size)
    return jnp.mean(samples, axis=0), stderr
