"""Stages: what differs between AR pretraining, the WSD conversion, merging and evaluation.

A stage is a small class registered under the name used in `config.stages`. Training stages
subclass `TrainStage` and supply segments, a loss and a held-out evaluation; `Run.train` drives
them with the one `Trainer`. Other stages (merge, eval) implement `run()` directly. Adding a
post-training stage (SFT, CAP, DPO) is a new module with a `@register("sft")` class.

Each stage reads its own config section `config.<name>`; `batch` below is the dict of the data
pipelines (`tokens`, `segment_ids`, `positions`, `loss_mask`), one micro-batch (b, L).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llada2_jax.diffusion import layout, losses, noising, schedules
from llada2_jax.evaluation.likelihood import mc_elbo_loglik
from llada2_jax.training.trainer import Segment

STAGES: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a stage available as `config.stages = "...,<name>,..."`."""
    def wrap(cls):
        if name in STAGES:
            raise ValueError(f"stage {name!r} is registered twice")
        cls.name = name
        STAGES[name] = cls
        return cls
    return wrap


def get_stage(name: str) -> type:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r} in config.stages; known: {sorted(STAGES)}")
    return STAGES[name]


class TrainStage:
    """Base of the training stages. Subclasses define `segments`, `loss` and `evaluate`."""
    name = "train"
    expert_bias_rate = 0.0  # MoE aux-loss-free balancing step size (0 = frozen bias)

    def __init__(self, ctx, cfg):
        self.ctx, self.cfg = ctx, cfg

    @classmethod
    def validate(cls, config) -> None:
        """Raise ValueError naming `config.<stage>.<field>` for impossible settings."""
        cfg = config[cls.name]
        if cfg.lr <= 0:
            raise ValueError(f"{cls.name}.lr={cfg.lr} must be > 0")
        if cfg.lr_schedule not in schedules.LR_KINDS:
            raise ValueError(f"{cls.name}.lr_schedule={cfg.lr_schedule!r}; expected one of {schedules.LR_KINDS}")
        total = cls.total_steps(config)
        if total < 1:
            raise ValueError(f"{cls.name}: the stage has {total} steps; give it at least one")
        if not 0 <= cfg.warmup_steps <= total or (cfg.lr_schedule == "cosine" and cfg.warmup_steps == total):
            raise ValueError(f"{cls.name}.warmup_steps={cfg.warmup_steps} must be in [0, {total}] (the stage's "
                             f"steps; < {total} for a cosine schedule)")

    @classmethod
    def total_steps(cls, config) -> int:
        raise NotImplementedError

    def segments(self) -> list[Segment]:
        raise NotImplementedError

    def loss(self, segment: Segment, model, batch: dict, rng, step):
        """(scalar loss, metrics dict of scalars [+ expert_load (layers, E)])."""
        raise NotImplementedError

    def evaluate(self, segment: Segment, model, batch: dict, rng) -> dict:
        """Sums over one held-out batch (combined by `summarize_eval`)."""
        raise NotImplementedError

    def summarize_eval(self, sums: dict) -> dict:
        return {"loss": sums["nll_sum"] / max(sums["tokens"], 1.0)}

    def schedule(self, total_steps: int):
        return schedules.lr_schedule(self.cfg.lr_schedule, self.cfg.lr, self.cfg.warmup_steps, total_steps)

    def run(self) -> None:
        self.ctx.train(self)


@register("ar_pretrain")
class ARPretrain(TrainStage):
    """Plain next-token prediction with a causal document mask (how the tiny base is made)."""

    @classmethod
    def total_steps(cls, config):
        return config.ar_pretrain.steps

    def segments(self):
        return [Segment("ar", self.cfg.steps, 0)]

    def loss(self, segment, model, batch, rng, step):
        db = layout.ar_batch(batch["tokens"], batch["segment_ids"], batch["positions"], batch["loss_mask"])
        loss, metrics = losses.ar_loss(model, db)
        out = {"masked_acc": metrics["accuracy"]}
        if "expert_load" in metrics:
            out["expert_load"] = metrics["expert_load"]
        return loss, out

    def evaluate(self, segment, model, batch, rng):
        db = layout.ar_batch(batch["tokens"], batch["segment_ids"], batch["positions"], batch["loss_mask"])
        loss, metrics = losses.ar_loss(model, db)
        return {"nll_sum": loss * metrics["n_tokens"], "tokens": metrics["n_tokens"].astype(jnp.float32)}


@register("wsd")
class WSD(TrainStage):
    """The AR → block-diffusion conversion: BDLM warm-up ladder, MDLM stable phase, BDLM decay.

    Each phase of `schedules.wsd_ladder` is one segment (its block size is static, so the step
    recompiles only at phase boundaries). Gaussian noise is added to the `[MASK]` input embeddings
    for the first `noise_steps` steps, annealed linearly to zero (spec §4).
    """

    @classmethod
    def validate(cls, config):
        cfg = config.wsd
        try:
            noising.check_t_range(cfg.t_min, cfg.t_max)
        except ValueError as e:
            raise ValueError(f"wsd.t_min / wsd.t_max: {e}") from None
        if cfg.weighting not in losses.WEIGHTINGS:
            raise ValueError(f"wsd.weighting={cfg.weighting!r}; expected one of {losses.WEIGHTINGS}")
        try:
            cls.ladder(config)
        except ValueError as e:
            raise ValueError(f"wsd ladder (wsd.warmup_sizes / wsd.decay_min vs data.seq_len): {e}") from None
        super().validate(config)

    @classmethod
    def total_steps(cls, config):
        return sum(p.steps for p in cls.ladder(config))

    @staticmethod
    def ladder(config) -> list[schedules.Phase]:
        cfg = config.wsd
        return schedules.wsd_ladder(config.data.seq_len, tuple(cfg.warmup_sizes), cfg.decay_min,
                                    steps_per_warmup=cfg.steps_per_warmup, stable_steps=cfg.stable_steps,
                                    steps_per_decay=cfg.steps_per_decay)

    @property
    def expert_bias_rate(self):
        return self.cfg.expert_bias_rate

    def segments(self):
        return [Segment(p.name, p.steps, p.block_size) for p in self.ladder(self.ctx.config)]

    def _batch(self, segment, batch, rng, *, at_least_one=True, t_min=None):
        k_t, k_mask = jax.random.split(rng)
        eligible = batch["loss_mask"]
        t = noising.sample_t(k_t, eligible.shape[0], self.cfg.t_min if t_min is None else t_min, self.cfg.t_max,
                             stratified=self.cfg.get("stratified_t", False))
        noise_mask = noising.sample_mask(k_mask, t, eligible, at_least_one=at_least_one)
        return layout.build_diffusion_batch(batch["tokens"], batch["segment_ids"], batch["positions"], eligible,
                                            noise_mask, t, mask_id=self.ctx.model_config.mask_token_id,
                                            block_size=segment.block_size,
                                            vocab_size=self.ctx.model_config.vocab_size)

    def loss(self, segment, model, batch, rng, step):
        k_batch, k_noise = jax.random.split(rng)
        db = self._batch(segment, batch, k_batch)
        embed_noise = None
        if self.cfg.noise_steps > 0:
            embed_noise = noising.mask_embedding_noise(k_noise, db.masked_input_positions(), model.embed[...],
                                                       self.cfg.noise_scale, step, self.cfg.noise_steps)
        loss, metrics = losses.diffusion_loss(model, db, weighting=self.cfg.weighting, embed_noise=embed_noise)
        out = {"masked_acc": metrics["masked_accuracy"], "masked_ce": metrics["masked_ce"]}
        if "expert_load" in metrics:
            out["expert_load"] = metrics["expert_load"]
        return loss, out

    def evaluate(self, segment, model, batch, rng):
        """Held-out NELBO per token at this segment's block size (unbiased: no forced mask)."""
        elbo, _ = mc_elbo_loglik(model, batch["tokens"], batch["segment_ids"], batch["loss_mask"],
                                 block_size=segment.block_size, n_samples=self.cfg.eval_samples, rng=rng,
                                 mask_id=self.ctx.model_config.mask_token_id,
                                 vocab_size=self.ctx.model_config.vocab_size, t_min=self.cfg.t_min,
                                 positions=batch["positions"])
        return {"nll_sum": -jnp.sum(elbo), "tokens": jnp.sum(batch["loss_mask"]).astype(jnp.float32)}

    def summarize_eval(self, sums):
        return {"nelbo": sums["nll_sum"] / max(sums["tokens"], 1.0)}


@register("merge")
class Merge:
    """Top-k checkpoint merge (spec §3.3): mean of the k checkpoints with the best held-out ELBO.

    Candidates are the checkpoints kept by the `merge.source_stage` stage (its last
    `train.keep_checkpoints`), scored at that stage's final block size on the same held-out batches
    and noise. The merged model is written to `WORKDIR/merged/` and becomes the run's final model.
    """

    def __init__(self, ctx, cfg):
        self.ctx, self.cfg = ctx, cfg

    @classmethod
    def validate(cls, config):
        if config.merge.top_k < 1:
            raise ValueError(f"merge.top_k={config.merge.top_k} must be >= 1")
        if config.merge.source_stage not in str(config.stages).split(","):
            raise ValueError(f"merge.source_stage={config.merge.source_stage!r} is not one of config.stages")

    def run(self) -> None:
        self.ctx.merge(self.cfg)


@register("eval")
class Evaluate:
    """Final report: held-out NELBO of the run's final model and a few decoded samples."""

    def __init__(self, ctx, cfg):
        self.ctx, self.cfg = ctx, cfg

    @classmethod
    def validate(cls, config):
        cfg = config.eval
        if config.data.seq_len % cfg.block_size:
            raise ValueError(f"eval.block_size={cfg.block_size} does not divide data.seq_len={config.data.seq_len}")
        if cfg.gen_length % cfg.block_size:
            raise ValueError(f"eval.gen_length={cfg.gen_length} must be a multiple of eval.block_size={cfg.block_size}")

    def run(self) -> None:
        self.ctx.final_eval(self.cfg)


def mean_of(trees: list):
    """Arithmetic mean of several pytrees of arrays (the merge), accumulated in float32."""
    total = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trees[0])
    for tree in trees[1:]:
        total = jax.tree.map(lambda a, b: a + jnp.asarray(b, jnp.float32), total, tree)
    return jax.tree.map(lambda a, ref: (a / len(trees)).astype(ref.dtype), total, trees[0])


def rank_by(scores: dict[int, float], k: int) -> list[int]:
    """The k steps with the lowest score (ties: the later step first)."""
    return [s for s, _ in sorted(scores.items(), key=lambda kv: (kv[1], -kv[0]))][:k]

