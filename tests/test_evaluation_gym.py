"""The reasoning-gym evaluation plumbing: scoring, the tokens-per-forward count, real decoders."""

import pytest
from flax import nnx

pytest.importorskip("reasoning_gym")

from llada2_jax.data import gym_tasks  # noqa: E402
from llada2_jax.evaluation import gym  # noqa: E402
from llada2_jax.inference import generate, generate_ar  # noqa: E402
from llada2_jax.inference.result import GenerationResult  # noqa: E402
from llada2_jax.model import ModelConfig, Transformer  # noqa: E402
from test_training_fixtures import train_tokenizer  # noqa: E402

TASKS = ("word_sequence_reversal", "rotate_matrix")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from llada2_jax.data.tokenizers import load_tokenizer
    return load_tokenizer(train_tokenizer(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def items():
    return gym_tasks.generate_items(TASKS, split="heldout", seed=7, count=5)


class ScriptedDecoder:
    """Replies with the given texts (each + EOS), in order; reports the given per-row forwards."""

    def __init__(self, tokenizer, replies, forwards):
        self.tokenizer, self.replies, self.forwards = tokenizer, replies, forwards
        self.served = 0

    def __call__(self, prompts):
        rows = [self.tokenizer.encode(self.replies[(self.served + i) % len(self.replies)])
                + [self.tokenizer.eos_id] for i in range(len(prompts))]
        self.served += len(prompts)
        return GenerationResult(rows, max(self.forwards), self.forwards[:len(prompts)],
                                sum(len(r) - 1 for r in rows), wall_time=0.5)


def test_reference_replies_score_one_and_tpf_counts_answer_tokens_with_eos(tokenizer, items):
    decoder = ScriptedDecoder(tokenizer, [it.answer for it in items], forwards=[3] * len(items))
    result = gym.evaluate(decoder, tokenizer, items, batch_size=len(items), warmup=False)
    assert result["accuracy"] == 1.0
    tokens = sum(len(tokenizer.encode(it.answer)) + 1 for it in items)
    assert result["answer_tokens"] == tokens
    assert result["forwards"] == 3 * len(items)
    assert result["tokens_per_forward"] == pytest.approx(tokens / (3 * len(items)))
    assert result["tokens_per_sec"] == pytest.approx(tokens / 0.5)
    assert [r["output"] for r in result["records"]] == [it.answer for it in items]


def test_wrong_replies_score_zero(tokenizer, items):
    decoder = ScriptedDecoder(tokenizer, ["no idea"], forwards=[1] * len(items))
    result = gym.evaluate(decoder, tokenizer, items, batch_size=2, warmup=True)
    assert result["accuracy"] == 0.0 and result["n"] == len(items)
    assert set(result["accuracy_per_task"]) == set(TASKS)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, mask_token_id=tokenizer.mask_id)
    return Transformer(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("decoder", ["block", "ar"])
def test_real_decoders_count_each_row_up_to_its_first_eos(tokenizer, items, tiny_model, decoder):
    if decoder == "block":
        def decode_fn(prompts):
            return generate(tiny_model, prompts, gen_length=24, block_size=8, threshold=0.5,
                            eos_id=tokenizer.eos_id)
    else:
        def decode_fn(prompts):
            return generate_ar(tiny_model, prompts, max_new_tokens=24, eos_id=tokenizer.eos_id)
    result = gym.evaluate(decode_fn, tokenizer, items, batch_size=2)
    prompts = [gym.prompt_ids(tokenizer, it) for it in items]
    direct = decode_fn(prompts)  # the same rows decoded in one batch: rows are batch-independent
    expected_tokens = sum(min(len(row), 24) for row in direct.tokens)
    assert result["answer_tokens"] == expected_tokens
    assert result["forwards"] == sum(direct.row_forwards)
    for record, row in zip(result["records"], direct.tokens):
        assert record["answer_tokens"] == len(row)
        eos_at = row.index(tokenizer.eos_id) if tokenizer.eos_id in row else None
        assert eos_at is None or eos_at == len(row) - 1  # nothing after the first EOS is counted
    if decoder == "ar":
        assert result["tokens_per_forward"] == pytest.approx(1.0)
    assert result["tokens_per_sec"] > 0


def test_bad_arguments_name_the_value(tokenizer, items):
    with pytest.raises(ValueError, match="items is empty"):
        gym.evaluate(lambda p: None, tokenizer, [], batch_size=1)
    with pytest.raises(ValueError, match="batch_size=0"):
        gym.evaluate(lambda p: None, tokenizer, items, batch_size=0)


def test_editing_presets_are_settings_of_their_own(tokenizer, items, tiny_model):
    """`decoders(..., presets=...)` adds one `edit:<preset>` setting per preset that decodes exactly
    as `generate(preset=...)`, beside the plain threshold settings."""
    from llada2_jax.inference.decode import PRESETS
    entry = {"ar": False, "block_size": 8}
    settings = gym.decoders(entry, tiny_model, tokenizer, thresholds=(0.9,), block_size=0, gen_length=16,
                            presets=("quality", "speed"))
    assert [s["decoder"] for s, _ in settings] == ["block", "edit:quality", "edit:speed"]
    prompts = [gym.prompt_ids(tokenizer, it) for it in items[:2]]
    for setting, decode_fn in settings[1:]:
        name = setting["decoder"].split(":")[1]
        assert (setting["threshold"], setting["edit_threshold"]) == (PRESETS[name]["threshold"],
                                                                     PRESETS[name]["edit_threshold"])
        direct = generate(tiny_model, prompts, gen_length=16, block_size=8, preset=name, eos_id=tokenizer.eos_id)
        got = decode_fn(prompts)
        assert got.tokens == direct.tokens and list(got.row_forwards) == list(direct.row_forwards)
        assert "/ edit" in gym.format_row({"model": "m", **setting, **gym.summarize(
            [{"task": "t", "score": 0.0, "answer_tokens": 1, "forwards": 1}], 1.0), "tokens_per_sec_batched": 1.0})
