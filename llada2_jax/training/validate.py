"""Start-up handling of a run config: `resolve_config` derives what follows from other fields
(returning a new config), then `validate_config` checks it without changing it; every impossible
setting fails before any work, naming its field."""
from __future__ import annotations

import os

from llada2_jax import workdir as wd
from llada2_jax.data import corpora, gym_tasks, streaming
from llada2_jax.model.config import check_runtime
from llada2_jax.training import mesh as mesh_lib
from llada2_jax.training import model_source as ms
from llada2_jax.training import sharding as shd
from llada2_jax.training import stages as stages_lib

_POSITIVE_TRAIN_FIELDS = ("batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints",
                          "max_nonfinite_streak", "eval_batch_size")


def _check_init_from(init_from: str) -> None:
    if not os.path.isdir(os.path.join(init_from, wd.TOKENIZER_DIR)) or wd.load_model_config(init_from) is None:
        raise ValueError(f"init_from={init_from!r} is not a finished run workdir (needs {wd.TOKENIZER_DIR}/ and "
                         f"{wd.MODEL_CONFIG_FILE})")


def resolve_config(config):
    """A copy of `config` with `init_from` applied; `config` itself is left as it is.

    `init_from = DIR` (an earlier run's workdir) means model.source `workdir:DIR` and the tokenizer
    saved in DIR/tokenizer; "" (or no such field) leaves `model.source` and `tokenizer` as configured.
    """
    resolved = config.copy_and_resolve_references()
    init_from = resolved.get("init_from", "")
    if init_from:
        _check_init_from(init_from)
        with resolved.unlocked():
            resolved.model.source = f"workdir:{init_from}"
            resolved.tokenizer.kind = "dir"
            resolved.tokenizer.path = os.path.join(init_from, wd.TOKENIZER_DIR)
    if resolved.tokenizer.kind == "hf":  # the checkpoint's own tokenizer files (data.checkpoint_tokenizer)
        kind, arg = resolved.model.source.partition(":")[::2]
        with resolved.unlocked():
            resolved.tokenizer.kind = "dir"
            resolved.tokenizer.path = resolved.tokenizer.path or (arg if kind == "hf" else "")
    names = [s.strip() for s in str(resolved.stages).split(",") if s.strip()]
    for name in names:
        if getattr(stages_lib.STAGES.get(name), "branch", False) and resolved[name].steps == 0:
            with resolved.unlocked():
                resolved[name].steps = _chain_steps(resolved, names)
    return resolved


def _chain_steps(config, names) -> int:
    """Steps of the run's non-branch training stages together: a branch stage with `steps = 0` (the AR
    twin) takes this many, so it sees as many data tokens as the chain it is compared with."""
    total = 0
    for name in names:
        cls = stages_lib.STAGES.get(name)
        if cls is not None and issubclass(cls, stages_lib.TrainStage) and not cls.branch:
            total += cls.total_steps(config, name)
    return total


def _stage_names(config) -> list[str]:
    names = [s.strip() for s in str(config.stages).split(",") if s.strip()]
    if not names:
        raise ValueError("config.stages is empty; list stage names, e.g. 'ar_pretrain,wsd,merge,eval'")
    for name in names:
        stages_lib.get_stage(name)
        if name not in config:
            raise ValueError(f"config.stages lists {name!r} but the config has no `{name}` section")
    if len(set(names)) != len(names):
        raise ValueError(f"config.stages={config.stages!r} names a stage twice")
    return names


def _check_train(config, num_devices: int) -> None:
    t = config.train
    for field in _POSITIVE_TRAIN_FIELDS:
        if t[field] < 1:
            raise ValueError(f"train.{field}={t[field]} must be >= 1")
    if t.frozen_layers < 0:
        raise ValueError(f"train.frozen_layers={t.frozen_layers} must be >= 0 (0 trains every layer)")
    if t.eval_batches < 0 or t.eval_every < 0:
        raise ValueError(f"train.eval_batches={t.eval_batches} and train.eval_every={t.eval_every} must be >= 0")
    shape = mesh_lib.resolve_mesh_shape(dict(config.mesh), num_devices)
    divisor = shd.batch_divisor(shape)
    if t.batch_size % (divisor * t.grad_accum):
        raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum={t.grad_accum} "
                         f"x the batch-sharding devices (mesh data*fsdp*expert = {divisor})")
    if t.eval_batch_size % divisor:
        raise ValueError(f"train.eval_batch_size={t.eval_batch_size} must be a multiple of mesh data*fsdp*expert"
                         f" = {divisor}")


def _check_optimizer(config) -> None:
    o = config.optimizer
    for field in ("b1", "b2"):
        if not 0.0 <= o[field] < 1.0:
            raise ValueError(f"optimizer.{field}={o[field]} must be in [0, 1)")
    for field in ("eps", "weight_decay", "grad_clip"):
        if o[field] < 0:
            raise ValueError(f"optimizer.{field}={o[field]} must be >= 0")


def _check_data(config) -> None:
    d = config.data
    if d.seq_len < 1:
        raise ValueError(f"data.seq_len={d.seq_len} must be >= 1")
    if d.align_to_block and d.seq_len % d.align_to_block:
        raise ValueError(f"data.align_to_block={d.align_to_block} does not divide data.seq_len={d.seq_len}")
    if not 0.0 < d.heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction={d.heldout_fraction} must be in (0, 1)")
    if str(d.corpora) == gym_tasks.CORPUS_NAME:
        return
    names = [c.strip() for c in str(d.corpora).split(",") if c.strip()] or [""]
    if any(streaming.is_stream(n) for n in names):
        streaming.check_streams(names)
        return
    for name in names:
        if name not in corpora.CORPORA and not os.path.exists(name):
            raise ValueError(f"data.corpora: {name!r} is neither a corpus name {corpora.CORPORA}, "
                             f"{gym_tasks.CORPUS_NAME!r} (the reasoning-gym tasks of config.gym) nor an existing path")


def _check_gym(config) -> None:
    g = config.gym
    try:
        gym_tasks.parse_tasks(g.tasks)
    except (ValueError, ImportError) as e:
        raise ValueError(f"gym.tasks: {e}") from None
    for field in ("train_items", "heldout_items"):
        if g[field] < 1:
            raise ValueError(f"gym.{field}={g[field]} must be >= 1")


def _check_model(config) -> None:
    check_runtime(dict(config.model.runtime), "model.runtime.")
    kind, arg = ms.parse_source(config.model.source)
    if kind == "workdir":
        arg, stage = ms.workdir_parts(arg)
        if stage is not None and os.path.isdir(arg):
            try:
                wd.weights_location(arg, stage)
            except ValueError as e:
                raise ValueError(f"model.source={config.model.source!r}: {e}") from None
    if kind in ("hf", "workdir") and not os.path.isdir(arg):
        raise ValueError(f"model.source={config.model.source!r}: directory {arg!r} does not exist")
    if kind == "hf" and not os.path.isfile(os.path.join(arg, "config.json")):
        raise ValueError(f"model.source={config.model.source!r}: {arg!r} holds no config.json (expected an HF "
                         "checkpoint directory: config.json + *.safetensors)")
    if kind == "workdir" and wd.load_model_config(arg) is None:
        raise ValueError(f"model.source={config.model.source!r}: {arg!r} holds no {wd.MODEL_CONFIG_FILE} "
                         "(expected a run workdir)")
    if kind == "gguf" and arg != "smollm2" and not os.path.exists(arg):
        raise ValueError(f"model.source={config.model.source!r}: file {arg!r} does not exist")
    if kind != "init":
        return
    arch = config.model.arch
    vocab = arch.vocab_size or (config.tokenizer.vocab_size if config.tokenizer.kind == "sentencepiece" else 0)
    mask = arch.get("mask_token_id")
    if mask is not None and vocab and not 0 <= mask < vocab:
        raise ValueError(f"model.arch.mask_token_id={mask} is outside the vocabulary [0, {vocab})")
    if config.data.seq_len > arch.max_position_embeddings:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.arch.max_position_embeddings="
                         f"{arch.max_position_embeddings}")


def _check_tokenizer(config) -> None:
    tok = config.tokenizer
    if tok.kind not in ("sentencepiece", "smollm2", "dir", "hf"):
        raise ValueError(f"tokenizer.kind={tok.kind!r}; expected 'sentencepiece', 'smollm2', 'dir' or 'hf' "
                         f"(model.source=hf:DIR's own tokenizer)")
    if tok.kind in ("dir", "hf") and not os.path.isdir(tok.path):
        raise ValueError(f"tokenizer.path={tok.path!r} is not a directory (tokenizer.kind={tok.kind!r}"
                         + (", and model.source is not hf:<dir>)" if tok.kind == "hf" else ")"))


def validate_config(config, num_devices: int) -> None:
    """Raise ValueError (naming the field) for the first impossible setting found; `config` is not changed."""
    names = _stage_names(config)
    _check_tokenizer(config)
    _check_data(config)
    _check_model(config)
    _check_optimizer(config)
    _check_train(config, num_devices)
    if config.get("init_from", ""):
        _check_init_from(config.init_from)
    uses_gym = "compare" in names or gym_tasks.CORPUS_NAME in (
        [str(config.data.corpora)] + [config[n].get("data") for n in names if n in config])
    if uses_gym:
        _check_gym(config)
    for name in names:
        stages_lib.get_stage(name).validate(config, name)
