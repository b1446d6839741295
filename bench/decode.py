"""Decode throughput: cached vs uncached block decoding vs AR decoding (TPF and tokens/s).

    python bench/decode.py                         # random model of the tiny_wsd size
    python bench/decode.py --workdir /tmp/tiny_wsd # the trained tiny_wsd model and its tokenizer
    python bench/decode.py --smollm2               # SmolLM2-135M size (slow)
    python bench/decode.py --write-notes BUILD_NOTES.md   # also write the table into the notes

One prompt per call (batch 1), greedy. Each configuration is first run with threshold 0 (without
EOS stop every block then takes one step: the same windows, so the same compilations, at a
fraction of the cost), then timed --repeats times and the fastest run is reported (the CI box is
shared), so compilation is excluded. By default rows never stop at EOS (eos_id = the mask id,
which is never committed), so every run generates exactly gen_length tokens and the lengths are
comparable; --stop-at-eos uses the tokenizer's EOS instead. Random weights are not confident, so
their TPF says nothing about a trained model: read tokens/s there.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import pathlib
import platform
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._notes import replace_section  # noqa: E402
from llada2_jax.inference import generate, generate_ar
from llada2_jax.model import ModelConfig, Transformer

# experiments/tiny_wsd.py: 4 layers, d 128, FFN 384, 4 heads / 2 KV heads, tied, vocab 4096.
TINY_WSD = ModelConfig(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=1024, mask_token_id=4095, eos_token_id=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workdir", help="a training workdir (its final weights and tokenizer)")
    src.add_argument("--smollm2", action="store_true", help="SmolLM2-135M weights (+ a [MASK] row)")
    p.add_argument("--gen-lengths", default="128,256,512")
    p.add_argument("--thresholds", default="0.95,0.85")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--prompt-lengths", default="32,128,256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stop-at-eos", action="store_true")
    p.add_argument("--max-positions", type=int,
                   help="raise the model's max_position_embeddings (timing only: e.g. gen 512 on the tiny_wsd "
                        "checkpoint, trained at 512 positions; RoPE without scaling has no position table)")
    p.add_argument("--write-notes", help="write the table into this markdown file (between bench-decode markers)")
    return p.parse_args(argv)


def load(args):
    """(model, prompt of the longest length, mask id, eos id, description)."""
    if args.workdir or args.smollm2:
        from llada2_jax.evaluation.models import load_model
        model, tok = load_model(f"workdir:{args.workdir}" if args.workdir else "smollm2")
        if model.config.mask_token_id is None:  # an AR checkpoint: give it the [MASK] row (spec §4)
            from llada2_jax.interop.convert import add_mask_token
            model, _ = add_mask_token(model)
        text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for"
        longest = max(int(n) for n in args.prompt_lengths.split(","))
        prompt = (tok.encode(text) * longest)[:longest]
        name = f"workdir {args.workdir}" if args.workdir else "SmolLM2-135M (GGUF, + [MASK])"
        return model, prompt, model.config.mask_token_id, tok.eos_id, name
    model = Transformer(TINY_WSD, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(3, 4000, max(int(n) for n in args.prompt_lengths.split(","))).tolist()
    return model, prompt, TINY_WSD.mask_token_id, TINY_WSD.eos_token_id, "random weights, tiny_wsd size"


def timed(fn, repeats, warmup=None):
    (warmup or fn)()  # compile
    return min((fn() for _ in range(repeats)), key=lambda r: r.wall_time)


def main(argv=None) -> int:
    args = parse_args(argv)
    model, longest, mask_id, eos_id, name = load(args)
    if args.max_positions:
        if model.config.rope_scaling_dict:
            raise ValueError("--max-positions would change this model's RoPE scaling")
        model.config = model.config.replace(max_position_embeddings=args.max_positions)
        name += f", max positions raised to {args.max_positions}"
    stop = eos_id if args.stop_at_eos else None
    rows = []
    for plen, gen in itertools.product((int(n) for n in args.prompt_lengths.split(",")),
                                       (int(g) for g in args.gen_lengths.split(","))):
        prompt = longest[:plen]
        if plen + gen > model.config.max_position_embeddings:
            print(f"skip prompt {plen} + gen_length {gen}: exceeds max_position_embeddings", file=sys.stderr)
            continue
        for thr in (float(t) for t in args.thresholds.split(",")):
            for cached in (True, False):
                run = functools.partial(generate, model, [prompt], gen_length=gen, block_size=args.block_size,
                                        mask_id=mask_id, eos_id=mask_id if stop is None else stop, use_cache=cached)
                warmup = functools.partial(run, threshold=0.0) if stop is None else None
                res = timed(functools.partial(run, threshold=thr), args.repeats, warmup)
                rows.append((plen, gen, "cached" if cached else "uncached", f"{thr:g}", res))
                print(f"  {rows[-1][:4]} tpf={res.tpf:.2f} tok/s={res.tokens_per_sec:.1f}", file=sys.stderr, flush=True)
        res = timed(lambda: generate_ar(model, [prompt], max_new_tokens=gen, eos_id=stop), args.repeats)
        rows.append((plen, gen, "AR", "-", res))

    lines = [f"Decode benchmark: {name}; batch 1, block {args.block_size}, greedy, "
             f"{'stop at EOS' if stop is not None else 'no EOS stop'}, best of {args.repeats}; {platform.machine()} "
             f"{jax.default_backend()} x{jax.device_count()}, jax {jax.__version__}.", "",
             "| prompt | gen | decoder | threshold | tokens | forwards | TPF | seconds | tokens/s | vs uncached |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    uncached = {(p, g, t): r.tokens_per_sec for p, g, kind, t, r in rows if kind == "uncached"}
    first_thr = f"{float(args.thresholds.split(',')[0]):g}"
    for plen, gen, kind, thr, res in rows:
        ref = uncached.get((plen, gen, thr)) or uncached.get((plen, gen, first_thr))
        ratio = f"{res.tokens_per_sec / ref:.1f}x" if ref else "-"
        lines.append(f"| {plen} | {gen} | {kind} | {thr} | {res.num_generated} | {res.forwards} | {res.tpf:.2f} | "
                     f"{res.wall_time:.2f} | {res.tokens_per_sec:.1f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.write_notes:  # one table per model source
        section = "bench-decode-smollm2" if args.smollm2 else "bench-decode" if args.workdir else "bench-decode-random"
        replace_section(section, table, pathlib.Path(args.write_notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
