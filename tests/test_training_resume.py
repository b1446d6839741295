"""Deterministic resume and graceful stop.

- 6 steps straight == 3 steps, stop (checkpoint), restart, 3 more steps: same losses, same params.
  The 6 steps cross a WSD phase boundary (block 16 -> 8), so the restart also recompiles.
- SIGTERM to `python -m llada2_jax.main` mid-run: a checkpoint is written and the exit code is 0.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from test_training_fixtures import REPO, read_metrics, tiny_train_config, train_tokenizer
from llada2_jax.training import model_source as ms
from llada2_jax.training.run import Run
from llada2_jax.training.trainer import Preempted


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(str(tmp_path_factory.mktemp("tok")))


def _config(tokenizer_dir, stop_after=0):
    c = tiny_train_config(tokenizer_dir)
    c.wsd.update(dict(steps_per_decay=3, decay_min=8))  # decay_16 (3 steps), decay_8 (3 steps)
    c.train.update(dict(grad_accum=1, checkpoint_every=2, stop_after_steps=stop_after))
    return c


def test_resume_is_deterministic(tmp_path, tokenizer_dir):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    Run(_config(tokenizer_dir), straight).execute()
    with pytest.raises(Preempted):
        Run(_config(tokenizer_dir, stop_after=3), resumed).execute()
    assert read_metrics(resumed).keys() == {("wsd", s) for s in (1, 2, 3)}
    Run(_config(tokenizer_dir), resumed).execute()  # a fresh process would do exactly this

    a, b = read_metrics(straight), read_metrics(resumed)
    assert sorted(a) == [("wsd", s) for s in range(1, 7)]
    assert a == b, (a, b)
    runs = {name: Run(_config(tokenizer_dir), path) for name, path in (("a", straight), ("b", resumed))}
    params = {name: ms.place_weights(ms.Source("workdir", r.workdir, r.model_config), r.layout, r.mesh, 0)[0]
              for name, r in runs.items()}
    for x, y in zip(jax.tree.leaves(params["a"]), jax.tree.leaves(params["b"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _last_trained_step(workdir) -> int:
    """The highest step with a training loss logged so far (0 before the first)."""
    try:
        return max((step for _, step in read_metrics(workdir)), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half-written
        return 0


def test_sigterm_saves_and_exits_zero(tmp_path, tokenizer_dir):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "llada2_jax.main", "--config=experiments/tiny_wsd.py", "--config.smoke=True",
           f"--workdir={workdir}", "--config.stages=ar_pretrain", "--config.tokenizer.kind=dir",
           f"--config.tokenizer.path={tokenizer_dir}", "--config.data.max_bytes=100000",
           "--config.ar_pretrain.steps=100000", "--config.train.checkpoint_every=100000",
           "--config.train.log_every=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    deadline = time.time() + 600
    while _last_trained_step(workdir) < 2:  # eval lines (step 0, no loss) do not count
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training never logged a step"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM" in out
    steps = [int(d) for d in os.listdir(workdir / "checkpoints" / "ar_pretrain") if d.isdigit()]
    assert steps and max(steps) >= 2  # saved where it stopped, not at a checkpoint_every boundary
    assert not (workdir / "final.json").exists()  # the stage is not marked complete
