"""A tiny MoE model trains identically on one device and on a (fsdp=2, tensor=2, expert=2) mesh.

Runs in a subprocess with 8 fake CPU devices; both runs live in that process (the one-device run
uses a mesh over the first device only), so the comparison isolates the sharding.
"""
import json
import os
import subprocess
import sys

from test_training_fixtures import REPO, train_tokenizer

SCRIPT = r"""
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import jax
import numpy as np
from test_training_fixtures import read_metrics, tiny_train_config
from llada2_jax.training.run import Run
from llada2_jax.training import model_source as ms
assert jax.device_count() == 8, jax.devices()
out = {}
for name, mesh, devices in (("single", dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1]),
                            ("sharded", dict(data=1, fsdp=2, expert=2, tensor=2), None)):
    config = tiny_train_config(sys.argv[2], moe=True)
    config.mesh.update(mesh)
    workdir = os.path.join(sys.argv[3], name)
    run = Run(config, workdir, devices=devices)
    run.execute()
    params, buffers = ms.place_weights(ms.Source("workdir", workdir, run.model_config), run.layout, run.mesh, 0)
    specs = {"/".join(str(p.key) for p in k): list(v.sharding.spec) for k, v in
             jax.tree_util.tree_flatten_with_path(params)[0]}
    out[name] = {"loss": [v for _, v in sorted(read_metrics(workdir).items())],
                 "grad_norm": [v for _, v in sorted(read_metrics(workdir, "grad_norm").items())],
                 "expert_bias": np.asarray(buffers["moe_layers"]["expert_bias"]).tolist(),
                 "specs": specs}
print("RESULT" + json.dumps(out))
"""


def test_sharded_training_matches_single_device(tmp_path):
    tok = train_tokenizer(str(tmp_path / "tok"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, REPO, tok, str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    res = json.loads(line[len("RESULT"):])
    single, sharded = res["single"], res["sharded"]
    assert len(single["loss"]) == 3
    # the mesh really shards: expert weights over `expert`, MLP widths over `tensor`, d_model over fsdp
    assert sharded["specs"]["moe_layers/e_gate"] == [None, "expert", "fsdp", "tensor"]
    assert sharded["specs"]["dense_layers/wq"] == [None, ["fsdp", "expert"], "tensor", None]
    assert all(a is None for s in single["specs"].values() for a in s)
    assert max(abs(a - b) for a, b in zip(single["loss"], sharded["loss"])) <= 1e-5, (single, sharded)
    # gradient norms differ only by reduction order across shards
    assert max(abs(a - b) / a for a, b in zip(single["grad_norm"], sharded["grad_norm"])) <= 1e-4
    assert single["expert_bias"] == sharded["expert_bias"]
    assert any(b != 0 for row in single["expert_bias"] for b in row)  # the balancing update ran
