"""Load a model and its tokenizer for evaluation from one spec string.

  smollm2 | gguf:smollm2     SmolLM2-135M-Instruct (assets.md), tokenizer from the same file
  gguf:<path>                another llama GGUF file and its tokenizer
  hf:<dir>                   an HF checkpoint dir; tokenizer if the dir holds a saved one
  workdir:<dir>              a run's final weights (its final.json) and <dir>/tokenizer
  workdir:<dir>@<stage>      the latest checkpoint of one stage of that run
                             (e.g. `@ar_pretrain`: the AR base a conversion run started from)

Weights land on the default device, unsharded: evaluation runs are single-device.
"""
from __future__ import annotations

import os

from llada2_jax.data.tokenizers import HFTokenizer, Tokenizer, load_tokenizer

SPEC_HELP = ("smollm2, gguf:<path>, hf:<dir>, workdir:<dir> or workdir:<dir>@<stage>")


def load_model(spec: str):
    """(model, tokenizer or None) for `spec` (module docstring)."""
    kind, _, arg = spec.partition(":")
    if spec == "smollm2":
        kind, arg = "gguf", "smollm2"
    if not arg or kind not in ("gguf", "hf", "workdir"):
        raise ValueError(f"model spec {spec!r}: expected {SPEC_HELP}")
    if kind == "gguf":
        from llada2_jax.interop import gguf
        path = None if arg == "smollm2" else arg
        return gguf.load_gguf(path), HFTokenizer.from_gguf(path, add_mask_token=True)
    if kind == "hf":
        from llada2_jax.interop import hf
        return hf.load_pretrained(arg), _saved_tokenizer(arg)
    directory, _, stage = arg.partition("@")
    return _load_workdir(directory, stage or None), _saved_tokenizer(os.path.join(directory, "tokenizer"))


def _saved_tokenizer(directory: str) -> Tokenizer | None:
    try:
        return load_tokenizer(directory)
    except FileNotFoundError:
        return None


def _load_workdir(workdir: str, stage: str | None):
    from llada2_jax.training import model_source as ms
    from llada2_jax.training.checkpoint import Checkpointer
    from llada2_jax.training.state import merge_model, split_model

    config = ms.load_model_config(workdir)
    if config is None:
        raise ValueError(f"workdir:{workdir}: {ms.MODEL_CONFIG_FILE} not found (not a run workdir?)")
    if stage is None:
        final = ms.read_final(workdir)
        if final is None:
            raise ValueError(f"workdir:{workdir}: {ms.FINAL_FILE} not found: the run has not finished "
                             "a stage yet (or name one: workdir:<dir>@<stage>)")
        directory, step = final["checkpoint_dir"], final["step"]
    else:
        directory = os.path.join(workdir, "checkpoints", stage)
        if not os.path.isdir(directory):
            raise ValueError(f"workdir:{workdir}@{stage}: no checkpoints in {directory}")
        step = None
    ckpt = Checkpointer(directory, keep=None, async_save=False)
    try:
        if step is None:
            step = ckpt.latest_step()
            if step is None:
                raise ValueError(f"workdir:{workdir}@{stage}: {directory} holds no checkpoint")
        graphdef, params, buffers = split_model(ms.abstract_model(config))
        params, buffers = ckpt.restore_model(step, params, buffers)
    finally:
        ckpt.close()
    return merge_model(graphdef, params, buffers)
