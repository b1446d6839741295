"""Entry point: `python -m llada2_jax.main --config=experiments/<file>.py --workdir=DIR`.

Any config field can be overridden (`--config.wsd.lr=1e-4`). `--config.smoke=True` applies the
experiment's `smoke_overrides` (same stages, tiny sizes); `--config.dry_run=True` prints the
parameter counts and per-device memory plan instead of training; `--config.distributed=True`
joins a multi-process job first (`llada2_jax.distributed`: the coordinator address, process count
and id come from the environment; run the same command in every process).
A workdir that already holds checkpoints resumes; SIGTERM saves a checkpoint and exits 0.
A mistake in the flags or the config prints one line `config error: ...` and exits with code 2; a
checkpoint that does not fit the model (another architecture) prints `checkpoint error: ...` (code 2).
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "experiments/smollm2_quick.py", "experiment config file",
                                lock_config=True)
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


class UserError(Exception):
    """A mistake on the command line: reported as one line, exit code 2."""


def _config_file_error(argv: list[str], error: Exception) -> str:
    """One line for an experiment file that cannot be loaded."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    path = (values[-1] if values else flags.FLAGS["config"].default).split(":")[0]
    if not os.path.isfile(path):
        return f"--config={path!r}: no such experiment file (expected e.g. experiments/tiny_wsd.py)"
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return f"--config={path!r} could not be loaded: {lines[-1] if lines else type(error).__name__}"


def _override_error(argv: list[str], error: Exception) -> str:
    """One line for a `--config.a.b=v` override naming a field the experiment does not have."""
    key = str(error).strip("\"' ")
    for arg in argv:
        name = arg[len("--config."):].split("=", 1)[0] if arg.startswith("--config.") else ""
        if key and key in re.split(r"[.\[\]]", name):
            return f"--config.{name}: unknown field {key!r} (check the spelling against the experiment file)"
    return f"--config override: unknown field {key!r}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, plus loading the experiment: every mistake becomes one line and exit code 2."""
    try:
        rest = flags.FLAGS(argv)
        flags.FLAGS.config.smoke  # the first field read loads the file and applies the overrides
        return rest
    except flags.IllegalFlagValueError as e:
        message = _config_file_error(argv, e) if str(e).startswith("flag --config=") else str(e).splitlines()[0]
    except OSError as e:
        message = _config_file_error(argv, e)
    except (AttributeError, KeyError) as e:
        message = _override_error(argv, e)
    except flags.Error as e:
        message = str(e).splitlines()[0]
    print(f"config error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv) -> int:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save/restore at INFO
    config = flags.FLAGS.config
    import jax
    if config.distributed:
        from llada2_jax import distributed
        try:
            distributed.initialize()
        except ValueError as e:
            print(f"config error: --config.distributed=True: {e}", file=sys.stderr, flush=True)
            return 2
        print(f"[run] {distributed.describe()}", flush=True)
    from llada2_jax.training.validate import resolve_config, validate_config
    devices = (config.dry_run_devices or jax.device_count()) if config.dry_run else jax.device_count()
    try:
        if config.smoke:  # command-line overrides win over the experiment's smoke sizes
            apply_smoke(config, keep=set(config_flags.get_override_values(flags.FLAGS["config"])))
        config = resolve_config(config)
        validate_config(config, devices)
        if not config.dry_run and not flags.FLAGS.workdir:
            raise UserError("--workdir is required (except with --config.dry_run=True)")
    except (ValueError, UserError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    if config.dry_run:
        from llada2_jax.training import dry_run
        print(dry_run.report(dry_run.plan(config, devices)), flush=True)
        return 0
    from llada2_jax.training.checkpoint import CheckpointMismatch
    from llada2_jax.training.data_shards import DataShardError
    from llada2_jax.training.run import Run
    from llada2_jax.training.trainer import Preempted
    try:
        Run(config, flags.FLAGS.workdir).execute()
    except Preempted as e:
        print(f"[run] {e}; rerun the same command to resume", flush=True)
    except CheckpointMismatch as e:
        print(f"checkpoint error: {e}", file=sys.stderr, flush=True)
        return 2
    except DataShardError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    else:  # a finished run (not a preempted one): process 0 draws WORKDIR/report/*.png
        from llada2_jax.report import report_at_end_of_run
        report_at_end_of_run(flags.FLAGS.workdir)
    return 0


def entry() -> None:
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
    entry()
