"""Entry point: `python -m llada2_jax.main --config=experiments/<file>.py --workdir=DIR`.

Any config field can be overridden (`--config.wsd.lr=1e-4`). `--config.smoke=True` applies the
experiment's `smoke_overrides` (same stages, tiny sizes); `--config.dry_run=True` prints the
parameter counts and per-device memory plan instead of training; `--config.distributed=True`
calls `jax.distributed.initialize()` first (run the same command on every host).
A workdir that already holds checkpoints resumes; SIGTERM saves a checkpoint and exits 0.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "experiments/tiny_wsd.py", "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)")


def apply_smoke(config, keep=()) -> None:
    """Apply `config.smoke_overrides` ((dotted field, value) pairs) in place, except fields in `keep`."""
    with config.unlocked():
        for path, value in config.smoke_overrides:
            if path in keep:
                continue
            *parents, leaf = path.split(".")
            node = config
            for name in parents:
                node = node[name]
            if leaf not in node:
                raise ValueError(f"smoke_overrides names unknown field {path!r}")
            node[leaf] = value


def main(argv) -> int:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
    config = flags.FLAGS.config
    import jax
    if config.distributed:
        jax.distributed.initialize()
    if config.smoke:  # command-line overrides win over the experiment's smoke sizes
        apply_smoke(config, keep=set(config_flags.get_override_values(flags.FLAGS["config"])))
    from llada2_jax.training.validate import validate_config
    devices = (config.dry_run_devices or jax.device_count()) if config.dry_run else jax.device_count()
    try:
        validate_config(config, devices)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    if config.dry_run:
        from llada2_jax.training import dry_run
        print(dry_run.report(dry_run.plan(config, devices)), flush=True)
        return 0
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir is required (except with --config.dry_run=True)")
    from llada2_jax.training.run import Run
    from llada2_jax.training.trainer import Preempted
    try:
        Run(config, flags.FLAGS.workdir).execute()
    except Preempted as e:
        print(f"[run] {e}; rerun the same command to resume", flush=True)
    return 0


def entry() -> None:
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    entry()
