"""The on-disk format of a run directory, and loading its weights without any training machinery.

  model_config.json          the architecture (ModelConfig minus the runtime fields below)
  final.json                 {"completed": [stages], "checkpoint_dir", "step"}: the run's output
  tokenizer/                 the run's tokenizer (`data.tokenizers.load_tokenizer`)
  checkpoints/<stage>/<step> Orbax checkpoints; their `model` item is {"params", "buffers"}

Training writes these (`training.checkpoint`, `training.model_source`) and `generate`, evaluation
and benchmarks read them through this module, so both sides share one definition of the format.
Runtime settings (kernels, dtypes, rematerialisation) are chosen by whoever loads the model, so a
model trained with `attention_impl="pallas"` loads with `"auto"` elsewhere; a model_config.json
that still lists them loads with those keys ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from llada2_jax.model.config import RUNTIME_CHOICES, ModelConfig
from llada2_jax.model.transformer import Transformer

FINAL_FILE = "final.json"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
MODEL_ITEM = "model"
RUNTIME_FIELDS = tuple(RUNTIME_CHOICES)  # chosen by whoever loads the model, never saved


# ---------------- model config: architecture only ----------------

def architecture_json(config: ModelConfig) -> dict:
    d = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}
    d["rope_scaling"] = config.rope_scaling_dict
    return d


def config_from_json(d: dict, **runtime) -> ModelConfig:
    """The architecture of `d` (runtime keys in it are ignored) with the caller's `runtime` settings."""
    arch = {k: v for k, v in d.items() if k not in RUNTIME_FIELDS}
    rope_scaling = arch.pop("rope_scaling", None)
    return ModelConfig(**arch, **runtime).replace(rope_scaling=rope_scaling)


def save_model_config(workdir: str, config: ModelConfig) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
            json.dump(architecture_json(config), f, indent=1)


def load_model_config(workdir: str, **runtime) -> ModelConfig | None:
    """The run's architecture with `runtime` applied; None when the directory has no model config."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return config_from_json(json.load(f), **runtime)


# ---------------- final.json: where the run's output lives ----------------

def read_final(workdir: str) -> dict | None:
    path = os.path.join(workdir, FINAL_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_final(workdir: str, completed: list[str], checkpoint_dir: str, step: int) -> None:
    if jax.process_index() == 0:
        tmp = os.path.join(workdir, FINAL_FILE + ".tmp")
        with open(tmp, "w") as f:
            directory = os.path.abspath(checkpoint_dir) if checkpoint_dir else ""  # "": no output yet
            json.dump({"completed": completed, "checkpoint_dir": directory, "step": step}, f, indent=1)
        os.replace(tmp, os.path.join(workdir, FINAL_FILE))


# ---------------- weights: the `model` item of a checkpoint ----------------

def split_model(model: nnx.Module):
    """(graphdef, params pure dict, buffers pure dict): `params` are the `nnx.Param`s, `buffers` the rest."""
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)


def merge_model(graphdef, params: dict, buffers: dict) -> nnx.Module:
    return nnx.merge(graphdef, nnx.State(params), nnx.State(buffers))


def abstract_like(tree, shardings=None):
    """ShapeDtypeStruct tree (with shardings when given) as an Orbax restore target."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_weights_arg(params: dict, buffers: dict):
    return ocp.args.StandardSave({"params": params, "buffers": buffers})


def weights_target(params, buffers, shardings=None):
    """The restore target of the `model` item; `shardings` is (param shardings, buffer shardings)."""
    return abstract_like({"params": params, "buffers": buffers},
                         None if shardings is None else {"params": shardings[0], "buffers": shardings[1]})


def restore_weights(manager: ocp.CheckpointManager, step: int, params, buffers, shardings=None):
    """(params, buffers) of `step` into the structure of the given (abstract) trees."""
    target = weights_target(params, buffers, shardings)
    out = manager.restore(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.StandardRestore(target)}))
    return out[MODEL_ITEM]["params"], out[MODEL_ITEM]["buffers"]


def open_checkpoints(directory: str) -> ocp.CheckpointManager:
    """A checkpoint directory opened for reading (nothing is written unless `save` is called)."""
    return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False))


# ---------------- loading a run's model ----------------

def abstract_model(config: ModelConfig) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def weights_location(workdir: str, stage: str | None = None) -> tuple[str, int | None]:
    """(checkpoint directory, step or None for its latest) of the run's output or of one stage."""
    if not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir!r} does not exist")
    if stage is None:
        final = read_final(workdir)
        if final is None or not final["checkpoint_dir"]:
            raise ValueError(f"workdir {workdir!r}: no output in {FINAL_FILE}: the run has not finished a stage "
                             "yet (or name a stage)")
        return final["checkpoint_dir"], final["step"]
    directory = os.path.join(workdir, "checkpoints", stage)
    if not os.path.isdir(directory):
        stages = sorted(os.listdir(os.path.join(workdir, "checkpoints"))) \
            if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
        raise ValueError(f"stage {stage!r} has no checkpoints in {workdir!r}; stages with checkpoints: {stages}")
    return directory, None


def load_model(workdir: str, stage: str | None = None, **runtime) -> Transformer:
    """The run's final model (its final.json) or the latest checkpoint of `stage`, on the default device."""
    config = load_model_config(workdir, **runtime) if os.path.isdir(workdir) else None
    if config is None:
        raise ValueError(f"workdir {workdir!r}: {MODEL_CONFIG_FILE} not found (not a run workdir?)")
    directory, step = weights_location(workdir, stage)
    manager = open_checkpoints(directory)
    try:
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise ValueError(f"stage {stage!r} of {workdir!r}: {directory} holds no checkpoint")
        graphdef, params, buffers = split_model(abstract_model(config))
        params, buffers = restore_weights(manager, step, params, buffers)
    finally:
        manager.close()
    return merge_model(graphdef, params, buffers)
