"""PNG plots of an evaluation and of training runs (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def frontier(rows: Sequence[dict], path: str) -> str:
    """Accuracy against tokens per forward, one curve per model and decoder kind (its thresholds are
    the points; token-editing presets are their own curves)."""
    fig, ax = _pyplot().subplots(figsize=(6, 4.2))
    for model, decoder in dict.fromkeys((r["model"], _curve(r)) for r in rows):
        points = sorted((r["tokens_per_forward"], 100 * r["accuracy"], r.get("threshold"))
                        for r in rows if r["model"] == model and _curve(r) == decoder)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=model if decoder in ("block", "ar") else f"{model} ({decoder})")
        for x, y, threshold in points:
            if threshold is not None:
                ax.annotate(f"{threshold:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    return _save(fig, ax, path, "tokens per forward", "accuracy (%)",
                 "speed / quality frontier (points: confidence thresholds)")


def _curve(row: dict) -> str:
    return row.get("decoder", "block")


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_loss(workdirs: Sequence[str], path: str) -> str:
    """Training loss per stage over a common step axis, with each block-size change marked."""
    fig, ax = _pyplot().subplots(figsize=(8, 4.2))
    offset = 0
    for workdir in workdirs:
        records = [r for r in read_metrics(workdir) if "loss" in r]
        for stage in dict.fromkeys(r["stage"] for r in records):
            steps = [r for r in records if r["stage"] == stage]
            xs = [offset + r["step"] for r in steps]
            ax.plot(xs, [r["loss"] for r in steps], marker=".", label=f"{os.path.basename(workdir)}: {stage}")
            previous = None
            for x, r in zip(xs, steps):
                size = r.get("block_size")
                if size != previous:
                    ax.axvline(x, color="grey", alpha=0.25, lw=0.8)
                    ax.annotate("AR" if not size else f"L_B={size}", (x, 1), xycoords=("data", "axes fraction"),
                                rotation=90, va="top", fontsize=7, color="grey")
                    previous = size
            offset = max(xs) if xs else offset
    return _save(fig, ax, path, "training step (stages placed end to end)", "training loss",
                 "training loss per phase (grey: block-size ladder)")


# ---------------------------------------------------------------- one run, from its metrics.jsonl

DPI = 120
RUN_FIGSIZE = (11.0, 7.0)         # training.png: training loss over held-out metrics
THROUGHPUT_FIGSIZE = (11.0, 4.0)  # throughput.png
SWEEP_FIGSIZE = (10.0, 4.2)       # thresholds.png: accuracy and tokens/forward per threshold
HELDOUT_PREFIX, PHASE_START_PREFIX = "eval_", "eval_start_"


def png_size(figsize: tuple[float, float]) -> tuple[int, int]:
    """(width, height) in pixels of a figure of `figsize` inches saved at `DPI`."""
    return round(figsize[0] * DPI), round(figsize[1] * DPI)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Timeline:
    """The records of one run on a common x axis: its training stages placed end to end.

    A stage with a `loss` record is a training stage; it starts where the previous one ended.
    Other stages (merge, eval) only score: their points sit at the end of the training before them.
    A step logged twice (a resumed run) keeps its last value.
    """

    def __init__(self, records: Sequence[dict]):
        trained = {r["stage"] for r in records if "loss" in r and "stage" in r}
        self.records = [r for r in records if "stage" in r and _is_number(r.get("step"))]
        self.offsets: dict[str, int | None] = {}  # x of a training stage's step 0; None: a scoring stage
        self.stage_spans: list[tuple[str, int, int]] = []  # (training stage, x of step 0, x of its last step)
        self.scoring_x: dict[str, int] = {}  # scoring stage -> x
        end = 0
        for stage in dict.fromkeys(r["stage"] for r in self.records):
            if stage in trained:
                last = max(r["step"] for r in self.records if r["stage"] == stage)
                self.offsets[stage] = end
                self.stage_spans.append((stage, end, end + last))
                end += last
            else:
                self.offsets[stage] = None
                self.scoring_x[stage] = end

    def x(self, record: dict) -> float:
        offset = self.offsets.get(record["stage"])
        return self.scoring_x[record["stage"]] if offset is None else offset + record["step"]

    def series(self, key: str, training_only: bool = True) -> dict[str, list[tuple[float, float]]]:
        """stage -> sorted (x, value) of `key` (last value per step)."""
        points: dict[str, dict[float, float]] = {}
        for r in self.records:
            if _is_number(r.get(key)) and (self.offsets.get(r["stage"]) is not None or not training_only):
                points.setdefault(r["stage"], {})[self.x(r)] = float(r[key])
        return {stage: sorted(p.items()) for stage, p in points.items()}

    def heldout_keys(self) -> list[str]:
        """The held-out metrics logged (`eval_*`: NELBO, AR loss, response NLL), in order of appearance."""
        keys = dict.fromkeys(k for r in self.records for k, v in r.items()
                             if k.startswith(HELDOUT_PREFIX) and _is_number(v))
        return list(keys)

    def phases(self) -> list[tuple[str, str, int | None, float, float]]:
        """(stage, phase, block size, first x, last x) of each training phase, in order. A phase runs
        from the previous phase's last training step (or its stage's step 0) to its own last one."""
        last: dict[tuple[str, str], list] = {}
        for r in self.records:
            if "loss" in r and self.offsets.get(r["stage"]) is not None and r.get("phase") is not None:
                entry = last.setdefault((r["stage"], r["phase"]), [r.get("block_size"), self.x(r)])
                entry[1] = max(entry[1], self.x(r))
        spans, previous = [], {}
        for (stage, phase), (size, hi) in last.items():
            lo = previous.get(stage, self.offsets[stage])
            spans.append([stage, phase, size, lo, hi])
            previous[stage] = hi
        stage_end = {stage: end for stage, _, end in self.stage_spans}
        for i, span in enumerate(spans):  # the last phase of a stage runs to the stage's last step
            if i + 1 == len(spans) or spans[i + 1][0] != span[0]:
                span[4] = stage_end[span[0]]
        return [tuple(span) for span in spans]


def _phase_label(phase: str, block_size) -> str:
    if block_size == 0:
        return "AR" if phase.lower() == "ar" else f"{phase} (AR)"
    if block_size is None or phase.endswith(f"_{block_size}"):
        return phase
    return f"{phase} B={block_size}"


def _mark_phases(ax, timeline: Timeline, labels: bool) -> None:
    """Shade each training phase (alternating), name it with its block size, and draw stage borders."""
    for i, (_, phase, size, lo, hi) in enumerate(timeline.phases()):
        ax.axvspan(lo, hi, color="tab:blue" if i % 2 else "tab:orange", alpha=0.07, lw=0)
        if labels:
            ax.annotate(_phase_label(phase, size), (lo, 1), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="left", fontsize=6, color="dimgrey", xytext=(1, -2), textcoords="offset points")
    for stage, lo, _ in timeline.stage_spans:
        ax.axvline(lo, color="black", alpha=0.5, lw=0.8)
        ax.annotate(stage, (lo, 0), xycoords=("data", "axes fraction"), va="bottom", ha="left", fontsize=7,
                    xytext=(2, 2), textcoords="offset points", weight="bold")


def _finish(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def run_curves(records: Sequence[dict], path: str, title: str = "") -> str:
    """Training loss (top) and held-out metrics (bottom) per step, the WSD phases and block sizes shaded
    and named; stages end to end. Hollow markers: a metric measured at the start of a phase."""
    timeline = Timeline(records)
    fig, (top, bottom) = _pyplot().subplots(2, 1, figsize=RUN_FIGSIZE, sharex=True)
    colors = {}
    for stage, points in timeline.series("loss").items():
        line, = top.plot([p[0] for p in points], [p[1] for p in points], marker=".", ms=3, lw=1, label=stage)
        colors[stage] = line.get_color()
    if not colors:
        _empty(top, "no training loss logged")
    plotted = False
    for k, key in enumerate(timeline.heldout_keys()):
        at_start = key.startswith(PHASE_START_PREFIX)
        marker = "os^Dv<>p"[k % 8]
        for stage, points in timeline.series(key, training_only=False).items():
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            scoring = timeline.offsets.get(stage) is None
            bottom.plot(xs, ys, ls="none" if (at_start or scoring) else "-", marker="*" if scoring else marker,
                        ms=9 if scoring else 5, mfc="none" if at_start else None, lw=1,
                        color=colors.get(stage), label=f"{stage}: {key}")
            plotted = True
    if not plotted:
        _empty(bottom, "no held-out evaluation logged")
    for ax, ylabel in ((top, "training loss"), (bottom, "held-out (nats/token)")):
        _mark_phases(ax, timeline, labels=ax is top)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best", ncol=2)
    bottom.set_xlabel("step (training stages end to end; shaded: phases, named with their block size)")
    top.set_title(title or "training loss and held-out NELBO per step")
    return _finish(fig, path)


def throughput(records: Sequence[dict], path: str, title: str = "") -> str:
    """Training tokens/s per logged window; the first window of a phase includes its compilation."""
    timeline = Timeline(records)
    fig, ax = _pyplot().subplots(figsize=THROUGHPUT_FIGSIZE)
    values = []
    for stage, points in timeline.series("tokens_per_sec").items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=1, label=stage)
        values += [p[1] for p in points if p[1] > 0]
    if not values:
        _empty(ax, "no tokens/s logged")
    elif max(values) / min(values) > 30:
        ax.set_yscale("log")
    _mark_phases(ax, timeline, labels=False)
    ax.set_xlabel("step (training stages end to end)")
    ax.set_ylabel("tokens / s")
    ax.grid(alpha=0.3, which="both")
    if values:
        ax.legend(fontsize=7)
    ax.set_title(title or "training throughput (first window of each phase includes compilation)")
    return _finish(fig, path)


def threshold_sweep(rows: Sequence[dict], path: str, title: str = "") -> str:
    """Accuracy and tokens per forward against the confidence threshold, one line per model; a model
    decoded without a threshold (the AR twin) is a dashed horizontal line."""
    fig, (acc, tpf) = _pyplot().subplots(1, 2, figsize=SWEEP_FIGSIZE)
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        swept = sorted((r["threshold"], r) for r in mine if r.get("threshold") is not None)
        for ax, key, scale in ((acc, "accuracy", 100), (tpf, "tokens_per_forward", 1)):
            if swept:
                ax.plot([t for t, _ in swept], [scale * r[key] for _, r in swept], marker="o", label=model)
            for r in mine:
                if r.get("threshold") is None:
                    ax.axhline(scale * r[key], ls="--", color="grey", lw=1)
                    ax.annotate(f"{model} (AR)", (0, scale * r[key]), xycoords=("axes fraction", "data"), fontsize=7,
                                color="grey", xytext=(2, 2), textcoords="offset points")
    for ax, ylabel in ((acc, "accuracy (%)"), (tpf, "tokens per forward")):
        ax.set_xlabel("confidence threshold")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title or "block threshold decoding: accuracy and tokens per forward per threshold")
    return _finish(fig, path)
