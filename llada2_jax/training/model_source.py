"""Where a stage's starting weights come from, and how they land sharded on the mesh.

`model.source` (config) is one of
  init            fresh random weights from `model.arch` (the tiny from-scratch models)
  hf:<dir>        an HF checkpoint directory (`interop.hf.load_pretrained`)
  gguf:<path>     a llama.cpp GGUF file; `gguf:smollm2` is the SmolLM2-135M file of assets.md
  workdir:<dir>   the final weights of an earlier run (its `final.json`): how post-training
                  stages start from a conversion run
  workdir:<dir>@<stage>   the latest checkpoint of one stage of that run (a variant branching
                  off an earlier stage, e.g. an editing SFT from a conversion's `@wsd`)
Models without a `[MASK]` id get one appended (`interop.convert.add_mask_token`).
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from llada2_jax import workdir as wd
from llada2_jax.model.config import ModelConfig
from llada2_jax.model.transformer import Transformer
from llada2_jax.training import sharding as shd

SOURCE_KINDS = ("init", "hf", "gguf", "workdir")


def parse_source(source: str) -> tuple[str, str]:
    """'kind:arg' -> (kind, arg); ValueError naming `model.source` otherwise."""
    kind, _, arg = source.partition(":")
    if kind not in SOURCE_KINDS or (kind == "init") != (arg == ""):
        raise ValueError(f"model.source={source!r}; expected 'init', 'hf:<dir>', 'gguf:<path>|gguf:smollm2' "
                         f"or 'workdir:<dir>[@<stage>]'")
    return kind, arg


def workdir_parts(arg: str) -> tuple[str, str | None]:
    """The argument of a `workdir:` source -> (run directory, stage or None for its final weights)."""
    directory, _, stage = arg.partition("@")
    return directory, stage or None


@dataclasses.dataclass
class ModelLayout:
    """Static structure of a model on a mesh: graphdef, abstract weights and their shardings."""
    config: ModelConfig
    graphdef: object
    param_vars: nnx.State  # abstract nnx.Param variables (they carry the axis metadata)
    abstract_params: dict
    abstract_buffers: dict
    param_specs: dict
    buffer_specs: dict

    @classmethod
    def build(cls, config: ModelConfig, mesh_shape: dict, frozen_layers: int = 0) -> "ModelLayout":
        """`frozen_layers`: no gradient reaches the bottom N layers (`Transformer.freeze_bottom`)."""
        model = wd.abstract_model(config)
        model.freeze_bottom(frozen_layers)
        graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
        return cls(config, graphdef, params, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers),
                   shd.state_specs(params, mesh_shape), shd.state_specs(buffers, mesh_shape))


@dataclasses.dataclass
class Source:
    """A resolved `model.source`: the architecture, plus the host model when one had to be loaded."""
    kind: str
    arg: str
    config: ModelConfig
    host_model: Transformer | None = None


def _with_mask_token(model: Transformer) -> Transformer:
    if model.config.mask_token_id is not None:
        return model
    from llada2_jax.interop import convert
    return convert.add_mask_token(model)[0]


def _mask_inside_embedding(directory: str, tokenizer) -> dict:
    """`mask_token_id` override when the tokenizer's [MASK] is a row the checkpoint already has (a
    reused token or an unused padded row, `data.checkpoint_tokenizer`): no row is appended then."""
    from llada2_jax.data import checkpoint_tokenizer as ct
    mask = getattr(tokenizer, "mask_id", None)
    hf_config = ModelConfig.from_hf_config(directory)
    if mask is None or hf_config.mask_token_id is not None or mask >= hf_config.vocab_size:
        return {}
    if not ct.has_tokenizer_files(directory) or \
            ct.load_checkpoint_tokenizer(directory).fingerprint() != tokenizer.fingerprint():
        return {}  # another tokenizer: Run.model_config reports the mismatch
    return {"mask_token_id": mask}


def open_source(source: str, arch: dict, runtime: dict, tokenizer=None) -> Source:
    """Resolve the architecture of `source`; hf/gguf models are loaded on the host once, here.

    `arch` (ModelConfig fields) is used only by `init`; `runtime` (dtype, remat_policy,
    attention_impl, ...) applies to every source. For `init`, a missing vocab size and special ids
    come from the tokenizer.
    """
    kind, arg = parse_source(source)
    if kind == "init":
        fields = dict(arch, **runtime)
        if tokenizer is not None:
            if not fields.get("vocab_size"):
                fields["vocab_size"] = tokenizer.vocab_size
            for name, value in (("mask_token_id", tokenizer.mask_id), ("eos_token_id", tokenizer.eos_id),
                                ("pad_token_id", tokenizer.pad_id)):
                if fields.get(name) is None:
                    fields[name] = value
        return Source(kind, arg, ModelConfig(**fields))
    if kind == "workdir":
        config = wd.load_model_config(workdir_parts(arg)[0], **runtime)
        if config is None:
            raise ValueError(f"model.source={source!r}: {arg}/{wd.MODEL_CONFIG_FILE} not found (not a run workdir?)")
        return Source(kind, arg, config)
    if kind == "hf":
        from llada2_jax.interop import hf
        model = hf.load_pretrained(arg, **runtime, **_mask_inside_embedding(arg, tokenizer))
    else:
        from llada2_jax.interop import gguf
        model = gguf.load_gguf(None if arg == "smollm2" else arg, **runtime)
    model = _with_mask_token(model)
    return Source(kind, arg, model.config, model)


def place_weights(src: Source, layout: ModelLayout, mesh, seed: int) -> tuple[dict, dict]:
    """(params, buffers) of the source, placed with the layout's shardings on `mesh`."""
    p_sh, b_sh = shd.named(layout.param_specs, mesh), shd.named(layout.buffer_specs, mesh)
    if src.kind == "init":
        def init():
            _, params, buffers = wd.split_model(Transformer(layout.config, rngs=nnx.Rngs(seed)))
            return params, buffers
        return jax.jit(init, out_shardings=(p_sh, b_sh))()
    if src.kind == "workdir":
        directory, stage = workdir_parts(src.arg)
        if stage is None and wd.read_final(directory) is None:
            raise ValueError(f"model.source=workdir:{src.arg}: {wd.FINAL_FILE} not found: that run has not "
                             f"finished a stage yet")
        checkpoints, step = wd.weights_location(directory, stage)
        manager = wd.open_checkpoints(checkpoints)
        try:
            step = manager.latest_step() if step is None else step
            if step is None:
                raise ValueError(f"model.source=workdir:{src.arg}: {checkpoints} holds no checkpoint")
            return wd.restore_weights(manager, step, layout.abstract_params, layout.abstract_buffers, (p_sh, b_sh))
        finally:
            manager.close()
    _, params, buffers = wd.split_model(src.host_model)
    return jax.device_put(params, p_sh), jax.device_put(buffers, b_sh)
