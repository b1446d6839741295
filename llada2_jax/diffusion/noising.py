"""The forward (absorbing-state) noising process: times, masks, complementary views, [MASK] noise.

API
  sample_t(rng, batch, t_min=1e-3, t_max=1.0, stratified=False) -> float32 (B,) one t per sequence
  sample_mask(rng, t, eligible, *, at_least_one=True)        -> bool (B, L)    Bernoulli(t) on eligible
  complementary_masks(mask, eligible)                        -> bool (B, L)    eligible & ~mask
  complementary_pair(mask, t, eligible)                      -> (mask (2B, L), t (2B,))  both views stacked
  apply_mask(x0, mask, mask_id)                              -> int (B, L)     x_t
  mask_embedding_noise(rng, positions, embed_table, scale, step, anneal_steps) -> (B, T, d) noise

Schedule: linear, α_t = 1 − t, so a token is masked with probability t (spec §2.1). `eligible`
marks the positions that may be masked: non-padding in CPT, response (non-prompt) tokens in SFT.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_t_range(t_min: float, t_max: float) -> None:
    """0 < t_min <= t_max <= 1, checked on Python floats so a bad config fails at start-up."""
    if not 0.0 < t_min <= 1.0:
        raise ValueError(f"t_min={t_min} must lie in (0, 1]")
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"t_max={t_max} must lie in (0, 1]")
    if t_min > t_max:
        raise ValueError(f"t_min={t_min} must not exceed t_max={t_max}")


def sample_t(rng, batch: int, t_min: float = 1e-3, t_max: float = 1.0, *, stratified: bool = False) -> jax.Array:
    """One masking rate per sequence, t ~ U[t_min, t_max] (float32 (B,)).

    `stratified` (BD3-LM's low-discrepancy sampler): row b gets u_b = (u + b / B) mod 1 from one
    shared uniform u, so every row is still U[t_min, t_max] but the batch covers the range evenly,
    which cuts the step-to-step variance of the loss.
    """
    check_t_range(t_min, t_max)
    if not stratified:
        return jax.random.uniform(rng, (batch,), jnp.float32, t_min, t_max)
    u = (jax.random.uniform(rng, (), jnp.float32) + jnp.arange(batch, dtype=jnp.float32) / batch) % 1.0
    return t_min + (t_max - t_min) * u


def sample_mask(rng, t, eligible, *, at_least_one: bool = True) -> jax.Array:
    """I.i.d. Bernoulli(t_b) over the eligible positions of each row: bool (B, L).

    With `at_least_one`, a row that has eligible positions but drew no mask gets its eligible
    position with the smallest uniform draw masked, so no row has an empty loss. (This biases the
    rate upwards by at most one token; pass False for unbiased likelihood estimates.)
    """
    eligible = jnp.asarray(eligible, bool)
    t = jnp.asarray(t, jnp.float32)
    u = jax.random.uniform(rng, eligible.shape, jnp.float32)
    mask = (u < t[:, None]) & eligible
    if at_least_one:
        u_eligible = jnp.where(eligible, u, jnp.inf)
        first = jnp.arange(eligible.shape[1]) == jnp.argmin(u_eligible, axis=1)[:, None]
        empty = ~mask.any(axis=1, keepdims=True)
        mask = mask | (first & eligible & empty)
    return mask


def complementary_masks(mask, eligible) -> jax.Array:
    """The complementary view: every eligible position not masked in `mask` (spec §6).

    Together the two views supervise every eligible token exactly once. The complement's rate is
    1 − t; a view can be empty (e.g. when `mask` covered every eligible token).
    """
    return jnp.asarray(eligible, bool) & ~jnp.asarray(mask, bool)


def complementary_pair(mask, t, eligible) -> tuple[jax.Array, jax.Array]:
    """Stack a mask and its complement along the batch: masks (2B, L), rates (2B,) = [t ; 1 − t].

    Each view keeps its own rate for the ELBO weight [I, spec §11]. Rows of the other per-row
    inputs (x0, segment ids, eligible) must be duplicated the same way (`jnp.concatenate([a, a])`).
    """
    t = jnp.asarray(t, jnp.float32)
    return (jnp.concatenate([mask, complementary_masks(mask, eligible)], axis=0),
            jnp.concatenate([t, 1.0 - t], axis=0))


def apply_mask(x0, mask, mask_id: int) -> jax.Array:
    """x_t: the clean tokens with [MASK] at the masked positions."""
    x0 = jnp.asarray(x0)
    return jnp.where(mask, jnp.asarray(mask_id, x0.dtype), x0)


def noise_sigma(embed_table, scale: float, step, anneal_steps: int) -> jax.Array:
    """σ(step) = scale · RMS(embedding table) · max(0, 1 − step / anneal_steps); 0 if anneal_steps == 0."""
    if anneal_steps < 0:
        raise ValueError(f"anneal_steps={anneal_steps} must be >= 0")
    if scale < 0:
        raise ValueError(f"mask-embedding noise scale={scale} must be >= 0")
    if anneal_steps == 0:
        return jnp.zeros((), jnp.float32)
    table = jax.lax.stop_gradient(jnp.asarray(embed_table, jnp.float32))
    rms = jnp.sqrt(jnp.mean(jnp.square(table)))
    ramp = jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
    return scale * rms * ramp


def mask_embedding_noise(rng, positions, embed_table, scale: float, step, anneal_steps: int) -> jax.Array:
    """Gaussian noise for the model's `embed_noise=` input (spec §4), shape (B, T, d).

    positions: bool (B, T), True at the [MASK] tokens of the noisy stream (see
    `DiffusionBatch.masked_input_positions`). Fresh noise per position and call; σ as in
    `noise_sigma`, zero everywhere else. Returned in the embedding table's dtype.
    """
    positions = jnp.asarray(positions, bool)
    embed_table = jnp.asarray(embed_table)
    sigma = noise_sigma(embed_table, scale, step, anneal_steps)
    noise = jax.random.normal(rng, (*positions.shape, embed_table.shape[-1]), jnp.float32)
    return jnp.where(positions[..., None], sigma * noise, 0.0).astype(embed_table.dtype)
