"""LLaDA2.0-mini (16B total / 1.4B active BailingMoeV2, spec §1.1): WSD conversion on a TPU pod.

    python -m llada2_jax.main --config=experiments/mini_wsd.py --config.dry_run=True
    # real run, same command on every host of a v5p-512 slice (256 chips; Cloud names count TensorCores):
    python -m llada2_jax.main --config=experiments/mini_wsd.py --workdir=gs://... \
        --config.distributed=True --config.model.source=hf:/ckpt/Ling-mini-2.0-base \
        --config.tokenizer.kind=dir --config.tokenizer.path=/ckpt/tokenizer --config.data.corpora=/data/cpt.jsonl

Defined in `llada2_jax/configs/mini.py`; the same as `--config=experiments/mini.py:wsd`.
"""
from llada2_jax.configs import mini


def get_config():
    return mini.get_config("wsd")
