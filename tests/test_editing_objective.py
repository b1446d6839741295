"""The token-editing objective (LLaDA2.1): the corruption of visible noisy-half tokens, the loss against
a numpy recomputation (packing, complementary views, CAP and ELBO / masked-mean weighting), fused vs
dense gradients, edit_rate = 0 as today's objective bit for bit, and config checks.

The reference runs the model with a dense attention mask built here in numpy from spec §2.3 and §5
(not the library's MaskSpec) and computes every loss term in float64.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada2_jax.configs.posttrain import posttrain_config
from llada2_jax.diffusion import editing, layout, losses, noising
from llada2_jax.model import ModelConfig, Transformer
from llada2_jax.training import objectives
from llada2_jax.training.stages.sft import SFT

V, MASK, EOS, L, BLOCK = 48, 47, 1, 16, 4
CFG = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def packed_arrays():
    """Row 0: two packed samples (prompts of 3 and 2 tokens); row 1: one sample of 12 + 4 padding.

    Responses end in EOS padding up to the block boundary (as `data.sft` builds them)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 40, size=(2, L)).astype(np.int32)
    segment_ids = np.array([[1] * 8 + [2] * 8, [1] * 12 + [0] * 4], np.int32)
    positions = np.array([list(range(8)) * 2, list(range(12)) + [0] * 4], np.int32)
    prompt = np.zeros((2, L), bool)
    prompt[0, :3] = prompt[0, 8:10] = prompt[1, :4] = True
    loss_mask = (segment_ids > 0) & ~prompt
    tokens[0, 6:8] = tokens[0, 13:16] = tokens[1, 9:12] = EOS
    tokens[1, 12:] = 0
    return dict(tokens=tokens, segment_ids=segment_ids, positions=positions, loss_mask=loss_mask.astype(np.int32))


_DENSE_FORWARD = nnx.jit(lambda m, tokens, positions, allow: m(tokens, positions, allow))
_SFT_LOSS = nnx.jit(objectives.sft_loss, static_argnums=3)
_SFT_GRAD = nnx.jit(nnx.grad(lambda m, arrays, rng, cfg: objectives.sft_loss(m, arrays, rng, cfg)[0]), static_argnums=3)


def noise_cfg(**kw):
    base = dict(block_size=BLOCK, mask_id=MASK, vocab_size=V, complementary=True, cap_weight=2.0, edit_rate=0.4,
                edit_weight=0.7)
    base.update(kw)
    return objectives.NoiseConfig(**base)


@functools.lru_cache(maxsize=None)
def model_predicting_eos():
    """A random model whose EOS logit is pushed up along the mean hidden state, so some masked EOS
    padding is predicted correctly (CAP and the accuracies then have something to count)."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    batch = objectives.sft_diffusion_batch(packed_arrays(), jax.random.key(1), noise_cfg())
    hidden = model.forward(batch.tokens, batch.positions, batch.mask, compute_logits=False).hidden[:, :L]
    direction = jnp.mean(hidden.reshape(-1, hidden.shape[-1]), axis=0)
    model.lm_head.set_value(model.lm_head[...].at[:, EOS].add(3.0 * direction / jnp.sum(direction ** 2)))
    return model


def dense_mask(segment_ids):
    """(B, 2L, 2L) spec §2.3 block-diffusion mask AND the document mask (§5), from packed indices."""
    i = np.arange(2 * L)
    noisy, blk = i < L, (i % L) // BLOCK
    q_noisy, k_noisy = noisy[:, None], noisy[None]
    qb, kb = blk[:, None], blk[None]
    allow = np.where(q_noisy & k_noisy, qb == kb,
                     np.where(q_noisy & ~k_noisy, qb > kb, np.where(~q_noisy & ~k_noisy, qb >= kb, False)))
    seg = np.concatenate([segment_ids, segment_ids], axis=1)
    return allow[None] & (seg[:, :, None] == seg[:, None, :])


def reference_loss(model, batch, *, weighting, cap_weight, edit_weight):
    """Every term in float64 from logits of a dense-mask forward of `batch.tokens`."""
    seg = np.concatenate([packed_arrays()["segment_ids"]] * 2, axis=0)  # complementary views repeat the rows
    logits = np.asarray(_DENSE_FORWARD(model, batch.tokens, batch.positions, jnp.asarray(dense_mask(seg))),
                        np.float64)[:, :L]
    target = np.asarray(batch.targets)
    m, e, elig = (np.asarray(a, bool) for a in (batch.loss_mask, batch.edit_mask, batch.eligible))
    t = np.asarray(batch.t, np.float64)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, target[..., None], -1)[..., 0]
    if weighting == "elbo":
        draft = np.sum(np.where(m, ce / t[:, None], 0.0)) / elig.sum()
    else:
        draft = np.sum(np.where(m, ce, 0.0)) / m.sum()
    logp = logits - lse[..., None]
    entropy = -np.sum(np.exp(logp) * logp, -1)
    correct = (logits.argmax(-1) == target) & m
    cap = np.sum(np.where(correct, entropy, 0.0)) / max(correct.sum(), 1)
    edit = np.sum(np.where(e, ce, 0.0)) / max(e.sum(), 1)
    return dict(loss=draft + cap_weight * cap + edit_weight * edit, sft_loss=draft, cap_entropy=cap, edit_ce=edit,
                edit_accuracy=np.sum((logits.argmax(-1) == target) & e) / max(e.sum(), 1),
                n_edited=e.sum(), n_correct=correct.sum())


def test_corruption_touches_only_visible_response_tokens_of_the_noisy_stream():
    arrays, rng = packed_arrays(), jax.random.key(3)
    plain = objectives.sft_diffusion_batch(arrays, rng, noise_cfg(edit_rate=0.0))
    edited = objectives.sft_diffusion_batch(arrays, rng, noise_cfg(edit_rate=0.5))
    assert plain.edit_mask is None
    for name in ("loss_mask", "t", "positions", "targets", "eligible"):  # the drafting stream is the same draw
        np.testing.assert_array_equal(getattr(plain, name), getattr(edited, name))
    e = np.asarray(edited.edit_mask)
    visible = np.asarray(edited.eligible) & ~np.asarray(edited.loss_mask)
    assert e.any() and not (e & ~visible).any()
    assert 0.2 < e.sum() / visible.sum() < 0.8
    noisy, plain_noisy, x0 = np.asarray(edited.tokens[:, :L]), np.asarray(plain.tokens[:, :L]), np.asarray(plain.targets)
    np.testing.assert_array_equal(np.where(e, plain_noisy, noisy), plain_noisy)  # only corrupted positions change
    assert (noisy[e] != x0[e]).all() and (noisy[e] != MASK).all()
    np.testing.assert_array_equal(edited.tokens[:, L:], plain.tokens[:, L:])  # the clean copy stays clean
    # complementary views: every response token is masked in exactly one view, corrupted only where visible
    m = np.asarray(edited.loss_mask)
    np.testing.assert_array_equal(m[:2] ^ m[2:], np.asarray(edited.eligible[:2]))


def test_random_tokens_are_uniform_over_the_vocabulary_minus_mask_and_original():
    vocab, mask_id, n = 12, 5, 120_000
    x0 = np.repeat(np.array([0, 4, 6, 11], np.int32), n // 4).reshape(4, -1)
    draws = np.asarray(editing.random_tokens(jax.random.key(0), x0, vocab, mask_id))
    for row, original in zip(draws, x0[:, 0]):
        counts = np.bincount(row, minlength=vocab)
        assert counts[mask_id] == 0 and counts[original] == 0
        allowed = np.delete(counts, [mask_id, original])
        expected = row.size / (vocab - 2)
        assert np.abs(allowed - expected).max() < 0.05 * expected


@pytest.mark.parametrize("weighting", ["elbo", "masked_mean"])
def test_loss_matches_numpy_reference(weighting):
    model = model_predicting_eos()
    cfg = noise_cfg(weighting=weighting)
    rng = jax.random.key(1)
    batch = objectives.sft_diffusion_batch(packed_arrays(), rng, cfg)
    want = reference_loss(model, batch, weighting=weighting, cap_weight=cfg.cap_weight, edit_weight=cfg.edit_weight)
    assert want["n_correct"] > 0 and want["n_edited"] > 0 and want["cap_entropy"] > 0
    loss, metrics = _SFT_LOSS(model, packed_arrays(), rng, cfg)
    np.testing.assert_allclose(float(loss), want["loss"], rtol=2e-5)
    for key in ("sft_loss", "cap_entropy", "edit_ce", "edit_accuracy", "n_edited"):
        np.testing.assert_allclose(float(metrics[key]), want[key], rtol=2e-5, err_msg=key)
    dense_loss, dense_metrics = losses.diffusion_loss_from_logits(
        losses.query_logits(model, batch)[0], batch, weighting=weighting, cap_weight=cfg.cap_weight,
        edit_weight=cfg.edit_weight)
    np.testing.assert_allclose(float(dense_loss), want["loss"], rtol=2e-5)
    np.testing.assert_allclose(float(dense_metrics["edit_ce"]), want["edit_ce"], rtol=2e-5)


def test_fused_gradients_equal_the_dense_path():
    model = model_predicting_eos()
    cfg = noise_cfg()
    rng = jax.random.key(1)
    batch = objectives.sft_diffusion_batch(packed_arrays(), rng, cfg)

    def dense(m):
        return losses.diffusion_loss_from_logits(losses.query_logits(m, batch)[0], batch, cap_weight=cfg.cap_weight,
                                                 edit_weight=cfg.edit_weight)[0]

    fused = _SFT_GRAD(model, packed_arrays(), rng, cfg)
    want = nnx.jit(nnx.grad(dense))(model)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_rate_zero_is_todays_objective_bit_for_bit():
    """Today's objective rebuilt from its parts (t, mask, complementary views, layout, loss)."""
    model = model_predicting_eos()
    arrays, rng = packed_arrays(), jax.random.key(5)
    k_t, k_mask = jax.random.split(rng)
    eligible = objectives.response_positions(arrays)
    t = noising.sample_t(k_t, 2, 0.3, 0.8)
    mask, t = noising.complementary_pair(noising.sample_mask(k_mask, t, eligible), t, eligible)
    twice = [jnp.concatenate([jnp.asarray(arrays[k])] * 2) for k in ("tokens", "segment_ids", "positions")]
    batch = layout.build_diffusion_batch(*twice, jnp.concatenate([eligible] * 2), mask, t, mask_id=MASK,
                                         block_size=BLOCK, vocab_size=V)
    want, want_metrics = nnx.jit(lambda m, b: losses.diffusion_loss(m, b, cap_weight=2.0))(model, batch)
    got, metrics = _SFT_LOSS(model, arrays, rng, noise_cfg(edit_rate=0.0, edit_weight=3.0))
    assert float(got) == float(want)
    assert "edit_ce" not in metrics
    for key, value in want_metrics.items():
        np.testing.assert_array_equal(metrics["sft_loss" if key == "diffusion_loss" else key], value, err_msg=key)


@pytest.mark.parametrize("field,value,match", [
    ("edit_rate", 1.5, "edit_rate=1.5 must be in"),
    ("edit_rate", -0.1, "edit_rate=-0.1 must be in"),
    ("edit_weight", -1.0, "edit_weight=-1.0 must be >= 0"),
    ("edit_weight", 0.0, "edit_rate=0.3 with edit_weight=0"),
])
def test_bad_editing_config_fails_at_start_up(field, value, match):
    config = posttrain_config("sft", "")
    config.sft.edit_rate = 0.3
    config.sft[field] = value
    with pytest.raises(ValueError, match=f"sft: {match}"):
        SFT.validate(config, "sft")
