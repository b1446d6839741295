"""`--config.distributed=True` reads the job layout from the environment; a bad layout is one line, exit 2."""
import os
import subprocess
import sys

import pytest

from test_training_fixtures import REPO
from llada2_jax.distributed import job_layout

FULL = {"JAX_COORDINATOR_ADDRESS": "localhost:12355", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}


def test_layout_from_environment():
    assert job_layout({}) == {}  # nothing set: JAX detects the cluster (TPU VM, SLURM, ...)
    assert job_layout(FULL) == dict(coordinator_address="localhost:12355", num_processes=2, process_id=1)


@pytest.mark.parametrize("change, message", [
    ({"JAX_PROCESS_ID": ""}, r"JAX_PROCESS_ID not set"),
    ({"JAX_COORDINATOR_ADDRESS": "", "JAX_NUM_PROCESSES": ""}, r"JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES not set"),
    ({"JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"),
    ({"JAX_NUM_PROCESSES": "two"}, r"JAX_NUM_PROCESSES='two' must be an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost"}, r"JAX_COORDINATOR_ADDRESS='localhost' must be host:port"),
])
def test_bad_layout_names_the_variable(change, message):
    with pytest.raises(ValueError, match=message):
        job_layout({**FULL, **change})


def test_cli_reports_a_bad_layout_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2")
    proc = subprocess.run([sys.executable, "-m", "llada2_jax.main", "--config=experiments/tiny_moe.py",
                           "--config.distributed=True", f"--workdir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "config error: --config.distributed=True: JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID not set"), proc.stderr
    assert "Traceback" not in proc.stderr
