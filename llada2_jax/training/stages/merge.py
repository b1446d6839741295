"""The `merge` stage (spec §3.3): mean of the k kept checkpoints with the best held-out score.

Candidates are the checkpoints kept by the `merge.source_stage` stage (its last
`train.keep_checkpoints`), scored by that stage's own evaluation at its final block size, on its
held-out batches and noise. The merged model is written to `WORKDIR/merged/` and becomes the
run's output. Nothing is trained: no optimizer state is built or read.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from llada2_jax import workdir as wd
from llada2_jax.training import sharding as shd
from llada2_jax.training.checkpoint import Checkpointer
from llada2_jax.training.context import StageContext
from llada2_jax.training.trainer import Evaluator


def mean_of(trees: list):
    """Arithmetic mean of several pytrees of arrays (the merge), accumulated in float32."""
    total = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trees[0])
    for tree in trees[1:]:
        total = jax.tree.map(lambda a, b: a + jnp.asarray(b, jnp.float32), total, tree)
    return jax.tree.map(lambda a, ref: (a / len(trees)).astype(ref.dtype), total, trees[0])


def rank_by(scores: dict[int, float], k: int) -> list[int]:
    """The k steps with the lowest score (ties: the later step first)."""
    return [s for s, _ in sorted(scores.items(), key=lambda kv: (kv[1], -kv[0]))][:k]


def weight_shardings(layout, mesh) -> tuple:
    return shd.named(layout.param_specs, mesh), shd.named(layout.buffer_specs, mesh)


class Merge:

    def __init__(self, ctx: StageContext, scorer):
        """`scorer`: the source stage (built from its own context), whose evaluation ranks the candidates."""
        self.ctx, self.cfg, self.scorer = ctx, ctx.cfg, scorer

    @staticmethod
    def scorer_name(cfg) -> str:
        return cfg.source_stage

    @classmethod
    def validate(cls, config, name) -> None:
        cfg = config[name]
        if cfg.top_k < 1:
            raise ValueError(f"{name}.top_k={cfg.top_k} must be >= 1")
        if cfg.source_stage not in [s.strip() for s in str(config.stages).split(",")]:
            raise ValueError(f"{name}.source_stage={cfg.source_stage!r} is not one of config.stages")
        if cfg.top_k > config.train.keep_checkpoints:
            raise ValueError(f"{name}.top_k={cfg.top_k} exceeds train.keep_checkpoints="
                             f"{config.train.keep_checkpoints} (the merge candidates)")

    def run(self) -> tuple[str, int]:
        """Merge, save, log; returns (checkpoint directory, step) of the merged model."""
        ctx, source = self.ctx, self.scorer
        layout = source.model_layout()
        shardings = weight_shardings(layout, ctx.mesh)
        evaluate = Evaluator(source, ctx.mesh, layout.graphdef, shardings, source.ctx.rng)
        segment = source.segments()[-1]
        heldout = source.heldout_batches()
        directory = ctx.paths.checkpoints(source.name)
        if not os.path.isdir(directory):
            raise ValueError(f"merge: no checkpoints under {directory}")
        manager = wd.open_checkpoints(directory)
        try:
            candidates = sorted(manager.all_steps())
            if not candidates:
                raise ValueError(f"merge: no checkpoints under {directory}")
            scores, weights = {}, {}
            for step in candidates:
                params, buffers = wd.restore_weights(manager, step, layout.abstract_params, layout.abstract_buffers,
                                                     shardings)
                scores[step] = float(next(iter(evaluate(params, buffers, segment, heldout).values())))
                weights[step] = (params, buffers)
        finally:
            manager.close()
        best = rank_by(scores, self.cfg.top_k)
        merged_params, merged_buffers = mean_of([weights[s] for s in best])
        merged_score = float(next(iter(evaluate(merged_params, merged_buffers, segment, heldout).values())))
        last = max(candidates)
        out = Checkpointer(ctx.paths.merged, keep=1, async_save=False)
        out.save_model(last, merged_params, merged_buffers, {"merged_steps": best, "scores": scores})
        out.wait()
        out.close()
        ctx.logger.write({"step": last, "stage": ctx.name, "phase": segment.name, "block_size": segment.block_size,
                          "merged_steps": json.dumps(best), "candidate_nelbo": json.dumps(scores),
                          "eval_nelbo": merged_score, "best_single_nelbo": scores[best[0]]})
        print(f"[merge] candidates {scores} -> merged {best}: held-out NELBO {merged_score:.4f} "
              f"(best single {scores[best[0]]:.4f})", flush=True)
        return ctx.paths.merged, last
