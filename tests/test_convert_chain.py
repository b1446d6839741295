"""The conversion run on the tiny model: gym corpus -> wsd -> sft, the ar_sft twin beside it, compare."""
import json
import os

import pytest

pytest.importorskip("reasoning_gym")

from llada2_jax import workdir as wd  # noqa: E402
from llada2_jax.configs.posttrain import posttrain_section  # noqa: E402
from llada2_jax.data import gym_tasks  # noqa: E402
from llada2_jax.training.run import Run  # noqa: E402
from llada2_jax.training.validate import resolve_config, validate_config  # noqa: E402
from test_training_fixtures import read_metrics, tiny_train_config, train_tokenizer  # noqa: E402

TASKS = "word_sequence_reversal,rotate_matrix"
COUNT = 4


def convert_config(tokenizer_dir):
    c = tiny_train_config(tokenizer_dir, stages="wsd,sft,ar_sft,compare")
    c.data.update(dict(corpora="gym", seq_len=512))
    c.gym.update(dict(tasks=TASKS, seed=3, train_items=16, heldout_items=4))
    c.train.update(dict(batch_size=2, grad_accum=1, eval_batch_size=2, frozen_layers=1))
    c.model.arch.max_position_embeddings = 512
    c.wsd.update(dict(decay_min=256, steps_per_decay=1))
    c.sft = posttrain_section(data="gym", steps=2, lr=1e-3, lr_min=1e-4, block_size=64, complementary=True,
                              eval_samples=1)
    c.ar_sft = posttrain_section(data="gym", steps=0, lr=1e-3, lr_min=1e-4, block_size=64)
    c.compare.update(dict(count=COUNT, thresholds=(0.5, 0.9), gen_length=32, batch_size=2, speed_items=1))
    return resolve_config(c)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    config = convert_config(train_tokenizer(str(root / "tok")))
    validate_config(config, 1)
    workdir = str(root / "run")
    Run(config, workdir).execute()
    return workdir, config


def test_twin_gets_the_chain_steps_and_the_run_output_stays_the_chain(run_dir):
    workdir, config = run_dir
    assert config.ar_sft.steps == 1 + 2  # wsd (one decay phase of 1 step) + sft
    final = json.loads(open(os.path.join(workdir, wd.FINAL_FILE)).read())
    assert final["completed"] == ["wsd", "sft", "ar_sft", "compare"]
    assert final["checkpoint_dir"] == os.path.join(workdir, "checkpoints", "sft")
    losses = read_metrics(workdir)
    assert {stage for stage, _ in losses} == {"wsd", "sft", "ar_sft"}
    block_sizes = {json.loads(line)["stage"]: json.loads(line).get("block_size")
                   for line in open(os.path.join(workdir, "metrics.jsonl")) if "loss" in json.loads(line)}
    assert block_sizes == {"wsd": 256, "sft": 64, "ar_sft": 0}


def test_twin_starts_from_the_source_not_from_the_chain(run_dir):
    workdir, config = run_dir
    run = Run(config, workdir)
    try:
        assert run.context("ar_sft").init_weights == run.source_weights
        assert run.context("sft").init_weights == run.initial_weights
    finally:
        run.logger.close()


def test_compare_scores_every_stage_with_reasoning_gym(run_dir):
    workdir, config = run_dir
    report = json.loads(open(os.path.join(workdir, "compare", "results.json")).read())
    settings = [(r["model"].split("/")[-1], r["decoder"], r["threshold"]) for r in report["rows"]]
    assert settings == [("wsd", "block", 0.5), ("wsd", "block", 0.9), ("sft", "block", 0.5),
                        ("sft", "block", 0.9), ("ar_sft", "ar", None)]
    items = gym_tasks.generate_items(TASKS, split="heldout", seed=config.compare.seed, count=COUNT)
    for row in report["rows"]:
        records = report["items"][f"{row['model']}|{row['decoder']}|{row['threshold']}"]
        assert [r["question"] for r in records] == [it.question for it in items]
        scores = [gym_tasks.score(it, r["output"]) for it, r in zip(items, records)]
        assert row["accuracy"] == pytest.approx(sum(scores) / COUNT)
        assert row["tokens_per_forward"] == pytest.approx(row["answer_tokens"] / row["forwards"])
        assert all(1 <= r["answer_tokens"] <= config.compare.gen_length for r in records)
    ar = report["rows"][-1]
    assert ar["tokens_per_forward"] == pytest.approx(1.0)  # one token per AR forward, the prefill's included
    for name in ("frontier.png", "training_loss.png"):
        assert os.path.getsize(os.path.join(workdir, "compare", name)) > 1000


def test_evaluate_command_matches_the_compare_stage(run_dir, tmp_path):
    from llada2_jax import evaluate
    workdir, config = run_dir
    out = tmp_path / "eval.json"
    code = evaluate.main([f"--workdirs={workdir}", "--stages=sft,ar_sft", f"--tasks={TASKS}",
                          f"--seed={config.compare.seed}", f"--count={COUNT}", "--thresholds=0.9",
                          "--gen_length=32", "--batch_size=4", "--speed_items=0", f"--out={out}"])
    assert code == 0
    mine = json.loads(out.read_text())["rows"]
    stage = {(r["model"], r["threshold"]): r for r in
             json.loads(open(os.path.join(workdir, "compare", "results.json")).read())["rows"]}
    for row in mine:  # batch size differs; rows are batch-independent
        other = stage[(row["model"], row["threshold"])]
        assert (row["accuracy"], row["forwards"], row["answer_tokens"]) == \
            (other["accuracy"], other["forwards"], other["answer_tokens"])


@pytest.mark.parametrize("flag,message", [("--count=0", "--count=0 must be >= 1"),
                                          ("--thresholds=0.9,1.5", "must be numbers in (0, 1]"),
                                          ("--tasks=nope", "unknown reasoning-gym task 'nope'"),
                                          ("--stages=dpo", "match no trained stage")])
def test_evaluate_command_rejects_bad_arguments_in_one_line(run_dir, flag, message, capsys):
    from llada2_jax import evaluate
    workdir, _ = run_dir
    assert evaluate.main([f"--workdirs={workdir}", flag]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
