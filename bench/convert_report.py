"""The AR-vs-dLLM table of a conversion run (its `compare` stage), with what the training cost.

    python bench/convert_report.py --workdir=workdirs/convert [--name=convert_cpu] [--nowrite]

Reads WORKDIR/compare/results.json (written by the `compare` stage or `python -m llada2_jax.evaluate
--out=WORKDIR/compare/results.json`) and WORKDIR/metrics.jsonl: the evaluation table, then per
training stage its steps, real data tokens, minutes spent in logged steps (compilation and held-out
evaluations excluded) and tokens per minute. Copies the two plots to bench/results/<name>_*.png.
"""
from __future__ import annotations

import json
import os
import shutil

from absl import app, flags

import _cli
import _results

from llada2_jax.evaluation import gym
from llada2_jax.evaluation.plots import read_metrics

WORKDIR = flags.DEFINE_string("workdir", None, "a conversion run directory (with compare/results.json)")
NAME = flags.DEFINE_string("name", "convert_cpu", "results file name: bench/results/<name>.md")
WRITE = flags.DEFINE_boolean("write", True, "write bench/results/<name>.md and the plots")


def stage_costs(records: list[dict]) -> list[list]:
    """Per training stage: steps, real (non-padding) data tokens and seconds, from the logged windows."""
    stats: dict[str, dict] = {}
    for r in records:
        if "window_tokens" in r:
            s = stats.setdefault(r["stage"], dict(steps=0, tokens=0, seconds=0.0))
            s["steps"] = max(s["steps"], r["step"])
            s["tokens"] += r["window_tokens"]
            s["seconds"] += r["window_seconds"]
    return [[stage, s["steps"], f"{s['tokens'] / 1e3:.1f} k", f"{s['seconds'] / 60:.1f}",
             f"{60 * s['tokens'] / max(s['seconds'], 1e-9):.0f}"] for stage, s in stats.items()]


def main() -> int:
    if not WORKDIR.value:
        raise app.UsageError("--workdir is required")
    path = os.path.join(WORKDIR.value, "compare", "results.json")
    if not os.path.exists(path):
        raise app.UsageError(f"--workdir={WORKDIR.value}: no compare/results.json (run the compare stage first)")
    with open(path) as f:
        report = json.load(f)
    lines = [f"Held-out items: {report['count']} of {', '.join(report['tasks'])} (seed {report['seed']}), "
             f"gen_length {report['gen_length']}; tokens/s decoding one prompt at a time "
             f"({report['speed_items']} items) and in batches of {report['batch_size']}.", "",
             gym.table(report["rows"]), "", "Training:", "",
             _results.markdown_table(["stage", "steps", "data tokens", "minutes", "tokens / minute"],
                                     stage_costs(read_metrics(WORKDIR.value)))]
    _results.publish(NAME.value, "\n".join(lines), WRITE.value)
    if WRITE.value:
        for plot in ("frontier.png", "training_loss.png"):
            shutil.copy(os.path.join(WORKDIR.value, "compare", plot), _results.RESULTS / f"{NAME.value}_{plot}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
