"""Tokenize raw text into ArrayRecord shards that a run streams (`data.corpora=arrayrecord:<glob>`).

    python -m llada2_jax.tokenize_shards --input=/data/web.jsonl,/data/books/ \\
        --tokenizer=/ckpt/qwen --output=/data/shards --records_per_shard=100000
    # then: --config.data.corpora='arrayrecord:/data/shards/*.array_record'

--input: comma-separated corpora, as `data.corpora` takes them (a corpus name, a text file, a
directory of text files, a `.jsonl` file, or a stream spec `jsonl:<glob>` / `parquet:<glob>`).
--tokenizer: `smollm2`, a directory saved by a run (`<workdir>/tokenizer`) or an HF checkpoint
directory (`tokenizer.json` or a sentencepiece `tokenizer.model`). With --text the records are the
UTF-8 texts instead (tokenized on the fly by the run; no tokenizer needed).

Each record holds one document's int32 ids (little endian, no EOS: the reader appends the run
tokenizer's). The output directory gets `data-NNNNN.array_record`, `llada2_shards.json` (record
kind, tokenizer fingerprint, counts) and, for ids, the tokenizer itself in `tokenizer/`, so that
a run can check it tokenizes the same way. Documents are read, encoded and written in small
batches: memory does not grow with the corpus.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import numpy as np
from absl import flags

from llada2_jax import cli
from llada2_jax.data import corpora, streaming

FLAGS = flags.FlagValues()
flags.DEFINE_string("input", None, "comma-separated corpora (names, paths, jsonl:/parquet: globs)",
                    flag_values=FLAGS)
flags.DEFINE_string("output", None, "directory for the shards (must hold no shards yet)", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "smollm2, a saved tokenizer directory or an HF checkpoint directory",
                    flag_values=FLAGS)
flags.DEFINE_boolean("text", False, "write UTF-8 text records (no tokenizer)", flag_values=FLAGS)
flags.DEFINE_integer("records_per_shard", 100_000, "documents per shard file", flag_values=FLAGS)
flags.DEFINE_string("text_field", "text", "JSONL key / Parquet column holding each document", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 256, "documents encoded together", flag_values=FLAGS)


def open_tokenizer(spec: str):
    """`smollm2`, a directory written by `Tokenizer.save`, or an HF checkpoint directory."""
    from llada2_jax.data import tokenizers
    if spec == "smollm2":
        from llada2_jax.interop.sources import smollm2_tokenizer
        return smollm2_tokenizer()
    if not os.path.isdir(spec):
        raise ValueError(f"--tokenizer={spec!r} is neither 'smollm2' nor a directory")
    return tokenizers.load_tokenizer(spec)


def documents(sources: list[str], text_field: str) -> Iterator[str]:
    for source in sources:
        if streaming.is_stream(source):
            yield from (d.text for d in streaming.StreamingCorpus([source], field=text_field))
        else:
            yield from (d.text for d in corpora.iter_documents(source, text_field))


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_shards(sources: list[str], output: str, tokenizer=None, *, records_per_shard: int = 100_000,
                 text_field: str = "text", batch_size: int = 256) -> dict:
    """Write the shards and their `llada2_shards.json`; returns that metadata.

    `tokenizer=None` writes text records.
    """
    from array_record.python import array_record_module
    if records_per_shard < 1 or batch_size < 1:
        raise ValueError(f"records_per_shard={records_per_shard} and batch_size={batch_size} must be >= 1")
    os.makedirs(output, exist_ok=True)
    if any(f.endswith(".array_record") for f in os.listdir(output)):
        raise ValueError(f"--output={output!r} already holds .array_record shards: choose an empty directory")
    shards, writer, in_shard, records, tokens = [], None, 0, 0, 0
    try:
        for batch in _batches(documents(sources, text_field), batch_size):
            if tokenizer is None:
                payloads = [t.encode("utf-8") for t in batch]
            else:
                encoded = tokenizer.encode_batch(batch)
                tokens += sum(len(ids) for ids in encoded)
                payloads = [np.asarray(ids, "<i4").tobytes() for ids in encoded]
            for payload in payloads:
                if writer is None:
                    shards.append(f"data-{len(shards):05d}.array_record")
                    writer = array_record_module.ArrayRecordWriter(
                        os.path.join(output, shards[-1]), streaming.ARRAY_RECORD_OPTIONS)
                writer.write(payload)
                in_shard += 1
                records += 1
                if in_shard == records_per_shard:
                    writer.close()
                    writer, in_shard = None, 0
    finally:
        if writer is not None:
            writer.close()
    if records == 0:
        raise ValueError(f"--input={','.join(sources)!r} holds no document")
    meta = {"records": "text" if tokenizer is None else "token_ids", "num_records": records,
            "shards": shards, "sources": sources}
    if tokenizer is not None:
        meta.update(dtype="int32", num_tokens=tokens, vocab_size=tokenizer.vocab_size,
                    eos_id=tokenizer.eos_id, tokenizer_fingerprint=tokenizer.fingerprint())
        tokenizer.save(os.path.join(output, streaming.TOKENIZER_SUBDIR))
    with open(os.path.join(output, streaming.SHARDS_META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def run(f) -> int:
    if not f.input or not f.output:
        raise ValueError("--input and --output are required")
    if f.text == bool(f.tokenizer):
        raise ValueError("give exactly one of --tokenizer (token-id records) and --text (text records)")
    sources = [s.strip() for s in f.input.split(",") if s.strip()]
    for source in sources:
        if streaming.is_stream(source):
            streaming.expand(source)
        elif source not in corpora.CORPORA and not os.path.exists(source):
            raise ValueError(f"--input: {source!r} is neither a corpus name {corpora.CORPORA}, "
                             f"a stream spec nor an existing path")
    tokenizer = None if f.text else open_tokenizer(f.tokenizer)
    meta = write_shards(sources, f.output, tokenizer, records_per_shard=f.records_per_shard,
                        text_field=f.text_field, batch_size=f.batch_size)
    summary = f"{meta['num_records']} records in {len(meta['shards'])} shards"
    if "num_tokens" in meta:
        summary += f", {meta['num_tokens']} tokens"
    print(f"{summary} -> {f.output}\n"
          f"use: --config.data.corpora='arrayrecord:{os.path.join(f.output, '*.array_record')}'")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`argv` without the program name (default: the command line). Returns the exit code."""
    return cli.run("tokenize_shards", __doc__, FLAGS, argv, run)


if __name__ == "__main__":
    sys.exit(main())
