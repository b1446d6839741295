"""Fine-tuning only the top layers: no gradient below, no optimizer update (weight decay included)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llada2_jax.model import ModelConfig, Transformer
from llada2_jax.training.freeze import keep_bottom_layers

CONFIGS = {
    "dense": ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2),
    "moe": ModelConfig(model_type="bailing_moe_v2", vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                       score_function="sigmoid", moe_impl="dense"),
}


def loss_fn(model, tokens):
    logits = model(tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])


def stacked(state, stack):
    return {k: np.asarray(v) for k, v in nnx.to_pure_dict(state)[stack].items() if k != "expert_bias"}


@pytest.mark.parametrize("kind,frozen", [("dense", 1), ("dense", 2), ("moe", 1), ("moe", 2)])
def test_frozen_layers_get_no_gradient_and_upper_gradients_are_unchanged(kind, frozen):
    config = CONFIGS[kind]
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, config.vocab_size)
    full = Transformer(config, rngs=nnx.Rngs(0))
    part = Transformer(config, rngs=nnx.Rngs(0))
    part.freeze_bottom(frozen)
    loss_full, g_full = nnx.value_and_grad(loss_fn)(full, tokens)
    loss_part, g_part = nnx.value_and_grad(loss_fn)(part, tokens)
    assert float(loss_full) == pytest.approx(float(loss_part), rel=1e-6)  # the forward is unchanged
    layer = 0
    for stack in ("dense_layers", "moe_layers"):
        if getattr(full, stack) is None:
            continue
        gf, gp = stacked(g_full, stack), stacked(g_part, stack)
        for name in gf:
            for i in range(gf[name].shape[0]):
                if layer + i < frozen:
                    assert not np.any(gp[name][i]), (stack, name, i)
                else:
                    np.testing.assert_allclose(gp[name][i], gf[name][i], rtol=2e-4, atol=1e-7)
        layer += gf[name].shape[0]
    np.testing.assert_allclose(np.asarray(g_part["final_norm"][...]), np.asarray(g_full["final_norm"][...]),
                               rtol=2e-4, atol=1e-7)


def test_optimizer_leaves_frozen_layers_alone_despite_weight_decay():
    config = CONFIGS["moe"]
    model = Transformer(config, rngs=nnx.Rngs(0))
    model.freeze_bottom(2)
    before = {s: stacked(nnx.state(model, nnx.Param), s) for s in ("dense_layers", "moe_layers")}
    tx = optax.chain(optax.adamw(1e-2, weight_decay=0.5), keep_bottom_layers(2, config.num_dense_layers))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, config.vocab_size)
    for _ in range(2):
        _, grads = nnx.value_and_grad(loss_fn)(model, tokens)
        opt.update(model, grads)
    after = {s: stacked(nnx.state(model, nnx.Param), s) for s in ("dense_layers", "moe_layers")}
    for name in after["dense_layers"]:  # layer 0: the one dense layer, frozen
        np.testing.assert_array_equal(after["dense_layers"][name], before["dense_layers"][name])
    for name in after["moe_layers"]:  # MoE layers 1 (frozen) and 2 (trained)
        np.testing.assert_array_equal(after["moe_layers"][name][0], before["moe_layers"][name][0])
    assert any(np.any(after["moe_layers"][n][1] != before["moe_layers"][n][1]) for n in after["moe_layers"])


def test_freezing_every_layer_or_more_is_refused():
    model = Transformer(CONFIGS["dense"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="frozen layers=4 must be in"):
        model.freeze_bottom(4)
