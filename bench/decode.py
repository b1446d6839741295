"""Decode throughput: cached vs uncached block decoding vs AR decoding (TPF and tokens/s).

    python bench/decode.py                          # random model of the tiny_wsd size
    python bench/decode.py --workdir=/tmp/tiny_wsd  # the trained tiny_wsd model and its tokenizer
    python bench/decode.py --smollm2                # SmolLM2-135M size (slow)
    python bench/decode.py --step_costs             # one cached block step vs one AR step, SmolLM2 size

Writes the table to bench/results/decode_random.md, decode_workdir.md or decode_smollm2.md (by
model source; --nowrite to only print it). One prompt per call (batch 1), greedy. Each
configuration is first run with threshold 0 (without EOS stop every block then takes one step:
the same windows, so the same compilations, at a fraction of the cost), then timed --repeats
times and the fastest run is reported (the CI box is shared), so compilation is excluded. By
default rows never stop at EOS (eos_id = the mask id, which is never committed), so every run
generates exactly gen_length tokens and the lengths are comparable; --stop_at_eos uses the
tokenizer's EOS instead. Random weights are not confident, so their TPF says nothing about a
trained model: read tokens/s there.

--step_costs prints the cost of one decoding forward instead (random weights of SmolLM2-135M size
unless --smollm2 or --workdir): the cached block step (each --step_blocks size, tokens against the
prompt's cache) and the AR step (one token), both at prompt length --step_prompt, and their ratio, which is
the tokens per forward (TPF) a block decoder needs to tie with AR. Each is measured through the
public decoders as a difference of two runs that differ by whole blocks (gen one block vs
two blocks at threshold 1, i.e. one token per step; the table lists both runs' forwards) and
share their cache windows, so prefill and compilation cancel out:
step time = (wall(2 blocks) - wall(1 block)) / (forwards(2 blocks) - forwards(1 block)). Writes
bench/results/decode_step_costs.md.
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
import _flops
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
STEP_COSTS = flags.DEFINE_boolean("step_costs", False, "time one cached block step and one AR step instead")
STEP_PROMPT = flags.DEFINE_integer("step_prompt", 256, "prompt length of --step_costs", lower_bound=1)
STEP_BLOCKS = _cli.DEFINE_number_list("step_blocks", "32,16", "block sizes of --step_costs", lower=1)
WRITE = flags.DEFINE_boolean("write", True, "write the table to bench/results/decode_<source>.md")

# SmolLM2-135M (llama, 30 layers, d 576, 9/3 heads, FFN 1536, tied) + the added [MASK] row
SMOLLM2_SIZE = ModelConfig(vocab_size=49153, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                           rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
                           mask_token_id=49152, eos_token_id=0)


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


def step_costs(model, prompt, mask_id, name) -> None:
    """One cached block step per --step_blocks size vs one AR step, at prompt length len(prompt)."""
    repeats, mc = REPEATS.value, model.config

    def difference(run, unit):
        """(s/forward, tokens/forward, forwards label) from a 1-unit and a 2-unit run."""
        one, two = (timed(functools.partial(run, n * unit), repeats) for n in (1, 2))
        forwards = two.forwards - one.forwards
        return ((two.wall_time - one.wall_time) / forwards, (two.num_generated - one.num_generated) / forwards,
                f"{one.forwards} / {two.forwards}")

    def block_run(block, gen):
        return generate(model, [prompt], gen_length=gen, block_size=block, threshold=1.0, mask_id=mask_id,
                        eos_id=None, use_cache=True)

    def ar_run(gen):
        return generate_ar(model, [prompt], max_new_tokens=gen, eos_id=None)

    def forward_flops(tokens, keys):
        return (_flops.dense_layer_flops(mc, tokens) + _flops.attention_flops(mc, tokens, keys)
                + _flops.head_flops(mc, tokens))

    ctx = len(prompt)
    peak = _flops.matmul_peak()
    print(f"  fp32 matmul peak: {peak:.0f} GFLOP/s", file=sys.stderr, flush=True)
    ar_sec, _, ar_fw = difference(ar_run, max(STEP_BLOCKS.value))
    print(f"  AR step: {1e3 * ar_sec:.1f} ms/forward", file=sys.stderr, flush=True)
    rows = []
    for block in STEP_BLOCKS.value:
        sec, tpf, fw = difference(functools.partial(block_run, block), block)
        flops = forward_flops(block, ctx + block)
        print(f"  cached block step, block {block}: {1e3 * sec:.1f} ms/forward, {tpf:.2f} tokens/forward",
              file=sys.stderr, flush=True)
        floor = flops / (peak * 1e9)
        rows.append(f"| cached block step | {block} | {fw} | {1e3 * sec:.1f} | {flops / 1e9:.2f} | "
                    f"{flops / sec / 1e9:.0f} | {tpf / sec:.1f} | {sec / ar_sec:.2f}x | {1e3 * floor:.1f} | "
                    f"{floor / ar_sec:.2f}x |")
    ar_flops = forward_flops(1, ctx + 1)
    rows.append(f"| AR step | 1 | {ar_fw} | {1e3 * ar_sec:.1f} | {ar_flops / 1e9:.2f} | {ar_flops / ar_sec / 1e9:.0f} "
                f"| {1 / ar_sec:.1f} | 1.00x | {1e3 * ar_flops / (peak * 1e9):.1f} | - |")
    lines = [f"Decode step cost: {name}; prompt {ctx}, batch 1, greedy, best of {repeats} (difference of a 1-block "
             "and a 2-block run at threshold 1, one token per step; AR: of a run of the largest block and one "
             f"twice as long). fp32 throughout; fp32 matmul peak measured in this run: {peak:.0f} GFLOP/s "
             "(a jitted 4096^3 jnp.dot).", "",
             "| step | tokens fed | forwards (1 / 2 blocks) | ms / forward | GFLOP / forward | GFLOP/s | "
             "tokens/s here | vs AR step | ms at the fp32 peak | floor vs AR step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
             "The ratio to the AR step is the tokens per forward a block decoder needs to tie with AR. GFLOP per "
             "forward counts the matmuls (projections, SwiGLU, attention against the cache, vocabulary head): the "
             "AR step is bound by reading the weights, the block step by its FLOPs. \"ms at the fp32 peak\" is "
             "the FLOP count at the measured matmul peak, a lower bound on any fp32 implementation here; \"floor vs "
             "AR step\" divides it by the measured AR step: the smallest ratio this CPU allows."]
    _results.publish("decode_step_costs", "\n".join(lines), WRITE.value)


def main() -> int:
    if WORKDIR.value and SMOLLM2.value:
        raise app.UsageError("--workdir and --smollm2 are alternatives; pass one of them (or neither)")
    if WORKDIR.value and not os.path.isdir(WORKDIR.value):
        raise app.UsageError(f"--workdir={WORKDIR.value}: no such directory")
    block_size, repeats = BLOCK_SIZE.value, REPEATS.value
    if STEP_COSTS.value:
        if WORKDIR.value or SMOLLM2.value:
            model, longest, mask_id, _, name = load()
            prompt = (longest * (1 + STEP_PROMPT.value // max(len(longest), 1)))[:STEP_PROMPT.value]
        else:
            model, mask_id = Transformer(SMOLLM2_SIZE, rngs=nnx.Rngs(0)), SMOLLM2_SIZE.mask_token_id
            prompt = np.random.default_rng(0).integers(3, 49000, STEP_PROMPT.value).tolist()
            name = "random weights, SmolLM2-135M size (+ [MASK])"
        step_costs(model, prompt, mask_id, name)
        return 0
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
