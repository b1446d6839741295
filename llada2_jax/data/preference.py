"""DPO pairs `{"prompt", "chosen", "rejected"}` -> padded Grain batches, one sample per row.

Each side is laid out exactly like an SFT sample (`sft.encode_sample`: chat-template prompt, then
response + EOS padded with EOS to a multiple of the block size, prompt outside the loss), then
padded to `seq_len` with `pad_id` (segment 0). Pairs where either side is longer than `seq_len`
are dropped and counted. Batch keys: `chosen_{tokens,segment_ids,positions,loss_mask}` and the
same with `rejected_`.

The default data set is *synthetic*, built from GSM8K train: chosen = the reference solution;
rejected = the same solution whose final answer (the `#### N` line) and the last reasoning line
that produces it carry a wrong number. The two differ only in that answer part, so the preference
signal is "get the final computation right".
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import grain
import numpy as np

from llada2_jax.data import sft
from llada2_jax.data.pipeline import IN_MEMORY, check_layout, shard_and_order
from llada2_jax.data.tokenizers import Tokenizer

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
SIDES = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferenceData:
    dataset: grain.IterDataset
    num_pairs: int     # pairs kept (before sharding)
    num_dropped: int   # pairs with a side longer than seq_len


def read_preference_pairs(path: str | os.PathLike) -> list[dict]:
    """`{"prompt", "chosen", "rejected"}` per line (all strings)."""
    pairs = sft.read_jsonl(path)
    for i, p in enumerate(pairs):
        for field in ("prompt",) + SIDES:
            if not isinstance(p.get(field), str):
                raise ValueError(f"{path} record {i}: field {field!r} missing or not a string")
    return pairs


def _format_like(template: str, x: float) -> str:
    """`x` with as many decimals as the number string `template` (no thousands separators)."""
    plain = template.replace(",", "")
    decimals = len(plain.split(".")[1]) if "." in plain else 0
    return f"{x:.{decimals}f}"


def corrupt_gsm8k_answer(answer: str, rng: np.random.Generator) -> str:
    """`answer` with its `#### N` value changed, and N changed the same way in the last step.

    N is moved by a random non-zero integer (staying non-negative when N is). In the last reasoning
    line, the last number equal to N (compared as values: `252.00` matches `252`) is replaced;
    when there is none, only the `####` line changes. ValueError without a `#### <number>` line.
    """
    lines = answer.split("\n")
    m = re.fullmatch(r"####\s*(" + _NUMBER.pattern + r")\s*", lines[-1])
    if m is None:
        raise ValueError(f"answer has no final '#### <number>' line: {lines[-1]!r}")
    value = float(m.group(1).replace(",", ""))
    delta = int(rng.integers(1, 10))
    wrong = value + (delta if value < 10 or rng.random() < 0.5 else -delta)
    lines[-1] = f"#### {_format_like(m.group(1), wrong)}"
    if len(lines) >= 2:
        step = lines[-2]
        hits = [h for h in _NUMBER.finditer(step) if float(h.group().replace(",", "")) == value]
        if hits:
            h = hits[-1]
            lines[-2] = step[:h.start()] + _format_like(h.group(), wrong) + step[h.end():]
    return "\n".join(lines)


def gsm8k_preference_pairs(path: str | os.PathLike | None = None, *, split: str = "train",
                           heldout_size: int = 256, seed: int = 0) -> list[dict]:
    """The synthetic GSM8K preference set (see the module docstring); deterministic per `seed`."""
    records = sft.read_gsm8k(path, split=split, heldout_size=heldout_size)
    pairs = []
    for i, r in enumerate(records):
        rng = np.random.default_rng([seed, i])
        pairs.append({"prompt": r["question"], "chosen": r["answer"],
                      "rejected": corrupt_gsm8k_answer(r["answer"], rng)})
    return pairs


def _pad_row(sample: dict, seq_len: int, pad_id: int) -> dict:
    n = len(sample["tokens"])
    tokens = np.full(seq_len, pad_id, np.int32)
    tokens[:n] = sample["tokens"]
    segment_ids = np.zeros(seq_len, np.int32)
    segment_ids[:n] = 1
    positions = np.zeros(seq_len, np.int32)
    positions[:n] = np.arange(n)
    loss_mask = np.zeros(seq_len, bool)
    loss_mask[:n] = sample["loss_mask"].astype(bool)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
            "loss_mask": loss_mask}


def preference_dataset(pairs: Sequence[dict], tokenizer: Tokenizer, *, seq_len: int,
                       batch_size: int, block_size: int, seed: int,
                       num_epochs: int | None = 1, shard_index: int = 0,
                       shard_count: int = 1) -> PreferenceData:
    """Batches of padded chosen/rejected rows (see the module docstring)."""
    check_layout(seq_len, batch_size, block_size)
    encoded = []
    for p in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}],
                                               add_generation_prompt=True)
        encoded.append({side: sft.encode_sample(prompt, p[side], tokenizer, block_size)
                        for side in SIDES})
    kept = [e for e in encoded if max(len(e[s]["tokens"]) for s in SIDES) <= seq_len]
    if not kept:
        raise ValueError(f"all {len(encoded)} pairs are longer than seq_len={seq_len}")
    pad_id = tokenizer.pad_id

    def to_rows(e: dict) -> dict:
        return {f"{side}_{k}": v for side in SIDES
                for k, v in _pad_row(e[side], seq_len, pad_id).items()}

    ds = shard_and_order(kept, seed=seed, num_epochs=num_epochs, shard_index=shard_index,
                         shard_count=shard_count)
    ds = ds.map(to_rows).to_iter_dataset(IN_MEMORY).batch(batch_size, drop_remainder=True)
    return PreferenceData(ds, num_pairs=len(kept), num_dropped=len(encoded) - len(kept))
