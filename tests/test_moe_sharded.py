"""The MoE expert dispatch under a multi-device mesh (shard_map, expert parallel) equals one device.

Runs in a subprocess with 8 fake CPU devices. A tiny Bailing MoE model on a mesh
fsdp=2 x expert=2 x tensor=2 (weights placed by the trainer's rules, tokens by `batch_spec`):
loss and gradients with gmm_impl "pallas" (interpret mode) and "xla_tiled" match the model run on
one device without a mesh; the compiled module works on local token rows only. Then
`routed_moe` alone under the other layouts the wrapper handles: rows not split over the
expert axis (psum instead of the token exchange) and an expert count that does not divide the
expert axis (expert weights replicated there, d_model over fsdp x expert).
"""

from test_kernels_sharded import run_on_fake_devices

SCRIPT = r"""
import json, math, re
import jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from llada2_jax.ops import sharded
from llada2_jax.model import ModelConfig, Transformer, moe
from llada2_jax.training import sharding as shd
from llada2_jax.training.mesh import make_mesh

assert jax.device_count() == 8, jax.devices()
B, T, D, K = 8, 24, 48, 3
mesh = make_mesh(dict(data=1, fsdp=2, expert=2, tensor=2))
put = lambda tree, specs, m=mesh: jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(m, s)), tree, specs,
                                               is_leaf=lambda x: isinstance(x, P))

def maxerr(ref, got):
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
    return err / max(1.0, max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(ref)))

out = {}
for impl in ("pallas", "xla_tiled"):
    config = ModelConfig(
        model_type="bailing_moe_v2", vocab_size=64, hidden_size=D, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, partial_rotary_factor=0.5, qk_norm=True,
        intermediate_size=64, num_experts=4, num_experts_per_tok=K, moe_intermediate_size=16,
        num_shared_experts=1, first_k_dense_replace=1, score_function="sigmoid", n_group=1, topk_group=1,
        norm_topk_prob=True, use_expert_bias=True, dtype="float32", attention_impl="xla", gmm_impl=impl)
    model = Transformer(config, rngs=nnx.Rngs(0))
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    specs = [shd.state_specs(s, dict(mesh.shape)) for s in (params, buffers)]
    params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
    buffers = jax.tree.map(lambda b: 0.05 * jax.random.normal(jax.random.key(3), b.shape), buffers)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 64)

    def loss(params, buffers, tokens):
        logits = nnx.merge(graphdef, nnx.State(params), nnx.State(buffers))(tokens, mask="bidirectional")
        return jnp.mean(jnp.sin(logits))

    f = jax.jit(jax.value_and_grad(loss))
    ref = f(params, buffers, tokens)  # one device, no mesh: the unchanged local path
    args = (put(params, specs[0]), put(buffers, specs[1]), put(tokens, shd.batch_spec()))
    compiled = f.lower(*args).compile()
    got = compiled(*args)
    hlo = compiled.as_text()
    n_local = B * T // 4  # rows over fsdp x expert; the token exchange gathers the 2 expert shards
    out[impl] = dict(
        loss=[float(ref[0]), float(got[0])], err=maxerr(ref, got),
        e_gate_spec=list(got[1]["moe_layers"]["e_gate"].sharding.spec),
        # gmm rows per step: one source shard's n_local tokens x K assignments
        local_rows=f"f32[{n_local * K},{D}]" in hlo,
        # (xla_tiled's slab einsums are skipped: their E_local x C rows are local rows that can equal B * T)
        full_rows=sum(line.count(f"f32[{B * T},{D}]") + line.count(f"f32[{B * T * K},{D}]")
                      + line.count(f"f32[{B},{T},{D}]") for line in hlo.splitlines()
                      if not re.search(r"ec[kn],e[kc][kn]->e[ck][kn]", line)),
        kernel_in_shard_map=hlo.count("shard_map/while/body"),
        # all-gathers of token rows or assignments: only the expert group's (2 x n_local rows)
        row_gathers=[s for s in re.findall(r"= f32\[([0-9,]*)\][^ ]* all-gather(?:-start)?\(", hlo)
                     if s and math.prod(map(int, s.split(",")[:-1])) >= B * T])

# route + dispatch alone (`moe.routed_moe`, gmm "xla") under other layouts: values, load, gradients
cfg = ModelConfig(model_type="bailing_moe_v2", hidden_size=32, num_experts=6, num_experts_per_tok=2,
                  moe_intermediate_size=16, gmm_impl="xla", vocab_size=8, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, score_function="sigmoid", use_expert_bias=True)

def moe_loss(x, p, batch):
    y, load = moe.routed_moe(cfg, p, x, batch)
    return jnp.sum(jnp.sin(y)), load

grad = jax.jit(jax.value_and_grad(moe_loss, argnums=(0, 1), has_aux=True), static_argnums=2)
axes = dict(router=("embed", None), e_gate=("expert", "embed", "mlp"), e_up=("expert", "embed", "mlp"),
            e_down=("expert", "mlp", "embed"), expert_bias=(None,))
for name, sizes, batch in (("rows_not_over_expert", dict(fsdp=2, expert=2, tensor=2), 2),
                           ("experts_do_not_divide", dict(fsdp=2, expert=4), 8)):
    m = make_mesh(sizes)
    ks = jax.random.split(jax.random.key(5), 6)
    x = jax.random.normal(ks[0], (batch * 4, 32))
    p = dict(router=jax.random.normal(ks[1], (32, 6)), e_gate=0.3 * jax.random.normal(ks[2], (6, 32, 16)),
             e_up=0.3 * jax.random.normal(ks[3], (6, 32, 16)), e_down=0.3 * jax.random.normal(ks[4], (6, 16, 32)),
             expert_bias=0.1 * jax.random.normal(ks[5], (6,)))
    ref = grad(x, p, batch)
    pspecs = {n: shd.logical_to_spec(axes[n], a.shape, dict(m.shape)) for n, a in p.items()}
    got = grad(jax.device_put(x, NamedSharding(m, P(sharded.batch_axes(m, batch)))), put(p, pspecs, m), batch)
    out[name] = dict(err=maxerr(ref, got), load_equal=bool(jnp.all(ref[0][1] == got[0][1])),
                     g_spec=list(pspecs["e_gate"]))
print("RESULT" + json.dumps(out))
"""


def test_sharded_moe_matches_single_device():
    res = run_on_fake_devices(SCRIPT)
    for impl in ("pallas", "xla_tiled"):
        r = res[impl]
        assert r["err"] <= 1e-5, (impl, r)  # loss and every gradient, fp32
        assert r["e_gate_spec"] == [None, "expert", "fsdp", "tensor"], r
        assert r["local_rows"], (impl, r)  # the gmm runs on the expert group's rows only
        assert r["full_rows"] == 0, (impl, r)  # no device holds all tokens or all assignments
        assert not r["row_gathers"], (impl, r)  # (without the wrapper, pallas gathers all N*K rows)
    assert res["pallas"]["kernel_in_shard_map"] > 0, res["pallas"]  # the interpreted kernel's loops
    for name in ("rows_not_over_expert", "experts_do_not_divide"):
        assert res[name]["err"] <= 1e-5 and res[name]["load_equal"], res
    assert res["experts_do_not_divide"]["g_spec"] == [None, ["fsdp", "expert"], None], res
