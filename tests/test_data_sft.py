"""SFT data: block-aligned samples, prompt out of the loss, EOS padding in it, packing, drops."""

import collections
import json
import random

import numpy as np
import pytest

from llada2_jax.data import corpora, sft
from llada2_jax.data.tokenizers import SentencePieceTokenizer

BLOCK = 8
SEQ_LEN = 64


@pytest.fixture(scope="module")
def tok():
    docs = corpora.load_corpus("stdlib", max_bytes=100_000)
    return SentencePieceTokenizer.train(corpora.texts(docs), vocab_size=600)


def make_conversations(n, seed=0, long_every=7):
    rng = random.Random(seed)
    words = ["alpha", "beta", "x = 1", "return", "def", "7", "42", "(", ")", "\n"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        a_len = rng.randint(0, 12) if i % long_every else 80  # some far longer than a row
        a = " ".join(rng.choice(words) for _ in range(a_len))
        conv = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            conv = [{"role": "system", "content": "Be terse."}] + conv
        out.append(conv)
    return out


def expected_sample(conv, tok):
    """Independent layout of one sample: (prompt ids, response ids incl. all EOS)."""
    prompt = tok.apply_chat_template(conv[:-1], add_generation_prompt=True)
    response = tok.encode(conv[-1]["content"]) + [tok.eos_id]
    while (len(prompt) + len(response)) % BLOCK:
        response.append(tok.eos_id)
    return tuple(prompt), tuple(response)


def unpack(batches):
    """Every packed sample as (prompt ids, response ids), checking the row invariants."""
    samples = []
    for b in batches:
        for tokens, seg, pos, loss in zip(b["tokens"], b["segment_ids"], b["positions"],
                                          b["loss_mask"]):
            assert not loss[seg == 0].any(), "padding is never in the loss"
            ids = [s for s in np.unique(seg) if s > 0]
            assert ids == list(range(1, len(ids) + 1))
            for s in ids:
                where = np.flatnonzero(seg == s)
                assert (np.diff(where) == 1).all()
                assert where[0] % BLOCK == 0 and len(where) % BLOCK == 0, "block aligned"
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                m = loss[where]
                n_prompt = int((~m).sum())
                assert not m[:n_prompt].any() and m[n_prompt:].all(), "prompt, then response"
                t = tokens[where]
                samples.append((tuple(t[:n_prompt]), tuple(t[n_prompt:])))
    return samples


def test_sft_epoch_packs_every_kept_sample(tok):
    convs = make_conversations(60)
    data = sft.sft_dataset(convs, tok, seq_len=SEQ_LEN, batch_size=1, block_size=BLOCK, seed=0)
    expected = [expected_sample(c, tok) for c in convs]
    kept = [e for e in expected if len(e[0]) + len(e[1]) <= SEQ_LEN]
    assert data.num_dropped == len(expected) - len(kept) > 0
    assert data.num_samples == len(kept)
    got = unpack(iter(data.dataset))
    assert collections.Counter(got) == collections.Counter(kept)
    for prompt, response in got:
        body = tok.encode(tok.decode(response))  # response text without its EOS
        assert response[len(body)] == tok.eos_id and set(response[len(body):]) == {tok.eos_id}
        assert tok.decode(prompt).endswith("<|assistant|>\n")


def test_sft_batches_and_padding_eos_in_loss(tok):
    convs = make_conversations(40, seed=1)
    data = sft.sft_dataset(convs, tok, seq_len=SEQ_LEN, batch_size=4, block_size=BLOCK, seed=2)
    batches = list(iter(data.dataset))
    assert batches and all(v.shape == (4, SEQ_LEN) for b in batches for v in b.values())
    assert batches[0]["loss_mask"].dtype == bool and batches[0]["tokens"].dtype == np.int32
    n_eos_in_loss = sum(((b["tokens"] == tok.eos_id) & b["loss_mask"]).sum() for b in batches)
    n_samples = sum(b["segment_ids"].max(axis=1).sum() for b in batches)
    assert n_eos_in_loss > n_samples  # more than one EOS per sample: the padding is trained
    assert len(unpack(batches)) == n_samples


def test_sft_deterministic_and_state_restore(tok):
    convs = make_conversations(50, seed=3)
    make = lambda seed: sft.sft_dataset(convs, tok, seq_len=SEQ_LEN, batch_size=2,
                                        block_size=BLOCK, seed=seed, num_epochs=None).dataset
    ds = make(5)
    it = iter(ds)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = iter(make(5))
    resumed.set_state(state)
    for e in expected:
        g = next(resumed)
        assert all((e[k] == g[k]).all() for k in e)
    first = lambda d: next(iter(d))["tokens"]
    assert (first(make(5)) == first(make(5))).all()
    assert not (first(make(5)) == first(make(6))).all()


def test_sft_bad_input(tok):
    with pytest.raises(ValueError, match="seq_len"):
        sft.sft_dataset(make_conversations(3), tok, seq_len=60, batch_size=1, block_size=BLOCK,
                        seed=0)
    with pytest.raises(ValueError, match="assistant"):
        sft.sft_dataset([[{"role": "user", "content": "hi"}]], tok, seq_len=SEQ_LEN,
                        batch_size=1, block_size=BLOCK, seed=0)
    with pytest.raises(ValueError, match="longer than seq_len"):
        sft.sft_dataset(make_conversations(1, long_every=1), tok, seq_len=SEQ_LEN, batch_size=1,
                        block_size=BLOCK, seed=0)


def test_conversation_readers(tmp_path):
    path = tmp_path / "c.jsonl"
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path.write_text(json.dumps({"messages": conv}) + "\n\n")
    assert sft.read_conversations(path) == [conv]
    assert sft.prompt_response_conversations([{"prompt": "q", "response": "a"}]) == [conv]
    with pytest.raises(ValueError, match="'response'"):
        sft.prompt_response_conversations([{"prompt": "q"}])
    path.write_text(json.dumps({"turns": conv}) + "\n")
    with pytest.raises(ValueError, match="messages"):
        sft.read_conversations(path)


def test_gsm8k_splits():
    if not sft.GSM8K_TRAIN.is_file():
        pytest.skip(f"{sft.GSM8K_TRAIN} not present")
    train = sft.read_gsm8k(split="train", heldout_size=100)
    held = sft.read_gsm8k(split="heldout", heldout_size=100)
    raw = [json.loads(line) for line in sft.GSM8K_TRAIN.open()]
    assert len(train) + len(held) == len(raw) and len(held) == 100
    assert [r["question"] for r in train + held] == [r["question"] for r in raw]
    assert all("<<" not in r["answer"] and "\n#### " in r["answer"] for r in train + held)
    convs = sft.gsm8k_conversations(split="heldout", heldout_size=100)
    assert convs[0][0]["content"] == held[0]["question"]
    assert convs[0][1]["content"] == held[0]["answer"]


def test_gsm8k_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match="nope"):
        sft.read_gsm8k(missing)
