"""CPU benchmark: the model's MoE experts, dense all-experts oracle vs dropless ragged dispatch.

Uses `llada2_jax.model.moe` (route + dense_experts / routed_experts) at E=64, k=8, forward and
backward (grads w.r.t. x and the three expert weights). The ragged dispatch is timed with the
model's two XLA grouped matmuls (`gmm_impl="xla"` = `jax.lax.ragged_dot`, and `"xla_tiled"`, the CPU
default of "auto"). Prints a markdown table and writes it into BUILD_NOTES.md.
Run: python3 bench/moe.py
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._notes import publish_table  # noqa: E402
from llada2_jax.model import moe
from llada2_jax.model.config import ModelConfig


def _best_times(fns, *args, reps):
    """Best wall time of each fn; the reps alternate between the fns so that all see the same machine state."""
    for fn in fns:
        jax.block_until_ready(fn(*args))
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    cfg = ModelConfig(model_type="qwen3_moe", hidden_size=args.hidden, num_experts=args.experts,
                      num_experts_per_tok=args.top_k, moe_intermediate_size=args.inter)
    e, d, i = args.experts, args.hidden, args.inter
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    router = jax.random.normal(keys[0], (d, e)) * d ** -0.5
    w = dict(e_gate=jax.random.normal(keys[1], (e, d, i)) * d ** -0.5,
             e_up=jax.random.normal(keys[2], (e, d, i)) * d ** -0.5,
             e_down=jax.random.normal(keys[3], (e, i, d)) * i ** -0.5)

    def grad_fn(experts, gmm_impl="xla"):
        c = dataclasses.replace(cfg, gmm_impl=gmm_impl)

        def loss(x, w):
            weights, ids, _ = moe.route(c, x, router)
            return (experts(c, x, weights, ids, w["e_gate"], w["e_up"], w["e_down"]) ** 2).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    dense = grad_fn(moe.dense_experts)
    ragged, tiled = grad_fn(moe.routed_experts, "xla"), grad_fn(moe.routed_experts, "xla_tiled")
    rows = []
    for n in args.tokens:
        x = jax.random.normal(keys[4], (n, d))
        # dense and xla_tiled alternate; ragged_dot (seconds per call on CPU) is timed on its own afterwards,
        # since running it between the others' reps slowed them (up to 2x for xla_tiled at 2048 tokens)
        t_dense, t_tiled = _best_times((dense, tiled), x, w, reps=args.reps)
        (t_ragged,) = _best_times((ragged,), x, w, reps=args.reps)
        rows.append(f"| {n} | {t_dense * 1e3:.0f} | {t_ragged * 1e3:.0f} ({t_dense / t_ragged:.2f}x) "
                    f"| {t_tiled * 1e3:.0f} ({t_dense / t_tiled:.2f}x) |")
        print(rows[-1], flush=True)
    publish_table(
        "bench-moe",
        f"MoE experts fwd+bwd on CPU, model code (`model.moe`), E={e}, k={args.top_k}, d={d}, I={i}, "
        f"fp32, best of {args.reps}; speedup vs dense in parentheses.",
        ["tokens", "dense all-experts ms", "ragged dispatch, ragged_dot ms", "ragged dispatch, xla_tiled gmm ms"],
        rows, write=not args.no_write)

if __name__ == "__main__":
    main()
