"""HF safetensors import/export: logits parity with transformers (Levanter-style) and bad input.

Parity: a tiny random PyTorch model (norm weights and biases perturbed away from their 1 / 0
init) is saved by transformers, loaded by `hf.load_pretrained`, and its logits are compared on
random tokens. Round trip: our `save_pretrained` output is loaded back by transformers.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from llada2_jax.interop import hf
from llada2_jax.model.config import ModelConfig
from llada2_jax.model.transformer import Transformer

REL_TOL = 1e-5
VOCAB = 96

# name -> (transformers class prefix, config kwargs, save_pretrained kwargs)
CASES = {
    "llama_gqa_odd_head_dim": ("Llama", dict(hidden_size=40, intermediate_size=56, num_attention_heads=4,
                                             num_key_value_heads=2, head_dim=12), {}),
    "llama_tied_1kv_sharded": ("Llama", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                             num_key_value_heads=1, tie_word_embeddings=True),
                               dict(max_shard_size="20KB")),
    "llama_rope_linear": ("Llama", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                        num_key_value_heads=2,
                                        rope_parameters=dict(rope_type="linear", factor=3.0, rope_theta=5000.0)), {}),
    "llama_rope_yarn": ("Llama", dict(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                                           original_max_position_embeddings=16)), {}),
    "qwen2_bias": ("Qwen2", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                 num_key_value_heads=2), {}),
    "qwen3_qknorm": ("Qwen3", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=6, tie_word_embeddings=True), {}),
    "qwen3_moe": ("Qwen3Moe", dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=20,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=10,
                                   num_experts=6, num_experts_per_tok=2, norm_topk_prob=True),
                  dict(max_shard_size="30KB")),
    "qwen3_moe_unnormed": ("Qwen3Moe", dict(hidden_size=24, intermediate_size=48, moe_intermediate_size=16,
                                            num_attention_heads=2, num_key_value_heads=2,
                                            num_experts=4, num_experts_per_tok=3, norm_topk_prob=False), {}),
}


def _rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _hf_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request, tmp_path_factory):
    """(case name, saved HF dir, tokens, transformers reference logits)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    prefix, kw, save_kw = CASES[request.param]
    torch.manual_seed(sum(map(ord, request.param)))
    config = getattr(transformers, f"{prefix}Config")(vocab_size=VOCAB, num_hidden_layers=2, **kw)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, **save_kw)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 13))
    return request.param, path, tokens, _hf_logits(model, tokens)


@pytest.mark.torch
def test_load_matches_transformers(hf_case):
    name, path, tokens, ref = hf_case
    if CASES[name][2]:
        assert os.path.exists(os.path.join(path, hf.INDEX_FILE)), "case meant to exercise sharding"
    model = hf.load_pretrained(path)
    err = _rel_err(model(jnp.asarray(tokens)), ref)
    print(f"parity {name}: {err:.2e}")
    assert err <= REL_TOL


@pytest.mark.torch
def test_round_trip_through_transformers(hf_case, tmp_path):
    transformers = pytest.importorskip("transformers")
    name, path, tokens, ref = hf_case
    model = hf.load_pretrained(path)
    hf.save_pretrained(model, tmp_path, max_shard_bytes=16_000)
    assert os.path.exists(os.path.join(tmp_path, hf.INDEX_FILE))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert _rel_err(_hf_logits(back, tokens), ref) <= REL_TOL


# ---- bad input (no torch needed): checkpoints written by our own save_pretrained ----

@pytest.fixture
def saved_llama(tmp_path):
    cfg = ModelConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=24,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    hf.save_pretrained(Transformer(cfg), tmp_path)
    return tmp_path


def _rewrite_tensors(path, edit):
    file = os.path.join(path, hf.SINGLE_FILE)
    tensors = safetensors.numpy.load_file(file)
    edit(tensors)
    safetensors.numpy.save_file(tensors, file)


def _edit_config(path, **kw):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg.update(kw)
    with open(file, "w") as f:
        json.dump(cfg, f)


def test_own_round_trip_is_exact(saved_llama, tmp_path):
    model = hf.load_pretrained(saved_llama)
    hf.save_pretrained(model, tmp_path / "again", max_shard_bytes=1500)
    again = hf.load_pretrained(tmp_path / "again")
    tokens = jnp.arange(10)[None] % 40
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(again(tokens)))


def test_bf16_load_and_save(saved_llama, tmp_path):
    fp32 = hf.load_pretrained(saved_llama)
    bf16 = hf.load_pretrained(saved_llama, dtype=jnp.bfloat16)
    assert bf16.config.param_dtype == "bfloat16" and bf16.dense_layers.wq[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16.dense_layers.wo[...]),
                                  np.asarray(fp32.dense_layers.wo[...].astype(jnp.bfloat16)))
    hf.save_pretrained(bf16, tmp_path)
    saved = safetensors.numpy.load_file(os.path.join(tmp_path, hf.SINGLE_FILE))
    assert str(saved["model.layers.0.self_attn.q_proj.weight"].dtype) == "bfloat16"
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


def test_missing_tensor_names_it(saved_llama):
    _rewrite_tensors(saved_llama, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(8, 16\).*missing"):
        hf.load_pretrained(saved_llama)


def test_wrong_shape_names_tensor_and_both_shapes(saved_llama):
    _edit_config(saved_llama, intermediate_size=20)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*expected shape "
                                         r"\(20, 16\), found \(24, 16\)"):
        hf.load_pretrained(saved_llama)


def test_unknown_model_type_lists_supported(saved_llama):
    _edit_config(saved_llama, model_type="gpt2")
    with pytest.raises(ValueError, match="gpt2.*llama.*qwen3_moe.*bailing_moe_v2"):
        hf.load_pretrained(saved_llama)


def test_corrupt_safetensors_names_file(saved_llama):
    file = os.path.join(saved_llama, hf.SINGLE_FILE)
    with open(file, "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*model\.safetensors"):
        hf.load_pretrained(saved_llama)


def test_directory_without_weights(saved_llama):
    os.remove(os.path.join(saved_llama, hf.SINGLE_FILE))
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        hf.load_pretrained(saved_llama)


def test_unsupported_o_proj_bias_is_rejected(saved_llama):
    _edit_config(saved_llama, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        hf.load_pretrained(saved_llama)


# ---- [MASK] conversion ----

@pytest.mark.parametrize("tied,pad", [(True, None), (False, 16)])
def test_add_mask_token_appends_mean_row_and_keeps_logits(tied, pad):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from llada2_jax.interop.convert import add_mask_token
    v = 40
    cfg = ModelConfig(model_type="llama", vocab_size=v, hidden_size=16, intermediate_size=24,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      tie_word_embeddings=tied)
    model = Transformer(cfg)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(v)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    new, mask_id = add_mask_token(model, tokenizer, pad_to_multiple=pad)
    new_v = 41 if pad is None else 48
    assert mask_id == v and new.config.mask_token_id == v and new.config.vocab_size == new_v
    assert tokenizer.token_to_id("[MASK]") == v and tokenizer.encode("w3 [MASK]").ids == [3, v]
    old_embed = np.asarray(model.embed[...])
    embed = np.asarray(new.embed[...])
    np.testing.assert_array_equal(embed[:v], old_embed)
    np.testing.assert_allclose(embed[v:], np.broadcast_to(old_embed.mean(0), (new_v - v, 16)), atol=1e-8)
    if not tied:
        old_head = np.asarray(model.lm_head[...])
        np.testing.assert_allclose(np.asarray(new.lm_head[...])[:, v:],
                                   np.broadcast_to(old_head.mean(1, keepdims=True), (16, new_v - v)), atol=1e-8)
    tokens = jnp.arange(12)[None] % v
    np.testing.assert_allclose(np.asarray(new(tokens))[..., :v], np.asarray(model(tokens)), rtol=1e-6, atol=1e-6)


def test_add_mask_token_rejects_mismatched_tokenizer():
    from tokenizers import Tokenizer, models
    from llada2_jax.interop.convert import add_mask_token
    cfg = ModelConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=24,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(39)}, unk_token="w0"))
    with pytest.raises(ValueError, match="vocabulary size 39 differs from the model's vocab_size 40"):
        add_mask_token(Transformer(cfg), tokenizer)
    new, _ = add_mask_token(Transformer(cfg))
    with pytest.raises(ValueError, match="already has mask_token_id=40"):
        add_mask_token(new)
