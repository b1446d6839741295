"""Per-phase report of a training run from its WORKDIR/metrics.jsonl (numbers for BUILD_NOTES.md).

    python bench/wsd_report.py --workdir workdirs/tiny_wsd [--write]

For every (stage, phase): step range, mean training loss of the first and last `--window` logged
points, masked accuracy at the end, the held-out metric (fixed noise) at the phase start and end, and the median
tokens/s. `--write` puts the table into BUILD_NOTES.md between bench-wsd-phases markers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._notes import replace_section  # noqa: E402


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--window", type=int, default=3, help="logged points averaged at each phase end")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    lines = ["| stage | phase | block | logged steps | train loss first → last | masked acc (last) | "
             "held-out start → end | tokens/s (median) |", "|---|---|---|---|---|---|---|---|"]
    for stage, phase, block, steps, first, last, acc, start, held, tps in phase_rows(records, args.window):
        held_s = "-" if held is None else f"{held:.3f}"
        if start is not None:
            held_s = f"{start:.3f} → {held_s}"
        acc_s = "-" if acc is None else f"{acc:.3f}"
        lines.append(f"| {stage} | {phase} | {block} | {steps} | {first:.3f} → {last:.3f} | {acc_s} | "
                     f"{held_s} | {tps:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        replace_section("bench-wsd-phases", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
