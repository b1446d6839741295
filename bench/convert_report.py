"""The AR-vs-dLLM table of a conversion run (its `compare` stage), with what the training cost.

    python bench/convert_report.py --workdir=workdirs/convert [--name=convert_cpu] [--nowrite]

Reads WORKDIR/compare/results.json (written by the `compare` stage or `python -m llada2_jax.evaluate
--out=WORKDIR/compare/results.json`) and WORKDIR/metrics.jsonl: the evaluation table, then per
training stage its steps, real data tokens, minutes spent in logged steps (compilation and held-out
evaluations excluded) and tokens per minute. Copies the two plots to bench/results/<name>_*.png.
--results=JSON tables another evaluation of the run instead (plots from beside that JSON);
--trained_too=DIR,... adds the training cost of the other runs that evaluation compared.

--choices=LABEL=DIR,... adds one row per conversion run tried (the design choice as its label): its
training data tokens and minutes, tokens per minute, and the held-out accuracy of the AR twin and
of the last dLLM stage at threshold 0.9, with accuracy points per training hour.
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
CHOICES = flags.DEFINE_list("choices", [], "LABEL=WORKDIR conversion runs to list side by side")
TRAINED_TOO = flags.DEFINE_list("trained_too", [], "more run directories whose training cost the table lists "
                                 "(e.g. the other runs a --results evaluation compared)")
RESULTS = flags.DEFINE_string("results", "", "an evaluation JSON to table instead of WORKDIR/compare/results.json "
                              "(e.g. a `python -m llada2_jax.evaluate --out=...` run); its plots sit beside it")
TARGET_THRESHOLD = 0.9


def stage_stats(records: list[dict]) -> dict[str, dict]:
    """Per training stage: steps, real (non-padding) data tokens and seconds, from the logged windows."""
    stats: dict[str, dict] = {}
    for r in records:
        if "window_tokens" in r:
            s = stats.setdefault(r["stage"], dict(steps=0, tokens=0, seconds=0.0))
            s["steps"] = max(s["steps"], r["step"])
            s["tokens"] += r["window_tokens"]
            s["seconds"] += r["window_seconds"]
    return stats


def stage_costs(records: list[dict]) -> list[list]:
    return [[stage, s["steps"], f"{s['tokens'] / 1e3:.1f} k", f"{s['seconds'] / 60:.1f}",
             f"{60 * s['tokens'] / max(s['seconds'], 1e-9):.0f}"] for stage, s in stage_stats(records).items()]


def results_path(workdir: str) -> str:
    return os.path.join(workdir, "compare", "results.json")


def read_report(path: str) -> dict:
    if not os.path.exists(path):
        raise app.UsageError(f"{path} not found (run the compare stage or `python -m llada2_jax.evaluate` first)")
    with open(path) as f:
        return json.load(f)


def choice_row(label: str, workdir: str) -> list:
    """One conversion run: its cost and its accuracy (AR twin, last dLLM stage at 0.9) per training hour."""
    rows = read_report(results_path(workdir))["rows"]
    stats = stage_stats(read_metrics(workdir))
    ar = [r for r in rows if r["decoder"] == "ar"]
    dllm = [r for r in rows if r["decoder"] == "block" and r["threshold"] == TARGET_THRESHOLD]
    cells = [label, str(rows[0]["n"])]
    for group, found in (("ar", ar), ("dllm", dllm)):
        stages = {s: v for s, v in stats.items() if (s == "ar_sft") == (group == "ar")}
        tokens, seconds = sum(v["tokens"] for v in stages.values()), sum(v["seconds"] for v in stages.values())
        accuracy = 100 * found[-1]["accuracy"] if found else float("nan")
        cells += [f"{tokens / 1e3:.0f} k / {seconds / 60:.0f}", f"{60 * tokens / max(seconds, 1e-9):.0f}",
                  f"{accuracy:.1f} %", f"{accuracy / max(seconds / 3600, 1e-9):.1f}"]
    cells.append(f"{dllm[-1]['tokens_per_forward']:.2f}" if dllm else "")
    return cells


def main() -> int:
    if not WORKDIR.value:
        raise app.UsageError("--workdir is required")
    path = RESULTS.value or results_path(WORKDIR.value)
    report = read_report(path)
    lines = [f"Held-out items: {report['count']} of {', '.join(report['tasks'])} (seed {report['seed']}), "
             f"gen_length {report['gen_length']}; tokens/s decoding one prompt at a time "
             f"({report['speed_items']} items) and in batches of {report['batch_size']}.", "",
             gym.table(report["rows"]), "", "Training:", "",
             _results.markdown_table(["run", "stage", "steps", "data tokens", "minutes", "tokens / minute"],
                                     [[os.path.basename(os.path.normpath(w)), *row]
                                      for w in [WORKDIR.value, *TRAINED_TOO.value]
                                      for row in stage_costs(read_metrics(w))])]
    if CHOICES.value:
        entries = [c.rpartition("=") for c in CHOICES.value]
        if any(not sep or not label or not path for label, sep, path in entries):
            raise app.UsageError(f"--choices={','.join(CHOICES.value)}: expected LABEL=WORKDIR entries")
        lines += ["", f"Design choices tried (accuracy of the AR twin, and of the last dLLM stage at threshold "
                  f"{TARGET_THRESHOLD}; minutes in logged training steps; accuracy points per training hour):", "",
                  _results.markdown_table(
                      ["run", "items", "AR data tokens / minutes", "AR tokens per min", "AR accuracy", "AR points / h",
                       "dLLM data tokens / minutes", "dLLM tokens per min", "dLLM accuracy", "dLLM points / h",
                       "dLLM tokens/forward"],
                      [choice_row(label, path) for label, _, path in entries])]
    _results.publish(NAME.value, "\n".join(lines), WRITE.value)
    if WRITE.value:
        for plot in ("frontier.png", "training_loss.png"):
            shutil.copy(os.path.join(os.path.dirname(path), plot), _results.RESULTS / f"{NAME.value}_{plot}")
    return 0


if __name__ == "__main__":
    _cli.run(main)
