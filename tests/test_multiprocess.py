"""A multi-controller run on CPU and elastic restores of its checkpoint (slow: ~5 minutes on 2 cores).

`bench/multiprocess_cpu.sh` starts 2 processes x 4 CPU devices (coordinator on localhost, gloo
collectives) training `experiments/tiny_moe.py` (tiny MoE, mesh fsdp=4 x expert=2, 2 data shards),
stopping after step 3 with a checkpoint. The reference is one process x 8 devices running all 6
steps with the same config. Checked:
- the 2-process losses equal the reference's (|diff| <= 1e-5) and both processes really took part;
- copies of the 2-process workdir continue on 1 process x 8 devices with mesh fsdp=2 x expert=4,
  and on 1 device: steps 4-6 have the reference's losses, and the data state they save at step 6
  (every shard's Grain state, global position 6) equals the reference's;
- the 2-process checkpoint's data state equals the reference's at step 3.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_training_fixtures import REPO, read_metrics

pytestmark = pytest.mark.slow

CONFIG = "--config=experiments/tiny_moe.py"
STOP = 3
TOL = 1e-5


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _main(workdir, devices, *flags):
    cmd = [sys.executable, "-m", "llada2_jax.main", CONFIG, f"--workdir={workdir}", *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _data_state(workdir, step) -> dict:
    with open(os.path.join(workdir, "checkpoints", "wsd", str(step), "data_shards", "metadata")) as f:
        return json.load(f)


def _losses(workdir) -> dict[int, float]:
    return {step: v for (_, step), v in read_metrics(workdir).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    dirs = {name: str(root / name) for name in ("reference", "two_process", "restored_8", "restored_1")}
    _main(dirs["reference"], 8)
    env = dict(_env(1), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "multiprocess_cpu.sh"), dirs["two_process"],
                           f"--config.train.stop_after_steps={STOP}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    logs = {i: open(os.path.join(dirs["two_process"], f"process_{i}.log")).read() for i in (0, 1)}
    assert proc.returncode == 0, proc.stderr + logs[0][-3000:] + logs[1][-3000:]
    shutil.copytree(dirs["two_process"], dirs["restored_8"])
    shutil.copytree(dirs["two_process"], dirs["restored_1"])
    _main(dirs["restored_8"], 8, "--config.mesh.fsdp=2", "--config.mesh.expert=4")
    _main(dirs["restored_1"], 1, "--config.mesh.fsdp=1", "--config.mesh.expert=1")
    return dirs, logs


def test_two_processes_train_like_one(runs):
    dirs, logs = runs
    for i in (0, 1):
        assert f"process {i}/2: 4 local of 8 cpu devices" in logs[i], logs[i][-2000:]
        assert f"saved step {STOP}" in logs[i]
    ref, two = _losses(dirs["reference"]), _losses(dirs["two_process"])
    assert sorted(two) == list(range(1, STOP + 1)) and sorted(ref) == list(range(1, 7))
    diffs = [abs(two[s] - ref[s]) for s in two]
    assert max(diffs) <= TOL, (ref, two)
    assert _data_state(dirs["two_process"], STOP) == _data_state(dirs["reference"], STOP)
    assert _data_state(dirs["two_process"], STOP)["position"] == STOP


@pytest.mark.parametrize("name", ["restored_8", "restored_1"])
def test_restore_onto_another_layout_continues_the_run(runs, name):
    dirs, _ = runs
    ref, got = _losses(dirs["reference"]), _losses(dirs[name])
    continued = [s for s in got if s > STOP]
    assert continued == [4, 5, 6], got
    assert max(abs(got[s] - ref[s]) for s in continued) <= TOL, (ref, got)
    state = _data_state(dirs[name], 6)
    assert state["position"] == 6 and state == _data_state(dirs["reference"], 6)
