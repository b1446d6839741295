"""Decode throughput: cached vs uncached block decoding vs AR decoding (TPF and tokens/s).

    python bench/decode.py                          # random model of the tiny_wsd size
    python bench/decode.py --workdir=/tmp/tiny_wsd  # the trained tiny_wsd model and its tokenizer
    python bench/decode.py --smollm2                # SmolLM2-135M size (slow)

Writes the table to bench/results/decode_random.md, decode_workdir.md or decode_smollm2.md (by
model source; --nowrite to only print it). One prompt per call (batch 1), greedy. Each
configuration is first run with threshold 0 (without EOS stop every block then takes one step:
the same windows, so the same compilations, at a fraction of the cost), then timed --repeats
times and the fastest run is reported (the CI box is shared), so compilation is excluded. By
default rows never stop at EOS (eos_id = the mask id, which is never committed), so every run
generates exactly gen_length tokens and the lengths are comparable; --stop_at_eos uses the
tokenizer's EOS instead. Random weights are not confident, so their TPF says nothing about a
trained model: read tokens/s there.
"""
from __future__ import annotations

import functools
import itertools
import os
import sys

import numpy as np
from absl import app, flags
from flax import nnx

import _cli
import _results
from llada2_jax.inference import generate, generate_ar
from llada2_jax.model import ModelConfig, Transformer

# the tiny_wsd shape (llada2_jax/configs/tiny.py: 4 layers, d 128, FFN 384, 4 heads / 2 KV heads, tied), vocab 4096
TINY_WSD = ModelConfig(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=1024, mask_token_id=4095, eos_token_id=2)

WORKDIR = flags.DEFINE_string("workdir", None, "a training workdir (its final weights and tokenizer)")
SMOLLM2 = flags.DEFINE_boolean("smollm2", False, "SmolLM2-135M weights (+ a [MASK] row)")
GEN_LENGTHS = _cli.DEFINE_number_list("gen_lengths", "128,256,512", "tokens to generate", lower=1)
THRESHOLDS = _cli.DEFINE_number_list("thresholds", "0.95,0.85", "confidence thresholds", kind=float, lower=0.0,
                                     upper=1.0)
BLOCK_SIZE = flags.DEFINE_integer("block_size", 32, "decoding block size", lower_bound=1)
PROMPT_LENGTHS = _cli.DEFINE_number_list("prompt_lengths", "32,128,256", "prompt lengths", lower=1)
REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per configuration (the fastest is reported)",
                               lower_bound=1)
STOP_AT_EOS = flags.DEFINE_boolean("stop_at_eos", False, "stop rows at the tokenizer's EOS")
MAX_POSITIONS = flags.DEFINE_integer(
    "max_positions", 0, "raise the model's max_position_embeddings (timing only: e.g. gen 512 on the tiny_wsd "
    "checkpoint, trained at 512 positions; RoPE without scaling has no position table); 0 keeps it",
    lower_bound=0)
WRITE = flags.DEFINE_boolean("write", True, "write the table to bench/results/decode_<source>.md")


def load():
    """(model, prompt of the longest length, mask id, eos id, description)."""
    workdir, longest = WORKDIR.value, max(PROMPT_LENGTHS.value)
    if workdir or SMOLLM2.value:
        from llada2_jax.interop.sources import load_model
        model, tok = load_model(f"workdir:{workdir}" if workdir else "smollm2")
        if model.config.mask_token_id is None:  # an AR checkpoint: give it the [MASK] row (spec §4)
            from llada2_jax.interop.convert import add_mask_token
            model, _ = add_mask_token(model)
        text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for"
        prompt = (tok.encode(text) * longest)[:longest]
        name = f"workdir {workdir}" if workdir else "SmolLM2-135M (GGUF, + [MASK])"
        return model, prompt, model.config.mask_token_id, tok.eos_id, name
    model = Transformer(TINY_WSD, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(3, 4000, longest).tolist()
    return model, prompt, TINY_WSD.mask_token_id, TINY_WSD.eos_token_id, "random weights, tiny_wsd size"


def timed(fn, repeats, warmup=None):
    (warmup or fn)()  # compile
    return min((fn() for _ in range(repeats)), key=lambda r: r.wall_time)


def main() -> int:
    if WORKDIR.value and SMOLLM2.value:
        raise app.UsageError("--workdir and --smollm2 are alternatives; pass one of them (or neither)")
    if WORKDIR.value and not os.path.isdir(WORKDIR.value):
        raise app.UsageError(f"--workdir={WORKDIR.value}: no such directory")
    block_size, repeats = BLOCK_SIZE.value, REPEATS.value
    model, longest, mask_id, eos_id, name = load()
    if MAX_POSITIONS.value:
        if model.config.rope_scaling_dict:
            raise app.UsageError("--max_positions would change this model's RoPE scaling")
        model.config = model.config.replace(max_position_embeddings=MAX_POSITIONS.value)
        name += f", max positions raised to {MAX_POSITIONS.value}"
    stop = eos_id if STOP_AT_EOS.value else None
    rows = []
    for plen, gen in itertools.product(PROMPT_LENGTHS.value, GEN_LENGTHS.value):
        prompt = longest[:plen]
        if plen + gen > model.config.max_position_embeddings:
            print(f"skip prompt {plen} + gen_length {gen}: exceeds max_position_embeddings", file=sys.stderr)
            continue
        for thr in THRESHOLDS.value:
            for cached in (True, False):
                run = functools.partial(generate, model, [prompt], gen_length=gen, block_size=block_size,
                                        mask_id=mask_id, eos_id=mask_id if stop is None else stop, use_cache=cached)
                warmup = functools.partial(run, threshold=0.0) if stop is None else None
                res = timed(functools.partial(run, threshold=thr), repeats, warmup)
                rows.append((plen, gen, "cached" if cached else "uncached", f"{thr:g}", res))
                print(f"  {rows[-1][:4]} tpf={res.tpf:.2f} tok/s={res.tokens_per_sec:.1f}", file=sys.stderr, flush=True)
        res = timed(lambda: generate_ar(model, [prompt], max_new_tokens=gen, eos_id=stop), repeats)
        rows.append((plen, gen, "AR", "-", res))

    lines = [f"Decode benchmark: {name}; batch 1, block {block_size}, greedy, "
             f"{'stop at EOS' if stop is not None else 'no EOS stop'}, best of {repeats}.", "",
             "| prompt | gen | decoder | threshold | tokens | forwards | TPF | seconds | tokens/s | vs uncached |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    uncached = {(p, g, t): r.tokens_per_sec for p, g, kind, t, r in rows if kind == "uncached"}
    first_thr = f"{THRESHOLDS.value[0]:g}"
    for plen, gen, kind, thr, res in rows:
        ref = uncached.get((plen, gen, thr)) or uncached.get((plen, gen, first_thr))
        ratio = f"{res.tokens_per_sec / ref:.1f}x" if ref else "-"
        lines.append(f"| {plen} | {gen} | {kind} | {thr} | {res.num_generated} | {res.forwards} | {res.tpf:.2f} | "
                     f"{res.wall_time:.2f} | {res.tokens_per_sec:.1f} | {ratio} |")
    source = "smollm2" if SMOLLM2.value else "workdir" if WORKDIR.value else "random"
    _results.publish(f"decode_{source}", "\n".join(lines), WRITE.value)
    return 0


if __name__ == "__main__":
    _cli.run(main)
