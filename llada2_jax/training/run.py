"""One run = a workdir + a config + a chain of stages (`config.stages`), resumable at any point.

Workdir layout (the files `llada2_jax.workdir` reads are marked *)
  tokenizer/ *               the run's tokenizer (trained once for sentencepiece)
  model_config.json *        the architecture every stage of the run shares (no runtime settings)
  checkpoints/<stage>/<step> * Orbax checkpoints of each training stage
  merged/<step> *            the top-k merged model (merge stage)
  final.json *               completed stages + where the latest stage output lives
  metrics.jsonl, tensorboard/, samples.json, cache/ (tokenized corpora)
A stage listed in final.json's `completed` is skipped on a rerun; an interrupted training stage
resumes from its latest checkpoint; a stage after the first starts from the previous one's output.
`Run` builds the shared resources once and hands each stage a `StageContext`; `train_stage` is
the one loop every training stage goes through.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from llada2_jax import workdir as wd
from llada2_jax.data import corpora
from llada2_jax.data.tokenizers import SentencePieceTokenizer, load_tokenizer
from llada2_jax.interop.sources import smollm2_tokenizer
from llada2_jax.training import mesh as mesh_lib
from llada2_jax.training import model_source as ms
from llada2_jax.training import sharding as shd
from llada2_jax.training.checkpoint import Checkpointer
from llada2_jax.training.context import Corpus, GymChats, RunData, RunPaths, StageContext
from llada2_jax.training.data_shards import ShardedBatches
from llada2_jax.training.freeze import keep_bottom_layers
from llada2_jax.training.metrics import MetricsLogger
from llada2_jax.training.stages import TrainStage, get_stage
from llada2_jax.training.state import TrainState, decay_mask, init_state, make_optimizer
from llada2_jax.training.trainer import Trainer, TrainSettings


def stage_names(config) -> list[str]:
    return [s.strip() for s in str(config.stages).split(",") if s.strip()]


def train_settings(config) -> TrainSettings:
    t = config.train
    return TrainSettings(batch_size=t.batch_size, grad_accum=t.grad_accum, log_every=t.log_every,
                         eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
                         keep_checkpoints=t.keep_checkpoints, max_nonfinite_streak=t.max_nonfinite_streak,
                         frozen_layers=t.frozen_layers,
                         stop_after_steps=t.stop_after_steps)


def state_shardings(layout: ms.ModelLayout, tx, mesh) -> TrainState:
    abstract = jax.eval_shape(lambda p, b: init_state(p, b, tx), layout.abstract_params, layout.abstract_buffers)
    specs = TrainState(layout.param_specs, layout.buffer_specs,
                       shd.optimizer_specs(tx, abstract.opt_state, layout.param_specs), P(), P(), P())
    return shd.named(specs, mesh)


def make_trainer(stage: TrainStage) -> Trainer:
    """The trainer of one stage: its layout, optimizer and schedule, checkpoints under checkpoints/<stage>."""
    ctx = stage.ctx
    layout = stage.model_layout()
    schedule = stage.schedule(sum(s.steps for s in stage.segments()))
    tx = make_optimizer(schedule, **ctx.optimizer, mask=decay_mask(layout.param_vars))
    if ctx.settings.frozen_layers:
        tx = optax.chain(tx, keep_bottom_layers(ctx.settings.frozen_layers, layout.config.num_dense_layers))
    settings = ctx.settings
    return Trainer(stage=stage, mesh=ctx.mesh, graphdef=layout.graphdef,
                   shardings=state_shardings(layout, tx, ctx.mesh), tx=tx, schedule=schedule, settings=settings,
                   checkpointer=Checkpointer(ctx.paths.checkpoints(stage.name), settings.keep_checkpoints,
                                             async_save=settings.async_checkpoints),
                   logger=ctx.logger, base_key=ctx.rng, init_weights=stage.initial_weights,
                   abstract_weights=(layout.abstract_params, layout.abstract_buffers))


def training_batches(stage: TrainStage, checkpointer: Checkpointer, shards: int = 0) -> ShardedBatches:
    """The stage's training data as `shards` data shards (0: one per process), this process's share.

    A stage resuming from a checkpoint keeps the checkpoint's shard count, whatever `shards` says, so
    the global batches continue unchanged when the process count or the mesh changes.
    """
    ctx = stage.ctx
    latest = checkpointer.latest_step()
    saved = checkpointer.data_state(latest) if latest is not None else None
    num_shards = saved["num_shards"] if saved else (shards or jax.process_count())
    counts: dict = {}

    def make_shard(index: int, count: int, rows: int):
        data = stage.dataset("train", rows, ctx.data_seed, None, shard=(index, count))
        for k, v in data.counts.items():
            counts[k] = counts.get(k, 0) + v
        return data.dataset

    batches = ShardedBatches(make_shard, num_shards=num_shards, global_batch=ctx.data.batch_size,
                             sharding=NamedSharding(ctx.mesh, shd.batch_spec()))
    if counts:  # this process's shards
        ctx.logger.write({"step": 0, "stage": stage.name, **counts})
        print(f"[{stage.name}] data: " + ", ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    return batches


def train_stage(stage: TrainStage, data_shards: int = 0) -> tuple[str, int]:
    """Train `stage` to its end (resuming from its checkpoints); returns where its output lives."""
    trainer = make_trainer(stage)
    data = training_batches(stage, trainer.checkpointer, data_shards)
    state = trainer.fit(data, stage.heldout_batches())
    trainer.checkpointer.close()
    return stage.save_output(state)


class Run:
    def __init__(self, config, workdir: str, devices=None):
        """`devices`: the devices the mesh spans (default: all devices of all processes)."""
        self.config, self.workdir = config, os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.paths = RunPaths(self.workdir)
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        self.logger = MetricsLogger(self.workdir)
        self.corpus = Corpus(config.data)
        self.gym_chats = GymChats(config.gym)
        self._tokenizer = None
        self._source = None
        self._model_config = None
        self._layout = None

    # ---------------- shared resources (built lazily, once) ----------------
    @property
    def tokenizer(self):
        """The workdir's tokenizer; built from `config.tokenizer` and saved there the first time."""
        if self._tokenizer is None:
            directory = os.path.join(self.workdir, wd.TOKENIZER_DIR)
            saved = os.path.exists(os.path.join(directory, "llada2_tokenizer.json"))
            if jax.process_count() > 1:  # process 0 builds and saves it, the others then read that one
                saved = bool(multihost_utils.broadcast_one_to_all(np.array(saved)))
                if not saved and jax.process_index() == 0:
                    self._new_tokenizer().save(directory)
                multihost_utils.sync_global_devices("llada2_jax: run tokenizer saved")
                saved = True
            if saved:
                self._tokenizer = load_tokenizer(directory)
            else:
                self._tokenizer = self._new_tokenizer()
                self._tokenizer.save(directory)
        return self._tokenizer

    def _new_tokenizer(self):
        cfg = self.config.tokenizer
        if cfg.kind == "dir":
            return load_tokenizer(cfg.path)
        if cfg.kind == "smollm2":
            return smollm2_tokenizer()
        docs = corpora.select(self.corpus.documents("train"), max_bytes=cfg.train_max_bytes)
        return SentencePieceTokenizer.train(corpora.texts(docs), cfg.vocab_size)

    @property
    def runtime(self) -> dict:
        return dict(self.config.model.runtime)

    @property
    def model_config(self):
        if self._model_config is None:
            saved = wd.load_model_config(self.workdir, **self.runtime)
            if saved is not None:
                self._model_config = saved
            else:
                self._model_config = self.source.config
                wd.save_model_config(self.workdir, self._model_config)
            mask = self._model_config.mask_token_id
            if mask is None:
                raise ValueError("the model has no mask_token_id (model.arch.mask_token_id / the tokenizer)")
            if self.tokenizer.mask_id is not None and self.tokenizer.mask_id != mask:
                raise ValueError(f"model mask_token_id={mask} differs from the tokenizer's [MASK] id "
                                 f"{self.tokenizer.mask_id} (tokenizer.kind={self.config.tokenizer.kind!r})")
        return self._model_config

    @property
    def source(self) -> ms.Source:
        if self._source is None:
            self._source = ms.open_source(self.config.model.source, dict(self.config.model.arch), self.runtime,
                                          self.tokenizer)
        return self._source

    @property
    def layout(self) -> ms.ModelLayout:
        if self._layout is None:
            frozen = self.config.train.frozen_layers
            if frozen >= self.model_config.num_hidden_layers:
                raise ValueError(f"train.frozen_layers={frozen} must be < the model's "
                                 f"{self.model_config.num_hidden_layers} layers")
            self._layout = ms.ModelLayout.build(self.model_config, dict(self.mesh.shape), frozen)
        return self._layout

    def completed(self) -> list[str]:
        final = wd.read_final(self.workdir)
        return [] if final is None else list(final["completed"])

    def initial_weights(self) -> tuple[dict, dict]:
        """The previous stage's output when there is one, else `model.source`; sharded on the mesh."""
        final = wd.read_final(self.workdir)
        if final is not None and final["checkpoint_dir"]:
            return ms.place_weights(ms.Source("workdir", self.workdir, self.model_config), self.layout, self.mesh,
                                    self.config.seed)
        return self.source_weights()

    def source_weights(self) -> tuple[dict, dict]:
        """`model.source`'s weights, sharded on the mesh (where a branch stage starts)."""
        return ms.place_weights(self.source, self.layout, self.mesh, self.config.seed)

    # ---------------- stages ----------------
    def context(self, name: str) -> StageContext:
        c = self.config
        kind, arg = ms.parse_source(c.model.source)
        order = tuple(stage_names(c))
        data = RunData(tokenizer=self.tokenizer, documents=self.corpus.documents, gym_chats=self.gym_chats,
                       corpora=str(c.data.corpora), seq_len=c.data.seq_len,
                       align_to_block=c.data.align_to_block, batch_size=c.train.batch_size,
                       eval_batch_size=c.train.eval_batch_size, eval_batches=c.train.eval_batches)
        return StageContext(name=name, cfg=c[name], seed=c.seed, order=order, model_config=self.model_config,
                            mesh=self.mesh, layout=self.layout, data=data, paths=self.paths,
                            settings=train_settings(c), optimizer=dict(c.optimizer), logger=self.logger,
                            init_weights=self.source_weights if getattr(get_stage(name), "branch", False)
                            else self.initial_weights, init_workdir=ms.workdir_parts(arg)[0] if kind == "workdir" else None)

    def stage(self, name: str):
        """The stage `name` built from its context; a stage that only scores (merge, eval) also gets
        the training stage whose evaluation it uses (`scorer_name`)."""
        ctx = self.context(name)
        cls = get_stage(name)
        if issubclass(cls, TrainStage):
            return cls(ctx)
        scorer = cls.scorer_name(ctx.cfg) if hasattr(cls, "scorer_name") else None
        return cls(ctx, self.stage(scorer) if scorer else None)

    def run_stage(self, name: str) -> None:
        """Run one stage and record it in final.json with the run's (possibly new) output."""
        stage = self.stage(name)
        output = (train_stage(stage, self.config.data.get("shards", 0)) if isinstance(stage, TrainStage)
                  else stage.run())
        if output is None or getattr(stage, "branch", False):  # the run's output stays the chain's
            final = wd.read_final(self.workdir)
            output = (final["checkpoint_dir"], final["step"]) if final else ("", 0)
        wd.write_final(self.workdir, self.completed() + [name], *output)

    def execute(self) -> None:
        done = self.completed()
        try:
            for name in stage_names(self.config):
                if name in done:
                    print(f"[run] stage {name!r} already completed; skipping", flush=True)
                    continue
                print(f"[run] stage {name!r}", flush=True)
                start = time.perf_counter()
                self.run_stage(name)
                print(f"[run] stage {name!r} done in {time.perf_counter() - start:.1f}s", flush=True)
        finally:  # also on a stop or an error: the tensorboard writer's thread must not outlive the run
            self.logger.close()



