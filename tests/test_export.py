"""`python -m llada2_jax.export`: a run's weights, decoding defaults and tokenizer as an HF directory.

A tiny random model (norm weights perturbed away from 1) is saved in a real workdir layout
(model_config.json, Orbax checkpoint, final.json, tokenizer/, metrics.jsonl) and exported. The
reference is transformers itself: `AutoModelForCausalLM` loads the export and runs the
`[x_t ; x_0]` sequence under the dense 4D block-diffusion mask (`diffusion.masks`), which must give
our logits (computed with the training path's `MaskSpec`) within 1e-5 in fp32.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers

from llada2_jax import export as export_cli
from llada2_jax import workdir as wd
from llada2_jax.data.tokenizers import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from llada2_jax.diffusion import masks
from llada2_jax.interop import hf
from llada2_jax.model.config import ModelConfig
from llada2_jax.model.transformer import Transformer
from llada2_jax.training.checkpoint import Checkpointer

REL_TOL = 1e-5
BLOCK = 4
WORDS = ["<pad>", "<eos>", "[UNK]", "<|im_start|>"] + [f"w{i}" for i in range(4, 47)] + ["[MASK]"]
MASK_ID = len(WORDS) - 1
EVAL_RECORD = {"step": 0, "stage": "eval", "phase": "eval_4", "block_size": BLOCK, "eval_nelbo": 3.0,
               "tokens_per_forward": 1.5, "threshold": 0.8}
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
FAMILIES = {  # HF config.json of each family transformers implements natively
    "llama": dict(model_type="llama", **SMALL),
    "qwen2": dict(model_type="qwen2", **SMALL),
    "qwen3": dict(model_type="qwen3", head_dim=6, tie_word_embeddings=True, **SMALL),
    "qwen3_moe": dict(model_type="qwen3_moe", moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True, **SMALL),
}


def _word_tokenizer() -> HFTokenizer:
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return HFTokenizer(raw, eos_token="<eos>", pad_token="<pad>", mask_token="[MASK]")


def _random_model(family: str) -> Transformer:
    config = ModelConfig.from_hf_config(dict(vocab_size=len(WORDS), eos_token_id=1, pad_token_id=0,
                                             mask_token_id=MASK_ID, **FAMILIES[family]))
    model = Transformer(config, rngs=nnx.Rngs(sum(map(ord, family))))
    graphdef, params, buffers = wd.split_model(model)
    keys = iter(jax.random.split(jax.random.key(1), 64))

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype)
        if "bias" in name or name.endswith("['bq']") or name.endswith("['bk']") or name.endswith("['bv']"):
            return 0.2 * jax.random.normal(next(keys), x.shape, x.dtype)
        return x
    return wd.merge_model(graphdef, jax.tree_util.tree_map_with_path(perturb, params), buffers)


def write_run(workdir, model, tokenizer, records=(EVAL_RECORD,)):
    """A finished run as training leaves it: model config, checkpoint, final.json, tokenizer, metrics."""
    tokenizer.save(str(workdir / wd.TOKENIZER_DIR))
    wd.save_model_config(str(workdir), model.config)
    ckpt = Checkpointer(str(workdir / "merged"), keep=1, async_save=False)
    _, params, buffers = wd.split_model(model)
    ckpt.save_model(6, params, buffers, {"stage": "merge"})
    ckpt.wait()
    ckpt.close()
    wd.write_final(str(workdir), ["wsd", "merge", "eval"], str(workdir / "merged"), 6)
    with open(workdir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _diffusion_inputs(seed: int = 0):
    """[x_t ; x_0] tokens, positions, segment ids (two packed documents in row 0) and the noisy half's mask."""
    rng = np.random.default_rng(seed)
    length = 12
    x0 = rng.integers(4, MASK_ID, (2, length))
    segments = np.array([[1] * 7 + [2] * 5, [1] * length])
    positions = np.array([list(range(7)) + list(range(5)), list(range(length))])
    xt = np.where(rng.random((2, length)) < 0.5, MASK_ID, x0)
    return (np.concatenate([xt, x0], 1), np.concatenate([positions, positions], 1), segments)


def _ours(model, tokens, positions, segments):
    spec = masks.MaskSpec.block_diffusion(jnp.asarray(segments), BLOCK)
    return np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), spec))


def _rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# Llama (SmolLM2's family) runs in the fast suite; the other families once in the slow one
FAMILY_PARAMS = [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow) for f in sorted(FAMILIES)]


@pytest.fixture(scope="module", params=FAMILY_PARAMS)
def exported(request, tmp_path_factory):
    """(family, workdir, export dir, our model) with the weights split over several shards."""
    root = tmp_path_factory.mktemp(request.param)
    workdir, out = root / "run", root / "hf"
    model = _random_model(request.param)
    write_run(workdir, model, _word_tokenizer())
    export_cli.export(str(workdir), str(out), max_shard_bytes=20_000)
    return request.param, workdir, out, wd.load_model(str(workdir))


@pytest.mark.torch
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_transformers_logits_under_block_diffusion_mask(exported, attention):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    family, _, out, model = exported
    assert os.path.exists(out / hf.INDEX_FILE), "the export is meant to be sharded"
    assert json.loads((out / "config.json").read_text())["mask_token_id"] == MASK_ID
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation=attention,
                                                                  dtype=torch.float32).eval()
    tokens, positions, segments = _diffusion_inputs()
    allowed = torch.from_numpy(np.array(masks.bdlm_mask(jnp.asarray(segments), BLOCK)))[:, None]
    # eager adds a float mask to the scores; sdpa takes the boolean one (True = may attend)
    mask_4d = allowed if attention == "sdpa" else torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(tokens), attention_mask=mask_4d,
                        position_ids=torch.from_numpy(positions)).logits.numpy()
        causal = ref_model(torch.from_numpy(tokens), position_ids=torch.from_numpy(positions)).logits.numpy()
    ours = _ours(model, tokens, positions, segments)
    err = _rel_err(ours, ref)
    print(f"{family}/{attention}: max |ours - transformers| / max |transformers| = {err:.2e}")
    assert err <= REL_TOL
    assert _rel_err(ours, causal) > 100 * REL_TOL, "the block-diffusion mask must change the logits"


def test_export_loads_back_with_the_same_logits(exported):
    _, workdir, out, model = exported
    back = hf.load_pretrained(out)
    tokens, positions, segments = _diffusion_inputs(1)
    np.testing.assert_array_equal(_ours(back, tokens, positions, segments), _ours(model, tokens, positions, segments))
    text = "w5 w9 [MASK] w40"
    assert load_tokenizer(str(out)).encode(text) == load_tokenizer(str(workdir / "tokenizer")).encode(text)


def test_generation_config_carries_the_run_decoding_setting(exported):
    _, _, out, _ = exported
    generation = json.loads((out / hf.GENERATION_CONFIG_FILE).read_text())
    assert (generation["block_size"], generation["threshold"]) == (BLOCK, 0.8)
    assert (generation["mask_token_id"], generation["eos_token_id"], generation["decoding"]) == \
        (MASK_ID, 1, hf.DECODING)


@pytest.mark.torch
def test_transformers_reads_generation_config_and_tokenizer(exported):
    transformers = pytest.importorskip("transformers")
    family, workdir, out, _ = exported
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.block_size, generation.threshold, generation.mask_token_id) == (BLOCK, 0.8, MASK_ID)
    if family == "qwen2":  # transformers 5 forces its byte-level BPE class on qwen2, rebuilt from tokenizer.json
        return                # vocab/merges: right for Qwen's own tokenizer, not for this word-level one
    ours = load_tokenizer(str(workdir / "tokenizer"))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.mask_token_id == MASK_ID and theirs.eos_token_id == ours.eos_id
    text = "w4 w17 w46 w5"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)


def test_decoding_defaults_fall_back_to_training_then_library(tmp_path):
    model = _random_model("llama")
    trained = {"step": 9, "stage": "merge", "phase": "decay_8", "block_size": 8, "eval_nelbo": 3.0}
    write_run(tmp_path, model, _word_tokenizer(), records=[trained])
    library = export_cli.library_defaults()
    got = export_cli.decoding_defaults(str(tmp_path))
    assert (got["block_size"], got["threshold"]) == (8, library["threshold"])
    (tmp_path / "metrics.jsonl").unlink()
    got = export_cli.decoding_defaults(str(tmp_path))
    assert (got["block_size"], got["threshold"]) == (library["block_size"], library["threshold"])


def test_flags_override_the_run_setting(tmp_path, capsys):
    write_run(tmp_path / "run", _random_model("llama"), _word_tokenizer())
    out = tmp_path / "hf"
    assert export_cli.main([f"--workdir={tmp_path / 'run'}", f"--out={out}", "--block_size=8",
                            "--threshold=0.6", "--dtype=bfloat16"]) == 0
    assert "block_size=8 (--block_size), threshold=0.6 (--threshold)" in capsys.readouterr().out
    generation = json.loads((out / hf.GENERATION_CONFIG_FILE).read_text())
    assert (generation["block_size"], generation["threshold"]) == (8, 0.6)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert hf.load_pretrained(out, dtype=jnp.bfloat16).embed[...].dtype == jnp.bfloat16


@pytest.mark.parametrize("argv,message", [
    (["--out=/tmp/x"], "--workdir is required"),
    (["--workdir=/nonexistent/run", "--out=/tmp/x"], "--workdir='/nonexistent/run' does not exist"),
    (["--workdir={run}", "--out={run}"], "is not empty (pass --overwrite"),
    (["--workdir={run}", "--out={out}", "--threshold=1.5"], "--threshold=1.5 must be in [0, 1]"),
    (["--workdir={run}", "--out={out}", "--stage=sft"], "stage 'sft' has no checkpoints"),
    (["--workdir={tmp}", "--out={out}"], "model_config.json not found"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    write_run(run, _random_model("llama"), _word_tokenizer())
    argv = [a.format(run=run, out=tmp_path / "hf", tmp=tmp_path) for a in argv]
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export: ") and message in err and "\n" not in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.torch
def test_sentencepiece_tokenizer_and_chat_template_match_transformers(tmp_path):
    """A from-scratch run's sentencepiece tokenizer: same ids in transformers, text and chat template."""
    transformers = pytest.importorskip("transformers")
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 20,
             "for i in range(10):\n\tprint(i * 2)\n", "héllo wörld, 12345 and 678"] * 10
    tokenizer = SentencePieceTokenizer.train(texts, vocab_size=400)
    config = _random_model("llama").config
    model = Transformer(config.replace(vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_id,
                                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id))
    write_run(tmp_path / "run", model, tokenizer)
    export_cli.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in texts[:4] + ["  leading spaces\n\n", "x"]:
        assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(text), repr(text)
    assert (theirs.mask_token_id, theirs.eos_token_id, theirs.pad_token_id) == \
        (tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def f(x):\n  return x"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    ids = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == tokenizer.apply_chat_template(chat, add_generation_prompt=True)


@pytest.mark.torch
def test_chatml_template_with_default_system_matches(tmp_path):
    """SmolLM2's layout (ChatML, a default system turn) renders the same ids through transformers."""
    transformers = pytest.importorskip("transformers")
    import dataclasses
    from llada2_jax.data.tokenizers import CHATML_TEMPLATE
    vocab = WORDS + ["<|im_end|>", "user", "assistant", "system", "hi", "there", "\n"]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.Split(" ", behavior="removed")])
    template = dataclasses.replace(CHATML_TEMPLATE, default_system="hi there")
    tokenizer = HFTokenizer(raw, eos_token="<|im_end|>", mask_token="[MASK]", chat_template=template)
    config = _random_model("llama").config
    write_run(tmp_path / "run", Transformer(config.replace(vocab_size=tokenizer.vocab_size)), tokenizer)
    export_cli.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for chat in ([{"role": "user", "content": "w5 w6"}],
                 [{"role": "system", "content": "w7"}, {"role": "user", "content": "w8"}]):
        ids = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == tokenizer.apply_chat_template(chat, add_generation_prompt=True)
