"""Shared helpers of the training tests (no tests here): tiny configs and a shared tokenizer."""
from __future__ import annotations

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment_config(name: str = "tiny_wsd", smoke: bool = True):
    """`get_config()` of experiments/<name>.py, with its smoke overrides applied."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if smoke:
        from llada2_jax.main import apply_smoke
        apply_smoke(config)
    return config


def train_tokenizer(directory: str) -> str:
    """A 512-piece sentencepiece model on ~200 kB of the stdlib, saved to `directory`."""
    from llada2_jax.data import corpora
    from llada2_jax.data.tokenizers import SentencePieceTokenizer
    if not os.path.exists(os.path.join(directory, "llada2_tokenizer.json")):
        docs = corpora.load_corpus("stdlib", split="train", max_bytes=200_000)
        SentencePieceTokenizer.train(corpora.texts(docs), 512).save(directory)
    return directory


def tiny_train_config(tokenizer_dir: str, *, moe: bool = False, stages: str = "wsd"):
    """A few-second training config: L = 32, batch 8, one decay phase of 3 steps at block size 16."""
    c = experiment_config()
    c.stages = stages
    c.tokenizer.kind, c.tokenizer.path = "dir", tokenizer_dir
    c.data.update(dict(seq_len=32, max_bytes=150_000, heldout_fraction=0.05))
    c.train.update(dict(batch_size=8, grad_accum=2, log_every=1, eval_batches=0, checkpoint_every=1,
                        keep_checkpoints=10))
    c.wsd.update(dict(warmup_sizes=(), steps_per_warmup=0, stable_steps=0, steps_per_decay=3, decay_min=16,
                      noise_steps=2, lr=3e-3, warmup_steps=0))
    c.ar_pretrain.update(dict(steps=3, warmup_steps=0))
    c.model.arch.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, max_position_embeddings=64))
    if moe:
        c.model.arch.update(dict(model_type="bailing_moe_v2", num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, num_shared_experts=1, first_k_dense_replace=1,
                                 score_function="sigmoid", norm_topk_prob=True, use_expert_bias=True,
                                 qk_norm=True, routed_scaling_factor=1.0))
    return c


def read_metrics(workdir: str, key: str = "loss") -> dict[tuple[str, int], float]:
    """{(stage, step): value} from metrics.jsonl (a re-logged step keeps its last value)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if key in rec:
                out[(rec["stage"], rec["step"])] = rec[key]
    return out
