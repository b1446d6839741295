"""A user mistake on the command line gives one line naming the value and what is valid, exit code 2.

`generate` runs in-process (its flags are its own); `main` runs as a subprocess, as a user runs it.
"""
import os
import subprocess
import sys

import pytest

from test_inference_cli import write_run
from test_inference_decode import constant_model
from test_training_fixtures import REPO

from llada2_jax import generate as cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    write_run(workdir, constant_model({7: 0.99}))
    return str(workdir)


def _one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.parametrize("args,expected", [
    (["--gen_length=0"], "--gen_length=0"),
    (["--block_size=0"], "--block_size=0"),
    (["--threshold=1.5"], "--threshold=1.5 must be in [0, 1]"),
    (["--gen_length=500"], "max_position_embeddings=128"),
    (["--stage=wsdd"], "stage 'wsdd'"),
    (["--gen_length=abc"], "gen_length"),
    (["--no_such_flag=1"], "no_such_flag"),
])
def test_generate_mistakes(run_dir, capsys, args, expected):
    assert cli.main([f"--workdir={run_dir}", "--prompt=w5 w9", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert expected in _one_line(err)


def test_generate_missing_workdir(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert cli.main([f"--workdir={missing}", "--prompt=hi"]) == 2
    assert f"--workdir={missing!r} does not exist" in _one_line(capsys.readouterr()[1])


def test_generate_help_lists_flags(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr()[0]
    for flag in ("--workdir", "--prompt", "--gen_length", "--block_size", "--threshold", "--ar", "--stage"):
        assert flag in out


def test_generate_reads_old_model_config_with_runtime_keys(run_dir, capsys, tmp_path):
    """A model_config.json that still lists runtime settings (e.g. pallas) loads with them ignored."""
    import json
    import shutil
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    config = json.loads((old / "model_config.json").read_text())
    assert "attention_impl" not in config  # written as architecture only
    config.update(attention_impl="pallas", gmm_impl="pallas", dtype="bfloat16")
    (old / "model_config.json").write_text(json.dumps(config))
    assert cli.main([f"--workdir={old}", "--prompt=w5 w9", "--gen_length=8", "--block_size=8"]) == 0
    assert capsys.readouterr()[0].strip()


def _main(*args):
    proc = subprocess.run([sys.executable, "-m", "llada2_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("args,expected", [
    (["--config=experiments/no_such_experiment.py"], "--config='experiments/no_such_experiment.py': no such"),
    (["--config=experiments/tiny_wsd.py", "--config.data.blok=3"], "--config.data.blok: unknown field 'blok'"),
    (["--config=experiments/tiny_wsd.py", "--config.model.source=hf:{empty}"], "holds no config.json"),
    (["--config=experiments/tiny_wsd.py", "--config.model.runtime.attention_impl=palas"],
     "model.runtime.attention_impl='palas'"),
])
def test_main_mistakes(tmp_path, args, expected):
    args = [a.format(empty=tmp_path) for a in args]
    code, out, err = _main(*args, f"--workdir={tmp_path / 'run'}")
    assert code == 2, err
    assert expected.format(empty=tmp_path) in _one_line(err)
    assert not (tmp_path / "run").exists()  # nothing started
