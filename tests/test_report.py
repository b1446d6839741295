"""`python -m llada2_jax.report WORKDIR`: PNGs of a run from its metrics.jsonl and evaluation results.

The fast tests write metrics in the trainer's format (WSD phases, phase-start evaluations, a merge
and an eval stage, a step logged twice by a resumed run); the slow one runs the tiny smoke
experiment through `main`, which draws the report at its end, and opens the PNGs.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llada2_jax import report
from llada2_jax.evaluation import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WSD_PHASES = [("warmup_1", 1), ("warmup_4", 4), ("stable_8", 8), ("decay_4", 4)]
FIGSIZES = {"training.png": plots.RUN_FIGSIZE, "throughput.png": plots.THROUGHPUT_FIGSIZE,
            "thresholds.png": plots.SWEEP_FIGSIZE}


def wsd_records(seed: int = 0) -> list[dict]:
    """An AR stage, a 4-phase WSD stage (2 steps a phase), then merge and eval, as the trainer logs them."""
    rng = np.random.default_rng(seed)
    records = [{"step": 0, "stage": "ar_pretrain", "phase": "ar", "block_size": 0, "eval_start_loss": 6.0}]
    for step in (1, 2, 3):
        records.append({"step": step, "stage": "ar_pretrain", "phase": "ar", "block_size": 0,
                        "loss": 6 - step * 0.1, "tokens_per_sec": 100.0 + rng.random()})
    records.append({"step": 3, "stage": "ar_pretrain", "phase": "ar", "block_size": 0, "eval_loss": 5.5})
    step = 0
    for phase, size in WSD_PHASES:
        records.append({"step": step, "stage": "wsd", "phase": phase, "block_size": size,
                        "eval_start_nelbo": 5.0 + rng.random()})
        for _ in range(2):
            step += 1
            records.append({"step": step, "stage": "wsd", "phase": phase, "block_size": size,
                            "loss": 5.0 - 0.1 * step + rng.random() * 0.05,
                            "tokens_per_sec": 50.0 * (1 + rng.random()), "masked_acc": 0.1})
        records.append({"step": step, "stage": "wsd", "phase": phase, "block_size": size, "eval_nelbo": 5 - step / 10})
    records.append({"step": step, "stage": "merge", "phase": "decay_4", "block_size": 4, "eval_nelbo": 4.0,
                    "merged_steps": "[8, 7]"})
    records.append({"step": 0, "stage": "eval", "phase": "eval_4", "block_size": 4, "eval_nelbo": 4.1,
                    "tokens_per_forward": 1.2, "threshold": 0.9})
    return records


def compare_results(models=("run/wsd", "run/sft")) -> dict:
    rows = [{"model": m, "decoder": "block", "threshold": t, "block_size": 4, "accuracy": (i + t) / 4,
             "tokens_per_forward": 3 - 2 * t, "tokens_per_sec": 10.0}
            for i, m in enumerate(models) for t in (0.5, 0.7, 0.9)]
    rows.append({"model": "run/ar_sft", "decoder": "ar", "threshold": None, "block_size": None, "accuracy": 0.3,
                 "tokens_per_forward": 1.0, "tokens_per_sec": 30.0})
    return {"tasks": ["t"], "rows": rows, "items": []}


def write_workdir(path, records, results=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if results is not None:
        os.makedirs(os.path.join(path, "compare"), exist_ok=True)
        with open(os.path.join(path, "compare", "results.json"), "w") as f:
            json.dump(results, f)
    return str(path)


def open_png(path: str, figsize) -> np.ndarray:
    """The image, checked: the size a figure of `figsize` has, and drawn on (not a blank canvas)."""
    import matplotlib.image
    image = matplotlib.image.imread(path)
    width, height = plots.png_size(figsize)
    assert image.shape[:2] == (height, width), (path, image.shape)
    ink = (image[..., :3] < 0.9).any(axis=-1).mean()
    colors = len(np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert ink > 0.02 and colors > 20, (path, ink, colors)
    return image


def test_timeline_places_stages_end_to_end_and_keeps_last_value():
    records = wsd_records()
    records.append({"step": 2, "stage": "wsd", "phase": "warmup_4", "block_size": 4, "loss": 9.0})  # resumed
    timeline = plots.Timeline(records)
    ar_end = max(r["step"] for r in records if r["stage"] == "ar_pretrain")
    assert [(s, lo) for s, lo, _ in timeline.stage_spans] == [("ar_pretrain", 0), ("wsd", ar_end)]
    wsd_losses = {x: v for x, v in timeline.series("loss")["wsd"]}
    assert wsd_losses[ar_end + 2] == 9.0 and len(wsd_losses) == 2 * len(WSD_PHASES)
    phases = [(p, size) for stage, p, size, _, _ in timeline.phases() if stage == "wsd"]
    assert phases == WSD_PHASES
    # a scoring stage sits at the end of the training before it
    end = ar_end + 2 * len(WSD_PHASES)
    assert timeline.series("eval_nelbo", training_only=False)["merge"] == [(end, 4.0)]
    assert "merge" not in timeline.series("eval_nelbo")
    assert timeline.heldout_keys() == ["eval_start_loss", "eval_loss", "eval_start_nelbo", "eval_nelbo"]


@pytest.mark.parametrize("log_every", [1, 2])
def test_phase_spans_tile_each_stage_and_hold_their_steps(log_every):
    """Phases cover their stage without gaps or overlap, and every logged step lies in its own phase."""
    records = [r for r in wsd_records() if "loss" not in r or r["step"] % log_every == 0]
    timeline = plots.Timeline(records)
    for stage, start, end in timeline.stage_spans:
        spans = [(p, lo, hi) for s, p, _, lo, hi in timeline.phases() if s == stage]
        assert spans[0][1] == start and spans[-1][2] == end
        assert all(a[2] == b[1] for a, b in zip(spans, spans[1:]))
        for r in records:
            if r["stage"] == stage and "loss" in r:
                lo, hi = next((lo, hi) for p, lo, hi in spans if p == r["phase"])
                assert lo < timeline.x(r) <= hi


def test_report_writes_every_plot_at_the_expected_size(tmp_path, capsys):
    workdir = write_workdir(tmp_path / "run", wsd_records(), compare_results())
    assert report.main([workdir]) == 0
    printed = capsys.readouterr().out.split()
    names = ["training.png", "throughput.png", "thresholds.png", "frontier.png"]
    assert printed == [os.path.join(workdir, "report", n) for n in names]
    for name, figsize in FIGSIZES.items():
        open_png(os.path.join(workdir, "report", name), figsize)
    open_png(os.path.join(workdir, "report", "frontier.png"), (6, 4.2))


def test_plots_follow_the_data(tmp_path):
    """Different metrics draw different pictures (the figure is not a fixed template)."""
    a = write_workdir(tmp_path / "a" / "run", wsd_records(0))  # same name: the titles match
    b = write_workdir(tmp_path / "b" / "run", [dict(r, loss=r["loss"] * 0.5) if "loss" in r else r
                                       for r in wsd_records(0)])
    report.write_report(a), report.write_report(b)
    for name in ("training.png", "throughput.png"):
        same = np.array_equal(open_png(os.path.join(a, "report", name), FIGSIZES[name]),
                              open_png(os.path.join(b, "report", name), FIGSIZES[name]))
        assert same == (name == "throughput.png"), name  # only the loss changed


def test_without_evaluation_only_training_plots(tmp_path):
    workdir = write_workdir(tmp_path / "run", wsd_records())
    written = report.write_report(workdir)
    assert sorted(os.path.basename(p) for p in written) == ["throughput.png", "training.png"]
    assert sorted(os.listdir(os.path.join(workdir, "report"))) == ["throughput.png", "training.png"]


def test_evaluation_results_alone_and_a_cut_line(tmp_path, capsys):
    """An `evaluate --out=W/eval/results.json` report is found too; a truncated metrics line is skipped."""
    workdir = tmp_path / "run"
    os.makedirs(workdir / "eval")
    (workdir / "eval" / "results.json").write_text(json.dumps(compare_results(("x/wsd",))))
    (workdir / "metrics.jsonl").write_text(json.dumps(wsd_records()[1]) + "\n{\"step\": 4, \"sta")
    written = report.write_report(str(workdir))
    assert len(written) == 4 and "skipped an unreadable line" in capsys.readouterr().err
    open_png(str(workdir / "report" / "thresholds.png"), plots.SWEEP_FIGSIZE)


@pytest.mark.parametrize("make,message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: str(p), "has no metrics.jsonl and no evaluation results"),
])
def test_bad_workdir_is_one_line(tmp_path, capsys, make, message):
    assert report.main([make(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("report: ") and message in err and "\n" not in err


def test_usage_without_a_workdir(capsys):
    assert report.main([]) == 2
    assert "python -m llada2_jax.report WORKDIR" in capsys.readouterr().err


def test_end_of_run_report_never_raises(tmp_path, capsys):
    report.report_at_end_of_run(str(tmp_path))  # nothing to plot: a message, no exception
    assert "[report] no plots" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_smoke_run_draws_its_report(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "llada2_jax.main", "--config=experiments/tiny_wsd.py",
                           "--config.smoke=True", f"--workdir={workdir}"], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"[report] 2 plots in {workdir / 'report'}" in proc.stdout
    for name in ("training.png", "throughput.png"):
        open_png(str(workdir / "report" / name), FIGSIZES[name])
    phases = {r["phase"] for r in report.read_records(str(workdir)) if r.get("stage") == "wsd"}
    timeline = plots.Timeline(report.read_records(str(workdir)))
    assert {p for s, p, *_ in timeline.phases() if s == "wsd"} == phases
