"""Generate text from a trained run: block-diffusion decoding (default) or the AR baseline.

    python -m llada2_jax.generate --workdir /tmp/tiny_wsd --prompt "def add(a, b):"
    python -m llada2_jax.generate --workdir /tmp/tiny_wsd --stage ar_pretrain --ar --prompt "..."

Loads the run's final weights (its final.json) or, with --stage, the latest checkpoint of that
stage, and the tokenizer saved in WORKDIR/tokenizer. The prompt is wrapped in the tokenizer's
chat template (one user turn + the assistant header) when it has one, unless --raw. Prints the
completion, then forwards, tokens per forward and tokens/s (a first call includes compilation:
use --warmup to time a second call).
"""
from __future__ import annotations

import argparse
import sys

import jax


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a training run directory")
    p.add_argument("--stage", help="use the latest checkpoint of this stage instead of the final weights")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--gen_length", type=int, default=128)
    p.add_argument("--block_size", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: block_size)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_cache", action="store_true", help="block decoding without the KV cache")
    p.add_argument("--ar", action="store_true", help="AR (next-token) decoding instead of block diffusion")
    p.add_argument("--warmup", action="store_true", help="run once before the timed call (excludes compilation)")
    return p.parse_args(argv)


def prompt_ids(tokenizer, text: str, raw: bool) -> list[int]:
    if raw or not tokenizer.has_chat_template:
        return tokenizer.encode(text)
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def main(argv=None) -> int:
    from llada2_jax.evaluation.models import load_model
    from llada2_jax.inference import generate, generate_ar

    args = parse_args(argv)
    model, tokenizer = load_model(f"workdir:{args.workdir}" + (f"@{args.stage}" if args.stage else ""))
    if tokenizer is None:
        raise ValueError(f"--workdir {args.workdir}: no tokenizer saved in {args.workdir}/tokenizer")
    ids = prompt_ids(tokenizer, args.prompt, args.raw)
    rng = jax.random.PRNGKey(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.eos_id,
                    rng=rng)
    if args.ar:
        def run():
            return generate_ar(model, [ids], max_new_tokens=args.gen_length, **sampling)
    else:
        mask_id = model.config.mask_token_id if model.config.mask_token_id is not None else tokenizer.mask_id
        if mask_id is None:
            raise ValueError(f"--workdir {args.workdir}: neither the model config nor the tokenizer has a mask id "
                             "(an AR checkpoint? use --ar)")

        def run():
            return generate(model, [ids], gen_length=args.gen_length, block_size=args.block_size,
                            threshold=args.threshold, steps=args.steps, mask_id=mask_id,
                            use_cache=not args.no_cache, **sampling)
    if args.warmup:
        run()
    res = run()
    out = res.tokens[0]
    if out and out[-1] == tokenizer.eos_id:
        out = out[:-1]
    print(tokenizer.decode(out))
    note = "" if args.warmup else " (includes compilation)"
    print(f"\n[{'AR' if args.ar else 'block diffusion'}] {res.num_generated} tokens, forwards={res.forwards}, "
          f"TPF={res.tpf:.2f}, tokens/s={res.tokens_per_sec:.1f}, {res.wall_time:.2f}s{note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
