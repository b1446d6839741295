"""Tokenizers: the kinds (`data.tokenizer_kinds`: sentencepiece trained here, HF `tokenizers`, and an
HF checkpoint's own files, `data.checkpoint_tokenizer`) and `load_tokenizer(dir)`, which restores any
of them from a directory.

This module is the public entry: the kinds live in their own modules so that the checkpoint
tokenizers can build on the base kinds without an import cycle.
"""

from __future__ import annotations

import json
import os

from llada2_jax.data import checkpoint_tokenizer
from llada2_jax.data.tokenizer_kinds import (_HF_MODEL_FILE, _META_FILE, _SP_MODEL_FILE, CHATML_TEMPLATE, MASK_TOKEN,
                                             SMOLLM2_SYSTEM_PROMPT, TINY_CHAT_TEMPLATE, ChatTemplate, HFTokenizer,
                                             SentencePieceTokenizer, Tokenizer, template_from_json)

__all__ = ["CHATML_TEMPLATE", "MASK_TOKEN", "SMOLLM2_SYSTEM_PROMPT", "TINY_CHAT_TEMPLATE", "ChatTemplate",
           "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer", "template_from_json",
           "_HF_MODEL_FILE", "_META_FILE", "_SP_MODEL_FILE"]


def load_tokenizer(directory: str) -> Tokenizer:
    """Restore a tokenizer written by `Tokenizer.save(directory)`, whatever its kind, or load an HF
    checkpoint directory's own tokenizer (`tokenizer.json` or sentencepiece `tokenizer.model`, with
    `tokenizer_config.json`; see `data.checkpoint_tokenizer`)."""
    meta_path = os.path.join(directory, _META_FILE)
    if not os.path.exists(meta_path):
        if checkpoint_tokenizer.has_tokenizer_files(directory):
            return checkpoint_tokenizer.load_checkpoint_tokenizer(directory)
        raise FileNotFoundError(f"{meta_path} not found: not a directory written by Tokenizer.save, "
                                f"and no HF tokenizer files ({_HF_MODEL_FILE}, tokenizer.model)")
    with open(meta_path) as f:
        meta = json.load(f)
    template = template_from_json(meta.get("chat_template"))
    kind = meta.get("kind")
    if kind == "sentencepiece_checkpoint":
        return checkpoint_tokenizer.CheckpointSentencePieceTokenizer.restore(directory, meta, template)
    if kind == "sentencepiece":
        with open(os.path.join(directory, _SP_MODEL_FILE), "rb") as f:
            return SentencePieceTokenizer(f.read(), chat_template=template)
    if kind == "hf":
        import tokenizers
        raw = tokenizers.Tokenizer.from_file(os.path.join(directory, _HF_MODEL_FILE))
        return HFTokenizer(raw, eos_token=meta["eos_token"], pad_token=meta["pad_token"],
                           mask_token=meta["mask_token"], chat_template=template)
    raise ValueError(f"{meta_path}: kind={kind!r} must be 'sentencepiece', 'sentencepiece_checkpoint' "
                     f"or 'hf'")
