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

`compare` runs this for every trained stage of some run directories (the AR twin with the AR
decoder, each block-diffusion stage at each threshold) and writes the JSON, table and plots;
`python -m llada2_jax.evaluate` and the `compare` stage call it.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence

from llada2_jax.data import gym_tasks
from llada2_jax.data.tokenizers import Tokenizer
from llada2_jax.evaluation import tasks

DecodeFn = Callable[[list[list[int]]], object]


def prompt_ids(tokenizer: Tokenizer, item: gym_tasks.TaskItem) -> list[int]:
    """The question as one user turn plus the assistant header: the SFT data's prompt layout."""
    return tasks.gsm8k_prompt(tokenizer, item.question)


def answer_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The decoded reply without its EOS, stripped of surrounding whitespace."""
    return tokenizer.decode([t for t in ids if t != tokenizer.eos_id]).strip()


def evaluate(decode_fn: DecodeFn, tokenizer: Tokenizer, items: Sequence[gym_tasks.TaskItem], *,
             batch_size: int, speed_items: int = 0, warmup: bool = True) -> dict:
    """Accuracy and speed of `decode_fn` on `items` (module docstring), with per-item records.

    All items are decoded in batches of `batch_size` (rows do not depend on their batch, so
    accuracy and tokens/forward are those of single-prompt runs): `tokens_per_sec_batched`.
    With `speed_items` > 0 the first that many items are decoded again one at a time, the
    latency regime a block decoder is built for: `tokens_per_sec` (else the batched figure).
    """
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
    summary = summarize(records, seconds)
    summary["tokens_per_sec_batched"] = summary["tokens_per_sec"]
    if speed_items > 0:
        summary["tokens_per_sec"] = single_prompt_speed(decode_fn, prompts[:speed_items], warmup)
    return {**summary, "records": records}


def single_prompt_speed(decode_fn: DecodeFn, prompts: list[list[int]], warmup: bool = True) -> float:
    """Answer tokens per second decoding `prompts` one at a time, after an untimed pass over the
    same prompts (each prompt length may need its own compiled window)."""
    if warmup:
        for prompt in prompts:
            decode_fn([prompt])
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        result = decode_fn([prompt])
        tokens += len(result.tokens[0])
        seconds += result.wall_time
    return tokens / seconds if seconds > 0 else 0.0


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


# ---------------------------------------------------------------- comparing trained runs

AR_BLOCK_SIZE = 0  # the block size a stage trained with the causal next-token loss logs
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)


def trained_stages(workdir: str) -> list[tuple[str, int]]:
    """(stage, last logged block size) of each stage with checkpoints, in training order."""
    from llada2_jax.evaluation.plots import read_metrics
    last_size: dict[str, int] = {}
    for record in read_metrics(workdir):
        if "loss" in record:
            last_size[record["stage"]] = int(record.get("block_size") or 0)
    return [(stage, size) for stage, size in last_size.items()
            if os.path.isdir(os.path.join(workdir, "checkpoints", stage))]


def models_to_evaluate(workdirs: Sequence[str], stages: Sequence[str] = ()) -> list[dict]:
    """One entry per trained stage of each workdir (only `stages` when given); ValueError when none."""
    out = []
    for workdir in workdirs:
        if not os.path.isdir(workdir):
            raise ValueError(f"workdir {workdir} is not a directory")
        found = trained_stages(workdir)
        if not found:
            raise ValueError(f"workdir {workdir} has no trained stage with checkpoints")
        for stage, block_size in found:
            if not stages or stage in stages:
                out.append({"model": f"{os.path.basename(os.path.normpath(workdir))}/{stage}", "workdir": workdir,
                            "stage": stage, "ar": block_size == AR_BLOCK_SIZE, "block_size": block_size})
    if not out:
        raise ValueError(f"stages {', '.join(stages)} match no trained stage of {', '.join(workdirs)}")
    return out


def decoders(entry: dict, model, tokenizer: Tokenizer, *, thresholds: Sequence[float], block_size: int,
             gen_length: int, presets: Sequence[str] = ()) -> list[tuple[dict, DecodeFn]]:
    """(setting, decode_fn) pairs of one model: the AR decoder once, or block decoding per threshold
    at `block_size` (0: the block size the stage was trained with), then per token-editing preset
    (`inference.decode.PRESETS`: its mask and edit thresholds; decoder name `edit:<preset>`)."""
    from llada2_jax.inference import generate, generate_ar
    from llada2_jax.inference.decode import preset_settings
    if entry["ar"]:
        return [({"decoder": "ar", "threshold": None, "block_size": None},
                 functools.partial(generate_ar, model, max_new_tokens=gen_length, eos_id=tokenizer.eos_id))]
    mask_id = model.config.mask_token_id if model.config.mask_token_id is not None else tokenizer.mask_id
    size = block_size or entry["block_size"]
    block = functools.partial(generate, model, gen_length=gen_length, block_size=size, mask_id=mask_id,
                              eos_id=tokenizer.eos_id, use_cache=True)
    settings = [({"decoder": "block", "threshold": t, "block_size": size}, functools.partial(block, threshold=t))
                for t in thresholds]
    for name in presets:
        knobs = preset_settings(name)
        settings.append(({"decoder": f"edit:{name}", "threshold": knobs["threshold"], "block_size": size,
                          "edit_threshold": knobs["edit_threshold"]}, functools.partial(block, **knobs)))
    return settings


def compare(workdirs: Sequence[str], *, out: str, tasks: Sequence[str], seed: int, count: int,
            stages: Sequence[str] = (), thresholds: Sequence[float] = THRESHOLDS, block_size: int = 0,
            gen_length: int = 64, batch_size: int = 8, speed_items: int = 8, presets: Sequence[str] = (),
            log=print) -> dict:
    """Evaluate every trained stage of `workdirs` on `count` held-out items; JSON + PNGs beside `out`.

    Returns the report: {"rows": one summary per (model, setting), "items": outputs per setting, ...}.
    """
    from llada2_jax.evaluation import plots
    from llada2_jax.interop.sources import load_model

    items = gym_tasks.generate_items(tasks, split="heldout", seed=seed, count=count)
    entries = models_to_evaluate(workdirs, stages)
    rows, outputs = [], {}
    log(TABLE_HEADER)
    for entry in entries:
        model, tokenizer = load_model(f"workdir:{entry['workdir']}@{entry['stage']}")
        if tokenizer is None:
            raise ValueError(f"workdir {entry['workdir']} holds no saved tokenizer")
        for setting, decode_fn in decoders(entry, model, tokenizer, thresholds=thresholds, block_size=block_size,
                                           gen_length=gen_length, presets=presets):
            result = evaluate(decode_fn, tokenizer, items, batch_size=batch_size, speed_items=speed_items)
            outputs[f"{entry['model']}|{setting['decoder']}|{setting['threshold']}"] = result.pop("records")
            rows.append({"model": entry["model"], **setting, **result})
            log(format_row(rows[-1]))
    report = {"tasks": list(tasks), "seed": seed, "count": count, "gen_length": gen_length,
              "batch_size": batch_size, "speed_items": speed_items, "rows": rows, "items": outputs}
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    plots.frontier(rows, os.path.join(out_dir, "frontier.png"))
    plots.training_loss(list(dict.fromkeys(e["workdir"] for e in entries)), os.path.join(out_dir, "training_loss.png"))
    return report


TABLE_HEADER = ("| model | decoder | threshold | block | accuracy | tokens/forward | forwards | answer tokens "
                "| tokens/s (1 prompt) | tokens/s (batched) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(row: dict) -> str:
    threshold = "" if row["threshold"] is None else f"{row['threshold']:g}"
    if row.get("edit_threshold") is not None:
        threshold += f" / edit {row['edit_threshold']:g}"
    block = "" if row["block_size"] is None else str(row["block_size"])
    return (f"| {row['model']} | {row['decoder']} | {threshold} | {block} | {100 * row['accuracy']:.1f} % | "
            f"{row['tokens_per_forward']:.2f} | {row['forwards']} | {row['answer_tokens']} | "
            f"{row['tokens_per_sec']:.1f} | {row['tokens_per_sec_batched']:.1f} |")


def table(rows: Sequence[dict]) -> str:
    return "\n".join([TABLE_HEADER] + [format_row(r) for r in rows])
