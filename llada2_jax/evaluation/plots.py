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
    """Accuracy against tokens per forward, one curve per model (its thresholds are the points)."""
    fig, ax = _pyplot().subplots(figsize=(6, 4.2))
    for model in dict.fromkeys(r["model"] for r in rows):
        points = sorted((r["tokens_per_forward"], 100 * r["accuracy"], r.get("threshold"))
                        for r in rows if r["model"] == model)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
        for x, y, threshold in points:
            if threshold is not None:
                ax.annotate(f"{threshold:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    return _save(fig, ax, path, "tokens per forward", "accuracy (%)",
                 "speed / quality frontier (points: confidence thresholds)")


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
