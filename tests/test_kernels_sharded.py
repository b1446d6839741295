"""Kernel attention under a multi-device mesh equals the one-device result, and runs per shard.

Runs in a subprocess with 8 fake CPU devices (the device count is fixed at jax start-up). Mesh
data=2 x fsdp=1 x expert=1 x tensor=2 over 4 of them; q/k/v and the MaskSpec are placed like the
trainer places a batch (rows over the batch axes, heads over "tensor").
"""
import json
import os
import subprocess
import sys

from test_training_fixtures import REPO

SCRIPT = r"""
import json, re
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from llada2_jax.ops import sharded
from llada2_jax import ops
from llada2_jax.core.masks import MaskSpec
from llada2_jax.training import sharding as shd
from llada2_jax.training.mesh import make_mesh

assert jax.device_count() == 8, jax.devices()
mesh = make_mesh(dict(data=2, fsdp=1, expert=1, tensor=2), jax.devices()[:4])
B, L, LB, HQ, HKV, D = 4, 64, 8, 4, 2, 32
seg = np.ones((B, L), np.int32)
seg[0, 40:] = 2
seg[1, 56:] = 0
spec = MaskSpec.block_diffusion(seg, LB)  # T = S = 2L = 128
ks = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(ks[0], (B, 2 * L, HQ, D), jnp.float32)
k = jax.random.normal(ks[1], (B, 2 * L, HKV, D), jnp.float32)
v = jax.random.normal(ks[2], (B, 2 * L, HKV, D), jnp.float32)
do = jax.random.normal(ks[3], q.shape, jnp.float32)

def fwd_bwd(impl):
    def f(q, k, v, do, spec):
        out, vjp = jax.vjp(lambda q, k, v: ops.attention(q, k, v, spec, impl=impl), q, k, v)
        return (out, *vjp(do))
    return jax.jit(f)

heads = NamedSharding(mesh, P(shd.BATCH_AXES, None, "tensor", None))
rows = NamedSharding(mesh, P(shd.BATCH_AXES, None))
args = (*(jax.device_put(a, heads) for a in (q, k, v, do)),
        jax.tree.map(lambda a: jax.device_put(a, rows), spec))
out = {}
for impl in ("xla_sparse", "pallas"):
    ref = fwd_bwd(impl)(q, k, v, do, spec)
    f = fwd_bwd(impl)
    ctx = f(*args)                       # mesh found on the arrays' shardings
    with jax.set_mesh(mesh):             # mesh from the context
        got = f(*args)
        hlo = f.lower(*args).compile().as_text()
    err = max(float(jnp.max(jnp.abs(a - b))) for r in (ctx, got) for a, b in zip(r, ref))
    scale = max(float(jnp.max(jnp.abs(a))) for a in ref)
    # per-shard shapes inside the compiled module: local q is (B/2, T, HQ/2, D)
    local = f"f32[{B // 2},{2 * L},{HQ // 2},{D}]"
    gathers = [l.strip()[:160] for l in hlo.splitlines() if re.search(r"all-gather(-start)?\(", l)]
    out[impl] = dict(err=err, scale=scale, local_shape=local in hlo, full_shape_ops=hlo.count(f"f32[{B},{2 * L},{HQ},{D}]"),
                     gathers=gathers, out_spec=str(got[0].sharding.spec))
# fallbacks: heads that do not divide "tensor" stay replicated; a batch of 1 is not split
m = make_mesh(dict(data=2, fsdp=1, expert=1, tensor=4), jax.devices())
out["partition"] = [list(map(str, sharded.partition(m, *shape))) for shape in ((4, 8, 4), (4, 4, 2), (1, 3, 1))]
one = MaskSpec(*(a[:1] for a in (spec.q_stream, spec.q_block, spec.q_segment,
                                 spec.k_stream, spec.k_block, spec.k_segment)), spec.rule)
small = (q[:1, :, :3], k[:1, :, :1], v[:1, :, :1])
with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k, v, s: ops.attention(q, k, v, s, impl="xla_sparse"))(*small, one)
# heads replicated over "tensor" (1 kv head): gradients must not be double counted
rep = (q[:, :, :2], k[:, :, :1], v[:, :, :1])
g = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(ops.attention(q, k, v, s, impl="xla_sparse") * do[:, :, :2]),
                     argnums=(0, 1, 2)))
want = g(*rep, spec)
with jax.set_mesh(mesh):
    got_rep = g(*(jax.device_put(a, NamedSharding(mesh, P(shd.BATCH_AXES))) for a in rep), spec)
out["replicated_heads_err"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got_rep, want))
out["fallback_err"] = float(jnp.max(jnp.abs(got - ops.attention(*small, one, impl="xla_sparse"))))
print("RESULT" + json.dumps(out))
"""


def run_on_fake_devices(script: str) -> dict:
    """Run `script` in a fresh process with 8 fake CPU devices; return the JSON it prints after RESULT."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[len("RESULT"):])


def test_sharded_kernel_attention_matches_single_device():
    res = run_on_fake_devices(SCRIPT)
    for impl in ("xla_sparse", "pallas"):
        r = res[impl]
        assert r["err"] <= 1e-5 * max(1.0, r["scale"]), (impl, r)
        assert r["local_shape"], (impl, r)  # the kernel sees (B/2, T, Hq/2, D) blocks
        assert not r["gathers"], (impl, r["gathers"])  # q/k/v are never gathered
        assert r["full_shape_ops"] == 0, (impl, r)  # no device holds a whole (B, T, Hq, D) array
        assert "data" in r["out_spec"] and "tensor" in r["out_spec"], r  # output stays sharded
    assert res["partition"] == [["('data', 'fsdp', 'expert')", "tensor"], ["('data', 'fsdp', 'expert')", "None"],
                                ["()", "None"]]
    assert res["fallback_err"] <= 1e-5
    assert res["replicated_heads_err"] <= 1e-5
