"""The chunked, fused output-head loss (`losses.head_loss`) against the dense reference path.

`diffusion_loss` / `ar_loss` never build the (rows x vocab) logits; here they are compared, loss,
metrics and gradients, with `diffusion_loss_from_logits(query_logits(...))` and the dense AR cross
entropy, for ELBO and masked-mean weighting, CAP (cap_weight > 0), complementary-masking batches,
tied and untied heads, and chunk sizes that leave partial and skipped chunks.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada2_jax.diffusion import layout, losses
from llada2_jax.model.config import ModelConfig
from llada2_jax.model.transformer import Transformer
from llada2_jax.training import objectives

VOCAB, MASK_ID, L = 40, 39, 8
BASE = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK_ID)


def _model(tied: bool):
    return Transformer(ModelConfig(**BASE, tie_word_embeddings=tied), rngs=nnx.Rngs(3))


def _batch(block_size=4, seed=0):
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.integers(0, MASK_ID, (2, L)), jnp.int32)
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]], jnp.int32)
    eligible = jnp.array([[0, 1, 1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]], bool)
    noise = jnp.asarray(rng.random((2, L)) < 0.6)
    return layout.build_diffusion_batch(x0, seg, None, eligible, noise, jnp.array([0.4, 0.8]), mask_id=MASK_ID,
                                        block_size=block_size, vocab_size=VOCAB)


def _complementary_batch(seed=1):
    rng = np.random.default_rng(seed)
    arrays = {"tokens": rng.integers(0, MASK_ID, (2, L)).astype(np.int32),
              "segment_ids": np.array([[1] * L, [1] * 6 + [0] * 2], np.int32),
              "positions": np.tile(np.arange(L, dtype=np.int32), (2, 1)),
              "loss_mask": np.array([[0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0]], bool)}
    cfg = objectives.NoiseConfig(block_size=4, t_min=0.3, t_max=0.8, mask_id=MASK_ID, vocab_size=VOCAB,
                                 complementary=True)
    return objectives.sft_diffusion_batch(arrays, jax.random.key(seed), cfg)


def _dense_loss(model, batch, weighting, cap_weight):
    logits, _ = losses.query_logits(model, batch)
    return losses.diffusion_loss_from_logits(logits, batch, weighting=weighting, cap_weight=cap_weight)


def _value_and_grad(fn, model, batch, **kw):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return fn(nnx.merge(graphdef, p, rest), batch, **kw)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _assert_close(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk", [3, 128])
@pytest.mark.parametrize("weighting,cap_weight,tied,block", [
    ("elbo", 0.0, True, 4), ("masked_mean", 0.0, False, 4), ("elbo", 2.0, True, 4), ("masked_mean", 0.5, False, 8)])
def test_diffusion_loss_matches_dense(monkeypatch, chunk, weighting, cap_weight, tied, block):
    monkeypatch.setattr(losses, "HEAD_CHUNK", chunk)
    model, batch = _model(tied), _batch(block)
    (loss, metrics), grads = _value_and_grad(losses.diffusion_loss, model, batch, weighting=weighting,
                                             cap_weight=cap_weight)
    (ref, ref_metrics), ref_grads = _value_and_grad(_dense_loss, model, batch, weighting=weighting,
                                                    cap_weight=cap_weight)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    assert set(metrics) == set(ref_metrics)
    _assert_close({k: metrics[k] for k in ref_metrics}, ref_metrics, rtol=1e-5)
    _assert_close(grads, ref_grads)


def test_cap_gradient_is_not_trivial():
    """With a confident model some rows are argmax-correct, so the CAP term really enters the gradient."""
    model, batch = _model(True), _batch()
    # make the targets the argmax of the model: the CAP selection is then non-empty
    logits, _ = losses.query_logits(model, batch)
    batch = batch.__class__(batch.tokens, batch.positions, batch.mask, jnp.argmax(logits, -1).astype(jnp.int32),
                            batch.loss_mask, batch.eligible, batch.t, num_query_rows=batch.num_query_rows)
    (_, m0), g0 = _value_and_grad(losses.diffusion_loss, model, batch, cap_weight=0.0)
    (_, m1), g1 = _value_and_grad(losses.diffusion_loss, model, batch, cap_weight=1.0)
    (_, r1), ref1 = _value_and_grad(_dense_loss, model, batch, weighting="elbo", cap_weight=1.0)
    assert float(m1["cap_entropy"]) > 0 and float(m1["masked_accuracy"]) == 1.0
    _assert_close(g1, ref1)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    assert diff > 1e-6


@pytest.mark.parametrize("cap_weight", [0.0, 2.0])
def test_complementary_batch_matches_dense(monkeypatch, cap_weight):
    monkeypatch.setattr(losses, "HEAD_CHUNK", 5)
    model, batch = _model(True), _complementary_batch()
    assert batch.tokens.shape[0] == 4  # the two views of each row
    (loss, metrics), grads = _value_and_grad(losses.diffusion_loss, model, batch, cap_weight=cap_weight)
    (ref, ref_metrics), ref_grads = _value_and_grad(_dense_loss, model, batch, weighting="elbo",
                                                    cap_weight=cap_weight)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    _assert_close({k: metrics[k] for k in ref_metrics}, ref_metrics, rtol=1e-5)
    _assert_close(grads, ref_grads)


def test_empty_loss_mask_gives_zero_loss_and_gradient():
    model, batch = _model(True), _batch()
    batch = batch.__class__(batch.tokens, batch.positions, batch.mask, batch.targets,
                            jnp.zeros_like(batch.loss_mask), batch.eligible, batch.t,
                            num_query_rows=batch.num_query_rows)
    (loss, metrics), grads = _value_and_grad(losses.diffusion_loss, model, batch, cap_weight=1.0)
    assert float(loss) == 0.0 and float(metrics["masked_accuracy"]) == 0.0
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("chunk", [4, 128])
def test_ar_loss_matches_dense(monkeypatch, chunk):
    monkeypatch.setattr(losses, "HEAD_CHUNK", chunk)
    model = _model(False)
    rng = np.random.default_rng(2)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0], [1] * L], jnp.int32)
    batch = layout.ar_batch(jnp.asarray(rng.integers(0, VOCAB, (2, L)), jnp.int32), seg)

    def dense(m, b):
        logits, _ = losses.query_logits(m, b)
        ce = losses.token_cross_entropy(logits, b.targets)
        n = jnp.sum(b.loss_mask)
        acc = jnp.sum((jnp.argmax(logits, -1) == b.targets) & b.loss_mask) / n
        return jnp.sum(jnp.where(b.loss_mask, ce, 0.0)) / n, {"accuracy": acc}

    (loss, metrics), grads = _value_and_grad(losses.ar_loss, model, batch)
    (ref, ref_metrics), ref_grads = _value_and_grad(dense, model, batch)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["accuracy"]), float(ref_metrics["accuracy"]))
    _assert_close(grads, ref_grads)


def test_head_loss_without_gradient_matches_forward_with_it():
    """The primal (no-grad) pass and the fused forward give the same loss and metrics."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(3, 7, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (3, 7)), jnp.int32)
    sel = jnp.asarray(rng.random((3, 7)) < 0.5)
    w = jnp.asarray(rng.random((3, 7)), jnp.float32)
    plain = losses.head_loss(h, head, targets, sel, w, cap_weight=0.7, chunk=4)
    fused, _ = jax.value_and_grad(lambda h: losses.head_loss(h, head, targets, sel, w, cap_weight=0.7, chunk=4),
                                  has_aux=True)(h)
    _assert_close(plain, fused, rtol=1e-6)
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, head), -1)
    ce = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(plain[1][0]), float(jnp.sum(jnp.where(sel, ce, 0.0))), rtol=1e-5)
