"""Generate text from a trained run: block-diffusion decoding (default) or the AR baseline.

    python -m llada2_jax.generate --workdir=/tmp/tiny_wsd --prompt="def add(a, b):"
    python -m llada2_jax.generate --workdir=/tmp/tiny_wsd --stage=ar_pretrain --ar --prompt="..."

Loads the run's final weights (its final.json) or, with --stage, the latest checkpoint of that
stage, and the tokenizer saved in WORKDIR/tokenizer, through `llada2_jax.workdir` (no training
code). The prompt is wrapped in the tokenizer's chat template (one user turn + the assistant
header) when it has one, unless --raw. Prints the completion, then forwards, tokens per forward
and tokens/s (a first call includes compilation: use --warmup to time a second call).
A mistake in the flags prints one line and exits with code 2.
"""
from __future__ import annotations

import os
import sys

from absl import flags

from llada2_jax import cli

FLAGS = flags.FlagValues()  # its own set, so importing this module never touches `main`'s flags
flags.DEFINE_string("workdir", None, "a training run directory", flag_values=FLAGS)
flags.DEFINE_string("prompt", None, "the prompt text", flag_values=FLAGS)
flags.DEFINE_string("stage", None, "use the latest checkpoint of this stage instead of the final weights",
                    flag_values=FLAGS)
flags.DEFINE_boolean("raw", False, "do not apply the chat template", flag_values=FLAGS)
flags.DEFINE_integer("gen_length", 128, "tokens to generate", flag_values=FLAGS)
flags.DEFINE_integer("block_size", 32, "block-diffusion block size", flag_values=FLAGS)
flags.DEFINE_float("threshold", 0.95, "confidence above which a masked token is committed, in [0, 1]",
                   flag_values=FLAGS)
flags.DEFINE_float("edit_threshold", None, "token editing (LLaDA2.1 T2T): replace a committed token when the "
                   "model's choice differs with confidence above this, in [0, 1] (default: no editing)",
                   flag_values=FLAGS)
flags.DEFINE_integer("max_post_steps", 16, "token editing: forwards a mask-free block may still spend on edits",
                     flag_values=FLAGS)
flags.DEFINE_string("preset", None, "quality (threshold 0.7, edit 0.5) | speed (threshold 0.5, edit 0.0): "
                    "LLaDA2.1 modes; replace --threshold and --edit_threshold", flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "denoising steps per block (default: block_size)", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "sampling temperature (0 = greedy)", flag_values=FLAGS)
flags.DEFINE_integer("top_k", None, "sample from the k most likely tokens", flag_values=FLAGS)
flags.DEFINE_float("top_p", None, "nucleus sampling mass", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_boolean("no_cache", False, "block decoding without the KV cache", flag_values=FLAGS)
flags.DEFINE_boolean("ar", False, "AR (next-token) decoding instead of block diffusion", flag_values=FLAGS)
flags.DEFINE_boolean("warmup", False, "run once before the timed call (excludes compilation)", flag_values=FLAGS)


class UsageError(ValueError):
    """A mistake in the flags or the workdir: one line, exit code 2."""


def prompt_ids(tokenizer, text: str, raw: bool) -> list[int]:
    if raw or not tokenizer.has_chat_template:
        return tokenizer.encode(text)
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def check_flags(f) -> None:
    """Everything that can be checked before loading the model."""
    cli.require_workdir(f, ("workdir", "prompt"))
    if f.gen_length < 1:
        raise UsageError(f"--gen_length={f.gen_length} must be >= 1")
    if f.block_size < 1:
        raise UsageError(f"--block_size={f.block_size} must be >= 1")
    if not 0.0 <= f.threshold <= 1.0:
        raise UsageError(f"--threshold={f.threshold} must be in [0, 1]")
    if f.edit_threshold is not None and not 0.0 <= f.edit_threshold <= 1.0:
        raise UsageError(f"--edit_threshold={f.edit_threshold} must be in [0, 1]")
    if f.max_post_steps < 0:
        raise UsageError(f"--max_post_steps={f.max_post_steps} must be >= 0")
    if f.preset is not None and f.preset not in ("quality", "speed"):
        raise UsageError(f"--preset={f.preset!r}; expected quality or speed")
    if f.steps is not None and f.steps < 1:
        raise UsageError(f"--steps={f.steps} must be >= 1")
    if f.temperature < 0:
        raise UsageError(f"--temperature={f.temperature} must be >= 0")
    if f.top_k is not None and f.top_k < 1:
        raise UsageError(f"--top_k={f.top_k} must be >= 1")
    if f.top_p is not None and not 0.0 < f.top_p <= 1.0:
        raise UsageError(f"--top_p={f.top_p} must be in (0, 1]")


def generate_text(f) -> int:
    import jax

    from llada2_jax import workdir as wd
    from llada2_jax.inference import generate, generate_ar
    from llada2_jax.interop.sources import saved_tokenizer

    try:
        model = wd.load_model(f.workdir, f.stage)
    except ValueError as e:
        raise UsageError(str(e)) from None
    tokenizer = saved_tokenizer(os.path.join(f.workdir, wd.TOKENIZER_DIR))
    if tokenizer is None:
        raise UsageError(f"--workdir={f.workdir!r}: no tokenizer saved in {f.workdir}/{wd.TOKENIZER_DIR}")
    ids = prompt_ids(tokenizer, f.prompt, f.raw)
    limit = model.config.max_position_embeddings
    if len(ids) + f.gen_length > limit:
        raise UsageError(f"--gen_length={f.gen_length}: the prompt ({len(ids)} tokens) + gen_length exceeds the "
                         f"model's max_position_embeddings={limit}; use --gen_length <= {limit - len(ids)}")
    sampling = dict(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, eos_id=tokenizer.eos_id,
                    rng=jax.random.PRNGKey(f.seed))
    if f.ar:
        def run():
            return generate_ar(model, [ids], max_new_tokens=f.gen_length, **sampling)
    else:
        mask_id = model.config.mask_token_id if model.config.mask_token_id is not None else tokenizer.mask_id
        if mask_id is None:
            raise UsageError(f"--workdir={f.workdir!r}: neither the model config nor the tokenizer has a mask id "
                             "(an AR checkpoint? use --ar)")

        def run():
            return generate(model, [ids], gen_length=f.gen_length, block_size=f.block_size, threshold=f.threshold,
                            steps=f.steps, mask_id=mask_id, use_cache=not f.no_cache, edit_threshold=f.edit_threshold,
                            max_post_steps=f.max_post_steps, preset=f.preset, **sampling)
    try:
        if f.warmup:
            run()
        res = run()
    except ValueError as e:  # the decoders check their arguments before any work
        raise UsageError(str(e)) from None
    out = res.tokens[0]
    if out and out[-1] == tokenizer.eos_id:
        out = out[:-1]
    print(tokenizer.decode(out))
    note = "" if f.warmup else " (includes compilation)"
    print(f"\n[{'AR' if f.ar else 'block diffusion'}] {res.num_generated} tokens, forwards={res.forwards}, "
          f"TPF={res.tpf:.2f}, tokens/s={res.tokens_per_sec:.1f}, {res.wall_time:.2f}s{note}"
          + (f", edits={res.row_edits[0]}" if res.row_edits else ""), file=sys.stderr)
    return 0


def run(f) -> int:
    check_flags(f)
    return generate_text(f)


def main(argv: list[str] | None = None) -> int:
    """`argv` without the program name (default: the command line). Returns the exit code."""
    return cli.run("generate", __doc__, FLAGS, argv, run)


if __name__ == "__main__":
    sys.exit(main())
