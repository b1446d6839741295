"""GPU check of the whole model with the Pallas kernels inside: a BDLM training step on a MoE model.

The kernel check (bench/gpu_check.py) tests the kernels alone; this one runs them where training
does: a Bailing MoE model, the two-copy [x_t ; x_0] layout with packed documents, the ELBO loss and
its gradients. attention_impl / gmm_impl "pallas" must match "xla" (dense mask, ragged_dot) in
fp32, and the bf16 step is timed with each. Needs jax (CUDA) + numpy + flax + this repo. The
tables go to bench/results/gpu_model_check.md (--nowrite: print only).

    python bench/gpu_model_check.py   (about 2 minutes on one H100/H200)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

import _cli
import _results
from _timing import median_ms
from llada2_jax.diffusion.layout import build_diffusion_batch
from llada2_jax.diffusion.losses import diffusion_loss
from llada2_jax.model import ModelConfig, Transformer

VOCAB, MASK_ID = 8192, 8191
WRITE = flags.DEFINE_boolean("write", True, "write the tables to bench/results/gpu_model_check.md")


def config(width, layers, dtype, impl):
    return ModelConfig(
        model_type="bailing_moe_v2", vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=width // 64, num_key_value_heads=max(1, width // 256), head_dim=64,
        partial_rotary_factor=0.5, qk_norm=True, intermediate_size=4 * width, num_experts=32,
        num_experts_per_tok=4, moe_intermediate_size=width // 2, num_shared_experts=1, first_k_dense_replace=1,
        score_function="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True, use_expert_bias=True,
        max_position_embeddings=8192, mask_token_id=MASK_ID, dtype=dtype, attention_impl=impl, gmm_impl=impl)


def packed_batch(batch, length, block, seed):
    """Three documents per row (uneven cuts), padding at the end of the last row, t ~ U(0.1, 0.9)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, length), np.int32)
    for r in range(batch):
        cuts = np.sort(rng.choice(np.arange(block, length), size=2, replace=False))
        seg[r] = 1 + np.searchsorted(cuts, np.arange(length), side="right")
    seg[-1, -length // 8:] = 0
    x0 = rng.integers(0, VOCAB - 1, (batch, length))
    t = rng.uniform(0.1, 0.9, batch)
    noise = rng.random((batch, length)) < t[:, None]
    return build_diffusion_batch(x0, seg, None, seg > 0, noise, t, mask_id=MASK_ID, block_size=block,
                                 vocab_size=VOCAB)


def loss_and_grads(cfg, batch):
    graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(params):
        return diffusion_loss(nnx.merge(graphdef, params, rest), batch)[0]
    return jax.jit(jax.value_and_grad(loss)), params


def rel_err(ref, got):
    num = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
              for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
    return num / max(float(jnp.max(jnp.abs(a.astype(jnp.float32)))) for a in jax.tree.leaves(ref))


def main() -> int:
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    ok = True
    batch = packed_batch(2, 512, 32, seed=0)
    with jax.default_matmul_precision("highest"):
        results = {}
        for impl in ("xla", "pallas"):
            fn, params = loss_and_grads(config(256, 3, "float32", impl), batch)
            results[impl] = fn(params)
    loss_err = abs(float(results["xla"][0]) - float(results["pallas"][0])) / abs(float(results["xla"][0]))
    grad_err = rel_err(results["xla"][1], results["pallas"][1])
    good = loss_err <= 1e-4 and grad_err <= 1e-3
    ok &= good
    check = _results.markdown_table(
        ["loss xla", "loss pallas", "loss rel err", "grads max rel err", "status"],
        [[f"{float(results['xla'][0]):.6f}", f"{float(results['pallas'][0]):.6f}", f"{loss_err:.1e}",
          f"{grad_err:.1e}", "ok" if good else "FAIL"]])
    print(check, flush=True)

    rows = []
    for impl, rows_per_batch in (("xla", 1), ("pallas", 1), ("xla", 4), ("pallas", 4)):
        batch = packed_batch(rows_per_batch, 2048, 32, seed=1)
        try:
            fn, params = loss_and_grads(config(1024, 4, "bfloat16", impl), batch)
            rows.append((impl, rows_per_batch, f"{median_ms(fn, params):.1f}", f"{float(fn(params)[0]):.4f}"))
        except jax.errors.JaxRuntimeError as exc:  # the dense reference's (B, H, T, S) scores at B4
            rows.append((impl, rows_per_batch, str(exc).split(":")[0], "-"))
    _results.publish("gpu_model_check", "\n\n".join([
        "## fp32 step, d256 x 3 layers, 32 experts top-4, B2 L512 L_B32 (3 docs + padding)", check,
        "## bf16 step (fwd+bwd), d1024 x 4 layers, 32 experts top-4, L2048 (T=4096) L_B32, median of 5",
        _results.markdown_table(["impl", "batch", "ms", "loss"], rows)]), WRITE.value)
    return 0 if ok else 1


if __name__ == "__main__":
    _cli.run(main)
