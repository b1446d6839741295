"""The `sft` and `cap` training stages (spec §6, §7): block-diffusion SFT on packed chat samples.

Config section `config.sft` (and `config.cap`, the same fields; CAP adds `cap_weight` = λ):
  data            "gsm8k" (../shared/data/gsm8k/train.jsonl; `data_path` overrides the file) or a
                  jsonl path of `{"messages": [...]}` conversations or `{"prompt", "response"}` pairs
  heldout_size    records held out for evaluation (GSM8K: the file's last ones; jsonl: the last ones)
  steps, lr, lr_min, warmup_ratio, lr_schedule        cosine from lr to lr_min after warm-up
  block_size, t_min, t_max, weighting, complementary  see `posttrain.NoiseConfig`
  eval_samples    MC samples of the held-out response ELBO (t ~ U[1e-3, 1], no forced mask)
The stage starts from `model.source` (e.g. `workdir:<previous run>`), logs the kept/dropped sample
counts once, logs `eval_response_nelbo` at the end, and records its last checkpoint as the run's
output (`final.json`) so the next stage can start from it.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from llada2_jax.data import sft as sft_data
from llada2_jax.diffusion import schedules
from llada2_jax.evaluation.likelihood import mc_elbo_loglik
from llada2_jax.training import model_source as ms
from llada2_jax.training import posttrain
from llada2_jax.training.run import stage_names
from llada2_jax.training.stages import TrainStage, register
from llada2_jax.training.trainer import Segment

GSM8K = "gsm8k"
_LOGGED = ("masked_ce", "masked_accuracy", "n_masked", "rows", "samples", "sft_loss", "cap_entropy")


def apply_init_from(config) -> None:
    """`config.init_from = DIR` (an earlier run's workdir) -> model.source `workdir:DIR`, tokenizer DIR/tokenizer.

    Runs at validation (before the run or dry run reads the config), so a command-line
    `--config.init_from=...` takes effect; "" leaves `model.source` and `tokenizer` as configured.
    """
    init_from = config.get("init_from", "")
    if not init_from:
        return
    if not os.path.isdir(os.path.join(init_from, "tokenizer")) or ms.load_model_config(init_from) is None:
        raise ValueError(f"init_from={init_from!r} is not a finished run workdir (needs tokenizer/ and "
                         f"{ms.MODEL_CONFIG_FILE})")
    config.model.source = f"workdir:{init_from}"
    config.tokenizer.kind = "dir"
    config.tokenizer.path = os.path.join(init_from, "tokenizer")


def check_data_source(field: str, data: str, data_path: str = "") -> None:
    """The data file must exist at start-up; the error names the config field."""
    if data == GSM8K:
        path = data_path or str(sft_data.GSM8K_TRAIN)
        if not os.path.isfile(path):
            raise ValueError(f"{field}.data_path={path!r}: GSM8K file not found (expected "
                             f"../shared/data/gsm8k/train.jsonl or set {field}.data_path)")
    elif not os.path.isfile(data):
        raise ValueError(f"{field}.data={data!r} is neither 'gsm8k' nor an existing jsonl file")


def check_common(config, name: str) -> None:
    """Fields shared by the post-training stages: steps, learning rate, block size vs seq_len."""
    apply_init_from(config)
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


def noise_config(stage, *, complementary: bool, cap_weight: float = 0.0, beta: float = 0.1) -> posttrain.NoiseConfig:
    cfg, mc = stage.cfg, stage.ctx.model_config
    return posttrain.NoiseConfig(block_size=cfg.block_size, mask_id=mc.mask_token_id, vocab_size=mc.vocab_size,
                                 t_min=cfg.t_min, t_max=cfg.t_max, weighting=cfg.get("weighting", "elbo"),
                                 complementary=complementary, cap_weight=cap_weight, beta=beta)


def validate_noise(config, name: str, **kw) -> None:
    """Build the NoiseConfig from the config alone (mask id checked later, once the model is known)."""
    cfg = config[name]
    try:
        posttrain.NoiseConfig(block_size=cfg.block_size, mask_id=0, vocab_size=1, t_min=cfg.t_min, t_max=cfg.t_max,
                              weighting=cfg.get("weighting", "elbo"), **kw)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


class PostTrainStage(TrainStage):
    """What SFT, CAP and DPO share: one segment, cosine lr with a warm-up ratio, own data, own output."""

    def segments(self):
        return [Segment(self.name, self.cfg.steps, self.cfg.block_size)]

    def schedule(self, total_steps: int):
        warmup = int(round(self.cfg.warmup_ratio * total_steps))
        return schedules.lr_schedule(self.cfg.lr_schedule, self.peak_lr(), warmup, total_steps, self.cfg.lr_min)

    def peak_lr(self) -> float:
        return self.cfg.lr

    def per_process(self, batch_size: int) -> int:
        return batch_size // jax.process_count()

    def train_data(self, seed: int):
        """An object with `.dataset` (Grain, batched) and kept / dropped counts."""
        raise NotImplementedError

    def heldout_data(self, batch_size: int):
        raise NotImplementedError

    def make_trainer(self):
        return self.ctx.trainer_for(self)

    def heldout_batches(self) -> list[dict]:
        t = self.ctx.config.train
        batches = []
        for batch in self.heldout_data(self.per_process(t.eval_batch_size)).dataset:
            if len(batches) == t.eval_batches:
                break
            batches.append(batch)
        return batches

    def save_tokenizer(self) -> None:
        """Keep the tokenizer in this run's workdir too, so the next stage can `init_from` it."""
        directory = os.path.join(self.ctx.workdir, "tokenizer")
        if jax.process_index() == 0 and not os.path.isdir(directory):
            self.ctx.tokenizer.save(directory)

    def record_counts(self, data) -> None:
        counts = {k: v for k, v in vars(data).items() if k.startswith("num_")}
        self.ctx.logger.write({"step": 0, "stage": self.name, **counts})
        print(f"[{self.name}] data: " + ", ".join(f"{k}={v}" for k, v in counts.items()), flush=True)

    def run(self) -> None:
        ctx = self.ctx
        seed = ctx.config.seed * 1000 + stage_names(ctx.config).index(self.name)
        self.save_tokenizer()
        data = self.train_data(seed)
        self.record_counts(data)
        trainer = self.make_trainer()
        state = trainer.fit(iter(data.dataset), self.heldout_batches())
        trainer.checkpointer.close()
        self.finish(state)

    def finish(self, state) -> None:
        ctx = self.ctx
        ms.write_final(ctx.workdir, ctx.completed() + [self.name], ctx.checkpoint_dir(self.name), int(state.step))


@register("sft")
class SFT(PostTrainStage):
    """Block-diffusion SFT with complementary masking (see `posttrain.sft_loss`)."""
    cap_weight = 0.0

    @classmethod
    def validate(cls, config) -> None:
        check_common(config, cls.name)
        validate_noise(config, cls.name, complementary=config[cls.name].complementary,
                       cap_weight=config[cls.name].get("cap_weight", 0.0))

    def noise(self) -> posttrain.NoiseConfig:
        return noise_config(self, complementary=self.cfg.complementary, cap_weight=self.cfg.get("cap_weight", 0.0))

    def conversations(self, split: str) -> list:
        cfg = self.cfg
        if cfg.data == GSM8K:
            return sft_data.gsm8k_conversations(cfg.get("data_path") or None, split=split,
                                                heldout_size=cfg.heldout_size)
        records = sft_data.read_jsonl(cfg.data)
        if records and "messages" in records[0]:
            convs = sft_data.read_conversations(cfg.data)
        else:
            convs = sft_data.prompt_response_conversations(records)
        cut = len(convs) - cfg.heldout_size
        if cut <= 0:
            raise ValueError(f"{self.name}.heldout_size={cfg.heldout_size} leaves no training sample in {cfg.data}")
        return convs[:cut] if split == "train" else convs[cut:]

    def _dataset(self, split: str, batch_size: int, seed: int, num_epochs):
        return sft_data.sft_dataset(self.conversations(split), self.ctx.tokenizer, seq_len=self.ctx.config.data.seq_len,
                                    batch_size=batch_size, block_size=self.cfg.block_size, seed=seed,
                                    num_epochs=num_epochs, shard_index=jax.process_index(),
                                    shard_count=jax.process_count())

    def train_data(self, seed: int):
        return self._dataset("train", self.per_process(self.ctx.config.train.batch_size), seed, None)

    def heldout_data(self, batch_size: int):
        return self._dataset("heldout", batch_size, 0, 1)

    def loss(self, segment, model, batch, rng, step):
        loss, metrics = posttrain.sft_loss(model, batch, rng, self.noise())
        return loss, {k: metrics[k] for k in _LOGGED if k in metrics}

    def evaluate(self, segment, model, batch, rng):
        """Held-out response NELBO (prompt and padding are context only)."""
        eligible = posttrain.response_positions(batch)
        elbo, _ = mc_elbo_loglik(model, batch["tokens"], batch["segment_ids"], eligible, block_size=segment.block_size,
                                 n_samples=self.cfg.eval_samples, rng=rng, mask_id=self.ctx.model_config.mask_token_id,
                                 vocab_size=self.ctx.model_config.vocab_size, positions=batch["positions"])
        return {"nll_sum": -jnp.sum(elbo), "tokens": jnp.sum(eligible).astype(jnp.float32)}

    def summarize_eval(self, sums):
        return {"response_nelbo": sums["nll_sum"] / max(sums["tokens"], 1.0)}


@register("cap")
class CAP(SFT):
    """SFT loss + λ · mean entropy of correctly predicted masked tokens (spec §7); λ = `cap.cap_weight`."""

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        if config.cap.cap_weight <= 0:
            raise ValueError(f"cap.cap_weight={config.cap.cap_weight} must be > 0 (use the sft stage for λ = 0)")
