"""The lm_eval model `llada2_jax` on the bundled offline task: lm_eval's numbers equal our own evaluator's.

A tiny random model (weights scaled up so its choices differ) and a word-level tokenizer over the
task's words are saved as a run workdir. lm_eval (`simple_evaluate`, the local task found through a
TaskManager include path) scores it; the reference rebuilds every request from the jsonl by hand
and scores it with `likelihood.mc_elbo_loglik` (one request per call, its key from the seed and
its tokens), decodes with `inference.generate`, and aggregates the metrics itself. Those three
end-to-end comparisons share one lm_eval run and are marked slow; the rest checks the pieces.
"""
import json
import math
import os
import re
import string
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

lm_eval = pytest.importorskip("lm_eval")

from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers  # noqa: E402

from llada2_jax import workdir as wd  # noqa: E402
from llada2_jax.core.masks import MaskSpec  # noqa: E402
from llada2_jax.data.tokenizers import HFTokenizer  # noqa: E402
from llada2_jax.evaluation import likelihood, lm_harness, request_scoring  # noqa: E402
from llada2_jax.inference import generate  # noqa: E402
from llada2_jax.model import ModelConfig, Transformer  # noqa: E402
from llada2_jax.training.checkpoint import Checkpointer  # noqa: E402

ITEMS = os.path.join(lm_harness.TASKS_DIR, "llada2_tiny", "items.jsonl")
BLOCK, SAMPLES, SEED, MAX_POS = 8, 3, 5, 64
LIMIT = 8  # docs per task that lm_eval runs (the first ones): one batch of generate_until
ARGS = dict(block_size=BLOCK, mc_samples=SAMPLES, seed=SEED, batch_size=LIMIT, threshold=0.6)


def items():
    with open(ITEMS) as f:
        return [json.loads(line) for line in f][:LIMIT]


def all_items():
    with open(ITEMS) as f:
        return [json.loads(line) for line in f]


def question(item):
    return f"Question: {item['question']}\nAnswer:"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run: model_config.json, final.json, one checkpoint and the word-level tokenizer."""
    directory = tmp_path_factory.mktemp("lm_harness_run")
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for it in all_items() for text in [question(it), *it["choices"]]
                    for w, _ in splitter.pre_tokenize_str(text)})
    vocab = ["<pad>", "<eos>", "[UNK]", *words, "[MASK]"]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    raw.pre_tokenizer = splitter
    HFTokenizer(raw, eos_token="<eos>", pad_token="<pad>", mask_token="[MASK]").save(str(directory / "tokenizer"))
    config = ModelConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                         mask_token_id=len(vocab) - 1)
    model = Transformer(config, rngs=nnx.Rngs(11))
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        var = getattr(model.dense_layers, name)
        var.set_value(var[...] * 4)
    wd.save_model_config(str(directory), config)
    ckpt = Checkpointer(str(directory / "ckpt"), keep=1, async_save=False)
    _, params, buffers = wd.split_model(model)
    ckpt.save_model(1, params, buffers, {"stage": "sft"})
    ckpt.wait()
    ckpt.close()
    wd.write_final(str(directory), ["sft"], str(directory / "ckpt"), 1)
    return str(directory)


@pytest.fixture(scope="module")
def lm(run_dir):
    return lm_harness.LLaDA2LM(workdir=run_dir, **ARGS)


@pytest.fixture(scope="module")
def results(lm):
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=lm_harness.TASKS_DIR, include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=["llada2_tiny"], task_manager=manager, log_samples=True,
                                   limit=LIMIT, random_seed=0, numpy_random_seed=0, fewshot_random_seed=0)


def reference_elbo(model, context, continuation):
    """mc_elbo_loglik of one request on its own row, padded by hand to whole blocks."""
    ids = context + continuation
    length = -(-len(ids) // BLOCK) * BLOCK
    tokens, seg = np.zeros((1, length), np.int32), np.zeros((1, length), np.int32)
    eligible = np.zeros((1, length), bool)
    tokens[0, :len(ids)], seg[0, :len(ids)] = ids, 1
    eligible[0, len(context):len(ids)] = True
    mean, _ = likelihood.mc_elbo_loglik(model, tokens, seg, eligible, block_size=BLOCK, n_samples=SAMPLES,
                                        rng=request_scoring.request_key(SEED, context, continuation),
                                        mask_id=model.config.mask_token_id)
    return float(mean[0])


def by_doc(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


@pytest.mark.slow  # lm_eval end to end on the three bundled tasks (one shared run)
def test_multiple_choice_equals_our_elbo(lm, results):
    tok, model = lm.tokenizer, lm.model
    samples = by_doc(results, "llada2_tiny_mc")
    assert len(samples) == len(items())
    correct = []
    for item, sample in zip(items(), samples):
        context = tok.encode(question(item))
        ours = [reference_elbo(model, context, tok.encode(choice)) for choice in item["choices"]]
        theirs = [resp[0][0] for resp in sample["resps"]]
        np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
        correct.append(int(np.argmax(ours)) == item["answer"])
    assert 0 < sum(correct) < len(correct)  # the random model is right on some items: a non-trivial accuracy
    assert results["results"]["llada2_tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))


@pytest.mark.slow  # lm_eval end to end on the three bundled tasks (one shared run)
def test_perplexity_equals_our_elbo(lm, results):
    tok, model = lm.tokenizer, lm.model
    total, words = 0.0, 0
    for item, sample in zip(items(), by_doc(results, "llada2_tiny_ppl")):
        text = f"{item['question']} {item['choices'][item['answer']]}"
        ours = reference_elbo(model, [], tok.encode(text))
        theirs = sample["resps"][0][0]
        assert theirs == pytest.approx(ours, rel=1e-4, abs=1e-4)
        total, words = total + ours, words + len(re.split(r"\s+", text))
    assert results["results"]["llada2_tiny_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words),
                                                                                          rel=1e-4)


@pytest.mark.slow  # lm_eval end to end on the three bundled tasks (one shared run)
def test_generation_equals_our_decoder(lm, results):
    tok, model = lm.tokenizer, lm.model
    hits = []
    outputs = generate(model, [tok.encode(question(item)) for item in items()], gen_length=8, block_size=BLOCK,
                       threshold=0.6, eos_id=tok.eos_id).tokens  # greedy: a batch decodes as each row alone
    for item, sample, out in zip(items(), by_doc(results, "llada2_tiny_gen"), outputs):
        text = tok.decode(out[:-1] if out and out[-1] == tok.eos_id else out)
        cuts = [i for i in (text.find("\n"), text.find(".")) if i >= 0]
        text = text[:min(cuts)] if cuts else text
        assert sample["resps"][0][0] == text
        clean = text.strip().lower().translate(str.maketrans("", "", string.punctuation))
        hits.append(clean == item["choices"][item["answer"]].lower())
    assert results["results"]["llada2_tiny_gen"]["exact_match,strip"] == pytest.approx(np.mean(hits))


def test_scores_do_not_depend_on_batching(lm):
    """The same requests in another order, in batches of other requests, give the same numbers."""
    tok = lm.tokenizer
    pairs = [(tok.encode(question(it)), tok.encode(c)) for it in items() for c in it["choices"]]
    kw = dict(block_size=BLOCK, n_samples=SAMPLES, seed=SEED, mask_id=lm.mask_id, batch_size=LIMIT)
    a = request_scoring.score_requests(lm.model, pairs, **kw)
    b = request_scoring.score_requests(lm.model, pairs[:0:-1], **kw)[::-1]  # reversed, the first one left out
    np.testing.assert_allclose([x for x, _ in a[1:]], [x for x, _ in b], rtol=1e-5, atol=1e-5)
    assert [g for _, g in a[1:]] == [g for _, g in b]


def test_is_greedy_matches_argmax(lm):
    """is_greedy: the argmax with the continuation masked reproduces it (checked on the model's own argmax)."""
    tok, model = lm.tokenizer, lm.model
    context = tok.encode(question(items()[0]))
    cont = tok.encode("blue sky")
    row = np.zeros((1, 16), np.int32)
    row[0, :len(context)] = context
    row[0, len(context):len(context) + len(cont)] = model.config.mask_token_id
    assert len(context) + len(cont) <= 16 and len(context) >= 8  # continuation inside block 1
    segments = jnp.asarray((np.arange(16) < len(context) + len(cont))[None].astype(np.int32))
    logits = model(jnp.asarray(row), None, MaskSpec.bidirectional(segments))  # one block of 16: the MDLM layout
    logits = logits.at[..., model.config.mask_token_id].set(-jnp.inf)
    best = [int(i) for i in np.asarray(jnp.argmax(logits[0], -1))[len(context):len(context) + len(cont)]]
    kw = dict(block_size=16, n_samples=1, seed=0, mask_id=lm.mask_id)
    scores = request_scoring.score_requests(model, [(context, best), (context, cont)], **kw)
    (_, greedy_best), (_, greedy_given) = scores
    assert greedy_best and greedy_given == (best == cont)


def test_rolling_windows_cover_long_texts(run_dir):
    """A text longer than max_length: the windows' ELBOs (each with its context) add up."""
    lm = lm_harness.LLaDA2LM(workdir=run_dir, **{**ARGS, "max_length": 16})
    text = " ".join(it["question"] for it in all_items()[:6])
    ids = lm.tokenizer.encode(text)
    assert len(ids) > 32
    windows = request_scoring.rolling_windows(len(ids), 16, 8)
    assert windows[0] == (0, 0, 16) and windows[1] == (8, 16, 24)
    assert [e for _, _, e in windows][-1] == len(ids)
    ours = sum(reference_elbo(lm.model, ids[c:s], ids[s:e]) for c, s, e in windows)

    class Request:
        args = (text,)
    assert lm.loglikelihood_rolling([Request()], disable_tqdm=True)[0] == pytest.approx(ours, rel=1e-4)


def test_stop_strings_and_bad_arguments(run_dir, lm):
    assert lm_harness.cut_at_stops("blue sky.\nmore", ["\n", "."]) == "blue sky"
    assert lm_harness.cut_at_stops("blue", []) == "blue"
    with pytest.raises(ValueError, match="exactly one of workdir=, hf=, spec="):
        lm_harness.LLaDA2LM()
    with pytest.raises(ValueError, match="block_size=0"):
        lm_harness.LLaDA2LM(workdir=run_dir, block_size=0)
    with pytest.raises(ValueError, match=r"threshold=2\.0"):
        lm_harness.LLaDA2LM(workdir=run_dir, threshold=2.0)
    with pytest.raises(ValueError, match="batch_size='auto'"):
        lm_harness.LLaDA2LM(workdir=run_dir, batch_size="auto")
    ar = Transformer(lm.model.config.replace(mask_token_id=None), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not a diffusion model"):
        lm_harness.LLaDA2LM(model=ar, tokenizer=type("NoMask", (), {"mask_id": None})())
    with pytest.raises(ValueError, match=r"\['repetition_penalty'\] are not supported"):
        lm.generation_settings({"until": ["\n"], "repetition_penalty": 1.1})
    assert lm.generation_settings({"until": "\n", "max_gen_toks": 4})["until"] == ["\n"]


def test_package_imports_without_lm_eval():
    code = ("import sys, llada2_jax, llada2_jax.evaluation, llada2_jax.evaluation.request_scoring; "
            "print('lm_eval' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
    assert out.strip() == "False"


@pytest.mark.slow
def test_command_line_runs_the_bundled_task(run_dir, tmp_path):
    """`python -m llada2_jax.evaluation.lm_harness`: the registered name and the bundled tasks, offline."""
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "llada2_jax.evaluation.lm_harness", "--model", "llada2_jax",
                    "--model_args", f"workdir={run_dir},block_size={BLOCK},mc_samples=1",
                    "--batch_size", "4", "--tasks", "llada2_tiny_mc", "--limit", "3", "--output_path", str(out)],
                   check=True, capture_output=True, text=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    files = list(out.rglob("results_*.json"))
    assert files, list(out.rglob("*"))
    result = json.loads(files[0].read_text())["results"]["llada2_tiny_mc"]
    assert 0.0 <= result["acc,none"] <= 1.0
    jax.clear_caches()
