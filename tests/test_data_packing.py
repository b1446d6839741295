"""Pretraining pipeline (tokenize, shuffle, pack, batch) and corpora."""

import collections
import json
import shutil

import numpy as np
import pytest

from llada2_jax.data import corpora, pipeline
from corpus_fixtures import docs, tok  # noqa: F401 (fixtures)

SEQ_LEN = 64



def reference_documents(docs, tok):
    """Independent of the pipeline: each document's ids + EOS."""
    return [tuple(tok.encode(d.text)) + (tok.eos_id,) for d in docs]


def batches(ds):
    return list(iter(ds))


def rows(batch_list):
    keys = pipeline.BATCH_KEYS
    return [{k: b[k][i] for k in keys} for b in batch_list for i in range(len(b["tokens"]))]


def check_row_structure(row, pad_id, align=None):
    seg, pos, tokens, loss = row["segment_ids"], row["positions"], row["tokens"], row["loss_mask"]
    assert seg.dtype == pos.dtype == tokens.dtype == np.int32 and loss.dtype == bool
    np.testing.assert_array_equal(loss, seg > 0)
    assert (tokens[seg == 0] == pad_id).all() and (pos[seg == 0] == 0).all()
    ids = [s for s in np.unique(seg) if s > 0]
    assert ids == list(range(1, len(ids) + 1))
    for s in ids:
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all(), "a segment must be contiguous"
        np.testing.assert_array_equal(pos[where], np.arange(len(where)))
        if align is not None:
            assert where[0] % align == 0, "documents start on a block boundary"
    if align is None:  # without alignment padding only ends a row
        real = np.flatnonzero(seg > 0)
        assert len(real) == 0 or real[-1] == len(real) - 1


def split_stream(row_list, eos_id):
    """Concatenate real tokens in order and cut after each EOS -> the documents seen."""
    stream = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in row_list])
    cuts = np.flatnonzero(stream == eos_id) + 1
    assert cuts[-1] == len(stream), "the stream must end with a complete document"
    return [tuple(d) for d in np.split(stream, cuts[:-1])]


@pytest.mark.parametrize("align", [None, 8])
def test_epoch_conserves_every_document(docs, tok, align):
    ds = pipeline.pretrain_dataset(docs, tok, seq_len=SEQ_LEN, batch_size=1, seed=3,
                                   align_to_block=align)
    row_list = rows(batches(ds))
    for r in row_list:
        check_row_structure(r, tok.pad_id, align)
    seen = split_stream(row_list, tok.eos_id)
    assert collections.Counter(seen) == collections.Counter(reference_documents(docs, tok))
    assert any(len(d) > SEQ_LEN for d in seen)  # splitting was exercised
    if align is None:  # concat-then-split leaves no gaps except at the very end
        n_real = sum(len(d) for d in seen)
        assert len(row_list) == -(-n_real // SEQ_LEN)


def test_batches_shape_and_drop_remainder(docs, tok):
    ds = pipeline.pretrain_dataset(docs, tok, seq_len=SEQ_LEN, batch_size=4, seed=0)
    out = batches(ds)
    n_rows_unbatched = len(batches(pipeline.pretrain_dataset(docs, tok, seq_len=SEQ_LEN,
                                                             batch_size=1, seed=0)))
    assert len(out) == n_rows_unbatched // 4
    for b in out:
        assert set(b) == set(pipeline.BATCH_KEYS)
        assert all(v.shape == (4, SEQ_LEN) for v in b.values())


def test_deterministic_per_seed(docs, tok):
    make = lambda seed: batches(pipeline.pretrain_dataset(docs, tok, seq_len=SEQ_LEN,
                                                          batch_size=2, seed=seed))
    a, b, c = make(7), make(7), make(8)
    assert all((x[k] == y[k]).all() for x, y in zip(a, b) for k in x) and len(a) == len(b)
    assert not all((x["tokens"] == y["tokens"]).all() for x, y in zip(a, c))


def test_two_epochs_reshuffle(docs, tok):
    ds = pipeline.pretrain_dataset(docs, tok, seq_len=SEQ_LEN, batch_size=1, seed=0, num_epochs=2)
    seen = split_stream(rows(batches(ds)), tok.eos_id)
    ref = reference_documents(docs, tok)
    assert collections.Counter(seen) == collections.Counter(ref * 2)
    assert seen[:len(ref)] != seen[len(ref):], "each epoch has its own order"


@pytest.mark.parametrize("skip", [0, 3, 11])
def test_state_restore_resumes_exactly(docs, tok, skip):
    ds = pipeline.pretrain_dataset(docs, tok, seq_len=SEQ_LEN, batch_size=2, seed=1,
                                   align_to_block=16, num_epochs=None)
    it = iter(ds)
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
    expected = [next(it) for _ in range(6)]
    resumed = iter(ds)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(6)]
    for e, g in zip(expected, got):
        for k in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(e[k], g[k])


def test_shards_partition_documents(docs, tok):
    shards = [split_stream(rows(batches(pipeline.pretrain_dataset(
        docs, tok, seq_len=SEQ_LEN, batch_size=1, seed=0, shard_index=i, shard_count=3))),
        tok.eos_id) for i in range(3)]
    assert collections.Counter(sum(shards, [])) == collections.Counter(
        reference_documents(docs, tok))
    assert all(shards)


def test_tokenization_cache(docs, tok, tmp_path):
    first = pipeline.tokenize_documents(docs, tok, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = pipeline.tokenize_documents(docs, tok, cache_dir=str(tmp_path))
    assert [tuple(a) for a in again] == [tuple(a) for a in first] == reference_documents(docs, tok)
    assert all(a.dtype == np.int32 for a in again)
    pipeline.tokenize_documents(docs[:3], tok, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.npz"))) == 2  # other inputs, other key


@pytest.mark.parametrize("kw, field", [({"align_to_block": 48}, "align_to_block"),
                                       ({"shard_index": 2, "shard_count": 2}, "shard_index"),
                                       ({"num_epochs": 0}, "num_epochs"),
                                       ({"batch_size": 0}, "batch_size")])
def test_bad_arguments(docs, tok, kw, field):
    args = dict(seq_len=SEQ_LEN, batch_size=2, seed=0) | kw
    with pytest.raises(ValueError, match=field):
        pipeline.pretrain_dataset(docs, tok, **args)


# ---------------------------------------------------------------- corpora


def test_stdlib_corpus_is_sorted_and_filtered():
    names = [d.name for d in corpora.stdlib_documents()]
    assert names == sorted(names) and len(names) > 500
    parts = [n.split("/") for n in names]
    assert not any(p[0] == "site-packages" or any(x.startswith("test") for x in p)
                   for p in parts)
    assert not any(n.startswith("idlelib/idle_test") for n in names)
    assert "os.py" in names and "json/decoder.py" in names


def test_split_is_deterministic_disjoint_and_complete():
    all_docs = corpora.load_corpus("stdlib", max_documents=300)
    first = all_docs[:300]
    train = [d.name for d in corpora.select(first, split="train", heldout_fraction=0.2)]
    held = [d.name for d in corpora.select(first, split="heldout", heldout_fraction=0.2)]
    assert sorted(train + held) == sorted(d.name for d in first) and not set(train) & set(held)
    assert 0.1 < len(held) / len(first) < 0.3
    # A document's split depends only on its name, not on the other documents.
    held_sub = [d.name for d in corpora.select(first[::2], split="heldout", heldout_fraction=0.2)]
    assert held_sub == [n for n in held if n in {d.name for d in first[::2]}]


def test_caps():
    capped = corpora.load_corpus("stdlib", max_bytes=50_000)
    assert sum(len(d.text.encode()) for d in capped) <= 50_000 or len(capped) == 1
    assert len(corpora.load_corpus("stdlib", max_documents=5)) == 5
    with pytest.raises(ValueError, match="max_documents"):
        corpora.load_corpus("stdlib", max_documents=0)


def test_path_corpora(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("bravo")
    (tmp_path / "d" / "a.md").write_text("alpha")
    (tmp_path / "d" / "skip.bin").write_text("x")
    assert [(d.name, d.text) for d in corpora.load_corpus(str(tmp_path / "d"))] == [
        ("a.md", "alpha"), ("b.txt", "bravo")]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"body": "one"}\n\n{"body": "two"}\n')
    assert corpora.texts(corpora.load_corpus(str(jl), jsonl_field="body")) == ["one", "two"]
    with pytest.raises(ValueError, match="'text'"):
        corpora.load_corpus(str(jl))
    with pytest.raises(ValueError, match="nowhere"):
        corpora.load_corpus("nowhere")


@pytest.mark.skipif(shutil.which("bible") is None, reason="needs apt package bible-kjv")
def test_kjv_chapters():
    chapters = list(corpora.kjv_documents())
    assert len(chapters) == 1189  # chapters of the Protestant canon
    assert chapters[0].text.startswith("In the beginning God created the heaven and the earth.\n")
    assert sum(t.text.count("\n") for t in chapters) == 31102  # verses


def test_missing_optional_corpus_names_package(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora.shutil, "which", lambda _: None)
    with pytest.raises(FileNotFoundError, match="bible-kjv"):
        list(corpora.kjv_documents())
    with pytest.raises(FileNotFoundError, match="python3.11-doc"):
        list(corpora.python_docs_documents(str(tmp_path / "absent")))
