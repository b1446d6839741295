"""AOT-compile the TPU kernels for a TPU topology on a machine without a TPU.

libtpu can describe a topology (`jax.experimental.topologies.get_topology_desc`) and compile for
its devices without hardware attached, so Mosaic lowering and XLA:TPU compilation errors of the
kernels show up in CI. Nothing runs; each check is `jit(...).lower(abstract args).compile()`.

Checks: megablox grouped matmul fwd+bwd; jax's splash attention fwd+bwd (a stand-in proving the
Mosaic attention plumbing); this repo's TPU attention kernel fwd+bwd
(`kernels_pallas.block_sparse_attention.tpu`);
`ops.attention(impl="pallas")` under a 4-device mesh (the shard_map wrapper); a tiny MoE model
forward+backward with attention_impl="pallas", gmm_impl="pallas" (megablox) on one device, under
the same mesh (the MoE shard_map of `model.moe.routed_moe`) and under a fsdp x expert mesh (expert
parallel token exchange), and with gmm_impl="xla".

The repo's dispatch picks TPU kernels by `jax.default_backend()`, which is "cpu" here; the
model-level checks patch it to "tpu" while tracing so the same code paths as on a TPU are lowered.
They find the mesh on the arguments' NamedShardings (as the trainer's jit does), not through
`jax.set_mesh`: under set_mesh the small eager computations some kernels do while tracing (tile
budgets from concrete layouts) would be placed on the topology's devices, which cannot execute.

    python bench/tpu_aot_check.py [--topology=v5e:2x2] [--nowrite]

Exit 0 when every check compiled or the check is skipped (no libtpu / no topology: prints "TPU AOT
check skipped: <reason>"), 1 otherwise. The table goes to bench/results/tpu_aot_check.md.
"""
from __future__ import annotations

import contextlib
import time
import traceback
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

import _cli
import _results

TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology to compile for (libtpu's name)")
WRITE = flags.DEFINE_boolean("write", True, "write the table to bench/results/tpu_aot_check.md")


@contextlib.contextmanager
def tpu_backend():
    """Make the repo's backend checks (`jax.default_backend()`) answer "tpu" while lowering."""
    with mock.patch.object(jax, "default_backend", lambda: "tpu"):
        yield


def sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def fwd_bwd(fn, n_diff):
    """loss = sum(fn(*args) * 1) differentiated w.r.t. the first n_diff args."""
    def loss(*args):
        return jnp.sum(fn(*args).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=tuple(range(n_diff)))


# ---------------------------------------------------------------- checks
def check_megablox_gmm(topo, mesh):
    from kernels_pallas.grouped_matmul import tpu
    one = SingleDeviceSharding(topo.devices[0])
    x = sds((1024, 256), jnp.bfloat16, one)
    w = sds((8, 256, 512), jnp.bfloat16, one)
    g = sds((8,), jnp.int32, one)
    return jax.jit(fwd_bwd(lambda x, w, g: tpu.grouped_matmul(x, w, g), 2)).lower(x, w, g)


def check_splash_attention(topo, mesh):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    b, h, t, d = 2, 4, 1024, 128
    mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * h)
    blocks = splash.BlockSizes(block_q=512, block_kv=512, block_kv_compute=512, block_q_dkv=512,
                               block_kv_dkv=512, block_kv_dkv_compute=512, block_q_dq=512, block_kv_dq=512)
    kernel = splash.make_splash_mha_single_device(mask, block_sizes=blocks)
    one = SingleDeviceSharding(topo.devices[0])
    qkv = [sds((b, h, t, d), jnp.bfloat16, one)] * 3
    return jax.jit(fwd_bwd(jax.vmap(kernel), 3)).lower(*qkv)


def _bdlm_inputs(sharding, b=2, length=512, block=32, hq=4, hkv=2, d=128, dtype=jnp.bfloat16):
    """Abstract q/k/v for a 2L block-diffusion sequence and a concrete MaskSpec layout."""
    from llada2_jax.diffusion.masks import MaskSpec
    spec = MaskSpec.block_diffusion(np.ones((b, length), np.int32), block)
    t = 2 * length
    q = sds((b, t, hq, d), dtype, sharding)
    kv = sds((b, t, hkv, d), dtype, sharding)
    feats = jax.tree.map(lambda a: sds(a.shape, a.dtype, sharding), spec)
    return q, kv, kv, feats


def check_repo_tpu_attention(topo, mesh):
    from kernels_pallas.block_sparse_attention import tpu
    q, k, v, spec = _bdlm_inputs(SingleDeviceSharding(topo.devices[0]))
    f = fwd_bwd(lambda q, k, v, spec: tpu.attention(q, k, v, spec), 3)
    return jax.jit(f).lower(q, k, v, spec)


def check_dispatch_attention_sharded(topo, mesh):
    """ops.attention(impl="pallas") under the mesh: the shard_map wrapper around dispatch."""
    from llada2_jax import ops
    from llada2_jax.training import sharding as shd
    q, k, v, spec = _bdlm_inputs(NamedSharding(mesh, P(shd.BATCH_AXES)), b=4)
    f = fwd_bwd(lambda q, k, v, spec: ops.attention(q, k, v, spec, impl="pallas"), 3)
    with tpu_backend():  # no jax.set_mesh: see module docstring
        return jax.jit(f).lower(q, k, v, spec)


def check_model(topo, mesh, gmm_impl="pallas"):
    """Tiny Bailing-style MoE model, BDLM mask, fwd+bwd w.r.t. params under the mesh."""
    from flax import nnx
    from llada2_jax.diffusion.masks import MaskSpec
    from llada2_jax.model import ModelConfig, Transformer
    from llada2_jax.training import sharding as shd
    config = ModelConfig(
        model_type="bailing_moe_v2", vocab_size=512, hidden_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
        qk_norm=True, intermediate_size=512, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=128, num_shared_experts=1, first_k_dense_replace=1,
        score_function="sigmoid", n_group=1, topk_group=1, norm_topk_prob=True, use_expert_bias=True,
        dtype="bfloat16", attention_impl="pallas", gmm_impl=gmm_impl)
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    shape = dict(mesh.shape)  # weights laid out by the trainer's rules (training.sharding)
    params, buffers = (jax.tree.map(lambda a, s: sds(a.shape, a.dtype, NamedSharding(mesh, s)),
                                    nnx.to_pure_dict(tree), shd.state_specs(tree, shape))
                       for tree in (params, buffers))
    b, length, block = 4, 256, 32
    rows = NamedSharding(mesh, shd.batch_spec())
    tokens = sds((b, 2 * length), jnp.int32, rows)
    spec = MaskSpec.block_diffusion(np.ones((b, length), np.int32), block)
    spec = jax.tree.map(lambda a: sds(a.shape, a.dtype, rows), spec)

    def loss(params, buffers, tokens, spec):
        model = nnx.merge(graphdef, nnx.State(params), nnx.State(buffers))
        return jnp.mean(model(tokens, mask=spec).astype(jnp.float32))

    with tpu_backend():  # no jax.set_mesh: see module docstring
        return jax.jit(jax.value_and_grad(loss)).lower(params, buffers, tokens, spec)


CHECKS = [
    ("megablox gmm fwd+bwd (kernels_pallas.grouped_matmul.tpu)", check_megablox_gmm),
    ("splash attention fwd+bwd (jax stand-in)", check_splash_attention),
    ("repo TPU attention fwd+bwd (block_sparse_attention.tpu)", check_repo_tpu_attention),
    ("ops.attention pallas, shard_map over 4-device mesh", check_dispatch_attention_sharded),
    ("tiny MoE model fwd+bwd, 1 device, pallas attn + pallas gmm",
     lambda topo, mesh: check_model(topo, one_device_mesh(topo))),
    ("tiny MoE model fwd+bwd, mesh, pallas attn + xla gmm",
     lambda topo, mesh: check_model(topo, mesh, gmm_impl="xla")),
    ("tiny MoE model fwd+bwd, mesh, pallas attn + pallas gmm", check_model),
    ("tiny MoE model fwd+bwd, mesh fsdp=2 x expert=2 (expert parallel), pallas attn + pallas gmm",
     lambda topo, mesh: check_model(topo, ep_mesh(topo))),
]


def ep_mesh(topo):
    from llada2_jax.training.mesh import make_mesh
    n = len(topo.devices)
    return make_mesh(dict(data=1, fsdp=n // 2 if n > 1 else 1, expert=2 if n > 1 else 1, tensor=1), topo.devices)


def one_device_mesh(topo):
    from llada2_jax.training.mesh import make_mesh
    return make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), topo.devices[:1])


def main() -> int:
    topology = TOPOLOGY.value
    try:
        from jax.experimental import topologies
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
        devices = topo.devices
    except Exception as e:  # no libtpu, or libtpu cannot describe this topology
        print(f"TPU AOT check skipped: cannot create TPU topology {topology!r}: "
              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return 0
    from llada2_jax.training.mesh import make_mesh
    n = len(devices)
    mesh = make_mesh(dict(data=n // 2 if n > 1 else 1, fsdp=1, expert=1, tensor=2 if n > 1 else 1), devices)
    print(f"jax {jax.__version__}; topology {topology}: {n} x {devices[0].device_kind}; "
          f"mesh {dict(mesh.shape)}")
    rows, failed = [], 0
    for name, check in CHECKS:
        t0 = time.perf_counter()
        try:
            compiled = check(topo, mesh).compile()
            kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
            rows.append((name, "ok", time.perf_counter() - t0, f"{kernels} tpu_custom_call ops in the HLO"))
        except Exception as e:
            msg = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)
            failed += 1
            rows.append((name, "error", time.perf_counter() - t0, f"{type(e).__name__}: {msg[:300]}"))
            traceback.print_exception(e, limit=-3, chain=False)  # the jaxpr-laden causes are noise
    table = _results.markdown_table(["check", "result", "lower+compile s", "notes"],
                                    [(name, status, f"{sec:.1f}", note) for name, status, sec, note in rows])
    _results.publish("tpu_aot_check", f"Topology {topology}: {n} x {devices[0].device_kind}.\n\n{table}",
                     WRITE.value)
    return 1 if failed else 0


if __name__ == "__main__":
    _cli.run(main)
