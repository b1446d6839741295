"""The `eval` stage: held-out NELBO of the run's output at `eval.block_size`, and a few samples.

The NELBO is measured by the `wsd` stage's evaluation (its `eval_samples`, `t_min`, held-out
batches and noise), so the number is comparable with the WSD and merge evaluations logged
before it. Samples are block-diffusion decodes of held-out document prefixes. Nothing is
trained: no optimizer state is built or read.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from llada2_jax import workdir as wd
from llada2_jax.inference import generate
from llada2_jax.training import model_source as ms
from llada2_jax.training.context import StageContext
from llada2_jax.training.stages.merge import weight_shardings
from llada2_jax.training.trainer import Evaluator, Segment

SCORER = "wsd"


class FinalEval:

    def __init__(self, ctx: StageContext, scorer):
        """`scorer`: the `wsd` stage (built from its own context)."""
        self.ctx, self.cfg, self.scorer = ctx, ctx.cfg, scorer

    @staticmethod
    def scorer_name(cfg) -> str:
        return SCORER

    @classmethod
    def validate(cls, config, name) -> None:
        cfg = config[name]
        if config.data.seq_len % cfg.block_size:
            raise ValueError(f"{name}.block_size={cfg.block_size} does not divide data.seq_len={config.data.seq_len}")
        if cfg.gen_length % cfg.block_size:
            raise ValueError(f"{name}.gen_length={cfg.gen_length} must be a multiple of {name}.block_size="
                             f"{cfg.block_size}")
        if SCORER not in [s.strip() for s in str(config.stages).split(",")]:
            raise ValueError(f"config.stages={config.stages!r}: the {name!r} stage scores with the {SCORER!r} "
                             f"stage's evaluation, so config.stages must list {SCORER!r}")

    def run(self) -> None:
        """Evaluate the run's output (its final.json) and log the record; samples go to samples.json."""
        ctx, cfg = self.ctx, self.cfg
        layout = ctx.layout
        params, buffers = ms.place_weights(ms.Source("workdir", ctx.paths.workdir, ctx.model_config), layout,
                                           ctx.mesh, ctx.seed)
        evaluate = Evaluator(self.scorer, ctx.mesh, layout.graphdef, weight_shardings(layout, ctx.mesh),
                             self.scorer.ctx.rng)
        segment = Segment(f"eval_{cfg.block_size}", 0, cfg.block_size)
        nelbo = evaluate(params, buffers, segment, self.scorer.heldout_batches())["nelbo"]
        print(f"[eval] held-out NELBO per token at block size {cfg.block_size}: {nelbo:.4f}", flush=True)
        record = {"step": 0, "stage": ctx.name, "phase": segment.name, "block_size": cfg.block_size,
                  "eval_nelbo": nelbo}
        samples = self.samples(wd.merge_model(layout.graphdef, params, buffers))
        record.update(tokens_per_forward=samples["tpf"], threshold=cfg.threshold)  # export reads the setting
        if jax.process_index() == 0:
            with open(os.path.join(ctx.paths.workdir, "samples.json"), "w") as f:
                json.dump(samples, f, indent=1)
        ctx.logger.write(record)

    def samples(self, model) -> dict:
        cfg, tok = self.cfg, self.ctx.data.tokenizer
        docs = self.ctx.data.documents("heldout")[:cfg.num_samples]
        prompts = [list(np.asarray(tok.encode(d.text)[:cfg.prompt_length], np.int32)) for d in docs]
        start = time.perf_counter()
        res = generate(model, prompts, gen_length=cfg.gen_length, block_size=cfg.block_size,
                       threshold=cfg.threshold, mask_id=self.ctx.model_config.mask_token_id, eos_id=tok.eos_id)
        seconds = time.perf_counter() - start
        out = {"tpf": float(res.tpf), "seconds": seconds, "samples": []}
        for prompt, gen in zip(prompts, res.tokens):
            item = {"prompt": tok.decode(prompt), "completion": tok.decode(gen)}
            out["samples"].append(item)
            print(f"[sample] {item['prompt']!r} -> {item['completion']!r}", flush=True)
        print(f"[eval] decoded {len(prompts)} samples in {seconds:.1f}s, {res.tpf:.2f} tokens per forward",
              flush=True)
        return out
