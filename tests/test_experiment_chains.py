"""The experiment files of every model size, in smoke mode, chained as a user runs them.

`<size>_wsd.py`, then `<size>_sft.py`, `<size>_cap.py` and `<size>_dpo.py`, each started with
`--config.init_from=` the previous stage's workdir, through `python -m llada2_jax.main` in a
subprocess. The tiny size runs the same chain in test_posttrain_chain.py (and tiny_wsd with every
stage in test_main_smoke.py). The stage files select from one definition per size: the cheap
tests check that `experiments/<size>_<stage>.py` is `experiments/<size>.py:<stage>`.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from test_training_fixtures import REPO

SIZES = ("tiny", "smollm2", "mini", "flash")
STAGES = ("wsd", "sft", "cap", "dpo")


def _load_config(path: str):
    """What `--config=<path>[:<stage>]` gives main: the file loaded by path, then get_config(*stage)."""
    file, *stage = path.split(":", 1)
    spec = importlib.util.spec_from_file_location("experiment", os.path.join(REPO, file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*stage)


@pytest.mark.parametrize("size", SIZES)
def test_stage_files_are_selections_of_one_definition(size):
    for stage in STAGES:
        by_file = _load_config(f"experiments/{size}_{stage}.py").to_dict()
        assert by_file == _load_config(f"experiments/{size}.py:{stage}").to_dict()
        assert stage in by_file["stages"].split(",")
    assert _load_config(f"experiments/{size}.py").to_dict() == _load_config(f"experiments/{size}_wsd.py").to_dict()


def test_unknown_stage_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"experiments/mini.py has no stage 'sfx'; expected one of wsd, sft, cap, dpo"):
        _load_config("experiments/mini.py:sfx")


def _main(config: str, workdir, *overrides: str, env: dict) -> None:
    cmd = [sys.executable, "-m", "llada2_jax.main", f"--config=experiments/{config}.py", f"--workdir={workdir}",
           "--config.smoke=True", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{config} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _final(workdir) -> dict:
    with open(os.path.join(workdir, "final.json")) as f:
        return json.load(f)


def _losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """mini and flash shrink to the same smoke model: a shared XLA cache compiles it once."""
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.mark.slow
@pytest.mark.parametrize("size", ["smollm2", "mini", "flash"])
def test_smoke_chain(size, tmp_path, compile_cache):
    if size == "smollm2":
        from llada2_jax.interop import gguf as gguf_io
        try:
            gguf_io.smollm2_gguf_path()
        except ValueError as e:
            pytest.skip(str(e))
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compile_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    previous = None
    for stage in STAGES:
        workdir = tmp_path / stage
        init = [f"--config.init_from={previous}"] if previous else []
        _main(f"{size}_{stage}", workdir, *init, env=env)
        final = _final(workdir)
        assert final["completed"] == (["wsd", "merge", "eval"] if stage == "wsd" else [stage])
        assert (workdir / "tokenizer").is_dir()
        losses = _losses(workdir)
        assert losses and all(math.isfinite(x) for x in losses)
        previous = workdir
