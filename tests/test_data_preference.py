"""DPO pairs: synthetic GSM8K corruption and padded chosen/rejected batches."""

import json
import re

import numpy as np
import pytest

from llada2_jax.data import corpora, preference, sft
from llada2_jax.data.tokenizers import SentencePieceTokenizer

BLOCK = 8
SEQ_LEN = 256
needs_gsm8k = pytest.mark.skipif(not sft.GSM8K_TRAIN.is_file(),
                                 reason=f"{sft.GSM8K_TRAIN} not present")


@pytest.fixture(scope="module")
def tok():
    docs = corpora.load_corpus("stdlib", max_bytes=100_000)
    return SentencePieceTokenizer.train(corpora.texts(docs), vocab_size=600)


def final_value(answer):
    return float(re.fullmatch(r"#### (\S+)", answer.split("\n")[-1]).group(1).replace(",", ""))


def test_corruption_changes_only_the_answer_part():
    answer = "She has 3 + 4 = 7 apples.\nThen 7 * 2 = 14 apples, or $14.00.\n#### 14"
    for seed in range(20):
        bad = preference.corrupt_gsm8k_answer(answer, np.random.default_rng(seed))
        lines = bad.split("\n")
        assert lines[0] == "She has 3 + 4 = 7 apples."
        wrong = final_value(bad)
        assert wrong != 14 and wrong >= 0 and wrong == int(wrong)
        # The last 14 of the last step ("$14.00") is the one replaced, keeping its format.
        assert lines[1] == f"Then 7 * 2 = 14 apples, or ${wrong:.2f}."
    with pytest.raises(ValueError, match="####"):
        preference.corrupt_gsm8k_answer("no final line", np.random.default_rng(0))


@needs_gsm8k
def test_gsm8k_pairs_deterministic_and_differ_in_answer_only():
    pairs = preference.gsm8k_preference_pairs(split="heldout", heldout_size=200, seed=1)
    again = preference.gsm8k_preference_pairs(split="heldout", heldout_size=200, seed=1)
    other = preference.gsm8k_preference_pairs(split="heldout", heldout_size=200, seed=2)
    assert pairs == again and pairs != other
    held = sft.read_gsm8k(split="heldout", heldout_size=200)
    for p, r in zip(pairs, held):
        assert p["prompt"] == r["question"] and p["chosen"] == r["answer"]
        c, w = p["chosen"].split("\n"), p["rejected"].split("\n")
        assert len(c) == len(w) and c[:-2] == w[:-2]
        assert final_value(p["chosen"]) != final_value(p["rejected"])


def rows_of(batch, side):
    keys = ("tokens", "segment_ids", "positions", "loss_mask")
    return [{k: batch[f"{side}_{k}"][i] for k in keys} for i in range(len(batch["chosen_tokens"]))]


def test_preference_batches(tok):
    pairs = [{"prompt": f"What is {i} + {i}?", "chosen": f"{i} + {i} = {2 * i}\n#### {2 * i}",
              "rejected": f"{i} + {i} = {2 * i + 1}\n#### {2 * i + 1}"} for i in range(30)]
    pairs.append({"prompt": "long", "chosen": "x " * 400, "rejected": "y"})  # dropped
    data = preference.preference_dataset(pairs, tok, seq_len=SEQ_LEN, batch_size=4,
                                         block_size=BLOCK, seed=0)
    assert (data.num_pairs, data.num_dropped) == (30, 1)
    batches = list(iter(data.dataset))
    assert len(batches) == 30 // 4
    seen = set()
    for b in batches:
        assert all(v.shape == (4, SEQ_LEN) for v in b.values())
        for chosen, rejected in zip(rows_of(b, "chosen"), rows_of(b, "rejected")):
            parts = {}
            for side, row in (("chosen", chosen), ("rejected", rejected)):
                n = int((row["segment_ids"] > 0).sum())
                assert n % BLOCK == 0 and (row["segment_ids"][:n] == 1).all()
                np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
                assert (row["tokens"][n:] == tok.pad_id).all() and not row["loss_mask"][n:].any()
                n_prompt = int((~row["loss_mask"][:n]).sum())
                assert row["loss_mask"][n_prompt:n].all()
                response = row["tokens"][n_prompt:n]
                text = tok.decode(response)
                body = tok.encode(text)
                assert set(response[len(body):].tolist()) == {tok.eos_id}  # EOS padding in loss
                parts[side] = (tuple(row["tokens"][:n_prompt]), text)
            assert parts["chosen"][0] == parts["rejected"][0]  # same prompt
            prompt_text = tok.decode(parts["chosen"][0])
            i = int(re.search(r"What is (\d+)", prompt_text).group(1))
            assert prompt_text == f"<|user|>\nWhat is {i} + {i}?\n<|assistant|>\n"
            assert parts["chosen"][1] == pairs[i]["chosen"]
            assert parts["rejected"][1] == pairs[i]["rejected"]
            seen.add(i)
    assert len(seen) == len(batches) * 4


def test_read_preference_pairs(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    assert preference.read_preference_pairs(path) == [{"prompt": "q", "chosen": "a",
                                                       "rejected": "b"}]
    path.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match="'rejected'"):
        preference.read_preference_pairs(path)
