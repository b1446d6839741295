"""Restoring onto another layout: data state across process counts, weights across meshes, clear mismatches.

- Data: the global batches of 2 data shards read by 2 (simulated) processes equal those read by one
  process; the per-shard state they save restores into one process, which continues with the
  batches the uninterrupted single-process iterator yields (same global position).
- Weights: a TrainState saved from an fsdp=4 x expert=2 mesh (8 fake CPU devices) restores
  bit-exactly onto fsdp=2 x expert=4 and onto one device, each array with the target's sharding.
- A checkpoint of another model fails with one line naming the tensor, in the API and from the CLI.
The 2-process run itself, and training continued from its checkpoint, are in test_multiprocess.py.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_training_fixtures import REPO, train_tokenizer
from llada2_jax.data import corpora, pipeline
from llada2_jax.data.tokenizers import load_tokenizer
from llada2_jax.training.checkpoint import Checkpointer, CheckpointMismatch
from llada2_jax.training.data_shards import DataShardError, ShardedBatches

GLOBAL_BATCH, SEQ_LEN = 8, 32


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(str(tmp_path_factory.mktemp("tok")))


class RowsOf:
    """Stands in for a batch sharding: this 'process' holds global rows [start, stop)."""

    def __init__(self, start, stop):
        self.start, self.stop = start, stop

    def addressable_devices_indices_map(self, shape):
        return {"device": (slice(self.start, self.stop), slice(None))}


def _batches(tokenizer_dir, sharding, num_shards=2):
    tokenizer = load_tokenizer(tokenizer_dir)
    docs = corpora.load_corpus("stdlib", split="train", max_bytes=40_000)

    def make_shard(index, count, rows):
        return pipeline.pretrain_dataset(docs, tokenizer, seq_len=SEQ_LEN, batch_size=rows, seed=7, num_epochs=None,
                                         shard_index=index, shard_count=count)

    return ShardedBatches(make_shard, num_shards=num_shards, global_batch=GLOBAL_BATCH, sharding=sharding)


def test_data_state_moves_between_process_counts(tokenizer_dir):
    one = _batches(tokenizer_dir, RowsOf(0, GLOBAL_BATCH))
    assert one.shards == [0, 1]
    expected = [next(one) for _ in range(6)]
    procs = [_batches(tokenizer_dir, RowsOf(0, 4)), _batches(tokenizer_dir, RowsOf(4, 8))]
    assert [p.shards for p in procs] == [[0], [1]]
    for step in range(3):  # the 2-process global batch = process 0's rows, then process 1's
        local = [next(p) for p in procs]
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), expected[step][key])
    # what Checkpointer.save gathers, through a JSON round trip as Orbax stores it
    saved = procs[0].local_state()
    saved["shards"].update(procs[1].local_state()["shards"])
    saved = json.loads(json.dumps(saved))
    assert saved["position"] == 3 and sorted(saved["shards"]) == ["0", "1"]

    resumed = _batches(tokenizer_dir, RowsOf(0, GLOBAL_BATCH))
    resumed.restore(saved)
    assert resumed.position == 3
    for step in (3, 4):
        got = next(resumed)
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(got[key], expected[step][key])
    # and back to 2 processes: process 1 picks up shard 1 where the single process left it
    back = _batches(tokenizer_dir, RowsOf(4, 8))
    back.restore(json.loads(json.dumps(resumed.local_state())))
    np.testing.assert_array_equal(next(back)["tokens"], expected[5]["tokens"][4:])


def test_shard_layout_errors(tokenizer_dir):
    with pytest.raises(DataShardError, match=r"data.shards=3 must divide train.batch_size=8"):
        _batches(tokenizer_dir, RowsOf(0, GLOBAL_BATCH), num_shards=3)
    with pytest.raises(DataShardError, match=r"data.shards=2: .* not a whole number of shards"):
        _batches(tokenizer_dir, RowsOf(0, 2))  # a quarter of the rows: half a shard
    state = _batches(tokenizer_dir, RowsOf(0, GLOBAL_BATCH), num_shards=4).local_state()
    with pytest.raises(DataShardError, match=r"num_shards=4, this run uses 2"):
        _batches(tokenizer_dir, RowsOf(0, GLOBAL_BATCH)).restore(state)


def _save_tiny(directory, tree):
    from llada2_jax.training.state import TrainState
    state = TrainState(tree["params"], tree["buffers"], {}, jnp.int32(1), jnp.int32(0), jnp.int32(0))
    ck = Checkpointer(directory, keep=1, async_save=False)
    ck.save(1, state, {"stage": "t"})
    ck.close()


def test_another_models_checkpoint_names_the_tensor(tmp_path):
    tree = {"params": {"embed": jnp.ones((16, 4)), "layers": {"wq": jnp.ones((2, 4, 4))}}, "buffers": {}}
    _save_tiny(str(tmp_path / "ck"), tree)
    ck = Checkpointer(str(tmp_path / "ck"), keep=1)
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    cases = [
        ({"embed": shape(16, 4), "layers": {"wq": shape(2, 8, 8)}}, r"tensor params/layers/wq has shape \(2, 4, 4\) "
         r"there but \(2, 8, 8\) in this model"),
        ({"embed": shape(16, 4), "layers": {"wq": shape(2, 4, 4), "wk": shape(2, 4, 4)}},
         r"tensor params/layers/wk of this model is not in the checkpoint"),
        ({"embed": shape(16, 4)}, r"tensor params/layers/wq \(and 0 more\) is not part of this model"),
    ]
    for params, message in cases:
        with pytest.raises(CheckpointMismatch, match=message) as info:
            ck.restore_model(1, params, {})
        assert "\n" not in str(info.value)
    ck.close()


RESHARD = r"""
import json, os, sys
import jax, numpy as np
from jax.sharding import NamedSharding
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from test_training_fixtures import experiment_config
from llada2_jax.training.checkpoint import Checkpointer
from llada2_jax.training.run import Run, make_trainer, state_shardings
from llada2_jax.training.state import init_state
out = {}
def run_on(mesh, devices, workdir):
    c = experiment_config("tiny_moe", smoke=False)
    c.tokenizer.kind, c.tokenizer.path = "dir", sys.argv[2]
    c.mesh.update(mesh)
    return Run(c, workdir, devices=devices)
source = run_on(dict(fsdp=4, expert=2), None, sys.argv[3])
trainer = make_trainer(source.stage("wsd"))
layout = source.layout  # random weights of the model's shapes, placed with its shardings (no init compile)
rng = np.random.default_rng(0)
params, buffers = (jax.tree.map(lambda a, sh: jax.device_put(rng.normal(size=a.shape).astype(a.dtype), sh), tree,
                                jax.tree.map(lambda s: NamedSharding(source.mesh, s), specs,
                                             is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
                   for tree, specs in ((layout.abstract_params, layout.param_specs),
                                       (layout.abstract_buffers, layout.buffer_specs)))
# shift every value (moments, counters) so the restore is checked on values that are not zeros
state = jax.jit(lambda p, b: init_state(p, b, trainer.tx), out_shardings=trainer.shardings)(params, buffers)
state = jax.tree.map(lambda x: x + 0.5 if x.dtype == np.float32 else x + 3, state)
trainer.checkpointer.save(3, state, {"stage": "wsd"})
trainer.checkpointer.wait()
saved = [np.asarray(x) for x in jax.tree.leaves(state)]
gate = state.params["moe_layers"]["e_gate"]
out["source_shard"] = list(gate.sharding.shard_shape(gate.shape))
for name, mesh, devices in (("fsdp2_expert4", dict(fsdp=2, expert=4), None),
                            ("one_device", dict(fsdp=1, expert=1), jax.devices()[:1])):
    run = run_on(mesh, devices, sys.argv[3])
    t = make_trainer(run.stage("wsd"))
    restored = t.initial_state(None)
    leaves = jax.tree.leaves(restored)
    want = jax.tree.leaves(t.shardings)
    out[name] = {"equal": all(np.array_equal(a, np.asarray(b)) for a, b in zip(saved, leaves)),
                 "count": [len(saved), len(leaves)],
                 "shardings_match": all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, want)),
                 "devices": len(restored.params["moe_layers"]["e_gate"].sharding.device_set),
                 "shard": list(restored.params["moe_layers"]["e_gate"].sharding.shard_shape(
                     restored.params["moe_layers"]["e_gate"].shape)),
                 "step": int(restored.step)}
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def resharded(tmp_path_factory, tokenizer_dir):
    workdir = str(tmp_path_factory.mktemp("reshard") / "run")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", RESHARD, REPO, tokenizer_dir, workdir], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):]), workdir


def test_train_state_restores_onto_other_meshes(resharded):
    res, _ = resharded
    # the layout really changed: e_gate (layers, experts, d, I) split (expert, fsdp) = (2, 4), then (4, 2), then 1
    assert res["source_shard"][1:3] == [4, 8] and res["fsdp2_expert4"]["shard"][1:3] == [2, 16]
    assert res["one_device"]["shard"][1:3] == [8, 32]
    for name, devices in (("fsdp2_expert4", 8), ("one_device", 1)):
        r = res[name]
        assert r["count"][0] == r["count"][1] and r["equal"], (name, r)
        assert r["shardings_match"] and r["devices"] == devices and r["step"] == 3, (name, r)


def test_cli_rejects_a_checkpoint_of_another_model(resharded, tokenizer_dir):
    _, workdir = resharded
    os.remove(os.path.join(workdir, "model_config.json"))  # the workdir now describes a wider model
    cmd = [sys.executable, "-m", "llada2_jax.main", "--config=experiments/tiny_moe.py", f"--workdir={workdir}",
           "--config.tokenizer.kind=dir", f"--config.tokenizer.path={tokenizer_dir}",
           "--config.model.arch.hidden_size=48", "--config.mesh.fsdp=1", "--config.mesh.expert=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("checkpoint error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "tensor params/" in lines[0] and "in this model" in lines[0], lines[0]
