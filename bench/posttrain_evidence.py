"""Does post-training do what the spec says, on the tiny model? (numbers for BUILD_NOTES.md)

    python bench/posttrain_evidence.py --base /tmp/tiny_wsd --out /tmp/posttrain_evidence

Runs the chain base -> tiny_sft -> tiny_cap -> tiny_dpo (plus a control: the SFT run continued
with plain SFT for as many steps as CAP, so CAP is compared against equal extra training), each
through `python -m llada2_jax.main`, then measures on held-out GSM8K (the last 256 records):
  1. response NELBO per token (t ~ U[1e-3, 1], fixed noise) of base, SFT, SFT-continued, CAP, DPO;
  2. TPF and answer accuracy of threshold decoding (0.95, block 32) for SFT, SFT-continued, CAP;
  3. DPO reward margin / accuracy and policy ELBO margin on held-out synthetic pairs, before
     (policy = reference: margin 0 by construction) and after DPO, with one fixed noise sample.
Prints a markdown table and writes `<out>/evidence.json`. Reruns skip finished stages.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llada2_jax.data import preference, sft  # noqa: E402
from llada2_jax.data.tokenizers import load_tokenizer  # noqa: E402
from llada2_jax.evaluation.likelihood import mc_elbo_loglik  # noqa: E402
from llada2_jax.evaluation.tasks import extract_gsm8k_answer  # noqa: E402
from llada2_jax.inference import generate  # noqa: E402
from llada2_jax.training import mesh as mesh_lib  # noqa: E402
from llada2_jax.training import model_source as ms  # noqa: E402
from llada2_jax.training import posttrain  # noqa: E402
from llada2_jax.training.state import merge_model  # noqa: E402

BLOCK = 32


def run_stage(config: str, workdir: str, init_from: str, overrides: list[str]) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "llada2_jax.main", f"--config=experiments/{config}.py", f"--workdir={workdir}",
           f"--config.init_from={init_from}", *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def load(workdir: str):
    config = ms.load_model_config(workdir)
    mesh = mesh_lib.make_mesh({"data": -1}, jax.devices()[:1])
    layout = ms.ModelLayout.build(config, dict(mesh.shape))
    params, buffers = ms.place_weights(ms.Source("workdir", workdir, config), layout, mesh, 0)
    return layout.graphdef, params, buffers


def response_nelbo(workdir: str, batches: list[dict], samples: int) -> float:
    graphdef, params, buffers = load(workdir)
    mask_id = ms.load_model_config(workdir).mask_token_id

    @jax.jit
    def elbo(params, buffers, batch, key):
        model = merge_model(graphdef, params, buffers)
        eligible = posttrain.response_positions(batch)
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
    model = merge_model(graphdef, params, buffers)
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
    config = ms.load_model_config(policy_dir)
    cfg = posttrain.NoiseConfig(block_size=BLOCK, mask_id=config.mask_token_id, vocab_size=config.vocab_size,
                                complementary=False, beta=beta)

    @jax.jit
    def metrics(pp, pb, rp, rb, batch, key):
        return posttrain.dpo_loss(merge_model(graphdef, pp, pb), merge_model(graphdef, rp, rb), batch, key, cfg)[1]

    out = [metrics(p_params, p_buffers, r_params, r_buffers, b, jax.random.key(2000 + i)) for i, b in enumerate(batches)]
    return {k: float(np.mean([o[k] for o in out])) for k in ("loss", "reward_margin", "reward_accuracy", "elbo_margin")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a finished tiny_wsd workdir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--cap-steps", type=int, default=60)
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--eval-batches", type=int, default=4, help="held-out SFT / pair batches of 8")
    ap.add_argument("--elbo-samples", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--threshold", type=float, default=0.95)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    d = {k: os.path.join(args.out, k) for k in ("sft", "sft_more", "cap", "dpo")}
    seconds = {
        "sft": run_stage("tiny_sft", d["sft"], args.base, [f"--config.sft.steps={args.sft_steps}"]),
        "cap": run_stage("tiny_cap", d["cap"], d["sft"], [f"--config.cap.steps={args.cap_steps}"]),
        # control: as many plain-SFT steps as CAP, with CAP's learning rates
        "sft_more": run_stage("tiny_sft", d["sft_more"], d["sft"], [f"--config.sft.steps={args.cap_steps}",
                                                                     "--config.sft.lr=3e-4", "--config.sft.lr_min=3e-5"]),
        "dpo": run_stage("tiny_dpo", d["dpo"], d["cap"], [f"--config.dpo.steps={args.dpo_steps}"]),
    }
    tokenizer = load_tokenizer(os.path.join(args.base, "tokenizer"))
    seq_len = 512
    held = sft.sft_dataset(sft.gsm8k_conversations(split="heldout"), tokenizer, seq_len=seq_len, batch_size=8,
                           block_size=BLOCK, seed=0)
    sft_batches = [b for _, b in zip(range(args.eval_batches), held.dataset)]
    pairs = preference.preference_dataset(preference.gsm8k_preference_pairs(split="heldout"), tokenizer,
                                          seq_len=seq_len, batch_size=8, block_size=BLOCK, seed=0)
    pair_batches = [b for _, b in zip(range(args.eval_batches), pairs.dataset)]
    records = sft.read_gsm8k(split="heldout")[:args.prompts]

    result = {"args": vars(args), "train_seconds": seconds, "heldout_dropped": held.num_dropped}
    result["response_nelbo"] = {name: response_nelbo(path, sft_batches, args.elbo_samples)
                                for name, path in [("base", args.base), *d.items()]}
    result["decode"] = {name: decode_eval(d[name], tokenizer, records, args.gen_length, args.threshold)
                        for name in ("sft", "sft_more", "cap")}
    result["dpo"] = {"before": dpo_margins(d["cap"], d["cap"], pair_batches, 0.1),
                     "after": dpo_margins(d["dpo"], d["cap"], pair_batches, 0.1)}
    with open(os.path.join(args.out, "evidence.json"), "w") as f:
        json.dump(result, f, indent=1)

    print("\n| model | held-out response NELBO/token |")
    print("|---|---|")
    for name, v in result["response_nelbo"].items():
        print(f"| {name} | {v:.4f} |")
    print(f"\n| model | TPF @ {args.threshold} | forwards | tokens | GSM8K accuracy ({args.prompts} held-out) |")
    print("|---|---|---|---|---|")
    for name, v in result["decode"].items():
        print(f"| {name} | {v['tpf']:.3f} | {v['forwards']} | {v['tokens']} | {v['accuracy']:.3f} |")
    print("\n| DPO (held-out pairs) | loss | reward margin | reward accuracy | policy ELBO margin (chosen - rejected) |")
    print("|---|---|---|---|---|")
    for name, v in result["dpo"].items():
        print(f"| {name} | {v['loss']:.4f} | {v['reward_margin']:.4f} | {v['reward_accuracy']:.3f} | "
              f"{v['elbo_margin']:.2f} |")
    print(f"\ntrain seconds: {json.dumps({k: round(v) for k, v in seconds.items()})}")


if __name__ == "__main__":
    main()
