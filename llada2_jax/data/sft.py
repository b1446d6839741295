"""Supervised fine-tuning data: conversations -> block-aligned samples -> packed Grain batches.

One sample per conversation; only its last message (which must be the assistant's) is supervised:
  prompt   = chat template of every earlier message + the generation prompt   (loss_mask False)
  response = encode(last content) + [EOS], then EOS up to a multiple of the block size  (True)
The prompt starts at a block boundary (like inference, where the prompt starts at position 0) and
the EOS padding makes the sample end on one; the decoder learns to fill the tail of its final
block with EOS and stops on it. Samples are packed whole (first fit) into rows of `seq_len`, with
segment ids 1, 2, ... and positions restarting at 0 per sample. Samples longer than `seq_len`
are dropped (never truncated mid-response) and counted in `SFTData.num_dropped`.

Batches have the pretraining keys (`tokens, segment_ids, positions, loss_mask`); here `loss_mask`
means "response token, eligible for noising and the loss".
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np

from llada2_jax.data.pipeline import (IN_MEMORY, check_layout, finalize_packed, round_up,
                                      shard_and_order)
from llada2_jax.data.tokenizers import Tokenizer

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GSM8K_TRAIN = PROJECT_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclasses.dataclass(frozen=True)
class SFTData:
    """The batches plus the bookkeeping the trainer logs."""
    dataset: grain.IterDataset
    num_samples: int   # samples kept (before sharding)
    num_dropped: int   # samples longer than seq_len, dropped


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file (blank lines skipped); FileNotFoundError names the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """`{"messages": [{"role", "content"}, ...]}` per line."""
    out = []
    for i, record in enumerate(read_jsonl(path)):
        if not isinstance(record.get("messages"), list):
            raise ValueError(f"{path} record {i}: field 'messages' missing or not a list")
        out.append(record["messages"])
    return out


def prompt_response_conversations(pairs: Sequence[dict], prompt_field: str = "prompt",
                                  response_field: str = "response") -> list[list[dict]]:
    """`{"prompt", "response"}` records as two-message conversations."""
    out = []
    for i, p in enumerate(pairs):
        for field in (prompt_field, response_field):
            if not isinstance(p.get(field), str):
                raise ValueError(f"pair {i}: field {field!r} missing or not a string")
        out.append([{"role": "user", "content": p[prompt_field]},
                    {"role": "assistant", "content": p[response_field]}])
    return out


def read_gsm8k(path: str | os.PathLike | None = None, *, split: str = "train",
               heldout_size: int = 256, strip_calculator: bool = True) -> list[dict]:
    """GSM8K `{"question", "answer"}` records; the last `heldout_size` form the held-out split.

    `strip_calculator` removes the `<<48/2=24>>` calculator annotations from answers.
    """
    path = Path(path) if path is not None else GSM8K_TRAIN
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file {path} not found (expected the shared data set "
                                "../shared/data/gsm8k/train.jsonl, or pass path=)")
    records = read_jsonl(path)
    if not 0 <= heldout_size < len(records):
        raise ValueError(f"heldout_size={heldout_size} must be in [0, {len(records)})")
    if split == "train":
        records = records[:len(records) - heldout_size]
    elif split == "heldout":
        records = records[len(records) - heldout_size:]
    else:
        raise ValueError(f"split={split!r} must be 'train' or 'heldout'")
    for i, r in enumerate(records):
        if not (isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)):
            raise ValueError(f"{path} record {i}: needs string fields 'question' and 'answer'")
    if strip_calculator:
        records = [{**r, "answer": _CALCULATOR.sub("", r["answer"])} for r in records]
    return records


def gsm8k_conversations(path: str | os.PathLike | None = None, *, split: str = "train",
                        heldout_size: int = 256) -> list[list[dict]]:
    """GSM8K as user question -> assistant solution (ending in `#### N`)."""
    return prompt_response_conversations(read_gsm8k(path, split=split, heldout_size=heldout_size),
                                         "question", "answer")


def encode_sample(prompt_ids: Sequence[int], response_text: str, tokenizer: Tokenizer,
                  block_size: int) -> dict:
    """`tokens` and `loss_mask` of prompt + response + EOS padding to a multiple of `block_size`."""
    response = tokenizer.encode(response_text) + [tokenizer.eos_id]
    total = round_up(len(prompt_ids) + len(response), block_size)
    response += [tokenizer.eos_id] * (total - len(prompt_ids) - len(response))
    tokens = np.asarray(list(prompt_ids) + response, np.int32)
    loss_mask = np.zeros(total, np.int32)
    loss_mask[len(prompt_ids):] = 1
    return {"tokens": tokens, "loss_mask": loss_mask}


def conversation_sample(messages: Sequence[dict], tokenizer: Tokenizer, block_size: int) -> dict:
    """A conversation whose last message is the assistant's, as `encode_sample` output."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"the last message must have role 'assistant', got "
                         f"{messages[-1].get('role') if messages else 'no messages'!r}")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    return encode_sample(prompt, messages[-1]["content"], tokenizer, block_size)


def pack_samples(samples: Sequence[dict], pad_id: int, *, seq_len: int, batch_size: int,
                 seed: int, num_epochs: int | None, shard_index: int, shard_count: int
                 ) -> grain.IterDataset:
    """Shuffle, pack whole samples into rows (first fit over `batch_size` bins), batch."""
    ds = shard_and_order(samples, seed=seed, num_epochs=num_epochs, shard_index=shard_index,
                         shard_count=shard_count)
    ds = ds.map(lambda s: {**s, "real": np.ones_like(s["tokens"])})
    ds = ds.to_iter_dataset(IN_MEMORY)
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": seq_len, "real": seq_len, "loss_mask": seq_len},
        num_packing_bins=batch_size, shuffle_bins=False)
    ds = ds.map(lambda row: finalize_packed(row, pad_id))
    return ds.batch(batch_size, drop_remainder=True)


def sft_dataset(conversations: Sequence[Sequence[dict]], tokenizer: Tokenizer, *, seq_len: int,
                batch_size: int, block_size: int, seed: int, num_epochs: int | None = 1,
                shard_index: int = 0, shard_count: int = 1, whole_chat: bool = False) -> SFTData:
    """Packed SFT batches (module docstring); `seq_len` must be a multiple of `block_size`.

    `whole_chat=True` marks every token of a sample (prompt included) as `loss_mask`: the chats
    become pretraining documents, as the WSD conversion reads a task corpus.
    """
    check_layout(seq_len, batch_size, block_size)
    samples = [conversation_sample(m, tokenizer, block_size) for m in conversations]
    if whole_chat:
        samples = [{**s, "loss_mask": np.ones_like(s["loss_mask"])} for s in samples]
    kept = [s for s in samples if len(s["tokens"]) <= seq_len]
    if not kept:
        raise ValueError(f"all {len(samples)} samples are longer than seq_len={seq_len}")
    ds = pack_samples(kept, tokenizer.pad_id, seq_len=seq_len, batch_size=batch_size, seed=seed,
                      num_epochs=num_epochs, shard_index=shard_index, shard_count=shard_count)
    return SFTData(ds, num_samples=len(kept), num_dropped=len(samples) - len(kept))
