"""Evaluate trained runs on held-out reasoning-gym items: accuracy, tokens per forward, tokens/s.

    python -m llada2_jax.evaluate --workdirs=W1[,W2] --tasks=word_sequence_reversal,rotate_matrix \
        --seed=0 --count=200 --out=eval/results.json

Each workdir contributes one model per training stage it has checkpoints of (`--stages` narrows
that). A stage trained autoregressively (its metrics log block size 0: the AR twin) is decoded
with the AR decoder; every other stage with block threshold decoding and the KV cache, at the
block size it was trained with and at each of `--thresholds`. Items come from the held-out split
of `data.gym_tasks` and are scored by reasoning-gym. Prints the table; writes the JSON (one row
per model and setting, every item's output) and `frontier.png` and `training_loss.png` beside it.
`llada2_jax.evaluation.gym` defines the counts.
"""
from __future__ import annotations

import sys

from absl import flags

from llada2_jax import cli
from llada2_jax.evaluation import gym

FLAGS = flags.FlagValues()
flags.DEFINE_list("workdirs", None, "training run directories to evaluate", flag_values=FLAGS)
flags.DEFINE_list("stages", [], "only these stages of each workdir (default: every stage with checkpoints)",
                  flag_values=FLAGS)
flags.DEFINE_list("tasks", ["word_sequence_reversal", "rotate_matrix"], "reasoning-gym task names",
                  flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the held-out item stream", flag_values=FLAGS)
flags.DEFINE_integer("count", 200, "held-out items (round-robin over the tasks)", flag_values=FLAGS)
flags.DEFINE_list("thresholds", [f"{t:g}" for t in gym.THRESHOLDS], "confidence thresholds (block decoding)",
                  flag_values=FLAGS)
flags.DEFINE_list("presets", [], "token-editing decoding presets to evaluate too (quality, speed)", flag_values=FLAGS)
flags.DEFINE_integer("block_size", 0, "decode block size (0: the one each stage was trained with)",
                     flag_values=FLAGS)
flags.DEFINE_integer("gen_length", 64, "maximum generated tokens per item", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "prompts decoded together for accuracy and tokens/forward",
                     flag_values=FLAGS)
flags.DEFINE_integer("speed_items", 8, "items decoded one at a time for tokens/s (0: batched figure)",
                     flag_values=FLAGS)
flags.DEFINE_string("out", "eval/results.json", "the JSON report (plots go beside it)", flag_values=FLAGS)


def checked(f) -> dict:
    """The flag values as `gym.compare` arguments; ValueError names the bad flag."""
    if not f.workdirs:
        raise ValueError("--workdirs is required (comma-separated training run directories)")
    for name in ("count", "batch_size", "gen_length"):
        if f[name].value < 1:
            raise ValueError(f"--{name}={f[name].value} must be >= 1")
    for name in ("block_size", "speed_items"):
        if f[name].value < 0:
            raise ValueError(f"--{name}={f[name].value} must be >= 0")
    try:
        thresholds = [float(t) for t in f.thresholds]
    except ValueError:
        thresholds = []
    if not thresholds or not all(0 < t <= 1 for t in thresholds):
        raise ValueError(f"--thresholds={','.join(f.thresholds)} must be numbers in (0, 1]")
    from llada2_jax.inference.decode import PRESETS
    unknown = [p for p in f.presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"--presets={','.join(f.presets)}: {unknown[0]!r} is not one of: {', '.join(PRESETS)}")
    from llada2_jax.data import gym_tasks
    try:
        tasks = gym_tasks.parse_tasks(f.tasks)
    except ValueError as e:
        raise ValueError(f"--tasks: {e}") from None
    return dict(workdirs=f.workdirs, stages=f.stages, tasks=tasks, seed=f.seed, count=f.count,
                thresholds=thresholds, block_size=f.block_size, gen_length=f.gen_length,
                batch_size=f.batch_size, speed_items=f.speed_items, presets=f.presets, out=f.out)


def evaluate(f) -> int:
    args = checked(f)
    gym.compare(**args, log=lambda line: print(line, flush=True))
    print(f"[evaluate] wrote {args['out']} and its plots", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`argv` without the program name (default: the command line). Returns the exit code."""
    return cli.run("evaluate", __doc__, FLAGS, argv, evaluate)


if __name__ == "__main__":
    sys.exit(main())
