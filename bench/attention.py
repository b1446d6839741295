"""CPU benchmark: BDLM attention, dense-mask XLA vs the tile-skipping XLA path (forward+backward).

Prints a markdown table and writes it into BUILD_NOTES.md (between bench markers). The spec is
passed through jit as an argument (traced features, as in training), so the sparse path runs
with its static budget and the run-time fallback check.
Run: PYTHONPATH=. python3 bench/attention.py [--lengths 1024 2048 4096] [--tile 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._notes import publish_table  # noqa: E402
from kernels_pallas import xla_sparse
from llada2_jax.diffusion.masks import MaskSpec
from llada2_jax.ops.attention import xla_attention


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--docs", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--tile", type=int, default=xla_sparse.DEFAULT_BLOCK)
    ap.add_argument("--heads", type=int, nargs=2, default=[2, 1], metavar=("HQ", "HKV"))
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    hq, hkv = args.heads
    dense = _grad_fn(lambda q, k, v, spec: xla_attention(q, k, v, spec.dense()))
    sparse = _grad_fn(lambda q, k, v, spec: xla_sparse.attention(q, k, v, spec, block_q=args.tile,
                                                                 block_k=args.tile))
    rows = []
    for length in args.lengths:
        for docs in args.docs:
            spec = _spec(length, args.block, docs)
            _, t, _ = spec.shape
            key = jax.random.split(jax.random.PRNGKey(length + docs), 3)
            q = jax.random.normal(key[0], (1, t, hq, args.head_dim), jnp.float32)
            k = jax.random.normal(key[1], (1, t, hkv, args.head_dim), jnp.float32)
            v = jax.random.normal(key[2], (1, t, hkv, args.head_dim), jnp.float32)
            true_sparsity = 1.0 - float(np.asarray(spec.dense()).mean())
            skipped = xla_sparse.skipped_fraction(spec, args.tile, args.tile)
            t_dense = _time(dense, q, k, v, spec, reps=args.reps)
            t_sparse = _time(sparse, q, k, v, spec, reps=args.reps)
            rows.append(f"| {length} | {docs} | {true_sparsity:.3f} | {skipped:.3f} | {t_dense * 1e3:.0f} "
                        f"| {t_sparse * 1e3:.0f} | {t_dense / t_sparse:.2f}x |")
            print(rows[-1], flush=True)
    publish_table(
        "bench-attention",
        f"BDLM attention fwd+bwd on CPU ({jax.device_count()} device(s), {jax.devices()[0].platform}), "
        f"L_B={args.block}, B=1, Hq/Hkv={hq}/{hkv}, D={args.head_dim}, fp32, tile={args.tile}, "
        f"best of {args.reps}. Sequence T = 2L.",
        ["L", "docs", "true sparsity", "tiles skipped", "dense XLA ms", "xla_sparse ms", "speedup"],
        rows, write=not args.no_write)

if __name__ == "__main__":
    main()
