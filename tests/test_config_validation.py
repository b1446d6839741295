"""Impossible configs fail at start-up (before any work) with a message naming the field."""
import re

import pytest

from test_training_fixtures import experiment_config
from llada2_jax.training.validate import validate_config

BAD = [
    ("block size not dividing seq len", {"wsd.warmup_sizes": (1, 4, 24)}, 1, "wsd.warmup_sizes"),
    ("eval block size", {"eval.block_size": 48}, 1, "eval.block_size"),
    ("mesh product != devices", {"mesh.data": 3}, 8, "mesh"),
    ("mesh fill impossible", {"mesh.data": -1, "mesh.tensor": 3}, 8, "mesh.data=-1"),
    ("unknown stage", {"stages": "ar_pretrain,wsdd"}, 1, "wsdd"),
    ("mask id outside vocab", {"model.arch.mask_token_id": 5000}, 1, "model.arch.mask_token_id"),
    ("missing data path", {"data.corpora": "/no/such/corpus.jsonl"}, 1, "data.corpora"),
    ("lr <= 0", {"wsd.lr": 0.0}, 1, "wsd.lr"),
    ("negative ar lr", {"ar_pretrain.lr": -1e-3}, 1, "ar_pretrain.lr"),
    ("batch not divisible by data x fsdp", {"mesh.data": 2, "mesh.fsdp": 4, "train.batch_size": 12}, 8,
     "train.batch_size"),
    ("t range", {"wsd.t_min": 0.0}, 1, "t_min"),
    ("t_min > t_max", {"wsd.t_min": 0.9, "wsd.t_max": 0.5}, 1, "t_max"),
    ("unknown weighting", {"wsd.weighting": "mean"}, 1, "wsd.weighting"),
    ("missing hf checkpoint", {"model.source": "hf:/no/such/dir"}, 1, "model.source"),
    ("bad source kind", {"model.source": "s3://bucket"}, 1, "model.source"),
    ("seq len beyond positions", {"data.seq_len": 1024}, 1, "max_position_embeddings"),
    ("merge more than kept", {"merge.top_k": 9}, 1, "merge.top_k"),
    ("grad accumulation", {"train.grad_accum": 3}, 1, "train.batch_size"),
    ("cosine warm-up as long as the stage", {"ar_pretrain.steps": 50, "ar_pretrain.warmup_steps": 50}, 1, "ar_pretrain.warmup_steps"),
    ("empty wsd stage", {"wsd.steps_per_warmup": 0, "wsd.stable_steps": 0, "wsd.steps_per_decay": 0}, 1,
     "wsd: the stage has 0 steps"),
    ("tokenizer kind", {"tokenizer.kind": "bpe"}, 1, "tokenizer.kind"),
]


def _config(overrides):
    config = experiment_config(smoke=False)
    with config.unlocked():
        for path, value in overrides.items():
            *parents, leaf = path.split(".")
            node = config
            for name in parents:
                node = node[name]
            node[leaf] = value
    return config


def test_default_configs_are_valid():
    validate_config(experiment_config(smoke=False), 1)
    validate_config(experiment_config(smoke=True), 1)
    validate_config(_config({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), 8)


@pytest.mark.parametrize("overrides,devices,field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_field(overrides, devices, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        validate_config(_config(overrides), devices)


def test_validation_leaves_the_config_unchanged():
    config = experiment_config(smoke=True)
    before = config.to_json()
    validate_config(config, 1)
    assert config.to_json() == before


def test_resolve_init_from_returns_a_new_config(tmp_path):
    """`init_from` becomes a workdir source and its tokenizer in a copy; the given config is untouched."""
    from llada2_jax.model.config import ModelConfig
    from llada2_jax.training.validate import resolve_config
    from llada2_jax.workdir import save_model_config
    (tmp_path / "tokenizer").mkdir()
    save_model_config(str(tmp_path), ModelConfig())
    config = experiment_config(smoke=True)
    with config.unlocked():
        config.init_from = str(tmp_path)
    before = config.to_json()
    resolved = resolve_config(config)
    assert config.to_json() == before
    assert resolved.model.source == f"workdir:{tmp_path}"
    assert (resolved.tokenizer.kind, resolved.tokenizer.path) == ("dir", str(tmp_path / "tokenizer"))
    with config.unlocked():
        config.init_from = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="init_from="):
        resolve_config(config)


def test_every_stage_is_in_the_table_without_importing_its_module():
    """A config names stages; the table in `training.stages` knows them all (no registration imports)."""
    import subprocess
    import sys
    code = ("from llada2_jax.training.stages import STAGES; "
            "print(','.join(sorted(STAGES)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "ar_pretrain,ar_sft,cap,compare,dpo,eval,merge,sft,wsd"
