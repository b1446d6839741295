"""reasoning-gym task data: seed streams, a split no seed can break, and the tasks' own scorers."""
import grain
import pytest

pytest.importorskip("reasoning_gym")

from llada2_jax.data import gym_tasks  # noqa: E402

TASKS = ("word_sequence_reversal", "rotate_matrix")


def questions(items):
    return {(it.task, it.question) for it in items}


def test_same_seed_same_items_and_other_seed_other_items():
    a = gym_tasks.generate_items(TASKS, split="train", seed=3, count=40)
    b = gym_tasks.generate_items(TASKS, split="train", seed=3, count=40)
    c = gym_tasks.generate_items(TASKS, split="train", seed=4 + 10_000, count=40)
    assert [it.question for it in a] == [it.question for it in b]
    assert len(questions(a) & questions(c)) < 4
    assert [it.task for it in a[:4]] == list(TASKS) * 2  # round-robin mix


@pytest.mark.parametrize("train_seed,heldout_seed", [(0, 0), (5, 4), (1_000_003, 0), (0, -1_000_003)])
def test_train_and_heldout_never_overlap(train_seed, heldout_seed):
    # seeds chosen so that the raw reasoning-gym streams overlap (item i of seed s == item i-1 of s+1)
    train = gym_tasks.generate_items(TASKS, split="train", seed=train_seed, count=300)
    heldout = gym_tasks.generate_items(TASKS, split="heldout", seed=heldout_seed, count=300)
    assert not questions(train) & questions(heldout)
    assert all(gym_tasks.in_split(it.task, it.question, "train") for it in train)
    assert all(gym_tasks.in_split(it.task, it.question, "heldout") for it in heldout)


def test_split_is_a_partition_of_the_raw_stream():
    import reasoning_gym
    raw = reasoning_gym.create_dataset("word_sequence_reversal", size=200, seed=11)
    sides = [gym_tasks.in_split("word_sequence_reversal", e["question"], "heldout") for e in raw]
    assert all(gym_tasks.in_split("word_sequence_reversal", e["question"], "train") != h
               for e, h in zip(raw, sides))
    assert 0.3 < sum(sides) / len(sides) < 0.7


def test_reference_answer_scores_one_and_wrong_answers_zero():
    items = gym_tasks.generate_items(TASKS, split="heldout", seed=2, count=6)
    for it in items:
        assert gym_tasks.score(it, it.answer) == 1.0
        assert gym_tasks.score(it, "") == 0.0
        assert gym_tasks.score(it, None) == 0.0
    reversal = next(it for it in items if it.task == "word_sequence_reversal")
    words = reversal.answer.split(", ")
    assert gym_tasks.score(reversal, ", ".join(reversed(words))) == 0.0  # the unreversed list


def test_answers_are_long_enough_for_parallel_decoding():
    from llada2_jax.interop.sources import smollm2_tokenizer
    tokenizer = smollm2_tokenizer()
    items = gym_tasks.generate_items(TASKS, split="train", seed=0, count=60)
    lengths = [len(tokenizer.encode(it.answer)) for it in items]
    assert sum(lengths) / len(lengths) >= 25


def test_grain_source_yields_chats():
    source = gym_tasks.GymSource(TASKS, split="train", seed=1, count=10)
    records = list(grain.MapDataset.source(source))
    assert len(records) == 10
    first = records[0]
    assert first["messages"] == [{"role": "user", "content": first["question"]},
                                 {"role": "assistant", "content": first["answer"]}]
    assert gym_tasks.conversations(TASKS, split="train", seed=1, count=10) == [r["messages"] for r in records]


def test_bad_task_and_split_name_the_value():
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'word_reversal'"):
        gym_tasks.parse_tasks("word_reversal")
    with pytest.raises(ValueError, match="split='test'"):
        gym_tasks.generate_items(TASKS, split="test", seed=0, count=1)
    with pytest.raises(ValueError, match="tasks is empty"):
        gym_tasks.parse_tasks(" , ")
