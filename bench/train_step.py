"""Training-step throughput: the project's WSD (BDLM) step vs a PyTorch/transformers step, CPU fp32.

    python bench/train_step.py [--lengths=256,1024] [--batch=2,1] [--steps=2] [--nowrite]

Model: SmolLM2-135M dimensions (Llama, 30 layers, d 576, 9/3 heads, head_dim 64, FFN 1536,
vocab 49153 = 49152 + the added [MASK], tied embeddings), random weights, fp32 everywhere.

JAX: the step `python -m llada2_jax.main` runs for the `wsd` stage of experiments/smollm2_wsd.py:
`training.run.make_trainer(WSD(ctx))` and its jitted, donated train step (`Trainer._step_for`),
i.e. noising + `build_diffusion_batch` + `[MASK]`-embedding noise + `diffusion_loss` + clip + AdamW,
called back to back as the loop calls it (outputs read at the end). The runtime settings are the
config's (`model.runtime`: attention_impl "xla", remat "none"), or those of each --variants entry.

PyTorch: transformers `LlamaForCausalLM` with the same weights (exported through
`interop.params.export`), fed the same step-0 batch: the same `[x_t ; x_0]` tokens, positions and
`[MASK]`-embedding noise, the dense block-diffusion mask as a 4D additive float mask (sdpa), logits on
the L noisy rows only, the same ELBO-weighted masked cross-entropy, global-norm clip 1.0 and
torch AdamW (fp32). Its step-0 loss is printed beside the JAX one as a check that both compute the
same objective.

Counted FLOPs per step (B rows, T = 2L tokens per row, fwd x 3 for fwd+bwd):
  layers   2 * B*T * n_layers * (d*Hq*D + 2*d*Hkv*D + Hq*D*d + 3*d*F)     (q, k, v, o, SwiGLU)
  attention 4 * B * n_layers * T^2 * Hq*D   (QK^T and PV over the full dense T x T mask)
  head     2 * B*L * d * V                   (the L noisy query rows, what the reference projects)
Nothing else (norms, softmax, RoPE, the optimizer) is counted. The same count divides both
implementations' step time, so "GFLOP/s" is model FLOPs per second: a path that skips work (the
JAX loss projects only the masked rows; a sparse attention skips empty tiles) gets credit for it.
"% of peak" divides by the fp32 matmul rate XLA reaches in the same process
(a jitted 4096^3 `jnp.dot`, best of 3). Both sides run fp32: on this CPU XLA's bf16 matmul is not
faster than fp32, while oneDNN bf16 in PyTorch is; the comparison is fp32 with fp32.

Tokens/s counts the L real tokens per row (as the trainer's `tokens_per_sec` does), not 2L.
Timing: two untimed steps (compile / allocator warm-up) on each side, then --steps steps back to back;
the mean is reported.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import _cli
import _flops
import _results
from llada2_jax.configs import smollm2 as smollm2_config
from llada2_jax.model.config import ModelConfig
from llada2_jax.training import mesh as mesh_lib
from llada2_jax.training import model_source as ms
from llada2_jax.training import run as run_lib
from llada2_jax.training.context import RunData, RunPaths, StageContext
from llada2_jax.training.metrics import MetricsLogger
from llada2_jax.training.stages.pretrain import WSD
from llada2_jax.training.trainer import Segment, device_batch
from llada2_jax.workdir import merge_model

LENGTHS = _cli.DEFINE_number_list("lengths", "256,1024", "sequence lengths L (the model sees 2L tokens)", lower=1)
BATCH = _cli.DEFINE_number_list("batch", "2,1", "rows per step, one per --lengths entry (or one for all)", lower=1)
BLOCK = flags.DEFINE_integer("block", 32, "diffusion block size", lower_bound=1)
STEPS = flags.DEFINE_integer("steps", 2, "timed steps (after one warm-up step)", lower_bound=1)
VARIANTS = flags.DEFINE_list(
    "variants", ["config"], "JAX runtime settings to time, each 'config' (the config's model.runtime) or "
    "'<attention_impl>:<remat_policy>' (e.g. xla_sparse:none), optionally for one length only as "
    "'<L>/<variant>' (e.g. 256/config); the torch step is timed once per length")
TORCH = flags.DEFINE_boolean("torch", True, "also time the PyTorch/transformers step")
WRITE = flags.DEFINE_boolean("write", True, "write the table to bench/results/train_step.md")

SMOLLM2_DIMS = dict(model_type="llama", vocab_size=49153, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                    tie_word_embeddings=True, mask_token_id=49152, eos_token_id=0, pad_token_id=0)


def step_flops(mc: ModelConfig, batch: int, length: int) -> float:
    t = 2 * length
    forward = (_flops.dense_layer_flops(mc, batch * t) + batch * _flops.attention_flops(mc, t, t)
               + _flops.head_flops(mc, batch * length))
    return 3.0 * forward


def build_trainer(length: int, batch: int, workdir: str, variant: str = "config"):
    """The wsd stage's trainer exactly as `training.run` builds it, on a random SmolLM2-size model.

    variant: "config" keeps the config's `model.runtime`; "<attention_impl>:<remat_policy>" overrides both.
    """
    config = smollm2_config.get_config("wsd")
    config.data.seq_len = length
    config.train.batch_size = batch
    runtime = dict(config.model.runtime)
    if variant != "config":
        runtime["attention_impl"], runtime["remat_policy"] = variant.split(":")
    mc = ModelConfig(**SMOLLM2_DIMS, **runtime)
    mesh = mesh_lib.make_mesh(config.mesh)
    layout = ms.ModelLayout.build(mc, dict(mesh.shape))
    known = dict(seq_len=length, align_to_block=0, batch_size=batch, eval_batch_size=batch, eval_batches=0,
                 corpora=str(config.data.corpora))
    # no corpus is read: the step gets a fixed random batch (fields this bench does not use get None)
    data = RunData(**{f.name: known.get(f.name) for f in dataclasses.fields(RunData)})
    ctx = StageContext(name="wsd", cfg=config.wsd, seed=config.seed, order=("wsd",), model_config=mc, mesh=mesh,
                       layout=layout, data=data, paths=RunPaths(workdir), settings=run_lib.train_settings(config),
                       optimizer=dict(config.optimizer), logger=MetricsLogger(workdir),
                       init_weights=lambda: ms.place_weights(ms.Source("init", "", mc), layout, mesh, config.seed),
                       init_workdir=None)
    stage = WSD(ctx)
    return stage, run_lib.make_trainer(stage), mc


def host_batch(length: int, batch: int, vocab: int) -> dict:
    rng = np.random.default_rng(length * 7 + batch)
    return {"tokens": rng.integers(0, vocab - 1, (batch, length)).astype(np.int32),
            "segment_ids": np.ones((batch, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
            "loss_mask": np.ones((batch, length), bool)}


def step0_inputs(stage, trainer, segment, batch: dict, params):
    """The step-0 diffusion batch and [MASK]-embedding noise, drawn with the trainer step's own keys."""
    rng = jax.random.fold_in(jax.random.fold_in(trainer.base_key, 0), 0)  # step 0, micro-batch 0
    k_batch, k_noise = jax.random.split(rng)
    jb = jax.tree.map(jnp.asarray, batch)
    db = stage._batch(segment, jb, k_batch)
    from llada2_jax.diffusion import noising
    cfg = stage.cfg
    noise = noising.mask_embedding_noise(k_noise, db.masked_input_positions(), params["embed"], cfg.noise_scale, 0,
                                         cfg.noise_steps) if cfg.noise_steps > 0 else jnp.zeros((*db.tokens.shape, params["embed"].shape[-1]))
    return jax.device_get(db), np.asarray(noise)


def time_jax(stage, trainer, segment, batch: dict, steps: int):
    fn = trainer._step_for(segment)
    state = trainer.initial_state(None)
    dev = device_batch(batch, trainer._batch_sharding)
    t0 = time.perf_counter()
    state, out = fn(state, dev, trainer.base_key)
    loss0 = float(jax.device_get(out["loss"]))
    compile_s = time.perf_counter() - t0
    state, out = fn(state, dev, trainer.base_key)  # a second untimed step, as on the torch side
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, out = fn(state, dev, trainer.base_key)
    jax.block_until_ready((state.params, out))
    return (time.perf_counter() - t0) / steps, compile_s, loss0, state


def time_torch(mc: ModelConfig, weights: dict, db, noise, optimizer: dict, steps: int):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
                     num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
                     num_key_value_heads=mc.num_key_value_heads, head_dim=mc.resolved_head_dim,
                     rms_norm_eps=mc.rms_norm_eps, rope_theta=mc.rope_theta,
                     max_position_embeddings=mc.max_position_embeddings, tie_word_embeddings=True)
    hf._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf).float()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()},
                                                strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"weight transfer: missing {missing}, unexpected {unexpected}")
    model.train()
    ids = torch.from_numpy(np.asarray(db.tokens, np.int64))
    pos = torch.from_numpy(np.asarray(db.positions, np.int64))
    allowed = torch.from_numpy(np.asarray(db.mask.dense()))
    mask4d = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    noise_t = torch.from_numpy(noise.astype(np.float32))
    length = db.num_query_rows
    targets = torch.from_numpy(np.asarray(db.targets, np.int64))
    m = np.asarray(db.loss_mask)
    inv_t = np.where(np.asarray(db.t) > 0, 1.0 / np.maximum(np.asarray(db.t), 1e-30), 0.0)[:, None]
    weight = torch.from_numpy((m * inv_t / max(np.asarray(db.eligible).sum(), 1)).astype(np.float32))
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-5, betas=(optimizer["b1"], optimizer["b2"]), eps=optimizer["eps"],
                            weight_decay=optimizer["weight_decay"])

    def step():
        opt.zero_grad(set_to_none=True)
        emb = model.model.embed_tokens(ids) + noise_t
        h = model.model(inputs_embeds=emb, attention_mask=mask4d, position_ids=pos).last_hidden_state
        logits = model.lm_head(h[:, :length]).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        loss = (ce.view_as(weight) * weight).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optimizer["grad_clip"])
        opt.step()
        return float(loss.detach())

    loss0 = step()
    step()  # torch's second step is still slow (allocator / oneDNN warm-up): not timed either
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps, loss0


def main() -> int:
    lengths, batches = LENGTHS.value, BATCH.value
    if len(batches) == 1:
        batches = batches * len(lengths)
    if len(batches) != len(lengths):
        raise app.UsageError(f"--batch has {len(batches)} entries; give one, or one per --lengths entry")
    block = BLOCK.value
    for length in lengths:
        if length % block:
            raise app.UsageError(f"--lengths={length} is not a multiple of --block={block}")
    peak = _flops.matmul_peak()
    print(f"[bench] fp32 matmul peak (XLA, 4096^3): {peak:.0f} GFLOP/s", flush=True)
    rows = []
    for length, batch in zip(lengths, batches):
        flops, tokens = None, batch * length
        jax_rows = []
        for entry in VARIANTS.value:
            only, _, variant = entry.rpartition("/")
            if only and int(only) != length:
                continue
            with tempfile.TemporaryDirectory() as workdir:
                stage, trainer, mc = build_trainer(length, batch, workdir, variant)
                segment = Segment("bench", 2 + STEPS.value, block)
                hb = host_batch(length, batch, mc.vocab_size)
                try:
                    sec, compile_s, jax_loss0, state = time_jax(stage, trainer, segment, hb, STEPS.value)
                finally:
                    trainer.checkpointer.close()
                del state
            flops = step_flops(mc, batch, length)
            print(f"[bench] L={length} B={batch} JAX {mc.attention_impl}/{mc.remat_policy}: {sec:.2f} s/step "
                  f"({compile_s:.0f} s first step), {tokens / sec:.1f} tok/s, {flops / sec / 1e9:.0f} GFLOP/s, "
                  f"loss0 {jax_loss0:.5f}", flush=True)
            jax_rows.append([length, batch, f"{mc.attention_impl} / {mc.remat_policy}", f"{flops / 1e9:.0f}",
                             f"{sec:.2f}", f"{tokens / sec:.1f}", f"{flops / sec / 1e9:.0f}",
                             f"{100 * flops / sec / 1e9 / peak:.0f} %"], )
            jax_rows[-1].append((sec, jax_loss0))
        if TORCH.value:
            fresh = trainer.init_weights()  # the step's initial weights (the timed state was donated)
            from llada2_jax.interop import params as hf_params
            weights = hf_params.export(merge_model(trainer.graphdef, *fresh))
            db, noise = step0_inputs(stage, trainer, segment, hb, fresh[0])
            del fresh
            t_sec, torch_loss0 = time_torch(mc, weights, db, noise, dict(stage.ctx.optimizer), STEPS.value)
            print(f"[bench] L={length} B={batch} PyTorch: {t_sec:.2f} s/step, {tokens / t_sec:.1f} tok/s, "
                  f"loss0 {torch_loss0:.5f}", flush=True)
        for row in jax_rows:
            sec, jax_loss0 = row.pop()
            if TORCH.value:
                row += [f"{t_sec:.2f}", f"{tokens / t_sec:.1f}", f"{flops / t_sec / 1e9:.0f}", f"{t_sec / sec:.2f}x",
                        f"{jax_loss0:.4f} / {torch_loss0:.4f}"]
            rows.append(row)
        publish(rows, peak, block)  # after every length: a later length that runs out of memory keeps these
    return 0


def publish(rows, peak, block):
    header = ["L", "batch", "attention / remat", "GFLOP/step", "JAX s/step", "JAX tok/s", "JAX GFLOP/s", "JAX % of peak"]
    if TORCH.value:
        header += ["torch s/step", "torch tok/s", "torch GFLOP/s", "JAX vs torch", "step-0 loss JAX / torch"]
    import torch
    caption = (f"WSD (BDLM) train step at SmolLM2-135M dimensions (random weights, vocab 49153, tied), block {block}, "
               f"fp32 on both sides, CPU ({os.cpu_count()} cores; torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads). JAX = the trainer's jitted step (`make_trainer(WSD)`); torch = "
               f"transformers LlamaForCausalLM + 4D dense mask + masked CE + AdamW. fp32 matmul peak measured "
               f"in the same run: {peak:.0f} GFLOP/s (XLA 4096^3 dot). Mean of {STEPS.value} steps after "
               "two warm-up steps; tokens/s counts L tokens per row. FLOPs counted as in the script's docstring.")
    _results.publish("train_step", f"{caption}\n\n{_results.markdown_table(header, rows)}", WRITE.value)


if __name__ == "__main__":
    _cli.run(main)
