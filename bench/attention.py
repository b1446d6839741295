"""CPU benchmark: BDLM attention, dense-mask XLA vs the tile-skipping XLA path (forward+backward).

    python bench/attention.py [--lengths=1024,2048,4096] [--tile=64] [--nowrite]

Prints a markdown table and writes it to bench/results/attention.md. The spec is passed through
jit as an argument (traced features, as in training), so the sparse path runs with its static
budget and the run-time fallback check.
"""
from __future__ import annotations

import time

import numpy as np

import jax
import jax.numpy as jnp
from absl import app, flags

import _cli
import _results
from llada2_jax.core.masks import MaskSpec
from llada2_jax.ops import xla_sparse
from llada2_jax.ops.attention import xla_attention

LENGTHS = _cli.DEFINE_number_list("lengths", "1024,2048,4096", "document lengths L (the sequence is 2L)", lower=1)
DOCS = _cli.DEFINE_number_list("docs", "1,4", "documents per sequence", lower=1)
BLOCK = flags.DEFINE_integer("block", 32, "diffusion block size L_B", lower_bound=1)
TILE = flags.DEFINE_integer("tile", xla_sparse.DEFAULT_BLOCK, "query/key tile of the sparse path", lower_bound=1)
HEADS = _cli.DEFINE_number_list("heads", "2,1", "query heads, KV heads", lower=1, length=2)
HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "head dimension", lower_bound=1)
REPS = flags.DEFINE_integer("reps", 3, "timed repetitions (the best is reported)", lower_bound=1)
WRITE = flags.DEFINE_boolean("write", True, "write the table to bench/results/attention.md")


def _spec(length, block, docs):
    seg = np.repeat(np.arange(1, docs + 1, dtype=np.int32), length // docs)[None]
    return MaskSpec.block_diffusion(seg, block)


def _grad_fn(attn):
    loss = lambda q, k, v, spec: (attn(q, k, v, spec).astype(jnp.float32) ** 2).sum()  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _time(fn, *args, reps):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    hq, hkv = HEADS.value
    tile, block, reps = TILE.value, BLOCK.value, REPS.value
    for length in LENGTHS.value:
        for docs in DOCS.value:
            if length % docs or length % block:
                raise app.UsageError(f"--lengths={length} must be a multiple of --docs={docs} and of --block={block}")
    dense = _grad_fn(lambda q, k, v, spec: xla_attention(q, k, v, spec.dense()))
    sparse = _grad_fn(lambda q, k, v, spec: xla_sparse.attention(q, k, v, spec, block_q=tile, block_k=tile))
    rows = []
    for length in LENGTHS.value:
        for docs in DOCS.value:
            spec = _spec(length, block, docs)
            _, t, _ = spec.shape
            key = jax.random.split(jax.random.PRNGKey(length + docs), 3)
            q = jax.random.normal(key[0], (1, t, hq, HEAD_DIM.value), jnp.float32)
            k = jax.random.normal(key[1], (1, t, hkv, HEAD_DIM.value), jnp.float32)
            v = jax.random.normal(key[2], (1, t, hkv, HEAD_DIM.value), jnp.float32)
            true_sparsity = 1.0 - float(np.asarray(spec.dense()).mean())
            skipped = xla_sparse.skipped_fraction(spec, tile, tile)
            t_dense = _time(dense, q, k, v, spec, reps=reps)
            t_sparse = _time(sparse, q, k, v, spec, reps=reps)
            rows.append([length, docs, f"{true_sparsity:.3f}", f"{skipped:.3f}", f"{t_dense * 1e3:.0f}",
                         f"{t_sparse * 1e3:.0f}", f"{t_dense / t_sparse:.2f}x"])
            print(rows[-1], flush=True)
    caption = (f"BDLM attention fwd+bwd on CPU ({jax.device_count()} device(s), {jax.devices()[0].platform}), "
               f"L_B={block}, B=1, Hq/Hkv={hq}/{hkv}, D={HEAD_DIM.value}, fp32, tile={tile}, best of {reps}. "
               "Sequence T = 2L.")
    table = _results.markdown_table(["L", "docs", "true sparsity", "tiles skipped", "dense XLA ms", "xla_sparse ms",
                                     "speedup"], rows)
    _results.publish("attention", f"{caption}\n\n{table}", WRITE.value)
    return 0


if __name__ == "__main__":
    _cli.run(main)
