"""An HF checkpoint directory's own tokenizer, so that `model.source=hf:DIR` trains with it.

Read from DIR:
  tokenizer.json            an HF `tokenizers` model (-> `HFTokenizer`), or else
  tokenizer.model           a sentencepiece model (-> `CheckpointSentencePieceTokenizer`);
  tokenizer_config.json     special tokens (`eos_token`, `pad_token`, `mask_token`, and
  special_tokens_map.json   `added_tokens_decoder`) and `chat_template` (or `chat_template.jinja`);
  config.json               the model's `vocab_size` (and `mask_token_id` of a converted model).
EOS is the config's `eos_token` (the end of an assistant turn for chat models); padding uses
`pad_token` or else EOS. No BOS is ever added: documents are separated by EOS, as everywhere here.

The diffusion `[MASK]` id, in order of preference:
  1. the model's own `mask_token_id` (config.json of an already converted checkpoint);
  2. an existing mask token: `mask_token` (argument or tokenizer_config), `[MASK]`, `<|mask|>`, `<mask>`;
  3. an unused reserved special token (e.g. Llama 3's `<|reserved_special_token_0|>`);
  4. a new `[MASK]` with the next tokenizer id, when the model can embed it: an unused padded row
     (tokenizer ids < model vocab_size) or one row appended by the conversion
     (`interop.convert.add_mask_token`, when the tokenizer ids = model vocab_size).
Otherwise a ValueError says that neither is possible.
"""
from __future__ import annotations

import json
import os
import re

from llada2_jax.data.chat_jinja import JinjaChatTemplate
from llada2_jax.data.tokenizer_kinds import (_SP_MODEL_FILE, MASK_TOKEN, HFTokenizer, SpecialIdsFromFields,
                                             Tokenizer, _template_json, _write_meta)

HF_TOKENIZER_FILE = "tokenizer.json"
SP_TOKENIZER_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
MODEL_CONFIG_FILE = "config.json"
MASK_NAMES = (MASK_TOKEN, "<|mask|>", "<mask>")
_RESERVED = re.compile(r"reserved", re.IGNORECASE)
_TEMPLATE_VARIABLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def has_tokenizer_files(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in (HF_TOKENIZER_FILE, SP_TOKENIZER_FILE))


def _token(value) -> str | None:
    """A special token as tokenizer_config stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_config(directory: str) -> dict:
    """special_tokens_map.json overlaid with tokenizer_config.json (which transformers prefers)."""
    config = _read_json(os.path.join(directory, SPECIAL_MAP_FILE))
    config.update(_read_json(os.path.join(directory, CONFIG_FILE)))
    return config


def added_tokens(config: dict) -> dict[str, tuple[int, bool]]:
    """`added_tokens_decoder` as {content: (id, special)}."""
    out = {}
    for key, value in (config.get("added_tokens_decoder") or {}).items():
        content = _token(value)
        if content is not None:
            out[content] = (int(key), bool(value.get("special", True)) if isinstance(value, dict) else True)
    return out


def read_chat_template(directory: str, config: dict) -> JinjaChatTemplate | None:
    path = os.path.join(directory, TEMPLATE_FILE)
    source = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            source = f.read()
    else:
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name", "template"}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
    if not source:
        return None
    variables = tuple((k, _token(config.get(k))) for k in _TEMPLATE_VARIABLES if _token(config.get(k)))
    return JinjaChatTemplate(source, variables)


def model_vocab(directory: str) -> tuple[int | None, int | None]:
    """(vocab_size, mask_token_id) of the model's config.json; (None, None) when there is none."""
    config = _read_json(os.path.join(directory, MODEL_CONFIG_FILE))
    mask = config.get("mask_token_id")
    return config.get("vocab_size"), (mask if isinstance(mask, int) else None)


def choose_mask(directory: str, token_to_id, id_to_token, tokenizer_size: int, config: dict,
                mask_token: str | None = None) -> tuple[str, int, bool]:
    """(token, id, is_new) of the `[MASK]` token, by the module docstring's order of preference."""
    vocab, model_mask = model_vocab(directory)
    if model_mask is not None:
        if model_mask < tokenizer_size:
            return id_to_token(model_mask), model_mask, False
        if model_mask == tokenizer_size:
            return MASK_TOKEN, model_mask, True
        raise ValueError(f"{directory}: config.json mask_token_id={model_mask} is beyond the tokenizer's "
                         f"{tokenizer_size} ids")
    limit = vocab if vocab is not None else tokenizer_size
    names = [t for t in (mask_token, _token(config.get("mask_token"))) if t] + list(MASK_NAMES)
    for name in dict.fromkeys(names):
        i = token_to_id(name)
        if i is not None and i < limit:
            return name, i, False
    reserved = sorted((i, t) for t, (i, special) in added_tokens(config).items()
                      if special and _RESERVED.search(t) and i < limit)
    if reserved and mask_token is None:
        return reserved[0][1], reserved[0][0], False
    new = mask_token or MASK_TOKEN
    if vocab is None or tokenizer_size <= vocab:
        return new, tokenizer_size, True
    raise ValueError(f"{directory}: no reusable mask token ({', '.join(dict.fromkeys(names))} or a reserved "
                     f"special token) and no embedding row for a new one: the tokenizer has {tokenizer_size} "
                     f"ids but config.json vocab_size={vocab}")


def load_checkpoint_tokenizer(directory: str, *, mask_token: str | None = None) -> Tokenizer:
    """The tokenizer of an HF checkpoint directory, with its `[MASK]` resolved (module docstring)."""
    config = read_config(directory)
    template = read_chat_template(directory, config)
    eos = _token(config.get("eos_token"))
    if eos is None:
        raise ValueError(f"{directory}/{CONFIG_FILE}: no eos_token: cannot tell where documents end")
    pad = _token(config.get("pad_token"))
    if os.path.isfile(os.path.join(directory, HF_TOKENIZER_FILE)):
        import tokenizers
        raw = tokenizers.Tokenizer.from_file(os.path.join(directory, HF_TOKENIZER_FILE))
        size = raw.get_vocab_size(with_added_tokens=True)
        token, mask_id, new = choose_mask(directory, raw.token_to_id, raw.id_to_token, size, config, mask_token)
        tok = HFTokenizer(raw, eos_token=eos, pad_token=pad, chat_template=template)
        return tok.with_mask_token(token) if new else HFTokenizer(
            raw, eos_token=eos, pad_token=pad, mask_token=token, chat_template=template)
    return CheckpointSentencePieceTokenizer.from_directory(directory, config, template, mask_token)


class CheckpointSentencePieceTokenizer(SpecialIdsFromFields, Tokenizer):
    """A checkpoint's sentencepiece model as transformers' sentencepiece tokenizers use it: special
    token strings in the text are cut out first and become their ids, the text between them is
    encoded by sentencepiece piece by piece (its own normalization and dummy prefix apply).

    `specials`: every special / added token string and its id (ids at or beyond the model's pieces
    are added tokens, e.g. a new `[MASK]`).
    """

    def __init__(self, model_proto: bytes, *, eos_id: int, pad_id: int, mask_id: int | None,
                 specials: dict[str, int], chat_template=None):
        import sentencepiece as spm
        super().__init__(chat_template)
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._eos_id, self._pad_id, self._mask_id = eos_id, pad_id, mask_id
        self.specials = dict(specials)
        self._special_ids = set(self.specials.values())
        alternatives = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    @classmethod
    def from_directory(cls, directory: str, config: dict, template, mask_token: str | None = None):
        import sentencepiece as spm
        with open(os.path.join(directory, SP_TOKENIZER_FILE), "rb") as f:
            proto = f.read()
        sp = spm.SentencePieceProcessor(model_proto=proto)
        specials = {t: i for t, (i, _) in added_tokens(config).items()}
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i):
                specials.setdefault(sp.id_to_piece(i), i)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"):
            t = _token(config.get(key))
            if t and t not in specials and sp.piece_to_id(t) != sp.unk_id():
                specials[t] = sp.piece_to_id(t)
        by_id = {i: t for t, i in specials.items()}
        size = max([sp.get_piece_size()] + [i + 1 for i in specials.values()])

        def token_to_id(t):
            if t in specials:
                return specials[t]
            i = sp.piece_to_id(t)
            return None if i == sp.unk_id() and t != sp.id_to_piece(sp.unk_id()) else i

        token, mask_id, new = choose_mask(directory, token_to_id,
                                          lambda i: by_id.get(i, sp.id_to_piece(i)), size, config, mask_token)
        specials[token] = mask_id
        eos = _token(config.get("eos_token"))
        pad = _token(config.get("pad_token"))
        ids = {}
        for field, t in (("eos_token", eos), ("pad_token", pad)):
            if t is not None:
                ids[field] = token_to_id(t)
                if ids[field] is None:
                    raise ValueError(f"{field}={t!r} is not in the tokenizer vocabulary of {directory}")
        return cls(proto, eos_id=ids["eos_token"], pad_id=ids.get("pad_token", ids["eos_token"]),
                   mask_id=mask_id, specials=specials, chat_template=template)

    @classmethod
    def restore(cls, directory: str, meta: dict, template):
        with open(os.path.join(directory, _SP_MODEL_FILE), "rb") as f:
            proto = f.read()
        return cls(proto, eos_id=meta["eos_id"], pad_id=meta["pad_id"], mask_id=meta["mask_id"],
                   specials=meta["specials"], chat_template=template)

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self._sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                ids.append(self.specials[part])
            elif part:
                ids += self._sp.encode(part)
        return ids

    def decode(self, ids) -> str:
        size = self._sp.get_piece_size()
        return self._sp.decode([int(i) for i in ids if int(i) not in self._special_ids and int(i) < size])

    @property
    def vocab_size(self) -> int:
        return max([self._sp.get_piece_size()] + [i + 1 for i in self.specials.values()])

    def _model_bytes(self) -> bytes:
        return self._proto + json.dumps(sorted(self.specials.items())).encode()

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, _SP_MODEL_FILE), "wb") as f:
            f.write(self._proto)
        _write_meta(directory, {"kind": "sentencepiece_checkpoint", "eos_id": self._eos_id,
                                "pad_id": self._pad_id, "mask_id": self._mask_id, "specials": self.specials,
                                "chat_template": _template_json(self)})

