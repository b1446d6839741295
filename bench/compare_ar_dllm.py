"""Same prompts, AR decoding vs block-diffusion decoding: accuracy, tokens per forward, tokens/s.

    python bench/compare_ar_dllm.py --smollm2 --dllm=workdir:/tmp/smollm2_sft --task=gsm8k --limit=8
    python bench/compare_ar_dllm.py --ar=workdir:/tmp/tiny_wsd@ar_pretrain \
        --dllm=workdir:/tmp/tiny_wsd --task=gsm8k --limit=4 --gen_length=64

Model specs: smollm2, gguf:<path>, hf:<dir>, workdir:<dir>, workdir:<dir>@<stage> (see
llada2_jax/interop/sources.py). The AR side decodes with `inference.ar.generate_ar` (greedy,
KV cache), the dLLM side with `inference.generate` (block-wise threshold decoding). Both use one
tokenizer: the dLLM's saved one, else the AR side's, else --tokenizer=DIR. The table goes to
bench/results/compare_ar_dllm.md (--nowrite: print only), the per-item records to --output.

tokens/s is measured after one warm-up call on the first batch, so the first compilation is not
counted; a later batch whose prompt lengths fall in a new shape bucket compiles again (inside
its timing).
"""
from __future__ import annotations

import functools
import json
import sys

from absl import app, flags

import _cli
import _results
from llada2_jax.data.tokenizers import load_tokenizer
from llada2_jax.evaluation import tasks
from llada2_jax.interop.sources import SPEC_HELP, load_model

AR = flags.DEFINE_string("ar", None, f"AR model spec: {SPEC_HELP}")
SMOLLM2 = flags.DEFINE_boolean("smollm2", False, "AR side = SmolLM2-135M-Instruct GGUF (instead of --ar)")
DLLM = flags.DEFINE_string("dllm", None, f"block-diffusion model spec: {SPEC_HELP}")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer dir (Tokenizer.save), if neither model has one")
TASK = flags.DEFINE_enum("task", "gsm8k", ["gsm8k", "humaneval"], "evaluation task")
LIMIT = flags.DEFINE_integer("limit", 16, "number of items / problems", lower_bound=1)
GEN_LENGTH = flags.DEFINE_integer("gen_length", 256, "tokens to generate per item", lower_bound=1)
BLOCK_SIZE = flags.DEFINE_integer("block_size", 32, "dLLM decoding block size", lower_bound=1)
THRESHOLD = flags.DEFINE_float("threshold", 0.95, "dLLM confidence threshold", lower_bound=0.0, upper_bound=1.0)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "prompts per decoding call", lower_bound=1)
RAW_PROMPTS = flags.DEFINE_boolean("raw_prompts", False,
                                   "humaneval: continue the bare function stub instead of a chat prompt")
OUTPUT = flags.DEFINE_string("output", None, "write the summary and per-item records here as JSON")
WRITE = flags.DEFINE_boolean("write", True, "write the table to bench/results/compare_ar_dllm.md")


def pick_tokenizer(*candidates):
    if TOKENIZER.value:
        return load_tokenizer(TOKENIZER.value)
    for tok in candidates:
        if tok is not None:
            return tok
    raise app.UsageError("no tokenizer: neither model spec has a saved one; pass --tokenizer=DIR")


def evaluate(generate_fn, tokenizer) -> dict:
    limit, batch_size = LIMIT.value, BATCH_SIZE.value
    if TASK.value == "gsm8k":
        items = tasks.gsm8k_items(n=limit)
        warm = [tasks.gsm8k_prompt(tokenizer, it.question) for it in items[:batch_size]]
        generate_fn(warm)
        out = tasks.evaluate_gsm8k(generate_fn, tokenizer, items, batch_size=batch_size)
        out["score"] = out.pop("accuracy")
    else:
        chat = not RAW_PROMPTS.value
        problems = tasks.humaneval_problems(limit)
        generate_fn([tasks.humaneval_prompt(tokenizer, p, chat) for p in problems[:batch_size]])
        out = tasks.evaluate_humaneval(generate_fn, tokenizer, limit, chat, batch_size=batch_size)
        out["score"] = out.pop("pass_at_1")
    return out


def _load(flag: str, spec: str):
    try:
        return load_model(spec)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"--{flag}={spec}: {e}") from None


def main() -> int:
    from llada2_jax.inference import generate, generate_ar

    if bool(AR.value) == SMOLLM2.value:
        raise app.UsageError("pass exactly one of --ar=SPEC and --smollm2")
    if not DLLM.value:
        raise app.UsageError(f"--dllm is required: {SPEC_HELP}")
    ar_spec = "smollm2" if SMOLLM2.value else AR.value
    ar_model, ar_tok = _load("ar", ar_spec)
    dllm_model, dllm_tok = _load("dllm", DLLM.value)
    tok = pick_tokenizer(dllm_tok, ar_tok)
    mask_id = dllm_model.config.mask_token_id
    if mask_id is None:
        raise app.UsageError(f"--dllm={DLLM.value}: the model config has no mask_token_id (not a converted model?)")

    gen_length = GEN_LENGTH.value
    runs = {
        f"AR {ar_spec}": functools.partial(generate_ar, ar_model, max_new_tokens=gen_length, eos_id=tok.eos_id),
        f"dLLM {DLLM.value}": functools.partial(generate, dllm_model, gen_length=gen_length,
                                                block_size=BLOCK_SIZE.value, threshold=THRESHOLD.value,
                                                mask_id=mask_id, eos_id=tok.eos_id),
    }
    results = {}
    for name, fn in runs.items():
        print(f"[compare] {name}: {TASK.value}, {LIMIT.value} items ...", file=sys.stderr, flush=True)
        results[name] = evaluate(fn, tok)

    metric = "accuracy" if TASK.value == "gsm8k" else "pass@1"
    caption = (f"{TASK.value} (n={LIMIT.value}, gen_length={gen_length}, block_size={BLOCK_SIZE.value}, "
               f"threshold={THRESHOLD.value})")
    rows = [[f"`{name}`", f"{r['score']:.3f}", f"{r['mean_tpf']:.2f}", f"{r['tokens_per_sec']:.1f}"]
            for name, r in results.items()]
    table = _results.markdown_table(["model", metric, "TPF", "tokens/s"], rows)
    _results.publish("compare_ar_dllm", f"{caption}\n\n{table}", WRITE.value)
    if OUTPUT.value:
        flag_values = {f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(sys.argv[0])}
        with open(OUTPUT.value, "w") as f:
            json.dump({"flags": flag_values, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    _cli.run(main)
