"""The `compare` stage: the AR-vs-dLLM table of the run's own trained stages on held-out tasks.

Every training stage of the run with checkpoints is decoded on `compare.count` held-out
reasoning-gym items (`config.gym` tasks, seed `compare.seed`, never a training item): an AR stage
(the `ar_sft` twin) with the AR decoder, a block-diffusion stage at its trained block size and at
each of `compare.thresholds`. The table is printed with a few scored answers (AR, and each
block-diffusion stage at threshold 0.9); the JSON and the
plots go to `<workdir>/compare/` (`evaluation.gym.compare`). Nothing is trained.
"""
from __future__ import annotations

import os

from llada2_jax.data import gym_tasks
from llada2_jax.evaluation import gym
from llada2_jax.training.context import StageContext

SHOWN_ANSWERS = 2  # scored answers printed per AR setting and per stage at SHOWN_THRESHOLD
SHOWN_THRESHOLD = 0.9


class Compare:

    def __init__(self, ctx: StageContext, scorer=None):
        """No `scorer_name`: each stage is scored by decoding, not by another stage's loss."""
        self.ctx, self.cfg = ctx, ctx.cfg

    @classmethod
    def validate(cls, config, name) -> None:
        cfg = config[name]
        for field in ("count", "gen_length", "batch_size"):
            if cfg[field] < 1:
                raise ValueError(f"{name}.{field}={cfg[field]} must be >= 1")
        if cfg.speed_items < 0:
            raise ValueError(f"{name}.speed_items={cfg.speed_items} must be >= 0")
        if not cfg.thresholds or not all(0 < t <= 1 for t in cfg.thresholds):
            raise ValueError(f"{name}.thresholds={tuple(cfg.thresholds)} must be numbers in (0, 1]")
        from llada2_jax.inference.decode import PRESETS
        for preset in cfg.get("presets", ()):
            if preset not in PRESETS:
                raise ValueError(f"{name}.presets: {preset!r} is not one of: {', '.join(PRESETS)}")

    def run(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        out = os.path.join(ctx.paths.workdir, "compare", "results.json")
        print(f"[compare] {cfg.count} held-out items of {ctx.data.gym_chats.tasks}", flush=True)
        report = gym.compare([ctx.paths.workdir], out=out, tasks=gym_tasks.parse_tasks(ctx.data.gym_chats.tasks),
                             seed=cfg.seed, count=cfg.count, thresholds=tuple(cfg.thresholds),
                             gen_length=cfg.gen_length, batch_size=cfg.batch_size, speed_items=cfg.speed_items,
                             presets=tuple(cfg.get("presets", ())), log=lambda line: print(line, flush=True))
        for key, records in report["items"].items():
            if not (key.endswith("|None") or key.endswith(f"|{SHOWN_THRESHOLD}")):
                continue
            for r in records[:SHOWN_ANSWERS]:
                print(f"[answer] {key}: {r['output']!r} (reference {r['reference']!r}, score {r['score']:g})",
                      flush=True)
        ctx.logger.write({"step": 0, "stage": ctx.name, **{
            f"accuracy|{r['model']}|{r['threshold']}": r["accuracy"] for r in report["rows"]}})
        print(f"[compare] wrote {out} and its plots", flush=True)
