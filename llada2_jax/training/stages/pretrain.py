"""The corpus stages: `ar_pretrain` (next-token prediction) and `wsd` (the AR -> block-diffusion
conversion). Both read the run's corpus documents (`config.data`), packed into rows of `seq_len`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llada2_jax.data import gym_tasks, pipeline
from llada2_jax.data import sft as sft_data
from llada2_jax.diffusion import layout, losses, noising, schedules
from llada2_jax.evaluation.likelihood import mc_elbo_loglik
from llada2_jax.training.stages.base import StageData, TrainStage, shard_or_process
from llada2_jax.training.trainer import Segment


class CorpusStage(TrainStage):
    """Packed documents of the run's corpora; training rows start documents at `data.align_to_block`.

    The corpus "gym" is the run's reasoning-gym chats (`config.gym`), each a whole document.
    """

    def dataset(self, split, batch_size, seed, num_epochs, shard=None):
        data = self.ctx.data
        if data.corpora == gym_tasks.CORPUS_NAME:
            out = sft_data.sft_dataset(data.gym_chats(split), data.tokenizer, seq_len=data.seq_len,
                                       batch_size=batch_size, block_size=max(data.align_to_block, 1), seed=seed,
                                       num_epochs=num_epochs, whole_chat=True, **shard_or_process(shard))
            return StageData(out.dataset)
        docs = data.documents(split)
        if not docs:
            raise ValueError(f"data.corpora: the {split!r} split holds no document (data.heldout_fraction)")
        ds = pipeline.pretrain_dataset(
            docs, data.tokenizer, seq_len=data.seq_len, batch_size=batch_size, seed=seed,
            align_to_block=(data.align_to_block or None) if split == "train" else None, num_epochs=num_epochs,
            cache_dir=self.ctx.paths.cache, **shard_or_process(shard))
        return StageData(ds)


def ar_nll_sums(model, db) -> dict:
    """Held-out sums of an AR batch: total next-token NLL and the number of loss tokens."""
    loss, metrics = losses.ar_loss(model, db)
    return {"nll_sum": loss * metrics["n_tokens"], "tokens": metrics["n_tokens"].astype(jnp.float32)}


class ARPretrain(CorpusStage):
    """Plain next-token prediction with a causal document mask (how the tiny base is made)."""

    @classmethod
    def total_steps(cls, config, name):
        return config[name].steps

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
        return ar_nll_sums(model, layout.ar_batch(batch["tokens"], batch["segment_ids"], batch["positions"],
                                                  batch["loss_mask"]))


class WSD(CorpusStage):
    """The AR → block-diffusion conversion: BDLM warm-up ladder, MDLM stable phase, BDLM decay.

    Each phase of `schedules.wsd_ladder` is one segment (its block size is static, so the step
    recompiles only at phase boundaries). Gaussian noise is added to the `[MASK]` input embeddings
    for the first `noise_steps` steps, annealed linearly to zero (spec §4).
    """

    @classmethod
    def validate(cls, config, name):
        cfg = config[name]
        try:
            noising.check_t_range(cfg.t_min, cfg.t_max)
        except ValueError as e:
            raise ValueError(f"{name}.t_min / {name}.t_max: {e}") from None
        if cfg.weighting not in losses.WEIGHTINGS:
            raise ValueError(f"{name}.weighting={cfg.weighting!r}; expected one of {losses.WEIGHTINGS}")
        try:
            cls.ladder(config.data.seq_len, cfg)
        except ValueError as e:
            raise ValueError(f"{name} ladder ({name}.warmup_sizes / {name}.decay_min vs data.seq_len): {e}") from None
        super().validate(config, name)

    @classmethod
    def total_steps(cls, config, name):
        return sum(p.steps for p in cls.ladder(config.data.seq_len, config[name]))

    @staticmethod
    def ladder(seq_len: int, cfg) -> list[schedules.Phase]:
        return schedules.wsd_ladder(seq_len, tuple(cfg.warmup_sizes), cfg.decay_min,
                                    steps_per_warmup=cfg.steps_per_warmup, stable_steps=cfg.stable_steps,
                                    steps_per_decay=cfg.steps_per_decay)

    @property
    def expert_bias_rate(self):
        return self.cfg.expert_bias_rate

    def segments(self):
        return [Segment(p.name, p.steps, p.block_size) for p in self.ladder(self.ctx.data.seq_len, self.cfg)]

    def _batch(self, segment, batch, rng):
        k_t, k_mask = jax.random.split(rng)
        eligible = batch["loss_mask"]
        t = noising.sample_t(k_t, eligible.shape[0], self.cfg.t_min, self.cfg.t_max,
                             stratified=self.cfg.get("stratified_t", False))
        noise_mask = noising.sample_mask(k_mask, t, eligible, at_least_one=True)
        mc = self.ctx.model_config
        return layout.build_diffusion_batch(batch["tokens"], batch["segment_ids"], batch["positions"], eligible,
                                            noise_mask, t, mask_id=mc.mask_token_id, block_size=segment.block_size,
                                            vocab_size=mc.vocab_size)

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
        mc = self.ctx.model_config
        elbo, _ = mc_elbo_loglik(model, batch["tokens"], batch["segment_ids"], batch["loss_mask"],
                                 block_size=segment.block_size, n_samples=self.cfg.eval_samples, rng=rng,
                                 mask_id=mc.mask_token_id, vocab_size=mc.vocab_size, t_min=self.cfg.t_min,
                                 positions=batch["positions"])
        return {"nll_sum": -jnp.sum(elbo), "tokens": jnp.sum(batch["loss_mask"]).astype(jnp.float32)}

    def summarize_eval(self, sums):
        return {"nelbo": sums["nll_sum"] / max(sums["tokens"], 1.0)}
