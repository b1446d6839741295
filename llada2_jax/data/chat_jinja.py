"""An HF checkpoint's Jinja chat template, rendered, then cut only where assistant replies start and end.

`Tokenizer.apply_chat_template` encodes each segment separately:
  [text up to the 1st assistant reply] [reply 1] [text up to reply 2] [reply 2] ... [rest + generation prompt]
A prompt (no assistant reply yet, e.g. one user turn + the generation prompt: what evaluation,
generation, DPO and SFT encode) is one segment, so its ids are exactly transformers'
`apply_chat_template(..., tokenize=True)`. Cutting at the replies keeps the prompt / response
boundary exact, as `ChatTemplate` does: the ids of a whole chat start with the ids of its prompt,
then `encode(reply)`. Encoding the whole rendered chat as one string instead would let a BPE merge
or a whitespace rule cross that boundary (e.g. Llama 3's `<|end_header_id|>\n\n` + reply): the
prompt ids would then not be a prefix of the chat ids, and the SFT loss mask would be off by a token.

Segments are found by rendering each prefix of the conversation (the template must only append);
a reply is located within its turn with a sentinel message.
"""
from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

_SENTINEL = "\u2060LLADA2_MESSAGE_CONTENT\u2060"


def _environment():
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("this tokenizer has a Jinja chat template: install jinja2 "
                         "(`pip install jinja2`) to render it") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@dataclasses.dataclass(frozen=True)
class JinjaChatTemplate:
    """`source`: the template text; `variables`: the special-token strings it may reference
    (`bos_token`, `eos_token`, ...)."""
    source: str
    variables: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict:
        return {"jinja": self.source, "variables": dict(self.variables)}

    @classmethod
    def from_json(cls, data: dict) -> "JinjaChatTemplate":
        return cls(data["jinja"], tuple(sorted(data.get("variables", {}).items())))

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        template = _environment().from_string(self.source)
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               **dict(self.variables))

    def pieces(self, messages: Sequence[dict],
               add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """(text, is_reply) pieces whose texts concatenate to `render(messages, ...)`; every
        assistant reply (the message content, as the template writes it) is a piece of its own."""
        messages = [dict(m) for m in messages]
        rendered = [self.render(messages[:k]) for k in range(len(messages) + 1)]
        out = [(rendered[0], False)]
        for k, message in enumerate(messages):
            before, after = rendered[k], rendered[k + 1]
            if not after.startswith(before):
                raise ValueError(f"chat template renders message {k} by rewriting earlier turns: it "
                                 f"cannot be cut into per-message pieces")
            added = after[len(before):]
            if message["role"] != "assistant":
                out.append((added, False))
                continue
            probe = self.render(messages[:k] + [{**message, "content": _SENTINEL}])[len(before):]
            head, found, _ = probe.partition(_SENTINEL)
            content = message["content"]
            if not found or not added.startswith(head):
                raise ValueError(f"chat template: cannot locate the content of message {k} "
                                 f"(role {message['role']!r}) in its rendering")
            rest = added[len(head):]
            for text in (content, content.strip()):
                if rest.startswith(text):
                    out += [(head, False), (text, True), (rest[len(text):], False)]
                    break
            else:
                raise ValueError(f"chat template changes the content of message {k} beyond stripping "
                                 f"whitespace: cannot keep the prompt/response boundary exact")
        if add_generation_prompt:
            full = self.render(messages, add_generation_prompt=True)
            if not full.startswith(rendered[-1]):
                raise ValueError("chat template: the generation prompt rewrites earlier turns")
            out.append((full[len(rendered[-1]):], False))
        return out

    def segments(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[str]:
        """The texts to encode one by one: replies alone, everything between them merged."""
        segments: list[str] = []
        merge = False
        for text, is_reply in self.pieces(messages, add_generation_prompt):
            if merge and not is_reply:
                segments[-1] += text
            else:
                segments.append(text)
            merge = not is_reply
        return [t for t in segments if t]
