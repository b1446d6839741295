"""Task data from reasoning-gym: chat-formatted prompt/answer pairs for named tasks, from a seed.

reasoning-gym (PyPI, Apache-2.0) generates items procedurally and scores answers with each
task's own scorer, offline, so any amount of training and held-out data exists without a hub.

Splits. reasoning-gym derives item i of a dataset built with seed s from `Random(s + i)`, so two
seeds give overlapping streams. The split is therefore a pure function of the item itself: an item
belongs to "heldout" when a hash of its task and question falls in `HELDOUT_SHARE` of the hash
space, else to "train". Each split draws from its own seed stream (`split_seed`) and keeps only
its own items, so no training item is ever a held-out item, whatever seeds are used.

Mixes. Items of several tasks interleave round-robin (item k is task k mod len(tasks)). A task
name is a reasoning-gym dataset name; `TASK_DEFAULTS` sizes some of them so that answers run to
~30 tokens (docs/DECISIONS.md says why these tasks).
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import NamedTuple

CORPUS_NAME = "gym"  # how configs name these items as a corpus (`data.corpora`) or SFT data (`sft.data`)
INSTALL_HINT = "reasoning-gym is not installed: pip install reasoning-gym==0.1.25"
SPLITS = ("train", "heldout")
HELDOUT_SHARE = 0.5
_HELDOUT_SEED_OFFSET = 1_000_003  # far from the train stream; the hash split is what guarantees
_CHUNK = 256

# Our sizes for the default tasks: answers of ~25-45 SmolLM2 tokens, prompts under ~120.
TASK_DEFAULTS: dict[str, dict] = {
    "word_sequence_reversal": dict(min_words=10, max_words=16),
    "rotate_matrix": dict(min_n=4, max_n=5),
    "number_sorting": dict(min_numbers=6, max_numbers=9, max_decimals=0, min_value=-99, max_value=99),
}
DEFAULT_TASKS = ("word_sequence_reversal", "rotate_matrix")


class TaskItem(NamedTuple):
    task: str
    question: str
    answer: str
    entry: dict  # reasoning-gym's own item (with metadata): what its scorer reads

    def messages(self) -> list[dict]:
        """The item as a two-turn chat (user question, assistant answer)."""
        return [{"role": "user", "content": self.question},
                {"role": "assistant", "content": self.answer}]


def parse_tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
    """A comma-separated string or a sequence of names -> a tuple of known task names."""
    names = tuple(t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip())
    if not names:
        raise ValueError("tasks is empty: name at least one reasoning-gym task, e.g. "
                         + ",".join(DEFAULT_TASKS))
    known = _registry()
    for name in names:
        if name not in known:
            raise ValueError(f"unknown reasoning-gym task {name!r}; known tasks include "
                             f"{', '.join(sorted(TASK_DEFAULTS))} (all: reasoning_gym.factory.DATASETS)")
    return names


def split_seed(seed: int, split: str) -> int:
    """The seed of `split`'s generator stream (module docstring)."""
    _check_split(split)
    return seed if split == "train" else seed + _HELDOUT_SEED_OFFSET


def in_split(task: str, question: str, split: str) -> bool:
    """Whether an item belongs to `split`: a pure function of the task and the question text."""
    _check_split(split)
    digest = hashlib.sha256(f"{task}\n{question}".encode()).digest()
    heldout = int.from_bytes(digest[:8], "big") < HELDOUT_SHARE * 2 ** 64
    return heldout == (split == "heldout")


def generate_items(tasks: str | Sequence[str], *, split: str, seed: int, count: int) -> list[TaskItem]:
    """`count` items of `split`, interleaving `tasks` round-robin; deterministic in (tasks, split, seed)."""
    names = parse_tasks(tasks)
    if count < 0:
        raise ValueError(f"count={count} must be >= 0")
    streams = [_task_stream(name, split_seed(seed, split), split) for name in names]
    return [next(streams[k % len(names)]) for k in range(count)]


def _task_stream(task: str, seed: int, split: str):
    """The items of one task that belong to `split`, in generator order."""
    start = 0
    while True:
        dataset = _dataset(task, seed + start, _CHUNK)
        for i in range(_CHUNK):
            entry = dataset[i]
            question, answer = entry["question"], str(entry["answer"])
            if in_split(task, question, split):
                yield TaskItem(task, question, answer, entry)
        start += _CHUNK


def score(item: TaskItem, answer: str | None) -> float:
    """reasoning-gym's own score of `answer` for `item` (1.0 = correct)."""
    return float(_scorer(item.task).score_answer(answer, item.entry))


class GymSource:
    """A Grain random-access source of `count` chat items (`grain.MapDataset.source(GymSource(...))`).

    Records: {"task", "question", "answer", "messages"} — `messages` feeds `data.sft`.
    """

    def __init__(self, tasks: str | Sequence[str], *, split: str, seed: int, count: int):
        self.items = generate_items(tasks, split=split, seed=seed, count=count)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {"task": item.task, "question": item.question, "answer": item.answer,
                "messages": item.messages()}


def conversations(tasks: str | Sequence[str], *, split: str, seed: int, count: int) -> list[list[dict]]:
    """The items as chats, the input of `data.sft.sft_dataset`."""
    source = GymSource(tasks, split=split, seed=seed, count=count)
    return [source[i]["messages"] for i in range(len(source))]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")


def _registry() -> dict:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return DATASETS


def _dataset(task: str, seed: int, size: int):
    import reasoning_gym
    return reasoning_gym.create_dataset(task, size=size, seed=seed, **TASK_DEFAULTS.get(task, {}))


@functools.lru_cache(maxsize=None)
def _scorer(task: str):
    """A dataset instance of `task`: its `score_answer` depends on the item, not on the seed."""
    return _dataset(task, 0, 1)
