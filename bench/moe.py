"""CPU benchmark: the model's MoE experts, dense all-experts oracle vs dropless ragged dispatch.

Uses `llada2_jax.model.moe` (route + dense_experts / routed_experts) at E=64, k=8, forward and
backward (grads w.r.t. x and the three expert weights). The ragged dispatch is timed with the
model's two XLA grouped matmuls (`gmm_impl="xla"` = `jax.lax.ragged_dot`, and `"xla_tiled"`, the CPU
default of "auto"). Prints a markdown table and writes it to bench/results/moe.md.

    python bench/moe.py [--tokens=512,2048] [--experts=64] [--nowrite]
"""
from __future__ import annotations

import dataclasses
import time

import jax
from absl import app, flags

import _cli
import _results
from llada2_jax.model import moe
from llada2_jax.model.config import ModelConfig

TOKENS = _cli.DEFINE_number_list("tokens", "512,2048", "token counts to time", lower=1)
EXPERTS = flags.DEFINE_integer("experts", 64, "routed experts E", lower_bound=1)
TOP_K = flags.DEFINE_integer("top_k", 8, "experts per token k", lower_bound=1)
HIDDEN = flags.DEFINE_integer("hidden", 256, "model width d", lower_bound=1)
INTER = flags.DEFINE_integer("inter", 128, "expert width I", lower_bound=1)
REPS = flags.DEFINE_integer("reps", 3, "timed repetitions (the best is reported)", lower_bound=1)
WRITE = flags.DEFINE_boolean("write", True, "write the table to bench/results/moe.md")


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


def main() -> int:
    e, d, i, k, reps = EXPERTS.value, HIDDEN.value, INTER.value, TOP_K.value, REPS.value
    if k > e:
        raise app.UsageError(f"--top_k={k} exceeds --experts={e}")
    cfg = ModelConfig(model_type="qwen3_moe", hidden_size=d, num_experts=e, num_experts_per_tok=k,
                      moe_intermediate_size=i)
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
    for n in TOKENS.value:
        x = jax.random.normal(keys[4], (n, d))
        # dense and xla_tiled alternate; ragged_dot (seconds per call on CPU) is timed on its own afterwards,
        # since running it between the others' reps slowed them (up to 2x for xla_tiled at 2048 tokens)
        t_dense, t_tiled = _best_times((dense, tiled), x, w, reps=reps)
        (t_ragged,) = _best_times((ragged,), x, w, reps=reps)
        rows.append([n, f"{t_dense * 1e3:.0f}", f"{t_ragged * 1e3:.0f} ({t_dense / t_ragged:.2f}x)",
                     f"{t_tiled * 1e3:.0f} ({t_dense / t_tiled:.2f}x)"])
        print(rows[-1], flush=True)
    caption = (f"MoE experts fwd+bwd on CPU, model code (`model.moe`), E={e}, k={k}, d={d}, I={i}, fp32, "
               f"best of {reps}; speedup vs dense in parentheses.")
    table = _results.markdown_table(["tokens", "dense all-experts ms", "ragged dispatch, ragged_dot ms",
                                     "ragged dispatch, xla_tiled gmm ms"], rows)
    _results.publish("moe", f"{caption}\n\n{table}", WRITE.value)
    return 0


if __name__ == "__main__":
    _cli.run(main)
