"""`python -m llada2_jax.main` end to end: the tiny_wsd smoke run, and a bad config failing at start-up."""
import json
import os
import subprocess
import sys

from test_training_fixtures import REPO, read_metrics

ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def test_tiny_wsd_smoke_runs_every_stage(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "llada2_jax.main", "--config=experiments/tiny_wsd.py",
                           "--config.smoke=True", f"--workdir={workdir}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = json.loads((workdir / "final.json").read_text())
    assert final["completed"] == ["ar_pretrain", "wsd", "merge", "eval"]
    losses = read_metrics(str(workdir))
    assert {s for s, _ in losses} == {"ar_pretrain", "wsd"}
    phases = {json.loads(l).get("phase") for l in (workdir / "metrics.jsonl").read_text().splitlines()
              if json.loads(l)["stage"] == "wsd"}
    assert phases == {"warmup_1", "warmup_4", "warmup_32", "stable_32", "decay_16"}
    nelbo = read_metrics(str(workdir), "eval_nelbo")
    assert ("merge", 6) in nelbo and ("eval", 0) in nelbo
    assert "[eval] held-out NELBO" in proc.stdout
    assert os.listdir(workdir / "merged") and (workdir / "tensorboard").is_dir()


def test_bad_config_fails_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llada2_jax.main", "--config=experiments/tiny_wsd.py",
                           f"--workdir={tmp_path / 'run'}", "--config.wsd.warmup_sizes=(1,3)"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "wsd.warmup_sizes" in proc.stderr and "does not divide seq_len=256" in proc.stderr
    assert not (tmp_path / "run").exists()
