"""Post-training objectives (spec §6–§8): block-diffusion SFT, CAP and diffusion DPO.

Pure functions of (model, batch arrays, rng); the sft, cap and dpo stages call them inside the
jitted step. Batches come from `data.sft` (keys `tokens, segment_ids, positions, loss_mask`, where
`loss_mask` marks response tokens incl. their EOS padding) and `data.preference` (the same keys
prefixed `chosen_` / `rejected_`, one sample per row).

API
  sft_diffusion_batch(arrays, rng, cfg)                    -> DiffusionBatch   (2B rows if complementary)
  sft_loss(model, arrays, rng, cfg)                         -> (loss, metrics)   SFT, + λ·CAP when cfg.cap_weight
  preference_elbo_batch(arrays, rng, cfg)                   -> DiffusionBatch   chosen rows then rejected rows
  dpo_loss(policy, reference, arrays, rng, cfg)             -> (loss, metrics)
  final_lr(workdir)                                         -> last logged `lr` of a stage's workdir

Batch-size bookkeeping for complementary masking [I]: `batch_size` counts the packed data rows
(each holds one or more samples); with `complementary=True` the step feeds 2 × batch_size rows to
the model — view 1 masks M at rate t, view 2 masks ¬M ∩ response at rate 1 − t — so every response
token of every sample is supervised exactly once per step. Under `weighting="elbo"` each view's
CE is divided by its own rate (1/t, 1/(1 − t)) and the sum is normalised by the eligible tokens of
both views.

Token editing (LLaDA2.1, `edit_rate` > 0, SFT/CAP only): after the views are built, each row's
visible response tokens are corrupted i.i.d. with probability `edit_rate` in the noisy stream
(`diffusion.editing`) and the loss adds `edit_weight` × the mean CE of recovering them. The
corruption draws from its own key (`fold_in(rng, EDIT_STREAM)`), so the drafting stream (t, mask)
is the same draw as without editing, and edit_rate = 0 is today's objective bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from llada2_jax.diffusion import editing, layout, losses, noising

SIDES = ("chosen", "rejected")
EDIT_STREAM = 0x6ED17  # fold_in constant of the editing stream's key


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """How a post-training batch is noised and scored (static under jit).

    block_size: block-diffusion block (32 in the spec); t_min/t_max: the mask-rate band
    (SFT [0.3, 0.8]); weighting: "elbo" (w = 1/t) or "masked_mean"; complementary: two views
    per sample (SFT/CAP only); cap_weight: λ of the CAP entropy term (0 = plain SFT);
    beta: DPO β; edit_rate: probability that a visible response token of the noisy stream is
    replaced by a random token (0 = no editing stream; SFT/CAP only); edit_weight: weight of the
    editing loss (mean CE over the replaced tokens).
    """
    block_size: int
    mask_id: int
    vocab_size: int
    t_min: float = 0.3
    t_max: float = 0.8
    weighting: str = "elbo"
    complementary: bool = True
    cap_weight: float = 0.0
    beta: float = 0.1
    edit_rate: float = 0.0
    edit_weight: float = 1.0

    def __post_init__(self):
        noising.check_t_range(self.t_min, self.t_max)
        if self.complementary and self.t_max >= 1.0:
            raise ValueError(f"t_max={self.t_max} with complementary masking: the complement's rate "
                             "1 - t must stay > 0, so t_max must be < 1")
        if self.weighting not in losses.WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r}; expected one of {losses.WEIGHTINGS}")
        if self.cap_weight < 0:
            raise ValueError(f"cap_weight={self.cap_weight} must be >= 0")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0")
        editing.check_rate(self.edit_rate)
        if self.edit_weight < 0:
            raise ValueError(f"edit_weight={self.edit_weight} must be >= 0")
        if self.edit_rate > 0 and self.edit_weight == 0:
            raise ValueError(f"edit_rate={self.edit_rate} with edit_weight=0: the corrupted tokens would get no "
                             "loss; set edit_weight > 0 or edit_rate = 0")
        layout.check_token_id("mask_id", self.mask_id, self.vocab_size)


def response_positions(arrays: dict, prefix: str = "") -> jax.Array:
    """bool (B, L): response tokens (incl. their EOS padding) of real samples — the only maskable ones."""
    return (jnp.asarray(arrays[prefix + "loss_mask"], bool)
            & (jnp.asarray(arrays[prefix + "segment_ids"]) > 0))


def _noised_batch(tokens, segment_ids, positions, eligible, rng, cfg: NoiseConfig, complementary: bool):
    k_t, k_mask = jax.random.split(rng)
    t = noising.sample_t(k_t, tokens.shape[0], cfg.t_min, cfg.t_max)
    mask = noising.sample_mask(k_mask, t, eligible)
    if complementary:
        mask, t = noising.complementary_pair(mask, t, eligible)
        tokens, segment_ids, positions, eligible = (jnp.concatenate([a, a], axis=0)
                                                    for a in (tokens, segment_ids, positions, eligible))
    return layout.build_diffusion_batch(tokens, segment_ids, positions, eligible, mask, t,
                                        mask_id=cfg.mask_id, block_size=cfg.block_size,
                                        vocab_size=cfg.vocab_size)


def sft_diffusion_batch(arrays: dict, rng, cfg: NoiseConfig) -> layout.DiffusionBatch:
    """One noised SFT batch: t ~ U[t_min, t_max] per row, mask over response tokens only.

    With `cfg.complementary`, rows [B, 2B) are the complementary views of rows [0, B). With
    `cfg.edit_rate` > 0 the batch also carries the editing stream (`edit_mask`).
    """
    batch = _noised_batch(jnp.asarray(arrays["tokens"], jnp.int32), jnp.asarray(arrays["segment_ids"], jnp.int32),
                          jnp.asarray(arrays["positions"], jnp.int32), response_positions(arrays), rng, cfg,
                          cfg.complementary)
    if cfg.edit_rate > 0:
        batch = editing.add_editing(batch, jax.random.fold_in(rng, EDIT_STREAM), cfg.edit_rate,
                                    vocab_size=cfg.vocab_size, mask_id=cfg.mask_id)
    return batch


def _num_samples(segment_ids) -> jax.Array:
    """Samples in a packed batch: starts of a non-padding segment."""
    seg = jnp.asarray(segment_ids)
    starts = jnp.concatenate([seg[:, :1] > 0, (seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)], axis=1)
    return jnp.sum(starts)


def sft_loss(model, arrays: dict, rng, cfg: NoiseConfig):
    """Block-diffusion SFT loss (+ λ · CAP entropy over correctly predicted masked tokens).

    metrics: loss, masked_ce, masked_accuracy, n_masked, n_eligible, mask_rate, rows (model rows fed),
    samples (packed samples in the data batch); with cap_weight > 0 also sft_loss and cap_entropy
    (sft_loss: the drafting loss alone); with edit_rate > 0 also edit_ce, edit_accuracy, n_edited.
    """
    batch = sft_diffusion_batch(arrays, rng, cfg)
    loss, metrics = losses.diffusion_loss(model, batch, weighting=cfg.weighting, cap_weight=cfg.cap_weight,
                                          edit_weight=cfg.edit_weight if cfg.edit_rate > 0 else 0.0)
    if cfg.cap_weight:
        metrics["sft_loss"] = metrics.pop("diffusion_loss")
    metrics["rows"] = jnp.asarray(batch.tokens.shape[0], jnp.int32)
    metrics["samples"] = _num_samples(arrays["segment_ids"])
    return loss, metrics


def preference_elbo_batch(arrays: dict, rng, cfg: NoiseConfig) -> layout.DiffusionBatch:
    """Chosen rows then rejected rows, each with its own (t, mask) sample over its response.

    The same batch is fed to the policy and the reference, so both see the same (t, mask) per
    response (VRPO's shared noise); chosen and rejected draws are independent.
    """
    def cat(key, dtype=jnp.int32):
        return jnp.concatenate([jnp.asarray(arrays[f"{s}_{key}"], dtype) for s in SIDES], axis=0)

    eligible = jnp.concatenate([response_positions(arrays, f"{s}_") for s in SIDES], axis=0)
    return _noised_batch(cat("tokens"), cat("segment_ids"), cat("positions"), eligible, rng, cfg,
                         complementary=False)


def dpo_loss(policy, reference, arrays: dict, rng, cfg: NoiseConfig):
    """Diffusion DPO (spec §8): single-sample ELBOs B(θ), B(θ_ref) on shared noise, then σ-DPO.

    `reference` gets no gradient. metrics: loss, reward_margin, reward_accuracy, chosen_reward,
    rejected_reward, elbo_margin (policy chosen − rejected ELBO, nats).
    """
    batch = preference_elbo_batch(arrays, rng, cfg)
    n = batch.tokens.shape[0] // 2
    pi = losses.sequence_elbo(policy, batch)
    ref = jax.lax.stop_gradient(losses.sequence_elbo(reference, batch))
    loss, metrics = losses.dpo_loss(pi[:n], pi[n:], ref[:n], ref[n:], cfg.beta)
    metrics["elbo_margin"] = jnp.mean(pi[:n] - pi[n:])
    return loss, metrics


def final_lr(workdir: str) -> float | None:
    """The last `lr` logged in `workdir/metrics.jsonl` (the stage's final rate), or None."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    lr = None
    with open(path) as f:
        for line in f:
            if line.strip():
                value = json.loads(line).get("lr")
                if isinstance(value, (int, float)):
                    lr = float(value)
    return lr
