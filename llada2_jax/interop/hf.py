"""Hugging Face checkpoints (config.json + safetensors, single file or sharded) ↔ our Transformer.

    model = load_pretrained("path/to/hf_dir", dtype=jnp.bfloat16)
    save_pretrained(model, "out_dir")   # transformers can `from_pretrained` it (Llama/Qwen families)
    save_generation_config("out_dir", model.config, block_size=32, threshold=0.95)

The per-family name/layout tables live in `mapping.py`; the tensor walking in `params.py`.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from llada2_jax.interop import params
from llada2_jax.model.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DECODING = "block_threshold"  # what generation_config.json's `decoding` names: `inference.generate`
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class SafetensorsCheckpoint:
    """The tensors of an HF checkpoint directory, read lazily (one file handle per shard)."""

    def __init__(self, directory: str):
        self.directory = directory
        single, index = (os.path.join(directory, f) for f in (SINGLE_FILE, INDEX_FILE))
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"cannot read the shard index {index}: {e}") from e
        elif os.path.exists(single):
            weight_map = {name: SINGLE_FILE for name in self._open(single).keys()}
        else:
            raise ValueError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._file_of = {name: os.path.join(directory, f) for name, f in weight_map.items()}
        self._handles = {}

    @staticmethod
    def _open(path: str):
        try:
            return safetensors.safe_open(path, framework="numpy")
        except Exception as e:  # SafetensorError, OSError: the file is corrupt, truncated or absent
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e

    def _handle(self, name: str):
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path]

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str):
        if name not in self._file_of:
            return None
        h = self._handle(name)
        if name not in h.keys():
            raise ValueError(f"shard index lists {name!r} in {self._file_of[name]}, which lacks it")
        return tuple(h.get_slice(name).get_shape())

    def get(self, name: str):
        try:
            return self._handle(name).get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {self._file_of[name]}: {e}") from e


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, **config_overrides):
    """Load an HF directory into a `Transformer` whose parameters (and compute) use `dtype`.

    `config_overrides` go to `ModelConfig.from_hf_config` (e.g. attention_impl="pallas",
    remat_policy="full", param_dtype="float32" to keep fp32 master weights with bf16 compute).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a checkpoint directory")
    name = jnp.dtype(dtype).name
    overrides = {"param_dtype": name, "dtype": name, **config_overrides}
    config = ModelConfig.from_hf_config(path, **overrides)
    return params.load_into(config, SafetensorsCheckpoint(path), jnp.dtype(config.param_dtype), path)


def save_pretrained(model, path: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
    """Write `config.json` and safetensors (sharded with an index above `max_shard_bytes`)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = params.export(model)
    hf_config = model.config.to_hf_config()
    hf_config["torch_dtype"] = model.config.param_dtype
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    shards = _shard(tensors, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        safetensors.numpy.save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata=meta)
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, os.path.join(path, fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)


def save_generation_config(path: str | os.PathLike, config: ModelConfig, *, block_size: int, threshold: float,
                           gen_length: int | None = None) -> dict:
    """Write `generation_config.json` with the block threshold decoding defaults, and return it.

    transformers keeps the unknown keys (`block_size`, `threshold`, `mask_token_id`, `decoding`) as
    attributes of its `GenerationConfig`, so a loader of the directory finds how the model decodes;
    transformers' own `generate` is autoregressive and ignores them.
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be in [0, 1]")
    if config.mask_token_id is None:
        raise ValueError("the model has no mask_token_id: block decoding needs one")
    generation = {"decoding": DECODING, "block_size": int(block_size), "threshold": float(threshold),
                  "steps_per_block": int(block_size), "mask_token_id": config.mask_token_id, "do_sample": False}
    if gen_length is not None:
        generation["max_new_tokens"] = int(gen_length)
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(config, name) is not None:
            generation[name] = getattr(config, name)
    os.makedirs(os.fspath(path), exist_ok=True)
    with open(os.path.join(os.fspath(path), GENERATION_CONFIG_FILE), "w") as f:
        json.dump(generation, f, indent=2, sort_keys=True)
    return generation


def _shard(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Greedy split in name order; a tensor larger than max_bytes gets a shard of its own."""
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        if current and size + t.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    return shards
