"""Corpora larger than memory: random-access shard readers that Grain shards, shuffles and packs.

A `data.corpora` entry `FORMAT:GLOB` names sharded files that are read one record at a time:
  arrayrecord:<glob>  ArrayRecord shards. Records are int32 token ids when the shards' directory
                      holds `llada2_shards.json` with `"records": "token_ids"` (what the
                      `tokenize_shards` command writes, with the tokenizer it used), else UTF-8 text.
  parquet:<glob>      Parquet shards; column `field` holds a string (tokenized on the fly) or a list
                      of ints (token ids).
  jsonl:<glob>        JSON-lines shards; key `field` of each non-blank line, same rule.
(A plain `x.jsonl` path, without the `jsonl:` prefix, is still read whole into memory.)

Only per-shard bookkeeping stays in memory (record counts, Parquet row-group sizes, and for JSONL
one int64 line offset per record); each record is read when Grain asks for it. So the existing
pipeline applies unchanged: the indices `0..N-1` are split between processes (`[i::count]`),
shuffled with a seed (Grain's index shuffle: no permutation is stored), read, tokenized and packed,
and the iterator state stays a few integers that the trainer checkpoints.

The train / held-out split hashes each record's name `<shard file>#<record>` (`corpora.is_heldout`),
so adding shards never moves a record between splits.
"""
from __future__ import annotations

import array
import bisect
import collections
import glob
import itertools
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence

import grain
import numpy as np

from llada2_jax.data.corpora import SPLITS, Document, is_heldout, load_corpus

FORMATS = ("arrayrecord", "parquet", "jsonl")
SHARDS_META = "llada2_shards.json"
TOKENIZER_SUBDIR = "tokenizer"
# ArrayRecord chunks of one record: a random read decodes only that record.
ARRAY_RECORD_OPTIONS = "group_size:1"


def parse_spec(spec: str) -> tuple[str, str] | None:
    """`'arrayrecord:/d/*.array_record'` -> ('arrayrecord', '/d/*.array_record'); None if not a stream."""
    kind, sep, pattern = spec.partition(":")
    if not sep or kind not in FORMATS:
        return None
    return kind, pattern


def is_stream(spec: str) -> bool:
    return parse_spec(spec) is not None


def expand(spec: str) -> list[str]:
    """The sorted shard files of a stream spec; ValueError naming the spec when none match."""
    parsed = parse_spec(spec)
    if parsed is None:
        raise ValueError(f"data.corpora: {spec!r} is not a stream spec ({'|'.join(FORMATS)}:<glob>)")
    paths = sorted(p for p in glob.glob(parsed[1], recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"data.corpora: {spec!r} matches no file")
    return paths


def read_shards_meta(directory: str) -> dict | None:
    path = os.path.join(directory, SHARDS_META)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _ids_or_text(value, where: str, field: str):
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and all(
            isinstance(v, (int, np.integer)) for v in value):
        return np.asarray(value, np.int32)
    raise ValueError(f"{where}: field {field!r} must be a string or a list of token ids, "
                     f"got {type(value).__name__}")


class _Shards:
    """Records of several files of one format, addressed by one global index."""

    def __init__(self, paths: Sequence[str], counts: Sequence[int]):
        self.paths = list(paths)
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, record within the file) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f, index - int(self._starts[f])

    def name(self, index: int) -> str:
        f, i = self.locate(index)
        return f"{os.path.basename(self.paths[f])}#{i}"

    def __getitem__(self, index: int):
        """The record: a str (to tokenize) or int32 token ids."""
        raise NotImplementedError


class ArrayRecordShards(_Shards):
    def __init__(self, paths: Sequence[str]):
        from array_record.python import array_record_module
        counts = []
        for p in paths:
            reader = array_record_module.ArrayRecordReader(p)
            counts.append(reader.num_records())
            reader.close()
        super().__init__(paths, counts)
        self._source = grain.sources.ArrayRecordDataSource(list(paths))
        directories = sorted({os.path.dirname(os.path.abspath(p)) for p in paths})
        meta = [read_shards_meta(d) for d in directories]
        kinds = {None if m is None else m.get("records") for m in meta}
        if len(kinds) > 1:
            raise ValueError(f"ArrayRecord shards mix record kinds {sorted(map(str, kinds))} "
                             f"across {directories}")
        self.token_ids = kinds == {"token_ids"}
        self.metas = dict(zip(directories, meta)) if self.token_ids else {}
        self.directories = directories

    def __getitem__(self, index: int):
        raw = self._source[int(index)]
        if self.token_ids:
            return np.frombuffer(raw, dtype="<i4").astype(np.int32)
        return raw.decode("utf-8", errors="replace")


class ParquetShards(_Shards):
    """One column of Parquet files; row groups are decoded whole, the last few are kept."""

    def __init__(self, paths: Sequence[str], field: str, cache_row_groups: int = 4):
        import pyarrow.parquet as pq
        self.field = field
        self._files = []
        group_starts, counts = [], []
        for p in paths:
            pf = pq.ParquetFile(p)
            if field not in pf.schema_arrow.names:
                raise ValueError(f"{p}: no column {field!r} (columns: {pf.schema_arrow.names}); "
                                 f"set data.text_field")
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            group_starts.append(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
            counts.append(pf.metadata.num_rows)
            self._files.append(pf)
        super().__init__(paths, counts)
        self._group_starts = group_starts
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = cache_row_groups
        self._lock = threading.Lock()

    def _row_group(self, f: int, g: int):
        with self._lock:
            key = (f, g)
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            column = self._files[f].read_row_group(g, columns=[self.field]).column(0)
            self._cache[key] = column
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return column

    def __getitem__(self, index: int):
        f, i = self.locate(int(index))
        starts = self._group_starts[f]
        g = int(np.searchsorted(starts, i, side="right")) - 1
        value = self._row_group(f, g)[i - int(starts[g])].as_py()
        return _ids_or_text(value, f"{self.paths[f]} row {i}", self.field)


class JsonlShards(_Shards):
    """Non-blank lines of JSON-lines files; one int64 byte offset per record is kept."""

    def __init__(self, paths: Sequence[str], field: str):
        self.field = field
        self._offsets = [self._line_offsets(p) for p in paths]
        super().__init__(paths, [len(o) for o in self._offsets])
        self._handles: dict[int, object] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _line_offsets(path: str) -> np.ndarray:
        offsets = array.array("q")  # 8 bytes per record while scanning, not a list of ints
        with open(path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        return np.frombuffer(offsets, np.int64) if len(offsets) else np.zeros(0, np.int64)

    def __getitem__(self, index: int):
        f, i = self.locate(int(index))
        with self._lock:
            handle = self._handles.get(f)
            if handle is None:
                handle = self._handles[f] = open(self.paths[f], "rb")
            handle.seek(int(self._offsets[f][i]))
            line = handle.readline()
        where = f"{self.paths[f]} record {i}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(record, dict) or self.field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: field {self.field!r} missing (keys: {keys}); set data.text_field")
        return _ids_or_text(record[self.field], where, self.field)


def open_shards(spec: str, field: str = "text") -> _Shards:
    kind, _ = parse_spec(spec) or (None, None)
    paths = expand(spec)
    if kind == "arrayrecord":
        return ArrayRecordShards(paths)
    if kind == "parquet":
        return ParquetShards(paths, field)
    return JsonlShards(paths, field)


class StreamingCorpus:
    """The records of one or more stream specs in one split, read lazily.

    Iterating yields `Document`s (token-id records are decoded with the shards' saved tokenizer),
    which is what tokenizer training and evaluation prompts need; `pipeline.pretrain_dataset`
    instead reads records by index through `ids_dataset`.
    """

    def __init__(self, specs: Sequence[str], *, split: str = "all", heldout_fraction: float = 0.01,
                 field: str = "text"):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
        self.specs = list(specs)
        self.split, self.heldout_fraction = split, heldout_fraction
        self.shards = [open_shards(s, field) for s in self.specs]
        self._starts = np.concatenate([[0], np.cumsum([len(s) for s in self.shards], dtype=np.int64)])
        self._start_list = self._starts.tolist()
        self._decoder = None

    @property
    def num_records(self) -> int:
        """Records of every split (the index space Grain shuffles)."""
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[_Shards, int]:
        k = bisect.bisect_right(self._start_list, index) - 1
        return self.shards[k], index - int(self._starts[k])

    def name(self, index: int) -> str:
        shards, i = self._locate(int(index))
        return shards.name(i)

    def record(self, index: int):
        """A str or int32 token ids (no EOS)."""
        shards, i = self._locate(int(index))
        return shards[i]

    def in_split(self, index: int) -> bool:
        if self.split == "all":
            return True
        return is_heldout(self.name(index), self.heldout_fraction) == (self.split == "heldout")

    def indices(self, start: int = 0, step: int = 1) -> Iterator[int]:
        return (i for i in range(start, self.num_records, step) if self.in_split(i))

    def token_id_tokenizer(self):
        """The tokenizer saved with token-id ArrayRecord shards (None when records are text)."""
        directories = [d for s in self.shards if getattr(s, "token_ids", False) for d in s.directories]
        if not directories:
            return None
        if self._decoder is None:
            from llada2_jax.data.tokenizers import load_tokenizer
            self._decoder = load_tokenizer(os.path.join(directories[0], TOKENIZER_SUBDIR))
        return self._decoder

    def __iter__(self) -> Iterator[Document]:
        for i in self.indices():
            value = self.record(i)
            if not isinstance(value, str):
                decoder = self.token_id_tokenizer()
                if decoder is None:
                    raise ValueError(f"record {self.name(i)} holds token ids and no tokenizer is "
                                     f"saved with it: cannot turn it into text")
                value = decoder.decode(value)
            yield Document(self.name(i), value)

    def __getitem__(self, item):
        if not isinstance(item, slice):
            raise TypeError("a StreamingCorpus is read by iteration or slicing (e.g. corpus[:8])")
        return list(itertools.islice(iter(self), item.start, item.stop, item.step))

    def __bool__(self) -> bool:
        return next(self.indices(), None) is not None

    def __len__(self) -> int:
        """Records in this split (a scan of the record names, no record is read)."""
        return sum(1 for _ in self.indices())

    def __repr__(self) -> str:
        return (f"StreamingCorpus({self.specs}, split={self.split!r}, "
                f"records={self.num_records})")


def check_streams(sources: Iterable[str]) -> None:
    """ValueError naming the spec unless every source is a stream spec that matches files."""
    sources = list(sources)
    others = [s for s in sources if not is_stream(s)]
    if others:
        raise ValueError(f"data.corpora mixes stream specs with in-memory corpora {others}: use one kind")
    for source in sources:
        expand(source)


def load_corpora(sources: Iterable[str], *, split: str = "all", heldout_fraction: float = 0.01,
                 max_bytes: int | None = None, text_field: str = "text"):
    """Several corpora as one: a list of documents (`corpora.load_corpus`), or one `StreamingCorpus`
    when every source is a stream spec (`max_bytes` does not apply to streams: choose fewer shards)."""
    sources = list(sources)
    if any(is_stream(s) for s in sources):
        check_streams(sources)
        return StreamingCorpus(sources, split=split, heldout_fraction=heldout_fraction, field=text_field)
    docs: list[Document] = []
    for source in sources:
        docs += load_corpus(source, split=split, heldout_fraction=heldout_fraction, max_bytes=max_bytes,
                            jsonl_field=text_field)
    return docs


def check_tokenizer(corpus: StreamingCorpus, tokenizer) -> None:
    """Token-id shards must come from `tokenizer`: the fingerprints saved with them must match."""
    for shards in corpus.shards:
        for directory, meta in getattr(shards, "metas", {}).items():
            saved = meta.get("tokenizer_fingerprint")
            if saved == tokenizer.fingerprint():
                continue
            raise ValueError(
                f"data.corpora: shards in {directory} were tokenized with tokenizer "
                f"fingerprint {saved}, the run's tokenizer is {tokenizer.fingerprint()}: re-run "
                f"tokenize_shards with the run's tokenizer (or use text shards)")


def ids_dataset(corpus: StreamingCorpus, tokenizer, *, seed: int, num_epochs: int | None,
                shard_index: int, shard_count: int) -> grain.MapDataset:
    """int32 ids (+ EOS) of this process's records of `corpus`, shuffled anew each epoch.

    Same order as `pipeline.shard_and_order` on the in-memory list of the same records (split
    "all"): indices `[shard_index::shard_count]`, `shuffle(seed)`, `repeat(num_epochs)`. Records
    outside the split are filtered by index before anything is read.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs={num_epochs} must be positive or None (forever)")
    check_tokenizer(corpus, tokenizer)
    if next(corpus.indices(shard_index, shard_count), None) is None:
        raise ValueError(f"shard {shard_index}/{shard_count} of {corpus!r} holds no "
                         f"{corpus.split!r} record")
    eos, vocab = tokenizer.eos_id, tokenizer.vocab_size

    def to_ids(index: int) -> np.ndarray:
        value = corpus.record(index)
        if isinstance(value, str):
            return np.asarray(tokenizer.encode(value) + [eos], np.int32)
        if len(value) and (value.min() < 0 or value.max() >= vocab):
            raise ValueError(f"record {corpus.name(index)}: token id outside [0, {vocab}) of the "
                             f"run's tokenizer")
        return np.append(value, np.int32(eos))

    ds = grain.MapDataset.range(corpus.num_records)[shard_index::shard_count]
    if corpus.split != "all":
        ds = ds.filter(corpus.in_split)
    return ds.shuffle(seed=seed).repeat(num_epochs).map(to_ids)
