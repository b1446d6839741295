"""The stage interface: what a training stage provides to the one loop (`training.run.train_stage`).

A training stage is built from its `StageContext` and supplies
  dataset(split, batch_size, seed, num_epochs) -> StageData   its data, train and held-out alike
  segments()                                                   runs of steps sharing one compiled step
  loss(segment, model, batch, rng, step) / evaluate(...)       the objective and held-out sums
  schedule(total_steps)                                        the learning rate
and may override `model_layout`, `initial_weights` and `save_output` (DPO trains a policy/reference
pair but hands on the policy alone). A `branch` stage (the AR twin) trains beside the chain: it
starts from the model source and the next stage starts from the stage before it. Stages that do not train (merge, eval) provide `run()`.
`batch` is one micro-batch of the stage's data pipeline, e.g. `tokens, segment_ids, positions,
loss_mask` of shape (b, L).
"""
from __future__ import annotations

import dataclasses

import jax

from llada2_jax.diffusion import schedules
from llada2_jax.training.context import StageContext
from llada2_jax.training.trainer import Segment


def shard_or_process(shard: tuple[int, int] | None) -> dict:
    """`shard_index`/`shard_count` keywords of a data pipeline: `shard`, or this process's share."""
    index, count = shard if shard is not None else (jax.process_index(), jax.process_count())
    return dict(shard_index=index, shard_count=count)


@dataclasses.dataclass
class StageData:
    """A batched Grain dataset and the counts worth logging once (e.g. samples kept / dropped)."""
    dataset: object
    counts: dict = dataclasses.field(default_factory=dict)


class TrainStage:
    """Base of the training stages."""
    expert_bias_rate = 0.0  # MoE aux-loss-free balancing step size (0 = frozen bias)
    branch = False  # True: start from `model.source` and leave the run's output to the chain

    def __init__(self, ctx: StageContext):
        self.ctx, self.cfg = ctx, ctx.cfg

    @property
    def name(self) -> str:
        return self.ctx.name

    @classmethod
    def validate(cls, config, name: str) -> None:
        """Raise ValueError naming `config.<name>.<field>` for impossible settings."""
        cfg = config[name]
        if cfg.lr <= 0:
            raise ValueError(f"{name}.lr={cfg.lr} must be > 0")
        if cfg.lr_schedule not in schedules.LR_KINDS:
            raise ValueError(f"{name}.lr_schedule={cfg.lr_schedule!r}; expected one of {schedules.LR_KINDS}")
        total = cls.total_steps(config, name)
        if total < 1:
            raise ValueError(f"{name}: the stage has {total} steps; give it at least one")
        if not 0 <= cfg.warmup_steps <= total or (cfg.lr_schedule == "cosine" and cfg.warmup_steps == total):
            raise ValueError(f"{name}.warmup_steps={cfg.warmup_steps} must be in [0, {total}] (the stage's "
                             f"steps; < {total} for a cosine schedule)")

    @classmethod
    def total_steps(cls, config, name: str) -> int:
        raise NotImplementedError

    def dataset(self, split: str, batch_size: int, seed: int, num_epochs: int | None,
                shard: tuple[int, int] | None = None) -> StageData:
        """`split` is "train" or "heldout"; `batch_size` rows per batch; `num_epochs=None`: forever.
        `shard`: (index, count) of the documents to read; None: this process's share."""
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

    def model_layout(self):
        return self.ctx.layout

    def initial_weights(self) -> tuple[dict, dict]:
        return self.ctx.init_weights()

    def save_output(self, state) -> tuple[str, int]:
        """(checkpoint directory, step) of the stage's output, recorded in final.json."""
        return self.ctx.paths.checkpoints(self.name), int(state.step)

    def heldout_batches(self) -> list[dict]:
        """The first `train.eval_batches` held-out batches (fixed: the same data every evaluation)."""
        data = self.ctx.data
        batches = []
        if data.eval_batches == 0:
            return batches
        for batch in self.dataset("heldout", data.per_process(data.eval_batch_size), 0, 1).dataset:
            batches.append(batch)
            if len(batches) == data.eval_batches:
                break
        return batches
