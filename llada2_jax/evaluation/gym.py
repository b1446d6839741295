"""Decode reasoning-gym items with any decoder and score them with reasoning-gym's own scorers.

`decode_fn(prompts) -> GenerationResult` is a decoder with the model and its knobs bound (the
block decoder `inference.generate` or the AR decoder `inference.ar.generate_ar`), so one runner
scores an AR model and a block-diffusion model on the same prompts.

Counting (the same for both decoders):
  answer tokens   a row's generated ids up to and including its first EOS (all of them when it
                  produced none); EOS padding after the answer is not counted
  forwards        the model calls in which that row was still being decoded, prefill included
                  (`GenerationResult.row_forwards`)
  tokens/forward  Σ answer tokens / Σ forwards over all items
  tokens/s        Σ answer tokens / Σ decode seconds, after one untimed warm-up call that compiles
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from llada2_jax.data import gym_tasks
from llada2_jax.data.tokenizers import Tokenizer

DecodeFn = Callable[[list[list[int]]], object]


def prompt_ids(tokenizer: Tokenizer, item: gym_tasks.TaskItem) -> list[int]:
    """The question as one user turn plus the assistant header: the SFT data's prompt layout."""
    return tokenizer.apply_chat_template([{"role": "user", "content": item.question}],
                                         add_generation_prompt=True)


def answer_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The decoded reply without its EOS, stripped of surrounding whitespace."""
    return tokenizer.decode([t for t in ids if t != tokenizer.eos_id]).strip()


def evaluate(decode_fn: DecodeFn, tokenizer: Tokenizer, items: Sequence[gym_tasks.TaskItem], *,
             batch_size: int, warmup: bool = True) -> dict:
    """Accuracy and speed of `decode_fn` on `items` (module docstring), with per-item records."""
    if not items:
        raise ValueError("items is empty: nothing to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    prompts = [prompt_ids(tokenizer, it) for it in items]
    if warmup:
        decode_fn(prompts[:batch_size])
    records, seconds = [], 0.0
    for start in range(0, len(prompts), batch_size):
        batch = items[start:start + batch_size]
        result = decode_fn(prompts[start:start + batch_size])
        seconds += result.wall_time
        for item, ids, forwards in zip(batch, result.tokens, result.row_forwards):
            output = answer_text(tokenizer, ids)
            records.append({"task": item.task, "question": item.question, "reference": item.answer,
                            "output": output, "score": gym_tasks.score(item, output),
                            "answer_tokens": len(ids), "forwards": int(forwards)})
    return {**summarize(records, seconds), "records": records}


def summarize(records: Sequence[dict], seconds: float) -> dict:
    """Accuracy, tokens per forward and tokens/s of scored records (module docstring)."""
    tokens = sum(r["answer_tokens"] for r in records)
    forwards = sum(r["forwards"] for r in records)
    per_task: dict[str, list[float]] = {}
    for r in records:
        per_task.setdefault(r["task"], []).append(r["score"])
    return {"n": len(records),
            "accuracy": sum(r["score"] for r in records) / len(records),
            "accuracy_per_task": {t: sum(s) / len(s) for t, s in sorted(per_task.items())},
            "tokens_per_forward": tokens / forwards if forwards else 0.0,
            "forwards": forwards, "answer_tokens": tokens, "seconds": seconds,
            "tokens_per_sec": tokens / seconds if seconds > 0 else 0.0}
