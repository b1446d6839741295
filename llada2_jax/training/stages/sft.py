"""The `sft` and `cap` stages (spec §6, §7): block-diffusion SFT on packed chat samples.

Config section `config.sft` (and `config.cap`, the same fields; CAP adds `cap_weight` = λ):
  data            "gsm8k" (../shared/data/gsm8k/train.jsonl; `data_path` overrides the file), "gym"
                  (the run's reasoning-gym chats, `config.gym`) or a jsonl path of
                  `{"messages": [...]}` conversations or `{"prompt", "response"}` pairs
  heldout_size    records held out for evaluation (GSM8K: the file's last ones; jsonl: the last
                  ones; gym: unused, the held-out split has `gym.heldout_items`)
  steps, lr, lr_min, warmup_ratio, lr_schedule        cosine from lr to lr_min after warm-up
  block_size, t_min, t_max, weighting, complementary  see `objectives.NoiseConfig`
  eval_samples    MC samples of the held-out response ELBO (t ~ U[1e-3, 1], no forced mask)
The block size reaches the objective through the stage's one segment; the mask id and vocabulary
through the model config.
"""
from __future__ import annotations

import os

import jax.numpy as jnp

from llada2_jax.data import gym_tasks
from llada2_jax.data import sft as sft_data
from llada2_jax.diffusion import layout, losses, schedules
from llada2_jax.evaluation.likelihood import mc_elbo_loglik
from llada2_jax.training import objectives
from llada2_jax.training.stages.base import StageData, TrainStage, shard_or_process
from llada2_jax.training.stages.pretrain import ar_nll_sums
from llada2_jax.training.trainer import Segment

GSM8K = "gsm8k"
_LOGGED = ("masked_ce", "masked_accuracy", "n_masked", "rows", "samples", "sft_loss", "cap_entropy",
           "edit_ce", "edit_accuracy", "n_edited")


def check_data_source(field: str, data: str, data_path: str = "") -> None:
    """The data file must exist at start-up; the error names the config field."""
    if data == gym_tasks.CORPUS_NAME:
        return
    if data == GSM8K:
        path = data_path or str(sft_data.GSM8K_TRAIN)
        if not os.path.isfile(path):
            raise ValueError(f"{field}.data_path={path!r}: GSM8K file not found (expected "
                             f"../shared/data/gsm8k/train.jsonl or set {field}.data_path)")
    elif not os.path.isfile(data):
        raise ValueError(f"{field}.data={data!r} is neither 'gsm8k', {gym_tasks.CORPUS_NAME!r} (the reasoning-gym "
                         "tasks of config.gym) nor an existing jsonl file")


def check_noise(config, name: str, **kw) -> None:
    """Build the NoiseConfig from the config alone (the mask id is checked once the model is known)."""
    cfg = config[name]
    try:
        objectives.NoiseConfig(block_size=cfg.block_size, mask_id=0, vocab_size=1, t_min=cfg.t_min, t_max=cfg.t_max,
                               weighting=cfg.get("weighting", "elbo"), **kw)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _editing(cfg) -> dict:
    """The token-editing fields of an sft/cap section (LLaDA2.1; absent = off)."""
    return dict(edit_rate=cfg.get("edit_rate", 0.0), edit_weight=cfg.get("edit_weight", 1.0))


class PostTrainStage(TrainStage):
    """What SFT, CAP and DPO share: one segment, cosine lr with a warm-up ratio, a file of samples."""

    @classmethod
    def validate(cls, config, name) -> None:
        cfg = config[name]
        if cfg.steps < 1:
            raise ValueError(f"{name}.steps={cfg.steps} must be >= 1")
        if cfg.lr <= 0:
            raise ValueError(f"{name}.lr={cfg.lr} must be > 0")
        if not 0 <= cfg.lr_min <= cfg.lr:
            raise ValueError(f"{name}.lr_min={cfg.lr_min} must be in [0, {name}.lr={cfg.lr}]")
        if not 0.0 <= cfg.warmup_ratio < 1.0:
            raise ValueError(f"{name}.warmup_ratio={cfg.warmup_ratio} must be in [0, 1)")
        if cfg.lr_schedule not in schedules.LR_KINDS:
            raise ValueError(f"{name}.lr_schedule={cfg.lr_schedule!r}; expected one of {schedules.LR_KINDS}")
        if cfg.block_size < 1 or config.data.seq_len % cfg.block_size:
            raise ValueError(f"{name}.block_size={cfg.block_size} must divide data.seq_len={config.data.seq_len}")
        if cfg.eval_samples < 1:
            raise ValueError(f"{name}.eval_samples={cfg.eval_samples} must be >= 1")
        check_data_source(name, cfg.data, cfg.get("data_path", ""))

    @classmethod
    def total_steps(cls, config, name):
        return config[name].steps

    def segments(self):
        return [Segment(self.name, self.cfg.steps, self.cfg.block_size)]

    def schedule(self, total_steps: int):
        warmup = int(round(self.cfg.warmup_ratio * total_steps))
        return schedules.lr_schedule(self.cfg.lr_schedule, self.peak_lr(), warmup, total_steps, self.cfg.lr_min)

    def peak_lr(self) -> float:
        return self.cfg.lr

    def noise(self, segment: Segment, **kw) -> objectives.NoiseConfig:
        mc = self.ctx.model_config
        return objectives.NoiseConfig(block_size=segment.block_size, mask_id=mc.mask_token_id,
                                      vocab_size=mc.vocab_size, t_min=self.cfg.t_min, t_max=self.cfg.t_max,
                                      weighting=self.cfg.get("weighting", "elbo"), **kw)

    def split_records(self, records: list, split: str, what: str) -> list:
        """The last `heldout_size` records are held out."""
        cut = len(records) - self.cfg.heldout_size
        if cut <= 0:
            raise ValueError(f"{self.name}.heldout_size={self.cfg.heldout_size} leaves no training {what} in "
                             f"{self.cfg.data}")
        return records[:cut] if split == "train" else records[cut:]


class SFT(PostTrainStage):
    """Block-diffusion SFT with complementary masking (see `objectives.sft_loss`)."""

    @classmethod
    def validate(cls, config, name) -> None:
        super().validate(config, name)
        check_noise(config, name, complementary=config[name].complementary,
                    cap_weight=config[name].get("cap_weight", 0.0), **_editing(config[name]))

    def conversations(self, split: str) -> list:
        cfg = self.cfg
        if cfg.data == gym_tasks.CORPUS_NAME:
            return self.ctx.data.gym_chats(split)
        if cfg.data == GSM8K:
            return sft_data.gsm8k_conversations(cfg.get("data_path") or None, split=split,
                                                heldout_size=cfg.heldout_size)
        records = sft_data.read_jsonl(cfg.data)
        if records and "messages" in records[0]:
            convs = sft_data.read_conversations(cfg.data)
        else:
            convs = sft_data.prompt_response_conversations(records)
        return self.split_records(convs, split, "sample")

    def dataset(self, split, batch_size, seed, num_epochs, shard=None):
        data = self.ctx.data
        out = sft_data.sft_dataset(self.conversations(split), data.tokenizer, seq_len=data.seq_len,
                                   batch_size=batch_size, block_size=self.cfg.block_size, seed=seed,
                                   num_epochs=num_epochs, **shard_or_process(shard))
        return StageData(out.dataset, {"num_samples": out.num_samples, "num_dropped": out.num_dropped})

    def loss(self, segment, model, batch, rng, step):
        noise = self.noise(segment, complementary=self.cfg.complementary, cap_weight=self.cfg.get("cap_weight", 0.0),
                           **_editing(self.cfg))
        loss, metrics = objectives.sft_loss(model, batch, rng, noise)
        return loss, {k: metrics[k] for k in _LOGGED if k in metrics}

    def evaluate(self, segment, model, batch, rng):
        """Held-out response NELBO (prompt and padding are context only)."""
        mc = self.ctx.model_config
        eligible = objectives.response_positions(batch)
        elbo, _ = mc_elbo_loglik(model, batch["tokens"], batch["segment_ids"], eligible, block_size=segment.block_size,
                                 n_samples=self.cfg.eval_samples, rng=rng, mask_id=mc.mask_token_id,
                                 vocab_size=mc.vocab_size, positions=batch["positions"])
        return {"nll_sum": -jnp.sum(elbo), "tokens": jnp.sum(eligible).astype(jnp.float32)}

    def summarize_eval(self, sums):
        return {"response_nelbo": sums["nll_sum"] / max(sums["tokens"], 1.0)}


class CAP(SFT):
    """SFT loss + λ · mean entropy of correctly predicted masked tokens (spec §7); λ = `cap.cap_weight`."""

    @classmethod
    def validate(cls, config, name) -> None:
        super().validate(config, name)
        if config[name].cap_weight <= 0:
            raise ValueError(f"{name}.cap_weight={config[name].cap_weight} must be > 0 (use the sft stage for λ = 0)")


class ARSFT(SFT):
    """The AR twin: next-token fine-tuning on the same packed chats, loss on the response tokens.

    It starts from `model.source`, not from the previous stage (`branch`), and hands nothing on,
    so a run can train the conversion chain and its AR baseline side by side. `steps = 0` gives it
    the steps of the run's other training stages together (`validate.resolve_config`): the same
    data tokens as the chain. It logs block size 0
    (`Segment("ar", ...)`), which is how evaluation knows to decode it autoregressively.
    """
    branch = True

    @classmethod
    def validate(cls, config, name) -> None:
        PostTrainStage.validate(config, name)

    def segments(self):
        return [Segment("ar", self.cfg.steps, 0)]

    def loss(self, segment, model, batch, rng, step):
        loss, metrics = losses.ar_loss(model, self._ar_batch(batch))
        return loss, {"masked_accuracy": metrics["accuracy"]}

    def evaluate(self, segment, model, batch, rng):
        return ar_nll_sums(model, self._ar_batch(batch))

    def summarize_eval(self, sums):
        return {"response_nll": sums["nll_sum"] / max(sums["tokens"], 1.0)}

    @staticmethod
    def _ar_batch(batch):
        return layout.ar_batch(batch["tokens"], batch["segment_ids"], batch["positions"],
                               objectives.response_positions(batch))
