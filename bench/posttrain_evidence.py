"""Does post-training do what the spec says, on the tiny model?

    python bench/posttrain_evidence.py --base=/tmp/tiny_wsd --out=/tmp/posttrain_evidence

Runs the chain base -> tiny_sft -> tiny_cap -> tiny_dpo (plus a control: the SFT run continued
with plain SFT for as many steps as CAP, so CAP is compared against equal extra training), each
through `python -m llada2_jax.main`, then measures on held-out GSM8K (the last 256 records):
  1. response NELBO per token (t ~ U[1e-3, 1], fixed noise) of base, SFT, SFT-continued, CAP, DPO;
  2. TPF and answer accuracy of threshold decoding (0.95, block 32) for SFT, SFT-continued, CAP;
  3. DPO reward margin / accuracy and policy ELBO margin on held-out synthetic pairs, before
     (policy = reference: margin 0 by construction) and after DPO, with one fixed noise sample.
Prints markdown tables, writes them to bench/results/posttrain_evidence.md (--nowrite: print only)
and the raw numbers to `<out>/evidence.json`. Reruns skip finished stages.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import _cli
import _results
from llada2_jax import workdir as wd
from llada2_jax.data import preference, sft
from llada2_jax.data.tokenizers import load_tokenizer
from llada2_jax.evaluation.likelihood import mc_elbo_loglik
from llada2_jax.evaluation.tasks import extract_gsm8k_answer
from llada2_jax.inference import generate
from llada2_jax.training import objectives

ROOT = _results.ROOT
BLOCK = 32

BASE = flags.DEFINE_string("base", None, "a finished tiny_wsd workdir")
OUT = flags.DEFINE_string("out", None, "directory for the stage workdirs and evidence.json")
SFT_STEPS = flags.DEFINE_integer("sft_steps", 150, "SFT steps", lower_bound=1)
CAP_STEPS = flags.DEFINE_integer("cap_steps", 60, "CAP steps (and the plain-SFT control's)", lower_bound=1)
DPO_STEPS = flags.DEFINE_integer("dpo_steps", 60, "DPO steps", lower_bound=1)
EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 4, "held-out SFT / pair batches of 8", lower_bound=1)
ELBO_SAMPLES = flags.DEFINE_integer("elbo_samples", 4, "Monte Carlo samples of the response ELBO", lower_bound=1)
PROMPTS = flags.DEFINE_integer("prompts", 32, "held-out GSM8K prompts decoded", lower_bound=1)
GEN_LENGTH = flags.DEFINE_integer("gen_length", 256, "tokens generated per prompt", lower_bound=1)
THRESHOLD = flags.DEFINE_float("threshold", 0.95, "decoding confidence threshold", lower_bound=0.0, upper_bound=1.0)
WRITE = flags.DEFINE_boolean("write", True, "write the tables to bench/results/posttrain_evidence.md")


def run_stage(config: str, workdir: str, init_from: str, overrides: list[str]) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "llada2_jax.main", f"--config=experiments/{config}.py", f"--workdir={workdir}",
           f"--config.init_from={init_from}", *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def load(workdir: str):
    """(graphdef, params, buffers) of the run's final model."""
    return wd.split_model(wd.load_model(workdir))


def response_nelbo(workdir: str, batches: list[dict], samples: int) -> float:
    graphdef, params, buffers = load(workdir)
    mask_id = wd.load_model_config(workdir).mask_token_id

    @jax.jit
    def elbo(params, buffers, batch, key):
        model = wd.merge_model(graphdef, params, buffers)
        eligible = objectives.response_positions(batch)
        mean, _ = mc_elbo_loglik(model, batch["tokens"], batch["segment_ids"], eligible, block_size=BLOCK,
                                 n_samples=samples, rng=key, mask_id=mask_id, positions=batch["positions"])
        return -jnp.sum(mean), jnp.sum(eligible)

    nll = count = 0.0
    for i, batch in enumerate(batches):
        a, b = elbo(params, buffers, batch, jax.random.key(1000 + i))
        nll, count = nll + float(a), count + float(b)
    return nll / count


def decode_eval(workdir: str, tokenizer, records: list[dict], gen_length: int, threshold: float) -> dict:
    graphdef, params, buffers = load(workdir)
    model = wd.merge_model(graphdef, params, buffers)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True)
               for r in records]
    start = time.perf_counter()
    res = generate(model, prompts, gen_length=gen_length, block_size=BLOCK, threshold=threshold,
                   mask_id=model.config.mask_token_id, eos_id=tokenizer.eos_id)
    seconds = time.perf_counter() - start
    correct = 0
    texts = [tokenizer.decode(t) for t in res.tokens]
    for text, r in zip(texts, records):
        got, want = extract_gsm8k_answer(text), extract_gsm8k_answer(r["answer"])
        correct += got is not None and got == want
    return {"tpf": float(res.tpf), "forwards": int(res.forwards), "tokens": int(sum(len(t) for t in res.tokens)),
            "accuracy": correct / len(records), "seconds": seconds, "example": texts[0][:300]}


def dpo_margins(policy_dir: str, reference_dir: str, batches: list[dict], beta: float) -> dict:
    graphdef, p_params, p_buffers = load(policy_dir)
    _, r_params, r_buffers = load(reference_dir)
    config = wd.load_model_config(policy_dir)
    cfg = objectives.NoiseConfig(block_size=BLOCK, mask_id=config.mask_token_id, vocab_size=config.vocab_size,
                                complementary=False, beta=beta)

    @jax.jit
    def metrics(pp, pb, rp, rb, batch, key):
        return objectives.dpo_loss(wd.merge_model(graphdef, pp, pb), wd.merge_model(graphdef, rp, rb), batch, key,
                                   cfg)[1]

    out = [metrics(p_params, p_buffers, r_params, r_buffers, b, jax.random.key(2000 + i))
           for i, b in enumerate(batches)]
    return {k: float(np.mean([o[k] for o in out])) for k in ("loss", "reward_margin", "reward_accuracy", "elbo_margin")}


def main() -> int:
    if not BASE.value or not os.path.isfile(os.path.join(BASE.value, "final.json")):
        raise app.UsageError(f"--base={BASE.value}: not a finished run workdir (no final.json)")
    if not OUT.value:
        raise app.UsageError("--out=DIR is required (the stage workdirs and evidence.json go there)")
    base, out = BASE.value, OUT.value
    os.makedirs(out, exist_ok=True)
    d = {k: os.path.join(out, k) for k in ("sft", "sft_more", "cap", "dpo")}
    seconds = {
        "sft": run_stage("tiny_sft", d["sft"], base, [f"--config.sft.steps={SFT_STEPS.value}"]),
        "cap": run_stage("tiny_cap", d["cap"], d["sft"], [f"--config.cap.steps={CAP_STEPS.value}"]),
        # control: as many plain-SFT steps as CAP, with CAP's learning rates
        "sft_more": run_stage("tiny_sft", d["sft_more"], d["sft"], [
            f"--config.sft.steps={CAP_STEPS.value}", "--config.sft.lr=3e-4", "--config.sft.lr_min=3e-5"]),
        "dpo": run_stage("tiny_dpo", d["dpo"], d["cap"], [f"--config.dpo.steps={DPO_STEPS.value}"]),
    }
    tokenizer = load_tokenizer(os.path.join(base, "tokenizer"))
    seq_len = 512
    held = sft.sft_dataset(sft.gsm8k_conversations(split="heldout"), tokenizer, seq_len=seq_len, batch_size=8,
                           block_size=BLOCK, seed=0)
    sft_batches = [b for _, b in zip(range(EVAL_BATCHES.value), held.dataset)]
    pairs = preference.preference_dataset(preference.gsm8k_preference_pairs(split="heldout"), tokenizer,
                                          seq_len=seq_len, batch_size=8, block_size=BLOCK, seed=0)
    pair_batches = [b for _, b in zip(range(EVAL_BATCHES.value), pairs.dataset)]
    records = sft.read_gsm8k(split="heldout")[:PROMPTS.value]

    flag_values = {f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(sys.argv[0])}
    result = {"flags": flag_values, "train_seconds": seconds, "heldout_dropped": held.num_dropped}
    result["response_nelbo"] = {name: response_nelbo(path, sft_batches, ELBO_SAMPLES.value)
                                for name, path in [("base", base), *d.items()]}
    result["decode"] = {name: decode_eval(d[name], tokenizer, records, GEN_LENGTH.value, THRESHOLD.value)
                        for name in ("sft", "sft_more", "cap")}
    result["dpo"] = {"before": dpo_margins(d["cap"], d["cap"], pair_batches, 0.1),
                     "after": dpo_margins(d["dpo"], d["cap"], pair_batches, 0.1)}
    with open(os.path.join(out, "evidence.json"), "w") as f:
        json.dump(result, f, indent=1)

    nelbo = _results.markdown_table(["model", "held-out response NELBO/token"],
                                    [[name, f"{v:.4f}"] for name, v in result["response_nelbo"].items()])
    decode = _results.markdown_table(
        ["model", f"TPF @ {THRESHOLD.value}", "forwards", "tokens", f"GSM8K accuracy ({PROMPTS.value} held-out)"],
        [[name, f"{v['tpf']:.3f}", v["forwards"], v["tokens"], f"{v['accuracy']:.3f}"]
         for name, v in result["decode"].items()])
    dpo = _results.markdown_table(
        ["DPO (held-out pairs)", "loss", "reward margin", "reward accuracy", "policy ELBO margin (chosen - rejected)"],
        [[name, f"{v['loss']:.4f}", f"{v['reward_margin']:.4f}", f"{v['reward_accuracy']:.3f}",
          f"{v['elbo_margin']:.2f}"] for name, v in result["dpo"].items()])
    train = f"train seconds: {json.dumps({k: round(v) for k, v in seconds.items()})}"
    _results.publish("posttrain_evidence", "\n\n".join([nelbo, decode, dpo, train]), WRITE.value)
    return 0


if __name__ == "__main__":
    _cli.run(main)
