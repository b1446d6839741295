"""Pretraining data: tokenize documents once, then a Grain pipeline that shuffles, packs, batches.

Pipeline (all Grain, so the iterator state is checkpointable with the model):
  MapDataset.source(token arrays)[shard_index::shard_count]  per-process documents
    .shuffle(seed).repeat(num_epochs)                           a new order every epoch
    .map(document -> {"tokens", "loss_mask"})                   EOS appended, optional block padding
    .to_iter_dataset()
  ConcatThenSplitIterDataset(seq_len)                           pack; long documents are split
    .map(finalize) .batch(batch_size, drop_remainder=True)

Every batch (the same keys for pretraining, SFT and the diffusion layout builder):
  tokens       (B, L) int32  pad_id outside documents
  segment_ids  (B, L) int32  1, 2, ... per document piece within a row; 0 = padding
  positions    (B, L) int32  restart at 0 for each document piece; 0 on padding
  loss_mask    (B, L) bool   True on tokens that may be noised / predicted

A document longer than the room left in a row is split; its continuation starts the next row as a
new segment with positions from 0 (it cannot attend to the previous row anyway).

Corpora larger than memory (`data/streaming.py`) replace the first line with record indices that
are read and tokenized lazily; everything after it is the same.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import grain
import numpy as np

from llada2_jax.data import streaming
from llada2_jax.data.corpora import Document
from llada2_jax.data.tokenizers import Tokenizer

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")
# Everything is already in memory: reading threads would only contend for the GIL (and for the
# CPU: with an infinite dataset they keep prefetching). Add prefetching at the end if needed.
IN_MEMORY = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def tokenize_documents(documents: Sequence[str | Document], tokenizer: Tokenizer, *,
                       cache_dir: str | None = None) -> list[np.ndarray]:
    """int32 ids of each document with `tokenizer.eos_id` appended.

    With `cache_dir`, the result is stored as one `.npz` keyed by the tokenizer fingerprint and a
    hash of the texts, and read back on the next call with the same inputs.
    """
    texts = [d.text if isinstance(d, Document) else d for d in documents]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"documents[{i}] must be a str or Document, got {type(t).__name__}")
    cache_path = None
    if cache_dir is not None:
        h = hashlib.sha256(tokenizer.fingerprint().encode())
        for t in texts:
            h.update(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest())
        cache_path = os.path.join(cache_dir, f"tokens-{h.hexdigest()[:24]}.npz")
        if os.path.exists(cache_path):
            with np.load(cache_path) as z:
                return np.split(z["ids"], z["offsets"][1:-1])
    eos = tokenizer.eos_id
    arrays = [np.asarray(ids + [eos], dtype=np.int32) for ids in tokenizer.encode_batch(texts)]
    if cache_path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        offsets = np.cumsum([0] + [len(a) for a in arrays])
        tmp = f"{cache_path}.{os.getpid()}.tmp.npz"  # per process: several may share a workdir
        np.savez(tmp, ids=np.concatenate(arrays), offsets=offsets)
        os.replace(tmp, cache_path)
    return arrays


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_layout(seq_len: int, batch_size: int, block_size: int | None,
                 block_field: str = "block_size") -> None:
    """ValueError naming the field when the row layout is impossible."""
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if block_size is not None:
        if block_size <= 0:
            raise ValueError(f"{block_field}={block_size} must be positive")
        if seq_len % block_size:
            raise ValueError(f"seq_len={seq_len} must be a multiple of {block_field}={block_size}")


def shard_and_order(items: Sequence, *, seed: int, num_epochs: int | None, shard_index: int,
                    shard_count: int) -> grain.MapDataset:
    """This process's share of `items`, shuffled with `seed` anew each epoch, repeated."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs={num_epochs} must be positive or None (forever)")
    ds = grain.MapDataset.source(items)[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index}/{shard_count} of {len(items)} items is empty")
    return ds.shuffle(seed=seed).repeat(num_epochs)


def finalize_packed(row: dict, pad_id: int) -> dict:
    """Grain's packed features -> the batch keys; positions without a real token become padding.

    `loss_mask` False with a non-zero packer segment marks alignment padding inside a document
    (pretraining) or a prompt token (SFT); `real` tells them apart.
    """
    real = row["real"].astype(bool) & (row["tokens_segment_ids"] > 0)
    return {
        "tokens": np.where(real, row["tokens"], pad_id).astype(np.int32),
        "segment_ids": np.where(real, row["tokens_segment_ids"], 0).astype(np.int32),
        "positions": np.where(real, row["tokens_positions"], 0).astype(np.int32),
        "loss_mask": (row["loss_mask"].astype(bool) & real),
    }


def _document_element(ids: np.ndarray, align_to_block: int | None, pad_id: int) -> dict:
    n = len(ids)
    padded = n if align_to_block is None else round_up(n, align_to_block)
    tokens = np.full(padded, pad_id, np.int32)
    tokens[:n] = ids
    real = np.zeros(padded, np.int32)
    real[:n] = 1
    return {"tokens": tokens, "real": real, "loss_mask": real}


class _RestorableConcatThenSplit(grain.IterDataset):
    """`ConcatThenSplitIterDataset` whose state survives a JSON round trip.

    Grain's checkpoint handler stores iterator state as JSON, which turns the packer's
    `remainder_slices` tuples into lists; the packer compares them with a tuple sentinel
    `(-1, -1)` and then restores a wrong remainder (grain 0.2.18). Turn them back into tuples.
    """

    def __init__(self, parent: grain.IterDataset, length_struct: dict):
        super().__init__(grain.experimental.ConcatThenSplitIterDataset(
            parent, length_struct=length_struct))

    def __iter__(self) -> grain.DatasetIterator:
        return _TupleSlicesIterator(self._parent.__iter__())


class _TupleSlicesIterator(grain.DatasetIterator):

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


def pretrain_dataset(documents: Sequence[str | Document], tokenizer: Tokenizer, *, seq_len: int,
                     batch_size: int, seed: int, align_to_block: int | None = None,
                     num_epochs: int | None = 1, shard_index: int = 0, shard_count: int = 1,
                     cache_dir: str | None = None) -> grain.IterDataset:
    """Packed pretraining batches (see the module docstring for keys and shapes).

    `align_to_block`: start every document at a multiple of this many tokens by padding the end of
    the previous one (padding has segment 0, is outside the loss). `num_epochs=None`: forever.
    Multi-host: pass `shard_index=jax.process_index(), shard_count=jax.process_count()`; documents
    are split between processes before shuffling. The last partial batch is dropped.
    `documents` may be a `streaming.StreamingCorpus`: its records are then read (and tokenized)
    one at a time as batches are drawn, in the same order as the same records held in a list.
    """
    check_layout(seq_len, batch_size, align_to_block, "align_to_block")
    pad_id = tokenizer.pad_id
    if isinstance(documents, streaming.StreamingCorpus):
        ds = streaming.ids_dataset(documents, tokenizer, seed=seed, num_epochs=num_epochs,
                                   shard_index=shard_index, shard_count=shard_count)
    else:
        arrays = tokenize_documents(documents, tokenizer, cache_dir=cache_dir)
        ds = shard_and_order(arrays, seed=seed, num_epochs=num_epochs, shard_index=shard_index,
                             shard_count=shard_count)
    ds = ds.map(lambda ids: _document_element(ids, align_to_block, pad_id))
    ds = ds.to_iter_dataset(IN_MEMORY)
    ds = _RestorableConcatThenSplit(
        ds, length_struct={"tokens": seq_len, "real": seq_len, "loss_mask": seq_len})
    ds = ds.map(lambda row: finalize_packed(row, pad_id))
    return ds.batch(batch_size, drop_remainder=True)
