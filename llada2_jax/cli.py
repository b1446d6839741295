"""What the small commands (`generate`, `evaluate`) share: their own absl flag set, `--help`, and
user mistakes reported as one line with exit code 2 (no traceback), as `main` does."""
from __future__ import annotations

import os
import sys
from typing import Callable

from absl import flags


def run(name: str, doc: str, flag_values: flags.FlagValues, argv: list[str] | None,
        body: Callable[[flags.FlagValues], int]) -> int:
    """Parse `argv` (without the program name; default: the command line) into `flag_values` and
    run `body` with them; a flag error or a ValueError from `body` prints `name: message`, returns 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv):
        print(doc + "\nflags:\n" + flag_values.get_help())
        return 0
    try:
        flag_values.unparse_flags()
        rest = flag_values([name, *argv])
        if len(rest) > 1:
            raise ValueError(f"unexpected argument {rest[1]!r} (flags are --name=value)")
        return body(flag_values)
    except (flags.Error, ValueError) as e:
        print(f"{name}: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        return 2


def require_workdir(flag_values: flags.FlagValues, required: tuple[str, ...]) -> None:
    """The `required` flags are set and `--workdir` (one of them) is an existing directory."""
    for name in required:
        if flag_values[name].value is None:
            raise ValueError(f"--{name} is required")
    if not os.path.isdir(flag_values.workdir):
        raise ValueError(f"--workdir={flag_values.workdir!r} does not exist")
