"""BailingMoeV2 (no transformers class): an independent numpy forward written from spec §1.2–1.3.

A random HF-layout checkpoint is written from numpy, loaded by `hf.load_pretrained` and compared
on logits; `save_pretrained` must reproduce the original tensors. The router is also checked
against transformers' DeepSeek-V3 gate (same sigmoid / bias / group-limited top-k rule) and the
Qwen3-MoE softmax gate.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from llada2_jax.interop import hf
from llada2_jax.model.config import ModelConfig
from llada2_jax.model.moe import route

HF_CONFIG = dict(
    model_type="bailing_moe_v2", architectures=["BailingMoeV2ForCausalLM"], vocab_size=80,
    hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, rope_theta=1000.0,
    rms_norm_eps=1e-6, use_qk_norm=True, use_qkv_bias=False, use_bias=False,
    tie_word_embeddings=False, first_k_dense_replace=1, num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=12, num_shared_experts=1, n_group=4, topk_group=2,
    score_function="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
    moe_router_enable_expert_bias=True, max_position_embeddings=128)


def random_checkpoint(c, rng) -> dict[str, np.ndarray]:
    """HF-layout tensors (PyTorch Linear = (out, in)); norms away from 1, a non-zero expert bias."""
    d, hq, hkv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    e, i_moe = c["num_experts"], c["moe_intermediate_size"]
    w = lambda *s: (rng.normal(size=s) / np.sqrt(s[-1])).astype(np.float32)
    norm = lambda n: (1 + 0.3 * rng.normal(size=n)).astype(np.float32)
    t = {"model.word_embeddings.weight": w(c["vocab_size"], d), "model.norm.weight": norm(d),
         "lm_head.weight": w(c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d),
                  p + "attention.query_key_value.weight": w((hq + 2 * hkv) * hd, d),
                  p + "attention.query_layernorm.weight": norm(hd),
                  p + "attention.key_layernorm.weight": norm(hd),
                  p + "attention.dense.weight": w(d, hq * hd)})
        if i < c["first_k_dense_replace"]:
            f = c["intermediate_size"]
            t.update({p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                      p + "mlp.down_proj.weight": w(d, f)})
            continue
        t[p + "mlp.gate.weight"] = w(e, d)
        t[p + "mlp.gate.expert_bias"] = (0.3 * rng.normal(size=e)).astype(np.float32)
        for j in range(e):
            q = f"{p}mlp.experts.{j}."
            t.update({q + "gate_proj.weight": w(i_moe, d), q + "up_proj.weight": w(i_moe, d),
                      q + "down_proj.weight": w(d, i_moe)})
        s = i_moe * c["num_shared_experts"]
        t.update({p + "mlp.shared_experts.gate_proj.weight": w(s, d),
                  p + "mlp.shared_experts.up_proj.weight": w(s, d),
                  p + "mlp.shared_experts.down_proj.weight": w(d, s)})
    return t


# ---- the numpy reference (float64) ----

def _rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _silu(x):
    return x / (1 + np.exp(-x))


def _swiglu(x, gate, up, down):  # HF (out, in) weights
    return (_silu(x @ gate.T) * (x @ up.T)) @ down.T


def _rope(x, pos, rot, theta):
    """Rotate-half RoPE on dims [0, rot) of each head; x (T, H, D)."""
    inv = theta ** (-np.arange(0, rot, 2) / rot)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    u = x[..., :rot]
    rotated = np.concatenate([-u[..., rot // 2:], u[..., :rot // 2]], -1)
    return np.concatenate([u * cos + rotated * sin, x[..., rot:]], -1)


def ref_router(m, gate_w, bias, c):
    """Sigmoid scores, bias for selection only, group-limited top-k (group score = top-2 sum)."""
    s = 1 / (1 + np.exp(-(m @ gate_w.T)))
    choice = s + bias
    n, e = choice.shape
    groups = choice.reshape(n, c["n_group"], e // c["n_group"])
    gscore = np.sort(groups, -1)[..., -2:].sum(-1)
    keep = np.argsort(-gscore, -1)[:, :c["topk_group"]]
    allowed = np.zeros((n, c["n_group"]), bool)
    np.put_along_axis(allowed, keep, True, -1)
    choice = np.where(np.repeat(allowed, e // c["n_group"], -1), choice, -np.inf)
    ids = np.argsort(-choice, -1)[:, :c["num_experts_per_tok"]]
    wts = np.take_along_axis(s, ids, -1)
    if c["norm_topk_prob"]:
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
    return wts * c["routed_scaling_factor"], ids


def ref_forward(t, tokens, c):
    hq, hkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps, rot = c["rms_norm_eps"], int(c["head_dim"] * c["partial_rotary_factor"])
    t = {k: v.astype(np.float64) for k, v in t.items()}
    out = []
    for seq in tokens:
        h = t["model.word_embeddings.weight"][seq]
        n, pos = len(seq), np.arange(len(seq), dtype=np.float64)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            a = _rms(h, t[p + "input_layernorm.weight"], eps)
            qkv = (a @ t[p + "attention.query_key_value.weight"].T).reshape(n, hq + 2 * hkv, hd)
            q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
            q = _rope(_rms(q, t[p + "attention.query_layernorm.weight"], eps), pos, rot, c["rope_theta"])
            k = _rope(_rms(k, t[p + "attention.key_layernorm.weight"], eps), pos, rot, c["rope_theta"])
            k, v = np.repeat(k, hq // hkv, 1), np.repeat(v, hq // hkv, 1)  # query head i -> kv i // r
            sc = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
            sc = np.where(np.tril(np.ones((n, n), bool)), sc, -np.inf)
            pr = np.exp(sc - sc.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            o = np.einsum("hqk,khd->qhd", pr, v).reshape(n, hq * hd)
            h = h + o @ t[p + "attention.dense.weight"].T
            m = _rms(h, t[p + "post_attention_layernorm.weight"], eps)
            if i < c["first_k_dense_replace"]:
                h = h + _swiglu(m, *(t[p + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down")))
                continue
            wts, ids = ref_router(m, t[p + "mlp.gate.weight"], t[p + "mlp.gate.expert_bias"], c)
            y = _swiglu(m, *(t[p + f"mlp.shared_experts.{x}_proj.weight"] for x in ("gate", "up", "down")))
            for row in range(n):
                for w_e, e in zip(wts[row], ids[row]):
                    ex = [t[p + f"mlp.experts.{e}.{x}_proj.weight"] for x in ("gate", "up", "down")]
                    y[row] += w_e * _swiglu(m[row:row + 1], *ex)[0]
            h = h + y
        out.append(_rms(h, t["model.norm.weight"], eps) @ t["lm_head.weight"].T)
    return np.stack(out)


@pytest.fixture(scope="module")
def bailing_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bailing")
    tensors = random_checkpoint(HF_CONFIG, np.random.default_rng(0))
    with open(path / "config.json", "w") as f:
        json.dump(HF_CONFIG, f)
    safetensors.numpy.save_file(tensors, str(path / hf.SINGLE_FILE), metadata={"format": "pt"})
    return path, tensors


def test_bailing_logits_match_numpy_reference(bailing_dir):
    path, tensors = bailing_dir
    tokens = np.random.default_rng(1).integers(0, HF_CONFIG["vocab_size"], (2, 11))
    ref = ref_forward(tensors, tokens, HF_CONFIG)
    model = hf.load_pretrained(path)
    assert model.config.partial_rotary_factor == 0.5 and model.config.num_moe_layers == 2
    err = float(np.max(np.abs(np.asarray(model(jnp.asarray(tokens))) - ref)) / np.max(np.abs(ref)))
    print(f"parity bailing_moe_v2: {err:.2e}")
    assert err <= 1e-5


def test_bailing_save_reproduces_checkpoint(bailing_dir, tmp_path):
    path, tensors = bailing_dir
    hf.save_pretrained(hf.load_pretrained(path), tmp_path)
    saved = safetensors.numpy.load_file(os.path.join(tmp_path, hf.SINGLE_FILE))
    assert sorted(saved) == sorted(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(saved[name], t, err_msg=name)
    with open(tmp_path / "config.json") as f:
        again = ModelConfig.from_hf_config(json.load(f))
    assert again == ModelConfig.from_hf_config(HF_CONFIG)


# ---- router vs transformers ----

def _route_config(**kw):
    base = dict(model_type="bailing_moe_v2", vocab_size=16, hidden_size=24, intermediate_size=8,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                moe_intermediate_size=8, first_k_dense_replace=1)
    return ModelConfig(**{**base, **kw})


def _same_routing(ours_w, ours_ids, ref_w, ref_ids):
    """Same selected set per token and the same weight for each selected expert."""
    o, r = np.argsort(ours_ids, -1), np.argsort(ref_ids, -1)
    np.testing.assert_array_equal(np.take_along_axis(ours_ids, o, -1), np.take_along_axis(ref_ids, r, -1))
    np.testing.assert_allclose(np.take_along_axis(ours_w, o, -1), np.take_along_axis(ref_w, r, -1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("n_group,topk_group,norm", [(4, 2, True), (1, 1, True), (8, 3, False)])
def test_sigmoid_router_matches_deepseek_v3(n_group, topk_group, norm):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    e, k, d, n = 16, 4, 24, 64
    rng = np.random.default_rng(n_group)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(e, d)) / np.sqrt(d)).astype(np.float32)
    bias = (0.2 * rng.normal(size=e)).astype(np.float32)
    gate = DeepseekV3TopkRouter(DeepseekV3Config(
        hidden_size=d, n_routed_experts=e, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm, routed_scaling_factor=2.5))
    with torch.no_grad():
        gate.weight.copy_(torch.tensor(w))
        gate.e_score_correction_bias.copy_(torch.tensor(bias))
        _, ref_w, ref_ids = gate(torch.tensor(x))
    cfg = _route_config(num_experts=e, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
                        score_function="sigmoid", norm_topk_prob=norm, routed_scaling_factor=2.5,
                        use_expert_bias=True)
    ours_w, ours_ids, load = route(cfg, jnp.asarray(x), jnp.asarray(w.T), jnp.asarray(bias))
    _same_routing(np.asarray(ours_w), np.asarray(ours_ids), ref_w.numpy(), ref_ids.numpy())
    np.testing.assert_allclose(np.asarray(load), np.bincount(ref_ids.numpy().ravel(), minlength=e) / (n * k))
    # the bias must matter for this input (selection changes), yet weights stay unbiased sigmoid
    _, ids_nobias, _ = route(cfg, jnp.asarray(x), jnp.asarray(w.T), None)
    assert (np.sort(np.asarray(ids_nobias), -1) != np.sort(np.asarray(ours_ids), -1)).any()
    scores = 1 / (1 + np.exp(-(x.astype(np.float64) @ w.T.astype(np.float64))))
    expect = np.take_along_axis(scores, np.asarray(ours_ids), -1)
    if norm:
        expect = expect / expect.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ours_w), 2.5 * expect, rtol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("norm", [True, False])
def test_softmax_router_matches_qwen3_moe(norm):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    e, k, d, n = 12, 3, 24, 64
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(e, d)) / np.sqrt(d)).astype(np.float32)
    gate = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=d, num_experts=e, num_experts_per_tok=k,
                                             norm_topk_prob=norm))
    with torch.no_grad():
        gate.weight.copy_(torch.tensor(w))
        _, ref_w, ref_ids = gate(torch.tensor(x))
    cfg = _route_config(model_type="qwen3_moe", num_experts=e, num_experts_per_tok=k,
                        score_function="softmax", norm_topk_prob=norm, first_k_dense_replace=0)
    ours_w, ours_ids, _ = route(cfg, jnp.asarray(x), jnp.asarray(w.T), None)
    _same_routing(np.asarray(ours_w), np.asarray(ours_ids), ref_w.numpy(), ref_ids.numpy())
