"""The tiny post-training chain end to end: tiny_wsd smoke -> tiny_sft -> tiny_cap -> tiny_dpo.

Each stage runs `python -m llada2_jax.main ... --config.smoke=True` in a subprocess and starts
from the previous run's workdir through `--config.init_from`. Checks what only a real chain shows:
the stages hand weights and tokenizer on, SFT logs its dropped-sample count and held-out response
ELBO, CAP logs both loss terms, DPO starts at log 2 with the previous stage's final learning rate,
and the DPO reference stored in its checkpoint is bit-identical to the CAP output.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(config: str, workdir, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "llada2_jax.main", f"--config=experiments/{config}.py", f"--workdir={workdir}",
           "--config.smoke=True", *overrides]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{config} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _saved_model(workdir) -> dict:
    with open(os.path.join(workdir, "final.json")) as f:
        final = json.load(f)
    return ocp.PyTreeCheckpointer().restore(os.path.join(final["checkpoint_dir"], str(final["step"]), "model"))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _flat(tree[k], prefix + (k,))
    else:
        yield prefix, np.asarray(tree)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("posttrain_chain")
    dirs = {name: base / name for name in ("wsd", "sft", "cap", "dpo")}
    _main("tiny_wsd", dirs["wsd"], "--config.stages=ar_pretrain,wsd")
    _main("tiny_sft", dirs["sft"], f"--config.init_from={dirs['wsd']}")
    _main("tiny_cap", dirs["cap"], f"--config.init_from={dirs['sft']}")
    _main("tiny_dpo", dirs["dpo"], f"--config.init_from={dirs['cap']}")
    return dirs


def test_each_stage_completes_and_hands_on_its_output(chain):
    for name in ("sft", "cap", "dpo"):
        with open(chain[name] / "final.json") as f:
            assert json.load(f)["completed"] == [name]
        assert (chain[name] / "tokenizer").is_dir()


def test_sft_logs_dropped_samples_and_heldout_response_elbo(chain):
    records = _records(chain["sft"])
    counts = [r for r in records if "num_dropped" in r]
    assert counts and counts[0]["num_samples"] > 0 and counts[0]["num_dropped"] >= 0
    train = [r for r in records if "loss" in r]
    # complementary masking: 2 model rows per packed data row (smoke batch_size = 2)
    assert train and all(r["rows"] == 4 and r["samples"] >= 2 for r in train)
    assert all(math.isfinite(r["loss"]) for r in train)
    assert any(math.isfinite(r.get("eval_response_nelbo", math.nan)) for r in records)


def test_cap_logs_both_terms(chain):
    train = [r for r in _records(chain["cap"]) if "loss" in r]
    for r in train:
        assert "sft_loss" in r and "cap_entropy" in r and r["cap_entropy"] >= 0
        np.testing.assert_allclose(r["loss"], r["sft_loss"] + 2.0 * r["cap_entropy"], rtol=1e-5)


def test_dpo_starts_at_log2_with_previous_final_lr(chain):
    cap_lr = [r["lr"] for r in _records(chain["cap"]) if "lr" in r][-1]
    train = [r for r in _records(chain["dpo"]) if "loss" in r]
    np.testing.assert_allclose(train[0]["loss"], math.log(2.0), rtol=1e-5)
    np.testing.assert_allclose(train[0]["lr"], cap_lr, rtol=1e-6)
    assert {"reward_margin", "reward_accuracy"} <= set(train[0])


def test_dpo_reference_is_the_unchanged_starting_model(chain):
    start = _saved_model(chain["cap"])
    start = _merge(start["params"], start.get("buffers") or {})
    dpo_dir = chain["dpo"] / "checkpoints" / "dpo"
    last = max(int(p.name) for p in dpo_dir.iterdir() if p.name.isdigit())
    state = ocp.PyTreeCheckpointer().restore(str(dpo_dir / str(last) / "model"))
    reference = dict(_flat(state["buffers"]["reference"]))
    expected = dict(_flat(start))
    assert reference.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(reference[key], value, err_msg=str(key))
    # the policy did move, and it is what the run hands on
    policy = dict(_flat(_saved_model(chain["dpo"])["params"]))
    assert any(not np.array_equal(policy[k], expected[k]) for k in policy)


def test_a_run_can_start_from_one_stage_of_an_earlier_run(chain):
    """`model.source=workdir:<dir>@<stage>` loads that stage's latest checkpoint, not the run's final
    output: a variant (e.g. an editing SFT) branches off an earlier stage of a conversion."""
    from llada2_jax import workdir as wd
    from llada2_jax.training import mesh as mesh_lib, model_source as ms
    directory = str(chain["wsd"])
    config = wd.load_model_config(directory)
    layout = ms.ModelLayout.build(config, {"data": 1})
    mesh = mesh_lib.make_mesh({"data": 1})
    placed = ms.place_weights(ms.Source("workdir", f"{directory}@ar_pretrain", config), layout, mesh, 0)[0]
    _, ar_params, _ = wd.split_model(wd.load_model(directory, "ar_pretrain"))
    _, final_params, _ = wd.split_model(wd.load_model(directory))
    got, ar, final = dict(_flat(placed)), dict(_flat(ar_params)), dict(_flat(final_params))
    assert got.keys() == ar.keys()
    for key in ar:
        np.testing.assert_array_equal(got[key], ar[key], err_msg=str(key))
    assert any(not np.array_equal(ar[k], final[k]) for k in ar)  # the two stages really differ


def test_a_missing_stage_source_is_a_one_line_error(chain):
    from llada2_jax.configs import tiny
    from llada2_jax.training.validate import validate_config
    config = tiny.get_config("sft")
    with config.unlocked():
        config.init_from = ""
        config.model.source = f"workdir:{chain['wsd']}@nosuchstage"
    with pytest.raises(ValueError, match=r"model.source=.*nosuchstage.*stages with checkpoints"):
        validate_config(config, 1)
