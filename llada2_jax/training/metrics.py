"""Where metrics go: `WORKDIR/metrics.jsonl`, TensorBoard, and a progress bar on a terminal.

Only process 0 writes, so a multi-host run produces one file. The JSONL file is appended to, so a
resumed run continues the same record (a resumed step can appear twice; readers keep the last).
"""
from __future__ import annotations

import json
import math
import os
import sys

import jax
import numpy as np


def _plain(value):
    """JSON-safe scalar: numpy/jax scalars to Python, non-finite floats to strings."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    value = float(np.asarray(value))
    return value if math.isfinite(value) else str(value)


class MetricsLogger:
    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb_dir = os.path.join(workdir, "tensorboard")
        self._tb = None  # opened on the first write: a run that never logs leaves no writer thread behind
        if self.active:
            os.makedirs(workdir, exist_ok=True)

    def _tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self._tb_dir)
        return self._tb

    def write(self, record: dict) -> None:
        """One JSON line; numeric fields also go to TensorBoard under `<stage>/<name>`."""
        if not self.active:
            return
        record = {k: _plain(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        stage, step = record.get("stage", "train"), record.get("step", 0)
        tb = self._tensorboard()
        for key, value in record.items():
            if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
                if key != "step":
                    tb.add_scalar(f"{stage}/{key}", value, step)
        tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A tqdm bar with ETA when stderr is a terminal (and on process 0); silent otherwise."""

    def __init__(self, total: int, initial: int, desc: str):
        self._bar = None
        if jax.process_index() == 0 and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _plain(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
