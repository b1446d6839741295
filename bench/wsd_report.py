"""Per-phase report of a training run from its WORKDIR/metrics.jsonl.

    python bench/wsd_report.py --workdir=/tmp/tiny_wsd [--window=3] [--nowrite]

For every (stage, phase): step range, mean training loss of the first and last `--window` logged
points, masked accuracy at the end, the held-out metric (fixed noise) at the phase start and end, and the median
tokens/s. The table goes to bench/results/wsd_report.md (--nowrite: print only).
"""
from __future__ import annotations

import json
import os
import statistics

from absl import app, flags

import _cli
import _results

WORKDIR = flags.DEFINE_string("workdir", None, "a training run directory (reads its metrics.jsonl)")
WINDOW = flags.DEFINE_integer("window", 3, "logged points averaged at each phase end", lower_bound=1)
WRITE = flags.DEFINE_boolean("write", True, "write the table to bench/results/wsd_report.md")


def phase_rows(records, window: int):
    phases: dict[tuple[str, str], dict] = {}
    for r in records:
        key = (r["stage"], r["phase"])
        p = phases.setdefault(key, dict(block=r["block_size"], train=[], heldout=None, tps=[], steps=[]))
        if "loss" in r:
            p["train"].append(r["loss"])
            p["steps"].append(r["step"])
            p["tps"].append(r["tokens_per_sec"])
            p["acc"] = r.get("masked_acc")
        for k in ("eval_loss", "eval_nelbo"):
            if k in r:
                p["heldout"] = r[k]
            if "eval_start_" + k[5:] in r:
                p["heldout_start"] = r["eval_start_" + k[5:]]
    for (stage, phase), p in phases.items():
        if not p["train"]:
            continue
        first = statistics.fmean(p["train"][:window])
        last = statistics.fmean(p["train"][-window:])
        yield (stage, phase, p["block"], f"{p['steps'][0]}–{p['steps'][-1]}", first, last, p.get("acc"),
               p.get("heldout_start"), p["heldout"], statistics.median(p["tps"]))


def main() -> int:
    metrics = os.path.join(WORKDIR.value or "", "metrics.jsonl")
    if not WORKDIR.value or not os.path.isfile(metrics):
        raise app.UsageError(f"--workdir={WORKDIR.value}: no metrics.jsonl there (pass a training run directory)")
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    lines = ["| stage | phase | block | logged steps | train loss first → last | masked acc (last) | "
             "held-out start → end | tokens/s (median) |", "|---|---|---|---|---|---|---|---|"]
    for stage, phase, block, steps, first, last, acc, start, held, tps in phase_rows(records, WINDOW.value):
        held_s = "-" if held is None else f"{held:.3f}"
        if start is not None:
            held_s = f"{start:.3f} → {held_s}"
        acc_s = "-" if acc is None else f"{acc:.3f}"
        lines.append(f"| {stage} | {phase} | {block} | {steps} | {first:.3f} → {last:.3f} | {acc_s} | "
                     f"{held_s} | {tps:.0f} |")
    _results.publish("wsd_report", "\n".join(lines), WRITE.value)
    return 0


if __name__ == "__main__":
    _cli.run(main)
