"""Evaluate trained runs on held-out reasoning-gym items: accuracy, tokens per forward, tokens/s.

    python -m llada2_jax.evaluate --workdirs=W_ar,W_dllm --tasks=word_sequence_reversal,rotate_matrix \
        --seed=0 --count=200 --out=eval/results.json

Each workdir contributes one model per training stage it has checkpoints of (`--stages` narrows
that). A stage trained autoregressively (its metrics log block size 0) is decoded with the AR
decoder; every other stage with block threshold decoding and the KV cache, at the block size it
was trained with (its last logged block size) and at each of `--thresholds`. Items come from the
held-out split of `data.gym_tasks` and are scored by reasoning-gym. The JSON holds one summary row
per (model, setting) and every item's output; the table is printed, and `frontier.png` and
`training_loss.png` are written beside the JSON (`evaluation.gym` defines the counts).
"""
from __future__ import annotations

import functools
import json
import os
import sys

from absl import app, flags

flags.DEFINE_list("workdirs", None, "training run directories to evaluate")
flags.DEFINE_list("stages", [], "only these stages of each workdir (default: every stage with checkpoints)")
flags.DEFINE_list("tasks", ["word_sequence_reversal", "rotate_matrix"], "reasoning-gym task names")
flags.DEFINE_integer("seed", 0, "seed of the held-out item stream")
flags.DEFINE_integer("count", 200, "held-out items (round-robin over the tasks)")
flags.DEFINE_list("thresholds", ["0.5", "0.7", "0.8", "0.9", "0.95"], "confidence thresholds (block decoding)")
flags.DEFINE_integer("block_size", 0, "decode block size (0: the one each stage was trained with)")
flags.DEFINE_integer("gen_length", 64, "maximum generated tokens per item")
flags.DEFINE_integer("batch_size", 8, "prompts decoded together")
flags.DEFINE_string("out", "eval/results.json", "where the JSON goes (plots beside it)")

AR_BLOCK_SIZE = 0  # what a stage trained with the causal next-token loss logs as its block size


class UserError(ValueError):
    """A bad argument: reported as one line, exit code 2."""


def trained_stages(workdir: str) -> list[tuple[str, int]]:
    """(stage, block size) of each stage with checkpoints, in training order, from metrics.jsonl."""
    from llada2_jax.evaluation.plots import read_metrics
    checkpoints = os.path.join(workdir, "checkpoints")
    last_size: dict[str, int] = {}
    for record in read_metrics(workdir):
        if "loss" in record:
            last_size[record["stage"]] = int(record.get("block_size") or 0)
    return [(stage, size) for stage, size in last_size.items()
            if os.path.isdir(os.path.join(checkpoints, stage))]


def models_to_evaluate(workdirs, stages) -> list[dict]:
    out = []
    for workdir in workdirs:
        if not os.path.isdir(workdir):
            raise UserError(f"--workdirs: {workdir} is not a directory")
        found = trained_stages(workdir)
        if not found:
            raise UserError(f"--workdirs: {workdir} has no trained stage with checkpoints")
        for stage, block_size in found:
            if not stages or stage in stages:
                out.append({"model": f"{os.path.basename(os.path.normpath(workdir))}/{stage}",
                            "spec": f"workdir:{workdir}@{stage}", "workdir": workdir,
                            "ar": block_size == AR_BLOCK_SIZE, "block_size": block_size})
    if not out:
        raise UserError(f"--stages={','.join(stages)} matches no trained stage of {', '.join(workdirs)}")
    return out


def decoders(entry: dict, model, tokenizer, args) -> list[tuple[dict, object]]:
    """(setting, decode_fn) pairs of one model: AR once, block decoding per threshold."""
    from llada2_jax.inference import generate, generate_ar
    if entry["ar"]:
        return [({"decoder": "ar", "threshold": None, "block_size": None},
                 functools.partial(generate_ar, model, max_new_tokens=args.gen_length, eos_id=tokenizer.eos_id))]
    mask_id = model.config.mask_token_id if model.config.mask_token_id is not None else tokenizer.mask_id
    block_size = args.block_size or entry["block_size"]
    return [({"decoder": "block", "threshold": t, "block_size": block_size},
             functools.partial(generate, model, gen_length=args.gen_length, block_size=block_size, threshold=t,
                               mask_id=mask_id, eos_id=tokenizer.eos_id, use_cache=True))
            for t in args.thresholds]


def run(args) -> dict:
    from llada2_jax.data import gym_tasks
    from llada2_jax.evaluation import gym, plots
    from llada2_jax.interop.sources import load_model

    items = gym_tasks.generate_items(args.tasks, split="heldout", seed=args.seed, count=args.count)
    rows, outputs, workdirs = [], {}, []
    for entry in models_to_evaluate(args.workdirs, args.stages):
        model, tokenizer = load_model(entry["spec"])
        if tokenizer is None:
            raise UserError(f"--workdirs: {entry['workdir']} holds no saved tokenizer")
        workdirs += [entry["workdir"]] if entry["workdir"] not in workdirs else []
        for setting, decode_fn in decoders(entry, model, tokenizer, args):
            result = gym.evaluate(decode_fn, tokenizer, items, batch_size=args.batch_size)
            records = result.pop("records")
            row = {"model": entry["model"], **setting, **result}
            rows.append(row)
            outputs[f"{entry['model']}|{setting['decoder']}|{setting['threshold']}"] = records
            print(format_row(row), flush=True)
    report = {"tasks": list(args.tasks), "seed": args.seed, "count": args.count, "gen_length": args.gen_length,
              "batch_size": args.batch_size, "rows": rows, "items": outputs}
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    plots.frontier(rows, os.path.join(out_dir, "frontier.png"))
    plots.training_loss(workdirs, os.path.join(out_dir, "training_loss.png"))
    return report


HEADER = ("| model | decoder | threshold | block | accuracy | tokens/forward | forwards | answer tokens | tokens/s |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")


def format_row(row: dict) -> str:
    threshold = "" if row["threshold"] is None else f"{row['threshold']:g}"
    block = "" if row["block_size"] is None else str(row["block_size"])
    return (f"| {row['model']} | {row['decoder']} | {threshold} | {block} | {100 * row['accuracy']:.1f} % | "
            f"{row['tokens_per_forward']:.2f} | {row['forwards']} | {row['answer_tokens']} | "
            f"{row['tokens_per_sec']:.1f} |")


def table(rows) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in rows])


def parse(argv_flags) -> object:
    """The flags as a checked namespace; UserError names the bad value."""
    from llada2_jax.data import gym_tasks
    if not argv_flags.workdirs:
        raise UserError("--workdirs is required (comma-separated training run directories)")
    if argv_flags.count < 1:
        raise UserError(f"--count={argv_flags.count} must be >= 1")
    if argv_flags.batch_size < 1:
        raise UserError(f"--batch_size={argv_flags.batch_size} must be >= 1")
    if argv_flags.gen_length < 1:
        raise UserError(f"--gen_length={argv_flags.gen_length} must be >= 1")
    if argv_flags.block_size < 0:
        raise UserError(f"--block_size={argv_flags.block_size} must be >= 1 (or 0: the trained block size)")
    try:
        thresholds = [float(t) for t in argv_flags.thresholds]
    except ValueError:
        raise UserError(f"--thresholds={','.join(argv_flags.thresholds)} must be numbers in (0, 1]") from None
    if not thresholds or not all(0 < t <= 1 for t in thresholds):
        raise UserError(f"--thresholds={','.join(argv_flags.thresholds)} must be numbers in (0, 1]")
    try:
        tasks = gym_tasks.parse_tasks(argv_flags.tasks)
    except ValueError as e:
        raise UserError(f"--tasks: {e}") from None
    return type("Args", (), dict(workdirs=argv_flags.workdirs, stages=argv_flags.stages, tasks=tasks,
                                 seed=argv_flags.seed, count=argv_flags.count, thresholds=thresholds,
                                 block_size=argv_flags.block_size, gen_length=argv_flags.gen_length,
                                 batch_size=argv_flags.batch_size, out=argv_flags.out))


def main(argv) -> int:
    del argv
    try:
        report = run(parse(flags.FLAGS))
    except UserError as e:
        print(f"evaluate error: {e}", file=sys.stderr)
        return 2
    print(table(report["rows"]))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
