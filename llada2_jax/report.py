"""Pictures of a run: PNGs in WORKDIR/report/, drawn from what the run wrote.

    python -m llada2_jax.report WORKDIR

  training.png    training loss and held-out NELBO (or AR loss / response NLL) per step, the WSD
                  phases shaded and named with their block size, stages end to end (metrics.jsonl)
  throughput.png  training tokens/s per logged window (metrics.jsonl)
  thresholds.png  accuracy and tokens per forward per confidence threshold  } when evaluation results
  frontier.png    accuracy against tokens per forward                        } exist: WORKDIR/compare/
                  results.json (the `compare` stage) or any WORKDIR/*/results.json from `evaluate`

`main` draws it at the end of every run (process 0 only). Prints the files written; a missing or
unreadable workdir prints one line and exits with code 2.
"""
from __future__ import annotations

import glob
import json
import os
import sys

REPORT_DIR = "report"
METRICS_FILE = "metrics.jsonl"


def evaluation_rows(workdir: str) -> list[dict]:
    """The rows of every evaluation results file in the workdir (`compare/results.json` first)."""
    paths = sorted(glob.glob(os.path.join(workdir, "*", "results.json")),
                   key=lambda p: (os.path.basename(os.path.dirname(p)) != "compare", p))
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                found = json.load(f).get("rows", [])
        except (OSError, ValueError, AttributeError):
            continue  # not an evaluation report
        rows += [r for r in found if isinstance(r, dict) and {"model", "accuracy", "tokens_per_forward"} <= set(r)]
    return rows


def read_records(workdir: str) -> list[dict]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as e:  # a line cut short by a killed run: keep the rest
                    print(f"[report] {path}:{n}: skipped an unreadable line ({e})", file=sys.stderr)
    return records


def write_report(workdir: str) -> list[str]:
    """Draw every plot the workdir has data for into WORKDIR/report/; returns the paths written."""
    from llada2_jax.evaluation import plots
    if not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir!r} does not exist")
    records, rows = read_records(workdir), evaluation_rows(workdir)
    if not records and not rows:
        raise ValueError(f"workdir {workdir!r} has no {METRICS_FILE} and no evaluation results to plot")
    out = os.path.join(workdir, REPORT_DIR)
    os.makedirs(out, exist_ok=True)
    name = os.path.basename(os.path.normpath(workdir))
    written = []
    if records:
        written.append(plots.run_curves(records, os.path.join(out, "training.png"),
                                        f"{name}: training loss and held-out NELBO per step"))
        written.append(plots.throughput(records, os.path.join(out, "throughput.png"),
                                        f"{name}: training tokens/s (first window of a phase includes compilation)"))
    if rows:
        written.append(plots.threshold_sweep(rows, os.path.join(out, "thresholds.png"),
                                             f"{name}: accuracy and tokens per forward per threshold"))
        written.append(plots.frontier(rows, os.path.join(out, "frontier.png")))
    return written


def report_at_end_of_run(workdir: str) -> None:
    """What `main` calls after the stages: process 0 draws; a plotting failure never fails the run."""
    import jax
    if jax.process_index() != 0:
        return
    try:
        written = write_report(workdir)
    except Exception as e:  # noqa: BLE001: the run's results are already saved; the pictures are extra
        print(f"[report] no plots: {type(e).__name__}: {e}", flush=True)
        return
    print(f"[report] {len(written)} plots in {os.path.join(workdir, REPORT_DIR)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"report: expected one argument, the workdir; got {argv}\n{__doc__}", file=sys.stderr)
        return 2
    try:
        written = write_report(argv[0])
    except ValueError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
