"""Same prompts, AR decoding vs block-diffusion decoding: accuracy, tokens per forward, tokens/s.

    python bench/compare_ar_dllm.py --smollm2 --dllm workdir:/tmp/smollm2_sft --task gsm8k --limit 8
    python bench/compare_ar_dllm.py --ar workdir:/tmp/tiny_wsd@ar_pretrain \
        --dllm workdir:/tmp/tiny_wsd --task gsm8k --limit 4 --gen-length 64

Model specs: smollm2, gguf:<path>, hf:<dir>, workdir:<dir>, workdir:<dir>@<stage> (see
llada2_jax/evaluation/models.py). The AR side decodes with `inference.ar.generate_ar` (greedy,
KV cache), the dLLM side with `inference.generate` (block-wise threshold decoding). Both use one
tokenizer: the dLLM's saved one, else the AR side's, else --tokenizer DIR.

tokens/s is measured after one warm-up call on the first batch, so the first compilation is not
counted; a later batch whose prompt lengths fall in a new shape bucket compiles again (inside
its timing).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys

from llada2_jax.data.tokenizers import load_tokenizer
from llada2_jax.evaluation import tasks
from llada2_jax.evaluation.models import SPEC_HELP, load_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ar = p.add_mutually_exclusive_group(required=True)
    ar.add_argument("--ar", help=f"AR model spec: {SPEC_HELP}")
    ar.add_argument("--smollm2", action="store_true", help="AR side = SmolLM2-135M-Instruct GGUF")
    p.add_argument("--dllm", required=True, help=f"block-diffusion model spec: {SPEC_HELP}")
    p.add_argument("--tokenizer", help="tokenizer dir (Tokenizer.save), if neither model has one")
    p.add_argument("--task", choices=("gsm8k", "humaneval"), default="gsm8k")
    p.add_argument("--limit", type=int, default=16, help="number of items / problems")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--raw-prompts", action="store_true",
                   help="humaneval: continue the bare function stub instead of a chat prompt")
    p.add_argument("--output", help="write the summary and per-item records here as JSON")
    args = p.parse_args(argv)
    if args.limit < 1:
        p.error(f"--limit={args.limit} must be >= 1")
    return args


def pick_tokenizer(args, *candidates):
    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    for tok in candidates:
        if tok is not None:
            return tok
    raise ValueError("no tokenizer: neither model spec has a saved one; pass --tokenizer DIR")


def evaluate(args, generate_fn, tokenizer) -> dict:
    if args.task == "gsm8k":
        items = tasks.gsm8k_items(n=args.limit)
        warm = [tasks.gsm8k_prompt(tokenizer, it.question) for it in items[:args.batch_size]]
        generate_fn(warm)
        out = tasks.evaluate_gsm8k(generate_fn, tokenizer, items, batch_size=args.batch_size)
        out["score"] = out.pop("accuracy")
    else:
        chat = not args.raw_prompts
        problems = tasks.humaneval_problems(args.limit)
        generate_fn([tasks.humaneval_prompt(tokenizer, p, chat) for p in problems[:args.batch_size]])
        out = tasks.evaluate_humaneval(generate_fn, tokenizer, args.limit, chat, batch_size=args.batch_size)
        out["score"] = out.pop("pass_at_1")
    return out


def main(argv=None) -> int:
    from llada2_jax.inference import generate, generate_ar

    args = parse_args(argv)
    ar_spec = "smollm2" if args.smollm2 else args.ar
    ar_model, ar_tok = load_model(ar_spec)
    dllm_model, dllm_tok = load_model(args.dllm)
    tok = pick_tokenizer(args, dllm_tok, ar_tok)
    mask_id = dllm_model.config.mask_token_id
    if mask_id is None:
        raise ValueError(f"--dllm {args.dllm}: the model config has no mask_token_id (not a converted model?)")

    runs = {
        f"AR   {ar_spec}": functools.partial(generate_ar, ar_model, max_new_tokens=args.gen_length,
                                          eos_id=tok.eos_id),
        f"dLLM {args.dllm}": functools.partial(generate, dllm_model, gen_length=args.gen_length,
                                              block_size=args.block_size, threshold=args.threshold,
                                              mask_id=mask_id, eos_id=tok.eos_id),
    }
    metric = "accuracy" if args.task == "gsm8k" else "pass@1"
    results = {}
    for name, fn in runs.items():
        print(f"[compare] {name}: {args.task}, {args.limit} items ...", file=sys.stderr, flush=True)
        results[name] = evaluate(args, fn, tok)

    width = max(len(n) for n in results)
    print(f"\n{args.task} (n={args.limit}, gen_length={args.gen_length}, block_size={args.block_size}, "
          f"threshold={args.threshold})")
    print(f"{'model':<{width}}  {metric:>8}  {'TPF':>6}  {'tokens/s':>9}")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['score']:>8.3f}  {r['mean_tpf']:>6.2f}  {r['tokens_per_sec']:>9.1f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
