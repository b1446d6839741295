"""Resident memory of the data pipeline as the corpus grows: streamed shards vs the in-memory path.

    python bench/data_memory.py                       # 4,000 and 40,000 documents of ~2 KB
    python bench/data_memory.py --docs=1000 --write=false

Writes a synthetic JSONL corpus of `--docs` documents and one `--factor` times larger, turns each
into the stream formats (ArrayRecord token ids and text via `tokenize_shards`, Parquet, JSONL), then
for every (format, size) starts a fresh process that builds `pipeline.pretrain_dataset` on it (the
trainer's call) and draws `--batches` packed batches of 8 x 256 tokens. The table reports the
process's peak RSS above its RSS once imports and the tokenizer are loaded: a streamed corpus
should cost about the same at both sizes, the in-memory path ~`--factor` times more. What a stream
still keeps per record: JSONL one int64 line offset, ArrayRecord its readers' chunk index; Parquet
adds Arrow's allocator, which keeps decoded row groups' memory for reuse (it levels off as more
row groups are read, whatever the corpus size).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags

import _cli
from _results import markdown_table, publish

DOCS = flags.DEFINE_integer("docs", 4000, "documents of the small corpus", lower_bound=10)
FACTOR = flags.DEFINE_integer("factor", 10, "the large corpus has this many times more documents", lower_bound=2)
DOC_BYTES = flags.DEFINE_integer("doc_bytes", 2000, "average document size in bytes", lower_bound=50)
BATCHES = flags.DEFINE_integer("batches", 100, "batches drawn in each measurement", lower_bound=1)
WRITE = flags.DEFINE_boolean("write", True, "write the table to bench/results/data_memory.md")

SEQ_LEN, BATCH = 256, 8

_CHILD = r"""
import json, sys, time
def status_mb(key):  # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024
spec, tok_dir, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
from llada2_jax.data import corpora, pipeline, streaming
from llada2_jax.data.tokenizers import load_tokenizer
import pyarrow.parquet, array_record.python.array_record_module  # imports are not data: load them first
tok = load_tokenizer(tok_dir)
base = status_mb("VmRSS")
start = time.perf_counter()
if spec.startswith("memory:"):
    docs = corpora.load_corpus(spec[len("memory:"):])
else:
    docs = streaming.load_corpora([spec])
it = iter(pipeline.pretrain_dataset(docs, tok, seq_len=%d, batch_size=%d, seed=0, num_epochs=None))
tokens = 0
for _ in range(batches):
    tokens += int((next(it)["segment_ids"] > 0).sum())
seconds = time.perf_counter() - start
peak = status_mb("VmHWM")
print(json.dumps({"base_mb": base, "peak_mb": peak, "seconds": seconds, "tokens": tokens}))
""" % (SEQ_LEN, BATCH)


def synthetic_jsonl(path: str, n_docs: int, doc_bytes: int, seed: int) -> None:
    """Documents of random pseudo-words (a Zipf-ish vocabulary), one JSON line each."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(3000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    with open(path, "w") as f:
        for _ in range(n_docs):
            n_words = max(5, int(rng.normal(doc_bytes / 6, doc_bytes / 24)))
            words = rng.choice(len(vocab), size=n_words, p=weights)
            f.write(json.dumps({"text": " ".join(vocab[w] for w in words)}) + "\n")


def to_parquet(jsonl: str, directory: str, per_file: int = 5000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(directory)
    chunk, k = [], 0
    with open(jsonl) as f:
        for line in f:
            chunk.append(json.loads(line)["text"])
            if len(chunk) == per_file:
                pq.write_table(pa.table({"text": chunk}), f"{directory}/part-{k:05d}.parquet", row_group_size=256)
                chunk, k = [], k + 1
    if chunk:
        pq.write_table(pa.table({"text": chunk}), f"{directory}/part-{k:05d}.parquet", row_group_size=256)


def dir_mb(pattern_dir: str) -> float:
    return sum(os.path.getsize(os.path.join(pattern_dir, f)) for f in os.listdir(pattern_dir)) / 2**20


def measure(spec: str, tok_dir: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, spec, tok_dir, str(BATCHES.value)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from llada2_jax import tokenize_shards
    from llada2_jax.data.tokenizers import SentencePieceTokenizer
    rows = []
    with tempfile.TemporaryDirectory(prefix="data_memory_") as root:
        tok_dir = os.path.join(root, "tok")
        sizes = {"1x": DOCS.value, f"{FACTOR.value}x": DOCS.value * FACTOR.value}
        paths = {}
        for label, n in sizes.items():
            src = os.path.join(root, f"{label}.jsonl")
            synthetic_jsonl(src, n, DOC_BYTES.value, seed=0)
            paths[label] = src
        if not os.path.exists(tok_dir):
            with open(paths["1x"]) as f:
                sample = [json.loads(next(f))["text"] for _ in range(min(DOCS.value, 500))]
            SentencePieceTokenizer.train(sample, vocab_size=1024).save(tok_dir)
        from llada2_jax.data.tokenizers import load_tokenizer
        tok = load_tokenizer(tok_dir)
        results = {}
        for label, src in paths.items():
            d = os.path.join(root, label)
            start = time.perf_counter()
            tokenize_shards.write_shards([src], f"{d}/ar_ids", tok, records_per_shard=5000)
            shard_seconds = time.perf_counter() - start
            tokenize_shards.write_shards([src], f"{d}/ar_text", None, records_per_shard=5000)
            to_parquet(src, f"{d}/pq")
            os.makedirs(f"{d}/jl")
            os.replace(src, f"{d}/jl/part-00000.jsonl")
            specs = {"ArrayRecord (token ids)": (f"arrayrecord:{d}/ar_ids/*.array_record", f"{d}/ar_ids"),
                     "ArrayRecord (text)": (f"arrayrecord:{d}/ar_text/*.array_record", f"{d}/ar_text"),
                     "Parquet (text)": (f"parquet:{d}/pq/*.parquet", f"{d}/pq"),
                     "JSONL (text)": (f"jsonl:{d}/jl/*.jsonl", f"{d}/jl"),
                     "in memory (`x.jsonl` path)": (f"memory:{d}/jl/part-00000.jsonl", f"{d}/jl")}
            for name, (spec, directory) in specs.items():
                r = measure(spec, tok_dir)
                r["disk_mb"] = dir_mb(directory)
                results[name, label] = r
                print(f"[bench] {name} {label}: +{r['peak_mb'] - r['base_mb']:.1f} MB", file=sys.stderr, flush=True)
            print(f"[bench] tokenize_shards {label}: {sizes[label]} docs in {shard_seconds:.1f} s",
                  file=sys.stderr, flush=True)
        big = f"{FACTOR.value}x"
        for name in dict.fromkeys(n for n, _ in results):
            small, large = results[name, "1x"], results[name, big]
            grow_small, grow_large = small["peak_mb"] - small["base_mb"], large["peak_mb"] - large["base_mb"]
            rows.append([name, f"{small['disk_mb']:.0f} → {large['disk_mb']:.0f}",
                         f"{grow_small:.1f}", f"{grow_large:.1f}", f"{grow_large / max(grow_small, 1e-9):.2f}",
                         f"{large['tokens'] / large['seconds'] / 1e3:.0f}"])
    header = ["source", "corpus on disk, MB (1x → %s)" % big, "peak RSS − base, MB (1x)",
              f"peak RSS − base, MB ({big})", f"ratio {big}/1x", f"k tokens/s ({big}, incl. open)"]
    text = (f"Data pipeline memory: {DOCS.value} vs {DOCS.value * FACTOR.value} synthetic documents of "
            f"~{DOC_BYTES.value} B; {BATCHES.value} batches of {BATCH} x {SEQ_LEN} tokens drawn per run "
            f"(`pipeline.pretrain_dataset`, sentencepiece vocab 1024, fresh process each).\n\n"
            + markdown_table(header, rows))
    publish("data_memory", text, WRITE.value)
    return 0


if __name__ == "__main__":
    _cli.run(main)
