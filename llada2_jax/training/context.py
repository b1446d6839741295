"""What a stage is given: an explicit, read-only context, and nothing of the orchestrator.

`training.run.Run` builds one `StageContext` per stage of `config.stages`; a stage reads its model
config, mesh and layout, data, paths and rng from it and never reaches back into the run.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping

import jax
from jax.sharding import Mesh

from llada2_jax.data import gym_tasks, streaming
from llada2_jax.data.tokenizers import Tokenizer
from llada2_jax.model.config import ModelConfig
from llada2_jax.training.metrics import MetricsLogger
from llada2_jax.training.model_source import ModelLayout
from llada2_jax.training.trainer import TrainSettings


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a run keeps its files (see `training.run` for the layout)."""
    workdir: str

    def checkpoints(self, stage: str) -> str:
        return os.path.join(self.workdir, "checkpoints", stage)

    @property
    def merged(self) -> str:
        return os.path.join(self.workdir, "merged")

    @property
    def cache(self) -> str:
        return os.path.join(self.workdir, "cache")


class Corpus:
    """The run's documents (`config.data.corpora`, comma-separated), loaded once per split."""

    def __init__(self, data_config):
        self.names = [c.strip() for c in str(data_config.corpora).split(",") if c.strip()]
        self.heldout_fraction, self.max_bytes = data_config.heldout_fraction, data_config.max_bytes or None
        self.text_field = data_config.get("text_field", "text")
        self._documents: dict[str, list] = {}

    def documents(self, split: str) -> list:
        if split not in self._documents:  # a list, or a StreamingCorpus for stream specs
            self._documents[split] = streaming.load_corpora(
                self.names, split=split, heldout_fraction=self.heldout_fraction, max_bytes=self.max_bytes,
                text_field=self.text_field)
        return self._documents[split]


class GymChats:
    """The run's reasoning-gym items (`config.gym`) as chats, generated once per split."""

    def __init__(self, gym_config):
        self.tasks, self.seed = gym_config.tasks, gym_config.seed
        self.counts = {"train": gym_config.train_items, "heldout": gym_config.heldout_items}
        self._chats: dict[str, list] = {}

    def __call__(self, split: str) -> list[list[dict]]:
        if split not in self._chats:
            self._chats[split] = gym_tasks.conversations(self.tasks, split=split, seed=self.seed,
                                                         count=self.counts[split])
        return self._chats[split]


@dataclasses.dataclass(frozen=True)
class RunData:
    """The run's tokenizer, packed-row shape, corpus documents (`documents(split)`) and task chats
    (`gym_chats(split)`), each loaded once."""
    tokenizer: Tokenizer
    documents: Callable[[str], list]
    gym_chats: Callable[[str], list]
    corpora: str  # `config.data.corpora`
    seq_len: int
    align_to_block: int
    batch_size: int  # global rows per step
    eval_batch_size: int
    eval_batches: int

    @staticmethod
    def per_process(batch_size: int) -> int:
        return batch_size // jax.process_count()


@dataclasses.dataclass(frozen=True)
class StageContext:
    """One stage's view of the run.

    name/cfg: the stage's name in `config.stages` and its section `config.<name>`;
    init_weights(): the previous stage's output, or `model.source` for the first stage;
    init_workdir: the earlier run a `workdir:` source points at (None otherwise);
    order: the names in `config.stages` (a stage's position there picks its rng and data seed).
    """
    name: str
    cfg: object
    seed: int
    order: tuple[str, ...]
    model_config: ModelConfig
    mesh: Mesh
    layout: ModelLayout
    data: RunData
    paths: RunPaths
    settings: TrainSettings
    optimizer: Mapping[str, float]
    logger: MetricsLogger
    init_weights: Callable[[], tuple[dict, dict]]
    init_workdir: str | None

    @property
    def index(self) -> int:
        return self.order.index(self.name)

    @property
    def rng(self):
        """The stage's key: step keys and held-out noise derive from it."""
        return jax.random.fold_in(jax.random.key(self.seed), self.index)

    @property
    def data_seed(self) -> int:
        return self.seed * 1000 + self.index
