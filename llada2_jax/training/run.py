"""One run = a workdir + a config + a chain of stages (`config.stages`), resumable at any point.

Workdir layout
  tokenizer/                 the run's tokenizer (trained once for sentencepiece)
  model_config.json          the architecture every stage of the run shares
  checkpoints/<stage>/<step> Orbax checkpoints of each training stage
  merged/<step>              the top-k merged model (merge stage)
  final.json                 completed stages + where the latest stage output lives
  metrics.jsonl, tensorboard/, samples.json, cache/ (tokenized corpora)
A stage listed in final.json's `completed` is skipped on a rerun; an interrupted training stage
resumes from its latest checkpoint; a stage after the first starts from the previous one's output.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from llada2_jax.data import corpora, pipeline
from llada2_jax.data.tokenizers import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from llada2_jax.training import mesh as mesh_lib
from llada2_jax.training import model_source as ms
from llada2_jax.training import sharding as shd
from llada2_jax.training import stages as stages_lib
from llada2_jax.training.checkpoint import Checkpointer
from llada2_jax.training.metrics import MetricsLogger
from llada2_jax.training.state import TrainState, decay_mask, init_state, make_optimizer
from llada2_jax.training.trainer import Trainer, TrainSettings
from jax.sharding import PartitionSpec as P

def stage_names(config) -> list[str]:
    return [s.strip() for s in str(config.stages).split(",") if s.strip()]


def model_runtime(config) -> dict:
    return dict(config.model.runtime)


class Run:
    def __init__(self, config, workdir: str, devices=None):
        """`devices`: the devices the mesh spans (default: all devices of all processes)."""
        self.config, self.workdir = config, os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        self.logger = MetricsLogger(self.workdir)
        self._tokenizer = None
        self._documents: dict[str, list] = {}
        self._source = None
        self._model_config = None
        self._layout = None

    # ---------------- shared resources (built lazily, once) ----------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._build_tokenizer()
        return self._tokenizer

    def _build_tokenizer(self):
        directory = os.path.join(self.workdir, "tokenizer")
        if os.path.exists(os.path.join(directory, "llada2_tokenizer.json")):
            return load_tokenizer(directory)
        cfg = self.config.tokenizer
        if cfg.kind == "dir":
            return load_tokenizer(cfg.path)
        if cfg.kind == "smollm2":
            from llada2_jax.interop import gguf
            tok = HFTokenizer.smollm2(gguf.load_gguf_tokenizer().tokenizer, add_mask_token=True)
        else:
            docs = corpora.select(self.documents("train"), max_bytes=cfg.train_max_bytes)
            tok = SentencePieceTokenizer.train(corpora.texts(docs), cfg.vocab_size)
        if jax.process_index() == 0:
            tok.save(directory)
        return tok

    def documents(self, split: str) -> list:
        if split not in self._documents:
            d = self.config.data
            docs = []
            for name in [c.strip() for c in str(d.corpora).split(",") if c.strip()]:
                docs += corpora.load_corpus(name, split=split, heldout_fraction=d.heldout_fraction,
                                            max_bytes=d.max_bytes or None)
            self._documents[split] = docs
        return self._documents[split]

    @property
    def model_config(self):
        if self._model_config is None:
            saved = ms.load_model_config(self.workdir)
            if saved is not None:
                self._model_config = saved.replace(**model_runtime(self.config))
            else:
                self._model_config = self.source.config
                ms.save_model_config(self.workdir, self._model_config)
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
            self._source = ms.open_source(self.config.model.source, dict(self.config.model.arch),
                                          model_runtime(self.config), self.tokenizer)
        return self._source

    @property
    def layout(self) -> ms.ModelLayout:
        if self._layout is None:
            self._layout = ms.ModelLayout.build(self.model_config, dict(self.mesh.shape))
        return self._layout

    def shardings(self, tx) -> TrainState:
        lay = self.layout
        abstract = jax.eval_shape(lambda p, b: init_state(p, b, tx), lay.abstract_params, lay.abstract_buffers)
        specs = TrainState(lay.param_specs, lay.buffer_specs, shd.optimizer_specs(tx, abstract.opt_state, lay.param_specs),
                           P(), P(), P())
        return shd.named(specs, self.mesh)

    # ---------------- data ----------------
    def _per_process(self, batch_size: int) -> int:
        return batch_size // jax.process_count()

    def train_iterator(self, seed: int):
        d = self.config.data
        ds = pipeline.pretrain_dataset(
            self.documents("train"), self.tokenizer, seq_len=d.seq_len,
            batch_size=self._per_process(self.config.train.batch_size), seed=seed,
            align_to_block=d.align_to_block or None, num_epochs=None, shard_index=jax.process_index(),
            shard_count=jax.process_count(), cache_dir=os.path.join(self.workdir, "cache"))
        return iter(ds)

    def heldout_batches(self) -> list[dict]:
        t = self.config.train
        docs = self.documents("heldout")
        if not docs:
            raise ValueError(f"data.heldout_fraction={self.config.data.heldout_fraction} selects no held-out document")
        ds = pipeline.pretrain_dataset(
            docs, self.tokenizer, seq_len=self.config.data.seq_len, batch_size=self._per_process(t.eval_batch_size),
            seed=0, num_epochs=1, shard_index=jax.process_index(), shard_count=jax.process_count(),
            cache_dir=os.path.join(self.workdir, "cache"))
        batches = []
        for batch in ds:
            if len(batches) == t.eval_batches:
                break
            batches.append(batch)
        return batches

    # ---------------- stage plumbing ----------------
    def _settings(self) -> TrainSettings:
        t = self.config.train
        return TrainSettings(batch_size=t.batch_size, grad_accum=t.grad_accum, log_every=t.log_every,
                             eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
                             keep_checkpoints=t.keep_checkpoints, max_nonfinite_streak=t.max_nonfinite_streak,
                             stop_after_steps=t.stop_after_steps)

    def checkpoint_dir(self, stage_name: str) -> str:
        return os.path.join(self.workdir, "checkpoints", stage_name)

    def completed(self) -> list[str]:
        final = ms.read_final(self.workdir)
        return [] if final is None else list(final["completed"])

    def _initial_weights(self):
        """The previous stage's output when there is one, else `model.source`."""
        if ms.read_final(self.workdir) is not None:
            src = ms.Source("workdir", self.workdir, self.model_config)
        else:
            src = self.source
        return ms.place_weights(src, self.layout, self.mesh, self.config.seed)

    def trainer_for(self, stage) -> Trainer:
        opt = self.config.optimizer
        total = sum(s.steps for s in stage.segments())
        schedule = stage.schedule(total)
        tx = make_optimizer(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                            grad_clip=opt.grad_clip, mask=decay_mask(self.layout.param_vars))
        settings = self._settings()
        return Trainer(stage=stage, mesh=self.mesh, graphdef=self.layout.graphdef, shardings=self.shardings(tx),
                       tx=tx, schedule=schedule, settings=settings,
                       checkpointer=Checkpointer(self.checkpoint_dir(stage.name), settings.keep_checkpoints,
                                                 async_save=settings.async_checkpoints),
                       logger=self.logger, base_key=self.stage_key(stage.name),
                       init_weights=self._initial_weights,
                       abstract_weights=(self.layout.abstract_params, self.layout.abstract_buffers))

    def stage_key(self, name: str):
        index = stage_names(self.config).index(name)
        return jax.random.fold_in(jax.random.key(self.config.seed), index)

    def train(self, stage) -> None:
        trainer = self.trainer_for(stage)
        seed = self.config.seed * 1000 + stage_names(self.config).index(stage.name)
        state = trainer.fit(self.train_iterator(seed), self.heldout_batches())
        step = int(state.step)
        trainer.checkpointer.close()
        ms.write_final(self.workdir, self.completed() + [stage.name], self.checkpoint_dir(stage.name), step)

    def merge(self, cfg) -> None:
        """Score the source stage's kept checkpoints, average the top k, save to WORKDIR/merged."""
        stage = stages_lib.get_stage(cfg.source_stage)(self, self.config[cfg.source_stage])
        trainer = self.trainer_for(stage)
        segment = stage.segments()[-1]
        heldout = self.heldout_batches()
        lay = self.layout
        sh = (trainer.shardings.params, trainer.shardings.buffers)
        candidates = trainer.checkpointer.all_steps()
        if not candidates:
            raise ValueError(f"merge: no checkpoints under {self.checkpoint_dir(cfg.source_stage)}")
        scores, weights = {}, {}
        for step in candidates:
            params, buffers = trainer.checkpointer.restore_model(step, lay.abstract_params, lay.abstract_buffers, sh)
            scores[step] = float(next(iter(trainer.evaluate(params, buffers, segment, heldout).values())))
            weights[step] = (params, buffers)
        best = stages_lib.rank_by(scores, cfg.top_k)
        merged_params, merged_buffers = stages_lib.mean_of([weights[s] for s in best])
        merged_score = float(next(iter(trainer.evaluate(merged_params, merged_buffers, segment, heldout).values())))
        last = max(candidates)
        out = Checkpointer(os.path.join(self.workdir, "merged"), keep=1, async_save=False)
        out.save_model(last, merged_params, merged_buffers, {"merged_steps": best, "scores": scores})
        out.wait()
        out.close()
        self.logger.write({"step": last, "stage": "merge", "phase": segment.name, "block_size": segment.block_size,
                           "merged_steps": json.dumps(best), "candidate_nelbo": json.dumps(scores),
                           "eval_nelbo": merged_score, "best_single_nelbo": scores[best[0]]})
        print(f"[merge] candidates {scores} -> merged {best}: held-out NELBO {merged_score:.4f} "
              f"(best single {scores[best[0]]:.4f})", flush=True)
        ms.write_final(self.workdir, self.completed() + ["merge"], os.path.join(self.workdir, "merged"), last)

    def final_eval(self, cfg) -> None:
        """Held-out NELBO at eval.block_size and a few greedy samples from held-out prompts."""
        from llada2_jax.training.state import merge_model
        from llada2_jax.training.trainer import Segment
        params, buffers = ms.place_weights(ms.Source("workdir", self.workdir, self.model_config),
                                           self.layout, self.mesh, self.config.seed)
        stage = stages_lib.get_stage("wsd")(self, self.config.wsd)
        trainer = self.trainer_for(stage)
        segment = Segment(f"eval_{cfg.block_size}", 0, cfg.block_size)
        nelbo = trainer.evaluate(params, buffers, segment, self.heldout_batches())["nelbo"]
        print(f"[eval] held-out NELBO per token at block size {cfg.block_size}: {nelbo:.4f}", flush=True)
        record = {"step": 0, "stage": "eval", "phase": segment.name, "block_size": cfg.block_size,
                  "eval_nelbo": nelbo}
        samples = self._samples(merge_model(self.layout.graphdef, params, buffers), cfg)
        if samples is not None:
            record["tokens_per_forward"] = samples["tpf"]
            if jax.process_index() == 0:
                with open(os.path.join(self.workdir, "samples.json"), "w") as f:
                    json.dump(samples, f, indent=1)
        self.logger.write(record)
        ms.write_final(self.workdir, self.completed() + ["eval"], ms.read_final(self.workdir)["checkpoint_dir"],
                       ms.read_final(self.workdir)["step"])

    def _samples(self, model, cfg) -> dict | None:
        try:
            from llada2_jax.inference import generate
        except ImportError:
            print("[eval] llada2_jax.inference.generate is not available: no samples", flush=True)
            return None
        tok = self.tokenizer
        prompts = [list(b) for b in self._prompt_ids(cfg)]
        start = time.perf_counter()
        res = generate(model, prompts, gen_length=cfg.gen_length, block_size=cfg.block_size,
                       threshold=cfg.threshold, mask_id=self.model_config.mask_token_id, eos_id=tok.eos_id)
        seconds = time.perf_counter() - start
        out = {"tpf": float(res.tpf), "seconds": seconds, "samples": []}
        for prompt, gen in zip(prompts, res.tokens):
            item = {"prompt": tok.decode(prompt), "completion": tok.decode(gen)}
            out["samples"].append(item)
            print(f"[sample] {item['prompt']!r} -> {item['completion']!r}", flush=True)
        print(f"[eval] decoded {len(prompts)} samples in {seconds:.1f}s, {res.tpf:.2f} tokens per forward",
              flush=True)
        return out

    def _prompt_ids(self, cfg) -> list[np.ndarray]:
        docs = self.documents("heldout")[:cfg.num_samples]
        return [np.asarray(self.tokenizer.encode(d.text)[:cfg.prompt_length], np.int32) for d in docs]

    # ---------------- the chain ----------------
    def execute(self) -> None:
        done = self.completed()
        for name in stage_names(self.config):
            if name in done:
                print(f"[run] stage {name!r} already completed; skipping", flush=True)
                continue
            print(f"[run] stage {name!r}", flush=True)
            start = time.perf_counter()
            stage = stages_lib.get_stage(name)(self, self.config[name])
            stage.run()
            print(f"[run] stage {name!r} done in {time.perf_counter() - start:.1f}s", flush=True)
        self.logger.close()
