"""The tokenizer kinds behind one interface: a sentencepiece model trained here, or a HF `tokenizers` model.

Both render chats the same way (`ChatTemplate`): for every message
`header(role) + encode(content) + [eos_id] + encode(separator)`, then optionally the generation
prompt `header("assistant")`. Building ids piece by piece (instead of rendering a string and
encoding it) keeps the prompt / response boundary exact, which the SFT loss mask depends on.

An HF checkpoint's own Jinja template (`JinjaChatTemplate`) is cut into the same kind of pieces
(`data/chat_jinja.py`).

`save(dir)` writes `llada2_tokenizer.json` (kind and special-token settings) beside the model file;
`data.tokenizers.load_tokenizer(dir)` restores any kind.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence

from llada2_jax.data.chat_jinja import JinjaChatTemplate

_META_FILE = "llada2_tokenizer.json"
_SP_MODEL_FILE = "sentencepiece.model"
_HF_MODEL_FILE = "tokenizer.json"

MASK_TOKEN = "[MASK]"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A turn-based chat layout: `header.format(role=...)`, content, EOS id, `separator`.

    `default_system` is inserted as a system turn when a conversation has none (SmolLM2-Instruct's
    ChatML template does this).
    """
    header: str
    separator: str
    default_system: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# Tiny from-scratch models: `<|user|>\n{content}</s>\n<|assistant|>\n{content}</s>\n`.
TINY_CHAT_TEMPLATE = ChatTemplate(header="<|{role}|>\n", separator="\n")
# ChatML (SmolLM2): `<|im_start|>{role}\n{content}<|im_end|>\n`, with <|im_end|> as EOS.
CHATML_TEMPLATE = ChatTemplate(header="<|im_start|>{role}\n", separator="\n")
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_ROLES = ("system", "user", "assistant")


class Tokenizer(abc.ABC):
    """What the data pipelines, trainer and decoder need from a tokenizer."""

    def __init__(self, chat_template: ChatTemplate | JinjaChatTemplate | None):
        self.chat_template = chat_template

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with no BOS/EOS added."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (EOS, pad, mask) decode to nothing."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts (implementations override with a multithreaded version)."""
        return [self.encode(t) for t in texts]

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (every id returned by `encode` and every special id is below it)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """End of a document / assistant turn; the decoder stops on it."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Filler id for positions outside any document (segment id 0, never in the loss)."""

    @property
    @abc.abstractmethod
    def mask_id(self) -> int | None:
        """The diffusion `[MASK]` id, or None when the vocabulary has none."""

    @abc.abstractmethod
    def save(self, directory: str) -> None:
        """Write everything `load_tokenizer(directory)` needs."""

    @abc.abstractmethod
    def _model_bytes(self) -> bytes:
        """The serialized vocabulary/model (what `fingerprint` hashes)."""

    def fingerprint(self) -> str:
        """Hash of the model and special-token settings: a cache key for tokenized corpora."""
        h = hashlib.sha256(self._model_bytes())
        h.update(repr((self.eos_id, self.pad_id, self.mask_id)).encode())
        return h.hexdigest()[:16]

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: Sequence[dict],
                            add_generation_prompt: bool = False) -> list[int]:
        """Ids of a conversation `[{"role", "content"}, ...]` (roles: system, user, assistant)."""
        template = self.chat_template
        if template is None:
            raise ValueError(f"{type(self).__name__} has no chat template (chat_template=None)")
        messages = list(messages)
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in _ROLES
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"message {i} must be {{'role': one of {_ROLES}, "
                                 f"'content': str}}, got {m!r}")
        if isinstance(template, JinjaChatTemplate):  # an HF checkpoint's own template
            return [i for segment in template.segments(messages, add_generation_prompt)
                    for i in self.encode(segment)]
        has_system = bool(messages) and messages[0]["role"] == "system"
        if template.default_system is not None and not has_system:
            messages.insert(0, {"role": "system", "content": template.default_system})
        ids: list[int] = []
        separator = self.encode(template.separator)
        for m in messages:
            ids += self.encode(template.header.format(role=m["role"]))
            ids += self.encode(m["content"])
            ids.append(self.eos_id)
            ids += separator
        if add_generation_prompt:
            ids += self.encode(template.header.format(role="assistant"))
        return ids


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model trained on our corpora, for from-scratch tiny models.

    Fixed ids: 0 `<pad>`, 1 `<unk>`, 2 `</s>` (EOS), 3 `[MASK]` (control symbol: never produced by
    `encode`), then the chat role markers `<|system|>`, `<|user|>`, `<|assistant|>` (user-defined
    symbols, so the template text encodes to one id each). No BOS. Byte fallback makes every string
    representable; identity normalization keeps code whitespace exact, so `decode(encode(s)) == s`.
    """

    def __init__(self, model_proto: bytes, chat_template: ChatTemplate | None = TINY_CHAT_TEMPLATE):
        import sentencepiece as spm
        super().__init__(chat_template)
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        mask = self._sp.piece_to_id(MASK_TOKEN)
        self._mask_id = None if mask == self._sp.unk_id() else mask

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, model_type: str = "bpe",
              character_coverage: float = 0.9995, num_threads: int = 2,
              max_sentence_length: int = 1 << 20) -> "SentencePieceTokenizer":
        """Train on `texts` (each one sentencepiece "sentence", e.g. a whole file).

        Texts longer than `max_sentence_length` bytes are skipped by sentencepiece itself.
        """
        import io
        import sentencepiece as spm
        min_vocab = 3 + 1 + len(_ROLES) + 256  # specials, mask, role markers, byte pieces
        if vocab_size <= min_vocab:
            raise ValueError(f"vocab_size={vocab_size} must exceed {min_vocab} "
                             "(special tokens + 256 byte pieces)")
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type={model_type!r} must be 'bpe' or 'unigram'")
        model = io.BytesIO()
        role_markers = [TINY_CHAT_TEMPLATE.header.format(role=r).strip() for r in _ROLES]
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=character_coverage,
            pad_id=0, unk_id=1, eos_id=2, bos_id=-1, control_symbols=[MASK_TOKEN],
            user_defined_symbols=role_markers, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=max_sentence_length, num_threads=num_threads, minloglevel=2)
        return cls(model.getvalue())

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def mask_id(self) -> int | None:
        return self._mask_id

    def _model_bytes(self) -> bytes:
        return self._proto

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, _SP_MODEL_FILE), "wb") as f:
            f.write(self._proto)
        _write_meta(directory, {"kind": "sentencepiece", "chat_template": _template_json(self)})


class SpecialIdsFromFields:
    """`eos_id`, `pad_id` and `mask_id` read from `_eos_id`, `_pad_id`, `_mask_id`, set in `__init__`."""

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def mask_id(self) -> int | None:
        return self._mask_id


class HFTokenizer(SpecialIdsFromFields, Tokenizer):
    """Wraps a `tokenizers.Tokenizer` (e.g. SmolLM2's byte-level BPE from the GGUF file).

    Special ids are found by token string. `pad_token=None` pads with EOS. The mask token is
    optional here; `with_mask_token()` appends one (id = current vocab size, 49152 for SmolLM2).
    """

    def __init__(self, tokenizer, *, eos_token: str = "<|im_end|>", pad_token: str | None = None,
                 mask_token: str | None = None,
                 chat_template: ChatTemplate | JinjaChatTemplate | None = CHATML_TEMPLATE):
        super().__init__(chat_template)
        self._tok = tokenizer
        self._tokens = {"eos_token": eos_token, "pad_token": pad_token, "mask_token": mask_token}
        self._eos_id = self._id_of("eos_token", eos_token)
        self._pad_id = self._eos_id if pad_token is None else self._id_of("pad_token", pad_token)
        self._mask_id = None if mask_token is None else self._id_of("mask_token", mask_token)

    def _id_of(self, field: str, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{field}={token!r} is not in the tokenizer vocabulary")
        return i

    @classmethod
    def smollm2(cls, tokenizer, *, add_mask_token: bool = True) -> "HFTokenizer":
        """SmolLM2-Instruct settings: EOS `<|im_end|>`, ChatML with its default system prompt."""
        template = dataclasses.replace(CHATML_TEMPLATE, default_system=SMOLLM2_SYSTEM_PROMPT)
        tok = cls(tokenizer, eos_token="<|im_end|>", chat_template=template)
        return tok.with_mask_token() if add_mask_token else tok

    def with_mask_token(self, token: str = MASK_TOKEN) -> "HFTokenizer":
        """A copy whose vocabulary has `token` as a special token (new id = old vocab size)."""
        import tokenizers
        raw = tokenizers.Tokenizer.from_str(self._tok.to_str())
        if raw.token_to_id(token) is None:
            expected = raw.get_vocab_size(with_added_tokens=True)
            raw.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
            got = raw.token_to_id(token)
            if got != expected:
                raise ValueError(f"adding {token!r} gave id {got}, expected {expected}")
        return HFTokenizer(raw, eos_token=self._tokens["eos_token"],
                           pad_token=self._tokens["pad_token"], mask_token=token,
                           chat_template=self.chat_template)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _model_bytes(self) -> bytes:
        return self._tok.to_str().encode("utf-8")

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, _HF_MODEL_FILE))
        _write_meta(directory,
                    {"kind": "hf", **self._tokens, "chat_template": _template_json(self)})


def _template_json(tok: Tokenizer) -> dict | None:
    return None if tok.chat_template is None else tok.chat_template.to_json()


def template_from_json(data: dict | None) -> ChatTemplate | JinjaChatTemplate | None:
    if data is None:
        return None
    if "jinja" in data:
        return JinjaChatTemplate.from_json(data)
    return ChatTemplate(**data)


def _write_meta(directory: str, meta: dict) -> None:
    with open(os.path.join(directory, _META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
