"""A run's tokenizer as HF tokenizer files, so `transformers.AutoTokenizer` loads an exported model.

    save_tokenizer_files("RUN/tokenizer", "out_dir")

The run's own files are copied unchanged (so `data.tokenizers.load_tokenizer(out_dir)` still works),
and `tokenizer_config.json` + `special_tokens_map.json` are added for transformers:
  hf kind (e.g. SmolLM2)  tokenizer.json, read by `PreTrainedTokenizerFast`;
  sentencepiece kind      the model copied to `tokenizer.model`, read by `LlamaTokenizer` with no BOS,
                          no dummy prefix (our training settings) — ids equal ours on plain text.
The chat template becomes a Jinja `chat_template` that renders the same turns as
`Tokenizer.apply_chat_template`. Special-token strings inside plain text are one id for transformers
but ordinary text for sentencepiece, the one place the two can differ.
"""
from __future__ import annotations

import json
import os
import shutil

from llada2_jax.data.tokenizers import ChatTemplate, load_tokenizer

META_FILE = "llada2_tokenizer.json"
HF_FILE = "tokenizer.json"
SP_FILE = "sentencepiece.model"
SP_HF_FILE = "tokenizer.model"


def _literal(text: str) -> str:
    """A Jinja string literal of `text` (JSON escapes are valid Jinja escapes)."""
    return json.dumps(text)


def chat_template_jinja(template: ChatTemplate, eos_token: str) -> str:
    """Jinja source rendering `[{"role", "content"}, ...]` as our `apply_chat_template` lays out ids."""
    before, _, after = template.header.partition("{role}")
    turn_end = _literal(eos_token + template.separator)
    parts = []
    if template.default_system is not None:
        parts.append("{%- if not messages or messages[0]['role'] != 'system' %}"
                     f"{{{{ {_literal(before + 'system' + after + template.default_system)} ~ {turn_end} }}}}"
                     "{%- endif %}")
    parts.append("{%- for message in messages %}"
                 f"{{{{ {_literal(before)} ~ message['role'] ~ {_literal(after)} ~ message['content'] ~ {turn_end} }}}}"
                 "{%- endfor %}")
    parts.append("{%- if add_generation_prompt %}"
                 f"{{{{ {_literal(before + 'assistant' + after)} }}}}"
                 "{%- endif %}")
    return "".join(parts)


def _special_tokens(meta: dict, tokenizer, tokenizer_dir: str) -> dict:
    if meta["kind"] == "sentencepiece":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, SP_FILE))
        ids = {"eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id, "unk_token": sp.unk_id(),
               "mask_token": tokenizer.mask_id}
        return {name: sp.id_to_piece(i) for name, i in ids.items() if i is not None and i >= 0}
    tokens = {"eos_token": meta["eos_token"], "pad_token": meta["pad_token"] or meta["eos_token"]}
    if meta.get("mask_token"):
        tokens["mask_token"] = meta["mask_token"]
    return tokens


def save_tokenizer_files(tokenizer_dir: str, out: str, *, model_max_length: int | None = None) -> dict:
    """Copy the run's tokenizer into `out` and add transformers' config files; returns tokenizer_config."""
    meta_path = os.path.join(tokenizer_dir, META_FILE)
    if not os.path.exists(meta_path):
        raise ValueError(f"{tokenizer_dir} holds no {META_FILE}: not a run's tokenizer directory")
    tokenizer = load_tokenizer(tokenizer_dir)  # fails with a clear message on a broken directory
    with open(meta_path) as f:
        meta = json.load(f)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(tokenizer_dir):
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out, name))
    specials = _special_tokens(meta, tokenizer, tokenizer_dir)
    if meta["kind"] == "sentencepiece":
        shutil.copyfile(os.path.join(tokenizer_dir, SP_FILE), os.path.join(out, SP_HF_FILE))
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "add_prefix_space": False, "legacy": False, "bos_token": None}
    else:
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update(specials, clean_up_tokenization_spaces=False)
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if tokenizer.chat_template is not None:
        config["chat_template"] = chat_template_jinja(tokenizer.chat_template, specials["eos_token"])
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    return config
