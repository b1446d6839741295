"""Post-training objectives on real SFT / preference batches: masking, views, CAP and DPO.

References are numpy recomputations from the model's logits (not our loss code), so each check
can fail independently of `posttrain`.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llada2_jax.data import preference, sft
from llada2_jax.data.tokenizers import SentencePieceTokenizer
from llada2_jax.diffusion import losses
from llada2_jax.model.config import ModelConfig
from llada2_jax.model.transformer import Transformer
from llada2_jax.training import objectives as posttrain
from llada2_jax.workdir import merge_model, split_model

BLOCK, SEQ, BATCH = 32, 512, 2


@pytest.fixture(scope="module")
def tokenizer():
    records = sft.read_gsm8k(split="train", heldout_size=256)[:300]
    return SentencePieceTokenizer.train([r["question"] + "\n" + r["answer"] for r in records], vocab_size=400)


@pytest.fixture(scope="module")
def sft_batch(tokenizer):
    convs = sft.gsm8k_conversations(split="train")[:12]
    data = sft.sft_dataset(convs, tokenizer, seq_len=SEQ, batch_size=BATCH, block_size=BLOCK, seed=0)
    return {k: np.asarray(v) for k, v in next(iter(data.dataset)).items()}


@pytest.fixture(scope="module")
def pair_batch(tokenizer):
    pairs = preference.gsm8k_preference_pairs(split="train")[:8]
    data = preference.preference_dataset(pairs, tokenizer, seq_len=SEQ, batch_size=BATCH, block_size=BLOCK, seed=0)
    return {k: np.asarray(v) for k, v in next(iter(data.dataset)).items()}


@pytest.fixture(scope="module")
def model(tokenizer):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ)
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def eos_model(model, tokenizer, sft_batch):
    """The random model with its EOS logit pushed up along the mean hidden direction, so masked EOS
    padding is often predicted correctly (a random model predicts nothing correctly)."""
    graphdef, params, buffers = split_model(model)
    batch = posttrain.sft_diffusion_batch(sft_batch, jax.random.key(0), noise_cfg(tokenizer))
    hidden = model.forward(batch.tokens, batch.positions, batch.mask, compute_logits=False).hidden[:, :SEQ]
    direction = jnp.sum(jnp.where(batch.loss_mask[..., None], hidden, 0.0), axis=(0, 1)) / jnp.sum(batch.loss_mask)
    params = dict(params, lm_head=params["lm_head"].at[:, tokenizer.eos_id].set(
        4.0 * direction / jnp.sum(direction ** 2)))
    return merge_model(graphdef, params, buffers)


def noise_cfg(tokenizer, **kw):
    return posttrain.NoiseConfig(block_size=BLOCK, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size, **kw)


def test_views_cover_each_response_token_once_and_never_prompt_or_padding(tokenizer, sft_batch):
    cfg = noise_cfg(tokenizer)
    batch = posttrain.sft_diffusion_batch(sft_batch, jax.random.key(0), cfg)
    m = np.asarray(batch.loss_mask)
    first, second = m[:BATCH], m[BATCH:]
    response = sft_batch["loss_mask"].astype(bool) & (sft_batch["segment_ids"] > 0)
    prompt = (sft_batch["segment_ids"] > 0) & ~sft_batch["loss_mask"].astype(bool)
    assert prompt.any() and (sft_batch["segment_ids"] == 0).any()  # the batch has both to check
    assert not (first & second).any()
    np.testing.assert_array_equal(first | second, response)
    t = np.asarray(batch.t)
    np.testing.assert_allclose(t[BATCH:], 1.0 - t[:BATCH], rtol=1e-6)
    assert (t[:BATCH] >= 0.3).all() and (t[:BATCH] <= 0.8).all()
    # the noisy stream holds [MASK] exactly at the masked positions; the clean stream is x0
    tokens = np.asarray(batch.tokens)
    x0 = np.concatenate([sft_batch["tokens"]] * 2)
    np.testing.assert_array_equal(tokens[:, :SEQ] == tokenizer.mask_id, m)
    np.testing.assert_array_equal(tokens[:, SEQ:], x0)


def test_samples_end_on_block_boundaries_with_eos_in_loss(tokenizer, sft_batch):
    seg, lm, tok = sft_batch["segment_ids"], sft_batch["loss_mask"].astype(bool), sft_batch["tokens"]
    for row in range(BATCH):
        for s in np.unique(seg[row][seg[row] > 0]):
            idx = np.flatnonzero(seg[row] == s)
            assert idx[0] % BLOCK == 0 and (idx[-1] + 1) % BLOCK == 0
            assert tok[row, idx[-1]] == tokenizer.eos_id and lm[row, idx[-1]]


def _numpy_ce(logits, targets):
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def test_sft_loss_weights_each_view_by_its_own_rate(tokenizer, sft_batch, model):
    cfg = noise_cfg(tokenizer)
    rng = jax.random.key(1)
    loss, metrics = posttrain.sft_loss(model, sft_batch, rng, cfg)
    batch = posttrain.sft_diffusion_batch(sft_batch, rng, cfg)
    logits, _ = losses.query_logits(model, batch)
    ce = _numpy_ce(logits, np.asarray(batch.targets))
    m = np.asarray(batch.loss_mask)
    t = np.asarray(batch.t, np.float64)
    t_first = t[:BATCH]
    weights = np.concatenate([1.0 / t_first, 1.0 / (1.0 - t_first)])[:, None]
    response = sft_batch["loss_mask"].astype(bool) & (sft_batch["segment_ids"] > 0)
    expected = np.sum(np.where(m, ce * weights, 0.0)) / (2 * response.sum())
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert int(metrics["rows"]) == 2 * BATCH
    assert int(metrics["samples"]) == sum(len(np.unique(r[r > 0])) for r in sft_batch["segment_ids"])


def test_cap_adds_lambda_times_correct_token_entropy(tokenizer, sft_batch, eos_model):
    model = eos_model
    rng = jax.random.key(2)
    lam = 2.0
    sft_value, _ = posttrain.sft_loss(model, sft_batch, rng, noise_cfg(tokenizer))
    cap_value, metrics = posttrain.sft_loss(model, sft_batch, rng, noise_cfg(tokenizer, cap_weight=lam))
    batch = posttrain.sft_diffusion_batch(sft_batch, rng, noise_cfg(tokenizer))
    logits = np.asarray(losses.query_logits(model, batch)[0], np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    correct = (logits.argmax(-1) == np.asarray(batch.targets)) & np.asarray(batch.loss_mask)
    assert correct.any() and not correct[np.asarray(batch.loss_mask)].all()
    expected_h = entropy[correct].mean()
    np.testing.assert_allclose(float(metrics["cap_entropy"]), expected_h, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["sft_loss"]), float(sft_value), rtol=1e-6)
    np.testing.assert_allclose(float(cap_value), float(sft_value) + lam * expected_h, rtol=1e-5)


def test_cap_term_vanishes_when_nothing_is_predicted_correctly(tokenizer, sft_batch, model):
    graphdef, params, buffers = split_model(model)
    params = jax.tree.map(lambda x: x, params)
    params["final_norm"] = jnp.zeros_like(params["final_norm"])  # all logits 0 -> argmax = id 0 (pad)
    flat = merge_model(graphdef, params, buffers)
    rng = jax.random.key(3)
    sft_value, _ = posttrain.sft_loss(flat, sft_batch, rng, noise_cfg(tokenizer))
    cap_value, metrics = posttrain.sft_loss(flat, sft_batch, rng, noise_cfg(tokenizer, cap_weight=2.0))
    assert float(metrics["cap_entropy"]) == 0.0
    assert float(cap_value) == float(sft_value)


def test_cap_gradient_is_sft_gradient_plus_entropy_gradient(tokenizer, sft_batch, eos_model):
    model = eos_model
    graphdef, params, buffers = split_model(model)
    rng, lam = jax.random.key(4), 2.0
    batch = posttrain.sft_diffusion_batch(sft_batch, rng, noise_cfg(tokenizer))

    def objective(p, cfg):
        return posttrain.sft_loss(merge_model(graphdef, p, buffers), sft_batch, rng, cfg)[0]

    logits0 = losses.query_logits(model, batch)[0]
    selected = (jnp.argmax(logits0, -1) == batch.targets) & batch.loss_mask  # fixed selection S
    assert selected.any()

    def entropy_on_fixed_set(p):
        logits = losses.query_logits(merge_model(graphdef, p, buffers), batch)[0]
        logp = jax.nn.log_softmax(logits, -1)
        h = -jnp.sum(jnp.exp(logp) * logp, -1)
        return jnp.sum(jnp.where(selected, h, 0.0)) / jnp.sum(selected)

    grad = jax.jit(jax.grad(objective), static_argnums=1)
    g_cap = grad(params, noise_cfg(tokenizer, cap_weight=lam))
    g_sft = grad(params, noise_cfg(tokenizer))
    g_h = jax.jit(jax.grad(entropy_on_fixed_set))(params)
    for a, b, c in zip(jax.tree.leaves(g_cap), jax.tree.leaves(g_sft), jax.tree.leaves(g_h)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) + lam * np.asarray(c), rtol=1e-4, atol=1e-7)


def test_preference_noise_is_shared_by_policy_and_reference_only(tokenizer, pair_batch):
    cfg = noise_cfg(tokenizer, complementary=False)
    batch = posttrain.preference_elbo_batch(pair_batch, jax.random.key(5), cfg)
    m = np.asarray(batch.loss_mask)
    for i, side in enumerate(posttrain.SIDES):
        rows = m[i * BATCH:(i + 1) * BATCH]
        response = pair_batch[f"{side}_loss_mask"] & (pair_batch[f"{side}_segment_ids"] > 0)
        assert not (rows & ~response).any() and rows.any(axis=1).all()
    t = np.asarray(batch.t)
    assert not np.allclose(t[:BATCH], t[BATCH:])  # chosen and rejected draw their own t


def test_dpo_starts_at_log2_and_reference_gets_no_gradient(tokenizer, pair_batch, model):
    cfg = noise_cfg(tokenizer, complementary=False)
    graphdef, params, buffers = split_model(model)
    ref_params = jax.tree.map(jnp.copy, params)

    def objective(p, rp):
        return posttrain.dpo_loss(merge_model(graphdef, p, buffers), merge_model(graphdef, rp, buffers),
                                  pair_batch, jax.random.key(6), cfg)

    (loss, metrics), (g_pi, g_ref) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
        params, ref_params)
    np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-6)
    assert float(metrics["reward_margin"]) == 0.0
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(g_ref))
    assert any(np.asarray(g).any() for g in jax.tree.leaves(g_pi))


def test_one_dpo_step_raises_the_elbo_margin_on_the_same_noise(tokenizer, pair_batch, model):
    cfg = noise_cfg(tokenizer, complementary=False)
    graphdef, params, buffers = split_model(model)
    reference = merge_model(graphdef, jax.tree.map(jnp.copy, params), buffers)
    ref_before = [np.asarray(x).copy() for x in jax.tree.leaves(split_model(reference)[1])]
    rng = jax.random.key(7)

    def objective(p):
        return posttrain.dpo_loss(merge_model(graphdef, p, buffers), reference, pair_batch, rng, cfg)

    tx = optax.adam(1e-3)
    (_, before), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    (loss_after, after) = jax.jit(objective)(optax.apply_updates(params, updates))
    assert float(after["elbo_margin"]) > float(before["elbo_margin"])
    assert float(after["reward_margin"]) > 0.0 and float(loss_after) < math.log(2.0)
    for a, b in zip(ref_before, jax.tree.leaves(split_model(reference)[1])):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("kw,field", [(dict(t_min=0.3, t_max=1.0), "t_max=1.0"), (dict(cap_weight=-1.0), "cap_weight"),
                                      (dict(beta=0.0), "beta"), (dict(weighting="sum"), "weighting")])
def test_bad_noise_config_names_the_field(tokenizer, kw, field):
    with pytest.raises(ValueError, match=field):
        noise_cfg(tokenizer, **kw)


def test_final_lr_reads_last_logged_rate(tmp_path):
    assert posttrain.final_lr(str(tmp_path)) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.5}\n{"step": 2, "eval_nelbo": 3.0}\n'
                                            '{"step": 3, "lr": 0.25}\n')
    assert posttrain.final_lr(str(tmp_path)) == 0.25


def _experiment(name):
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name,field,value,message", [
    ("tiny_sft", "init_from", "EMPTY", "init_from="),
    ("tiny_sft", "sft.block_size", 48, "sft.block_size=48"),
    ("tiny_cap", "cap.cap_weight", 0.0, "cap.cap_weight"),
    ("tiny_cap", "cap.t_max", 1.0, "t_max=1.0"),
    ("tiny_dpo", "dpo.beta", -0.1, "beta"),
    ("tiny_dpo", "dpo.data", "/no/such/pairs.jsonl", "dpo.data="),
])
def test_stage_configs_reject_bad_fields(tmp_path, name, field, value, message):
    from llada2_jax.training.stages import get_stage
    from llada2_jax.training.validate import resolve_config
    config = _experiment(name)
    config.init_from = ""
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = str(tmp_path) if value == "EMPTY" else value
    with pytest.raises(ValueError, match=message):
        stage = name.split("_")[1]
        get_stage(stage).validate(resolve_config(config), stage)
