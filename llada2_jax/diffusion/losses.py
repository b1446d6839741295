"""Training objectives: BDLM/MDLM ELBO, masked mean, AR, CAP entropy, sequence ELBO and DPO.

API
  query_logits(model, batch, *, embed_noise=None)     -> (logits (B, L, V) fp32, ModelOutput)
  token_cross_entropy(logits, targets)                -> fp32 (B, L)
  diffusion_loss_from_logits(logits, batch, *, weighting="elbo", cap_weight=0.0) -> (loss, metrics)
  diffusion_loss(model, batch, *, weighting="elbo", embed_noise=None, cap_weight=0.0) -> (loss, metrics)
  ar_loss(model, batch)                               -> (loss, metrics)
  cap_entropy(logits, targets, loss_mask)             -> scalar (spec §7)
  sequence_elbo(model, batch, *, embed_noise=None)    -> (B,) Σ_i m_i / t · log p(x_0^i | ...) (spec §8)
  dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta) -> (loss, metrics)

Weightings (spec §2.5): "elbo" = Σ_b Σ_i m_bi CE_bi / t_b / Σ eligible (the NELBO per eligible
token); "masked_mean" = Σ m CE / Σ m (dFactory). Logits are computed only for the first L rows
(the noisy stream) of the 2L layout, in fp32 over the full vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llada2_jax.diffusion.layout import DiffusionBatch

WEIGHTINGS = ("elbo", "masked_mean")


def query_logits(model, batch: DiffusionBatch, *, embed_noise=None):
    """Forward the batch and project only the L query rows to fp32 logits."""
    out = model.forward(batch.tokens, batch.positions, batch.mask, embed_noise=embed_noise,
                        compute_logits=False)
    logits = model.logits_from_hidden(out.hidden[:, :batch.num_query_rows]).astype(jnp.float32)
    return logits, out


def token_cross_entropy(logits, targets) -> jax.Array:
    """−log softmax(logits)[target] in fp32, shape of targets."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def cap_entropy(logits, targets, loss_mask) -> jax.Array:
    """Mean predictive entropy over loss positions whose argmax equals the target; 0 if there are none.

    The selection (argmax == target) is non-differentiable, so the gradient flows only through the
    entropies of the selected rows (spec §7).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    correct = jax.lax.stop_gradient((jnp.argmax(logits, axis=-1) == targets) & loss_mask)
    n = jnp.sum(correct)
    return jnp.sum(jnp.where(correct, entropy, 0.0)) / jnp.maximum(n, 1)


def _inverse_t(t) -> jax.Array:
    """1/t per row as (B, 1); a row with t = 0 (an empty complementary view) gets 0, not inf/NaN gradients."""
    t = jnp.asarray(t, jnp.float32)[:, None]
    return jnp.where(t > 0, 1.0 / jnp.where(t > 0, t, 1.0), 0.0)


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; expected one of {WEIGHTINGS}")


def diffusion_loss_from_logits(logits, batch: DiffusionBatch, *, weighting: str = "elbo",
                               cap_weight: float = 0.0):
    """Loss and metrics from the L query-row logits (lets CAP/SFT reuse one forward)."""
    _check_weighting(weighting)
    ce = token_cross_entropy(logits, batch.targets)
    m = batch.loss_mask
    n_masked = jnp.sum(m)
    n_eligible = jnp.sum(batch.eligible)
    masked_ce = jnp.sum(jnp.where(m, ce, 0.0))
    masked_mean = masked_ce / jnp.maximum(n_masked, 1)
    if weighting == "elbo":
        weighted = jnp.where(m, ce * _inverse_t(batch.t), 0.0)
        loss = jnp.sum(weighted) / jnp.maximum(n_eligible, 1)
    else:
        loss = masked_mean
    correct = (jnp.argmax(logits, axis=-1) == batch.targets) & m
    metrics = {
        "masked_ce": masked_mean,
        "masked_accuracy": jnp.sum(correct) / jnp.maximum(n_masked, 1),
        "n_masked": n_masked,
        "n_eligible": n_eligible,
        "mask_rate": jnp.mean(batch.t),
    }
    if cap_weight:
        cap = cap_entropy(logits, batch.targets, m)
        metrics["diffusion_loss"] = loss
        metrics["cap_entropy"] = cap
        loss = loss + cap_weight * cap
    metrics["loss"] = loss
    return loss, metrics


def diffusion_loss(model, batch: DiffusionBatch, *, weighting: str = "elbo", embed_noise=None,
                   cap_weight: float = 0.0):
    """BDLM / MDLM training loss (+ λ·CAP entropy when cap_weight > 0) and metrics.

    metrics: loss, masked_ce, masked_accuracy, n_masked, n_eligible, mask_rate, and
    expert_load (num_moe_layers, E) when the model is MoE.
    """
    _check_weighting(weighting)
    logits, out = query_logits(model, batch, embed_noise=embed_noise)
    loss, metrics = diffusion_loss_from_logits(logits, batch, weighting=weighting, cap_weight=cap_weight)
    if getattr(out, "expert_load", None) is not None:
        metrics["expert_load"] = out.expert_load
    return loss, metrics


def ar_loss(model, batch: DiffusionBatch):
    """Next-token cross entropy averaged over the loss positions of an `ar_batch`."""
    logits, out = query_logits(model, batch)
    ce = token_cross_entropy(logits, batch.targets)
    n = jnp.sum(batch.loss_mask)
    loss = jnp.sum(jnp.where(batch.loss_mask, ce, 0.0)) / jnp.maximum(n, 1)
    correct = (jnp.argmax(logits, axis=-1) == batch.targets) & batch.loss_mask
    metrics = {"loss": loss, "accuracy": jnp.sum(correct) / jnp.maximum(n, 1), "n_tokens": n}
    if getattr(out, "expert_load", None) is not None:
        metrics["expert_load"] = out.expert_load
    return loss, metrics


def sequence_elbo(model, batch: DiffusionBatch, *, embed_noise=None) -> jax.Array:
    """Per-sequence ELBO estimate B = Σ_i m_i / t · log p(x_0^i | ...) (one MC sample), fp32 (B,).

    Summed, not normalised, so differences are on a log-likelihood scale (spec §8). Rows with no
    masked token give 0.
    """
    logits, _ = query_logits(model, batch, embed_noise=embed_noise)
    logp = -token_cross_entropy(logits, batch.targets)
    return jnp.sum(jnp.where(batch.loss_mask, logp * _inverse_t(batch.t), 0.0), axis=-1)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """DPO on ELBO log-likelihood surrogates: −mean log σ(β((π_w − ref_w) − (π_l − ref_l))).

    Inputs are per-pair (N,) values (e.g. from `sequence_elbo`); reference values carry no gradient.
    metrics: loss, reward_margin, reward_accuracy, chosen_reward, rejected_reward (β-scaled).
    """
    if beta <= 0:
        raise ValueError(f"DPO beta={beta} must be > 0")
    ref_chosen = jax.lax.stop_gradient(ref_chosen)
    ref_rejected = jax.lax.stop_gradient(ref_rejected)
    chosen = beta * (pi_chosen - ref_chosen)
    rejected = beta * (pi_rejected - ref_rejected)
    margin = chosen - rejected
    loss = -jnp.mean(jax.nn.log_sigmoid(margin))
    metrics = {
        "loss": loss,
        "reward_margin": jnp.mean(margin),
        "reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "chosen_reward": jnp.mean(chosen),
        "rejected_reward": jnp.mean(rejected),
    }
    return loss, metrics
