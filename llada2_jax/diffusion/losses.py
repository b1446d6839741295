"""Training objectives: BDLM/MDLM ELBO, masked mean, AR, CAP entropy, sequence ELBO and DPO.

API
  query_logits(model, batch, *, embed_noise=None)     -> (logits (B, L, V) fp32, ModelOutput)
  token_cross_entropy(logits, targets)                -> fp32 (B, L)
  diffusion_loss_from_logits(logits, batch, *, weighting="elbo", cap_weight=0.0, edit_weight=0.0)
                                                      -> (loss, metrics)
  diffusion_loss(model, batch, *, weighting="elbo", embed_noise=None, cap_weight=0.0, edit_weight=0.0)
                                                      -> (loss, metrics)
  ar_loss(model, batch)                               -> (loss, metrics)
  head_loss(hidden, head, targets, loss_mask, weights, *, cap_weight=0.0, chunk=None (HEAD_CHUNK))
                                                      -> (loss, (masked_ce_sum, n_correct, cap_entropy))
  cap_entropy(logits, targets, loss_mask)             -> scalar (spec §7)
  sequence_elbo(model, batch, *, embed_noise=None)    -> (B,) Σ_i m_i / t · log p(x_0^i | ...) (spec §8)
  dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta) -> (loss, metrics)

Weightings (spec §2.5): "elbo" = Σ_b Σ_i m_bi CE_bi / t_b / Σ eligible (the NELBO per eligible
token); "masked_mean" = Σ m CE / Σ m (dFactory). Logits are computed only for the first L rows
(the noisy stream) of the 2L layout, in fp32 over the full vocabulary.

Token editing (LLaDA2.1): when the batch carries an `edit_mask` (`editing.add_editing`) and
edit_weight > 0, the loss adds edit_weight · (mean CE over the corrupted positions), whatever the
weighting; CAP stays on the drafting (masked) positions. Without it nothing changes.

`diffusion_loss` and `ar_loss` never build the (rows x vocab) logits: `head_loss` moves the loss
rows to the front, projects them HEAD_CHUNK rows at a time (chunks past the last loss row are
skipped) and computes the cross-entropy, its gradient with respect to the hidden rows and the
output head, and the CAP entropy term chunk by chunk in one pass (a custom VJP: the backward only
scales the gradients the forward pass accumulated). `query_logits` + `diffusion_loss_from_logits`
remain the dense reference (tests compare both paths).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llada2_jax.diffusion import editing
from llada2_jax.diffusion.layout import DiffusionBatch

WEIGHTINGS = ("elbo", "masked_mean")
HEAD_CHUNK = 128  # loss rows projected to logits at a time by `head_loss`


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


def _editing_on(batch: DiffusionBatch, edit_weight: float) -> bool:
    if edit_weight < 0:
        raise ValueError(f"edit_weight={edit_weight} must be >= 0")
    return batch.edit_mask is not None and edit_weight > 0


def _edit_metrics(ce_sum, n_correct, n_edited) -> dict:
    denom = jnp.maximum(n_edited, 1)
    return {"edit_ce": ce_sum / denom, "edit_accuracy": n_correct / denom, "n_edited": n_edited}


def diffusion_loss_from_logits(logits, batch: DiffusionBatch, *, weighting: str = "elbo",
                               cap_weight: float = 0.0, edit_weight: float = 0.0):
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
    if _editing_on(batch, edit_weight):
        e = batch.edit_mask
        n_edited = jnp.sum(e)
        edit_ce = jnp.sum(jnp.where(e, ce, 0.0))
        metrics.update(_edit_metrics(edit_ce, jnp.sum((jnp.argmax(logits, axis=-1) == batch.targets) & e), n_edited))
        loss = loss + edit_weight * jnp.sum(jnp.where(e, ce * editing.edit_weights(batch), 0.0))
    metrics["loss"] = loss
    return loss, metrics


def output_head(model) -> jax.Array:
    """The (d, V) output projection `model.logits_from_hidden` applies (the tied embedding transposed)."""
    if hasattr(model, "output_head"):
        return model.output_head()
    return model.embed[...].T if getattr(model, "lm_head", None) is None else model.lm_head[...]


def _chunk_terms(h, head, targets, sel, weights, cap: bool, grad: bool):
    """One chunk of rows: cross-entropy, argmax hits, entropy and (if `grad`) the logit gradients.

    Returns ce, correct, entropy (c,) and, with grad, dz_ce = w (p - onehot) and dz_cap =
    correct · dH/dz (c, V) fp32.
    """
    z = jnp.dot(h, head.astype(h.dtype), preferred_element_type=jnp.float32)  # (c, V) fp32
    lse = jax.nn.logsumexp(z, axis=-1)
    logp = z - lse[:, None]
    ce = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(z, axis=-1) == targets) & sel
    p = jnp.exp(logp) if (grad or cap) else None
    entropy = -jnp.sum(p * logp, axis=-1) if cap else jnp.zeros_like(ce)
    if not grad:
        return ce, correct, entropy, None, None
    onehot = jnp.arange(z.shape[-1], dtype=targets.dtype)[None, :] == targets[:, None]
    dz_ce = weights[:, None] * (p - onehot.astype(jnp.float32))
    dz_cap = None
    if cap:  # dH/dz_j = -p_j (log p_j + H)
        dz_cap = jnp.where(correct[:, None], -p * (logp + entropy[:, None]), 0.0)
    return ce, correct, entropy, dz_ce, dz_cap


def _head_pass(h, head, targets, sel, weights, n_rows, cap_weight: float, chunk: int, grad: bool):
    """Scan over row chunks; chunks at or past `n_rows` (rows are sorted loss rows first) are skipped.

    Returns (loss, aux, grads) with grads = (dh (N, d), dhead (d, V)) when `grad`, else None.
    """
    n, d = h.shape
    vocab = head.shape[-1]
    cap = cap_weight != 0.0
    xs = tuple(a.reshape(n // chunk, chunk, *a.shape[1:]) for a in (h, targets, sel, weights))
    zeros_c = jnp.zeros((chunk,), jnp.float32)
    acc_dtype = jnp.float32

    def run(carry, x):
        hk, tk, sk, wk = x
        ce, correct, entropy, dz_ce, dz_cap = _chunk_terms(hk, head, tk, sk, wk, cap, grad)
        if not grad:
            return carry, (ce, correct, entropy)
        hd = hk.dtype
        head_t = head.astype(hd).T
        dh_ce = jnp.dot(dz_ce.astype(hd), head_t, preferred_element_type=jnp.float32)
        g_ce = carry[0] + jnp.dot(hk.T, dz_ce.astype(hd), preferred_element_type=acc_dtype)
        if not cap:
            return (g_ce,), (ce, correct, entropy, dh_ce)
        dh_cap = jnp.dot(dz_cap.astype(hd), head_t, preferred_element_type=jnp.float32)
        g_cap = carry[1] + jnp.dot(hk.T, dz_cap.astype(hd), preferred_element_type=acc_dtype)
        return (g_ce, g_cap), (ce, correct, entropy, dh_ce, dh_cap)

    def skip(carry, x):
        out = (zeros_c, jnp.zeros((chunk,), bool), zeros_c)
        if grad:
            dh = jnp.zeros((chunk, d), jnp.float32)
            out = out + ((dh,) if not cap else (dh, dh))
        return carry, out

    def body(carry, x):
        k, x = x
        return jax.lax.cond(k * chunk < n_rows, run, skip, carry, x)

    init = ()
    if grad:
        init = (jnp.zeros((d, vocab), acc_dtype),) * (2 if cap else 1)
    carry, outs = jax.lax.scan(body, init, (jnp.arange(n // chunk), xs))
    outs = tuple(o.reshape(n, *o.shape[2:]) for o in outs)
    ce, correct, entropy = outs[:3]
    n_correct = jnp.sum(correct)
    inv_correct = 1.0 / jnp.maximum(n_correct, 1).astype(jnp.float32)
    cap_value = jnp.sum(jnp.where(correct, entropy, 0.0)) * inv_correct
    loss = jnp.sum(weights * ce) + (cap_weight * cap_value if cap else 0.0)
    aux = (jnp.sum(jnp.where(sel, ce, 0.0)), n_correct, cap_value, ce)
    if not grad:
        return loss, aux, None
    dh, dhead = outs[3], carry[0]
    if cap:
        scale = cap_weight * inv_correct
        dh, dhead = dh + scale * outs[4], dhead + scale * carry[1]
    return loss, aux, (dh.astype(h.dtype), dhead.astype(head.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fused_head_loss(h, head, targets, sel, weights, n_rows, cap_weight, chunk):
    loss, aux, _ = _head_pass(h, head, targets, sel, weights, n_rows, cap_weight, chunk, grad=False)
    return loss, aux


def _fused_fwd(h, head, targets, sel, weights, n_rows, cap_weight, chunk):
    loss, aux, grads = _head_pass(h, head, targets, sel, weights, n_rows, cap_weight, chunk, grad=True)
    return (loss, aux), (grads, aux[3])


def _fused_bwd(cap_weight, chunk, res, cotangents):
    (dh, dhead), ce = res
    g = cotangents[0]  # the aux outputs are metrics: callers stop their gradient (see head_loss)
    return (g * dh).astype(dh.dtype), (g * dhead).astype(dhead.dtype), None, None, g * ce, None


_fused_head_loss.defvjp(_fused_fwd, _fused_bwd)


def head_loss(hidden, head, targets, loss_mask, weights, *, cap_weight: float = 0.0, chunk: int | None = None):
    """Σ weights · CE(hidden @ head, targets) [+ cap_weight · CAP entropy] without the full logits.

    hidden (..., d) final-normed rows, head (d, V), targets/loss_mask/weights of shape hidden[..., 0]
    (weights are 0 off the loss rows). Only the loss rows are projected, `chunk` at a time, in fp32.
    Returns (loss, (masked_ce_sum, n_correct, cap_entropy)), the metrics without gradient;
    n_correct counts loss rows whose argmax is the target; cap_entropy is their mean entropy
    (`cap_entropy`, 0 when there are none).
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    sel = loss_mask.reshape(-1).astype(bool)
    tg = targets.reshape(-1).astype(jnp.int32)
    w = jnp.where(sel, weights.reshape(-1).astype(jnp.float32), 0.0)
    rows = h.shape[0]
    chunk = max(1, min(HEAD_CHUNK if chunk is None else chunk, rows))
    order = jnp.argsort(jnp.where(sel, 0, 1), stable=True)  # loss rows first, in row order
    pad = -rows % chunk
    take = lambda a: jnp.pad(a[order], [(0, pad)] + [(0, 0)] * (a.ndim - 1))  # noqa: E731
    loss, aux = _fused_head_loss(take(h), head, take(tg), take(sel), take(w), jnp.sum(sel), float(cap_weight), chunk)
    return loss, jax.lax.stop_gradient(aux[:3])


def _row_weights(batch: DiffusionBatch, weighting: str) -> jax.Array:
    m = batch.loss_mask
    if weighting == "elbo":
        return jnp.where(m, _inverse_t(batch.t), 0.0) / jnp.maximum(jnp.sum(batch.eligible), 1)
    return m.astype(jnp.float32) / jnp.maximum(jnp.sum(m), 1)


def diffusion_loss(model, batch: DiffusionBatch, *, weighting: str = "elbo", embed_noise=None,
                   cap_weight: float = 0.0, edit_weight: float = 0.0):
    """BDLM / MDLM training loss (+ λ·CAP entropy when cap_weight > 0, + the editing term) and metrics.

    metrics: loss, masked_ce, masked_accuracy, n_masked, n_eligible, mask_rate, and
    expert_load (num_moe_layers, E) when the model is MoE; with the editing stream also edit_ce,
    edit_accuracy and n_edited (its loss is a second `head_loss` pass over the corrupted rows). Equals
    `diffusion_loss_from_logits(query_logits(...))` (the dense reference) without building the
    (B, L, V) logits (see `head_loss`).
    """
    _check_weighting(weighting)
    out = model.forward(batch.tokens, batch.positions, batch.mask, embed_noise=embed_noise, compute_logits=False)
    hidden = out.hidden[:, :batch.num_query_rows]
    m = batch.loss_mask
    loss, (ce_sum, n_correct, cap) = head_loss(hidden, output_head(model), batch.targets, m,
                                               _row_weights(batch, weighting), cap_weight=cap_weight)
    n_masked = jnp.sum(m)
    n_eligible = jnp.sum(batch.eligible)
    denom = jnp.maximum(n_masked, 1)
    metrics = {
        "masked_ce": ce_sum / denom,
        "masked_accuracy": n_correct / denom,
        "n_masked": n_masked,
        "n_eligible": n_eligible,
        "mask_rate": jnp.mean(batch.t),
    }
    if cap_weight:
        metrics["diffusion_loss"] = jax.lax.stop_gradient(loss - cap_weight * cap)
        metrics["cap_entropy"] = cap
    if _editing_on(batch, edit_weight):
        e = batch.edit_mask
        edit_loss, (edit_ce, edit_correct, _) = head_loss(hidden, output_head(model), batch.targets, e,
                                                          editing.edit_weights(batch))
        metrics.update(_edit_metrics(edit_ce, edit_correct, jnp.sum(e)))
        loss = loss + edit_weight * edit_loss
    metrics["loss"] = loss
    if getattr(out, "expert_load", None) is not None:
        metrics["expert_load"] = out.expert_load
    return loss, metrics


def ar_loss(model, batch: DiffusionBatch):
    """Next-token cross entropy averaged over the loss positions of an `ar_batch`."""
    out = model.forward(batch.tokens, batch.positions, batch.mask, compute_logits=False)
    hidden = out.hidden[:, :batch.num_query_rows]
    m = batch.loss_mask
    n = jnp.sum(m)
    loss, (_, n_correct, _) = head_loss(hidden, output_head(model), batch.targets, m,
                                        m.astype(jnp.float32) / jnp.maximum(n, 1))
    metrics = {"loss": loss, "accuracy": n_correct / jnp.maximum(n, 1), "n_tokens": n}
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
