"""Model internals against independent references: MoE dispatch, KV cache, RoPE, remat, metadata."""
import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from llada2_jax.model import KVCache, ModelConfig, Transformer
from llada2_jax.model import moe
from llada2_jax.model.layers import apply_rope, rope_frequencies, swiglu

BAILING = ModelConfig(
    model_type="bailing_moe_v2", vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, qk_norm=True, intermediate_size=48,
    num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, num_shared_experts=1,
    first_k_dense_replace=1, score_function="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
    norm_topk_prob=True, use_expert_bias=True)
QWEN3_MOE = ModelConfig(
    model_type="qwen3_moe", vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
    num_key_value_heads=1, head_dim=8, qk_norm=True, num_experts=6, num_experts_per_tok=2,
    moe_intermediate_size=12, score_function="softmax", norm_topk_prob=False)


def _tokens(b, t, v, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, v)


@pytest.mark.parametrize("config", [BAILING, QWEN3_MOE], ids=["bailing", "qwen3_moe"])
def test_ragged_dispatch_matches_dense_oracle(config):
    model = Transformer(config, rngs=nnx.Rngs(1))
    oracle = Transformer(config.replace(moe_impl="dense"), rngs=nnx.Rngs(1))
    tok = _tokens(2, 12, config.vocab_size)
    ref = oracle(tok)
    np.testing.assert_allclose(model(tok), ref, atol=1e-5 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("gmm_impl", ["xla", "xla_tiled"])
def test_ragged_dispatch_gradients_match_dense_oracle(gmm_impl):
    """Gradients through the sorted dispatch (its own row-gather VJPs) equal the all-experts oracle."""
    config = QWEN3_MOE.replace(gmm_impl=gmm_impl)
    k = jax.random.split(jax.random.key(3), 6)
    n, d, e, i = 37, config.hidden_size, config.num_experts, config.moe_intermediate_size
    x = jax.random.normal(k[0], (n, d))
    weights, ids, _ = moe.route(config, x, jax.random.normal(k[1], (d, e)))
    experts = [jax.random.normal(k[2], (e, d, i)), jax.random.normal(k[3], (e, d, i)), jax.random.normal(k[4], (e, i, d))]
    probe = jax.random.normal(k[5], (n, d))

    def loss(fn, x, weights, *w):
        return (fn(config, x, weights, ids, *w) * probe).sum()

    args = (x, weights, *experts)
    got = jax.grad(functools.partial(loss, moe.routed_experts), argnums=range(5))(*args)
    ref = jax.grad(functools.partial(loss, moe.dense_experts), argnums=range(5))(*args)
    for name, a, b in zip(["x", "weights", "e_gate", "e_up", "e_down"], got, ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()), err_msg=name)


def test_router_matches_numpy_reference_with_bias():
    rng = np.random.default_rng(0)
    n, d, e = 40, 16, 8
    x, w = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(d, e)).astype(np.float32)
    bias = rng.normal(size=(e,)).astype(np.float32) * 0.5
    weights, ids, load = moe.route(BAILING, jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias))
    scores = 1 / (1 + np.exp(-(x @ w)))
    choice = scores + bias
    for i in range(n):
        groups = choice[i].reshape(4, 2)
        group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
        kept = np.argsort(-group_score, kind="stable")[:2]
        masked = np.full(e, -np.inf)
        for g in kept:
            masked[g * 2:(g + 1) * 2] = choice[i, g * 2:(g + 1) * 2]
        sel = np.argsort(-masked, kind="stable")[:3]
        assert set(sel) == set(np.asarray(ids[i]))
        expect = scores[i, sel] / scores[i, sel].sum() * 2.5
        got = dict(zip(np.asarray(ids[i]), np.asarray(weights[i])))
        np.testing.assert_allclose([got[s] for s in sel], expect, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(load), np.bincount(np.asarray(ids).ravel(), minlength=e) / (n * 3))


def test_expert_bias_update_direction():
    bias = jnp.zeros((2, 4))
    load = jnp.array([[0.4, 0.1, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]])
    new = moe.update_expert_bias(bias, load, rate=0.01)
    np.testing.assert_allclose(new, [[-0.01, 0.01, 0.0, 0.0], [0, 0, 0, 0]])


@pytest.mark.parametrize("config", [BAILING, QWEN3_MOE], ids=["bailing", "qwen3_moe"])
def test_kv_cache_incremental_equals_full_forward(config):
    model = Transformer(config, rngs=nnx.Rngs(2))
    tok = _tokens(2, 11, config.vocab_size, seed=3)
    full = model(tok)
    cache = KVCache.create(config, 2, 16)
    out = model.forward(tok[:, :5], cache=cache)
    logits = [out.logits]
    for i in range(5, 11):
        pos = jnp.full((2, 1), i, jnp.int32)
        out = model.forward(tok[:, i:i + 1], positions=pos, cache=out.cache)
        logits.append(out.logits)
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full, atol=2e-5 * float(jnp.abs(full).max()))


def test_remat_policies_do_not_change_values_or_grads():
    tok = _tokens(1, 8, BAILING.vocab_size)
    outs = []
    for policy in ("none", "full", "dots_saveable"):
        model = Transformer(BAILING.replace(remat_policy=policy), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        loss = lambda s: nnx.merge(graphdef, s)(tok).std()
        outs.append(jax.grad(loss)(state))
    for other in outs[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), outs[0], other)


@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 3, 4)])
def test_swiglu_custom_backward_matches_numpy_gradients(lead):
    """The hand-written SwiGLU backward against gradients derived by hand in numpy (float64)."""
    d, f = 6, 10
    rng = np.random.default_rng(len(lead))
    x, wg, wu, wd, dy = (rng.normal(size=s) for s in ((*lead, d), (d, f), (d, f), (f, d), (*lead, d)))
    y, vjp = jax.vjp(swiglu, *(jnp.asarray(a, jnp.float32) for a in (x, wg, wu, wd)))
    grads = vjp(jnp.asarray(dy, jnp.float32))
    g, u = x @ wg, x @ wu
    s = 1 / (1 + np.exp(-g))
    h = g * s * u
    dh = dy @ wd.T
    dg, du = dh * u * (s + g * s * (1 - s)), dh * g * s
    rows = lambda a: a.reshape(-1, a.shape[-1])
    expected = (dg @ wg.T + du @ wu.T, rows(x).T @ rows(dg), rows(x).T @ rows(du), rows(h).T @ rows(dy))
    np.testing.assert_allclose(y, h @ wd, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_partial_rope_matches_numpy_rotate_half():
    cfg = BAILING
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, cfg.resolved_head_dim))
    pos = jnp.arange(5)[None]
    inv_freq, scale = rope_frequencies(cfg)
    out = np.asarray(apply_rope(x, pos, inv_freq, scale))
    xn = np.asarray(x)
    rot = cfg.rotary_dim
    np.testing.assert_array_equal(out[..., rot:], xn[..., rot:])  # pass-through half
    freqs = cfg.rope_theta ** (-np.arange(0, rot, 2) / rot)
    for p in range(5):
        ang = p * freqs
        u1, u2 = xn[0, p, :, :rot // 2], xn[0, p, :, rot // 2:rot]
        np.testing.assert_allclose(out[0, p, :, :rot // 2], u1 * np.cos(ang) - u2 * np.sin(ang), atol=1e-5)
        np.testing.assert_allclose(out[0, p, :, rot // 2:rot], u2 * np.cos(ang) + u1 * np.sin(ang), atol=1e-5)


def test_every_parameter_has_logical_axes():
    model = Transformer(BAILING)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Variable)):
        axes = var.get_metadata().get("axes")
        assert axes is not None and len(axes) == var.get_value().ndim, path


def test_bf16_compute_keeps_fp32_logits_close():
    tok = _tokens(2, 10, BAILING.vocab_size)
    ref = Transformer(BAILING, rngs=nnx.Rngs(0))(tok)
    low = Transformer(BAILING.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))(tok)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, ref, atol=0.05 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("kw,needle", [
    (dict(model_type="gpt2"), "supported"),
    (dict(num_attention_heads=3, num_key_value_heads=2), "num_key_value_heads"),
    (dict(mask_token_id=999), "mask_token_id=999"),
    (dict(attention_impl="palas"), r"attention_impl='palas' is not one of: auto, xla, xla_sparse, pallas$"),
    (dict(gmm_impl="ragged"), r"gmm_impl='ragged' is not one of: auto, xla, xla_tiled, pallas$"),
    (dict(moe_impl="sparse"), r"moe_impl='sparse' is not one of: ragged, dense$"),
    (dict(dtype="bf16"), r"dtype='bf16' is not one of: float32, bfloat16, float16$"),
    (dict(remat_policy="dots"), r"remat_policy='dots' is not one of: none, full"),
])
def test_config_errors_name_the_problem(kw, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**kw)


def test_runtime_settings_are_checked_with_their_config_path():
    from llada2_jax.model.config import check_runtime
    check_runtime(dict(param_dtype="float32", dtype="bfloat16", attention_impl="auto", gmm_impl="xla_tiled"))
    with pytest.raises(ValueError, match=r"^model\.runtime\.attention_impl='palas' is not one of: auto, xla"):
        check_runtime(dict(dtype="float32", attention_impl="palas"), "model.runtime.")
    with pytest.raises(ValueError, match=r"^model\.runtime\.atention_impl is not a runtime setting; expected"):
        check_runtime(dict(atention_impl="xla"), "model.runtime.")
