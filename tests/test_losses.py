"""Losses against independent numpy references: ELBO / masked mean, AR, CAP, sequence ELBO, DPO, MC likelihood."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada2_jax.diffusion import layout, losses, masks, noising
from llada2_jax.evaluation import likelihood
from llada2_jax.model.config import ModelConfig
from llada2_jax.model.transformer import Transformer

VOCAB, MASK_ID, L = 40, 39, 8
CONFIG = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK_ID)
# jitted (also checks the losses trace under jit); eager dispatch is slow on CPU
full_logits = nnx.jit(lambda m, tokens, pos, mask: m(tokens, pos, mask))
diffusion_loss = nnx.jit(losses.diffusion_loss, static_argnames=("weighting", "cap_weight"))
query_logits = nnx.jit(lambda m, b, noise: losses.query_logits(m, b, embed_noise=noise)[0])
clean_hidden = nnx.jit(lambda m, b, noise: m.forward(b.tokens, b.positions, b.mask, embed_noise=noise,
                                                     compute_logits=False).hidden[:, L:])


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG, rngs=nnx.Rngs(1))


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(logits, targets):
    return -np.take_along_axis(np_log_softmax(np.asarray(logits, np.float64)), np.asarray(targets)[..., None], -1)[..., 0]


def _batch(block_size=4, seed=0):
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.integers(0, MASK_ID, (2, L)), jnp.int32)
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]], jnp.int32)
    eligible = jnp.array([[0, 1, 1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]], bool)  # prompts + padding out
    noise = jnp.ones((2, L), bool).at[0, 2].set(False)
    return layout.build_diffusion_batch(x0, seg, None, eligible, noise, jnp.array([0.4, 0.8]), mask_id=MASK_ID,
                                        block_size=block_size, vocab_size=VOCAB)


def _reference_logits(model, b):
    return np.asarray(full_logits(model, b.tokens, b.positions, b.mask))[:, :L]


def test_elbo_and_masked_mean_match_numpy(model):
    b = _batch()
    ce = np_ce(_reference_logits(model, b), b.targets)
    m = np.asarray(b.loss_mask)
    # prompt and padding never masked, never in the loss
    assert not (m & ~np.asarray(b.eligible)).any() and m.sum() == np.asarray(b.eligible).sum() - 1
    t = np.asarray(b.t)
    elbo, metrics = diffusion_loss(model, b, weighting="elbo")
    mean, _ = diffusion_loss(model, b, weighting="masked_mean")
    np.testing.assert_allclose(float(elbo), (ce * m / t[:, None]).sum() / np.asarray(b.eligible).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(mean), (ce * m).sum() / m.sum(), rtol=1e-5)
    assert int(metrics["n_masked"]) == m.sum()
    argmax_ok = (_reference_logits(model, b).argmax(-1) == np.asarray(b.targets)) & m
    np.testing.assert_allclose(float(metrics["masked_accuracy"]), argmax_ok.sum() / m.sum(), rtol=1e-6)


def test_elbo_vs_masked_mean_factor_single_sequence(model):
    b = _batch()
    one = jax.tree.map(lambda a: a[:1], b)
    elbo, metrics = diffusion_loss(model, one, weighting="elbo")
    mean, _ = diffusion_loss(model, one, weighting="masked_mean")
    factor = float(metrics["n_masked"]) / (float(one.t[0]) * float(metrics["n_eligible"]))
    np.testing.assert_allclose(float(elbo), factor * float(mean), rtol=1e-5)


def test_sequence_elbo_is_negative_summed_weighted_ce(model):
    b = _batch()
    ce = np_ce(_reference_logits(model, b), b.targets)
    want = -(ce * np.asarray(b.loss_mask) / np.asarray(b.t)[:, None]).sum(-1)
    np.testing.assert_allclose(np.asarray(nnx.jit(losses.sequence_elbo)(model, b)), want, rtol=1e-5)


def test_mdlm_layout_loss_and_moe_free_metrics(model):
    b = _batch(block_size=L)
    assert not b.two_copy
    ce = np_ce(_reference_logits(model, b), b.targets)
    m = np.asarray(b.loss_mask)
    loss, metrics = diffusion_loss(model, b, weighting="masked_mean")
    np.testing.assert_allclose(float(loss), (ce * m).sum() / m.sum(), rtol=1e-5)
    assert "expert_load" not in metrics


def test_embed_noise_reaches_only_masked_inputs(model):
    b = _batch()
    noise = noising.mask_embedding_noise(jax.random.key(0), b.masked_input_positions(), model.embed[...], 1.0, 0, 10)
    base = query_logits(model, b, None)
    noisy = query_logits(model, b, noise)
    assert np.abs(np.asarray(noisy - base)).max() > 1e-4
    # the clean stream never receives noise: its hidden state is unchanged
    h0 = clean_hidden(model, b, None)
    h1 = clean_hidden(model, b, noise)
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h0), rtol=1e-6, atol=1e-6)


def test_ar_loss_matches_numpy(model):
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (2, L)), jnp.int32)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    b = layout.ar_batch(tokens, seg)
    logits = np.asarray(full_logits(model, tokens, None, masks.MaskSpec.causal(seg)))
    ce, n = 0.0, 0
    tok, sg = np.asarray(tokens), np.asarray(seg)
    for r in range(2):
        for i in range(L - 1):
            if sg[r, i] and sg[r, i + 1] == sg[r, i]:
                ce += np_ce(logits[r, i], tok[r, i + 1])
                n += 1
    loss, metrics = nnx.jit(losses.ar_loss)(model, b)
    assert int(metrics["n_tokens"]) == n
    np.testing.assert_allclose(float(loss), ce / n, rtol=1e-5)


def np_entropy(z):
    logp = np_log_softmax(z)
    return -(np.exp(logp) * logp).sum(-1)


def test_cap_entropy_value_and_gradient():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 2
    targets = rng.integers(0, 7, (2, 5))
    targets[0, :3] = logits[0, :3].argmax(-1)  # a few correct rows
    targets[1, 1] = logits[1, 1].argmax(-1)
    loss_mask = np.ones((2, 5), bool)
    loss_mask[0, 2] = False  # correct but not a loss position: excluded
    correct = (logits.argmax(-1) == targets) & loss_mask
    value = float(losses.cap_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(loss_mask)))
    np.testing.assert_allclose(value, np_entropy(logits.astype(np.float64))[correct].mean(), rtol=1e-5)

    grad = np.asarray(jax.grad(losses.cap_entropy)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(loss_mask)))
    # d H / d z_k = -p_k (log p_k + H), only on selected rows, scaled by 1/|S|
    logp = np_log_softmax(logits.astype(np.float64))
    h = np_entropy(logits.astype(np.float64))
    want = -np.exp(logp) * (logp + h[..., None]) * correct[..., None] / correct.sum()
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


def test_cap_entropy_zero_when_nothing_correct():
    logits = jnp.array([[[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    targets = jnp.array([[1, 2]])
    loss_mask = jnp.ones((1, 2), bool)
    assert float(losses.cap_entropy(logits, targets, loss_mask)) == 0.0
    assert not np.asarray(jax.grad(losses.cap_entropy)(logits, targets, loss_mask)).any()


def test_cap_weight_adds_entropy_term(model):
    b = _batch()
    base, _ = diffusion_loss(model, b, weighting="masked_mean")
    with_cap, metrics = diffusion_loss(model, b, weighting="masked_mean", cap_weight=2.0)
    logits = _reference_logits(model, b)
    correct = (logits.argmax(-1) == np.asarray(b.targets)) & np.asarray(b.loss_mask)
    cap = np_entropy(logits.astype(np.float64))[correct].mean() if correct.any() else 0.0
    np.testing.assert_allclose(float(metrics["cap_entropy"]), cap, rtol=1e-5)
    np.testing.assert_allclose(float(with_cap), float(base) + 2.0 * cap, rtol=1e-5)


def test_dpo_loss():
    x = jnp.array([-3.0, -7.5, -1.0])
    loss, metrics = losses.dpo_loss(x, x + 1.0, x, x + 1.0, 0.1)
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
    rng = np.random.default_rng(0)
    pw, pl, rw, rl = (rng.normal(size=6) * 5 for _ in range(4))
    loss, metrics = losses.dpo_loss(*(jnp.asarray(a, jnp.float32) for a in (pw, pl, rw, rl)), 0.1)
    margin = 0.1 * ((pw - rw) - (pl - rl))
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-margin))), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward_margin"]), margin.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward_accuracy"]), (margin > 0).mean())
    with pytest.raises(ValueError, match="beta=0"):
        losses.dpo_loss(x, x, x, x, 0)


def test_unknown_weighting_rejected(model):
    with pytest.raises(ValueError, match="weighting='mean'"):
        losses.diffusion_loss(model, _batch(), weighting="mean")


def test_mc_elbo_unbiased_for_context_free_model():
    """With a zero lm_head every token has log p = -log V, so E[ELBO] = -N_eligible log V exactly."""
    m = Transformer(CONFIG, rngs=nnx.Rngs(2))
    m.lm_head[...] = jnp.zeros_like(m.lm_head[...])
    tokens = jnp.arange(2 * L, dtype=jnp.int32).reshape(2, L) % MASK_ID
    seg = jnp.ones((2, L), jnp.int32)
    eligible = jnp.arange(L)[None, :] >= jnp.array([[2], [5]])
    mean, stderr = likelihood.mc_elbo_loglik(m, tokens, seg, eligible, block_size=4, n_samples=48,
                                             rng=jax.random.key(0), mask_id=MASK_ID, t_min=0.05)
    want = -np.asarray(eligible).sum(1) * np.log(VOCAB)
    assert np.all(np.abs(np.asarray(mean) - want) < 4 * np.asarray(stderr) + 1e-3), (mean, stderr, want)
    assert np.all(np.asarray(stderr) > 0)
    with pytest.raises(ValueError, match="n_samples=0"):
        likelihood.mc_elbo_loglik(m, tokens, seg, eligible, block_size=4, n_samples=0, rng=jax.random.key(0),
                                  mask_id=MASK_ID)


def test_empty_complementary_view_with_zero_rate_has_finite_gradient():
    """mask covering every eligible token -> complement empty with rate 1 - t = 0: no inf/NaN."""
    eligible = jnp.ones((1, 4), bool)
    pair, rates = noising.complementary_pair(eligible, jnp.array([1.0]), eligible)
    x0 = jnp.array([[1, 2, 3, 4]] * 2)
    b = layout.build_diffusion_batch(x0, jnp.ones((2, 4), jnp.int32), None, jnp.ones((2, 4), bool), pair, rates,
                                     mask_id=MASK_ID, block_size=2, vocab_size=VOCAB)
    logits = jax.random.normal(jax.random.key(0), (2, 4, VOCAB))
    grad = jax.grad(lambda z: losses.diffusion_loss_from_logits(z, b)[0])(logits)
    assert np.isfinite(np.asarray(grad)).all() and np.asarray(grad)[0].any() and not np.asarray(grad)[1].any()
