"""absl entry point of the bench scripts: the flag style of `llada2_jax.main`, user mistakes in one line.

A bad flag value, an unknown flag or an `app.UsageError` raised by the script prints
`<script>: error: <message>` to stderr and exits with status 2 (no traceback); `--help` lists the
script's docstring and flags.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app, flags

flags.disclaim_key_flags()  # flags made by DEFINE_number_list belong to the calling script (its --help)


def fail(message: str) -> None:
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))


class NumberListParser(flags.ListParser):
    """Comma-separated numbers of one type, each within [lower, upper]."""

    def __init__(self, kind: type, lower: float | None = None, upper: float | None = None, length: int = 0):
        super().__init__()
        self.kind, self.lower, self.upper, self.length = kind, lower, upper, length

    def parse(self, argument):
        items = super().parse(argument)
        try:
            values = [self.kind(x) for x in items]
        except ValueError:
            raise ValueError(f"expected comma-separated {self.kind.__name__} values, got {argument!r}") from None
        if not values or (self.length and len(values) != self.length):
            raise ValueError(f"expected {self.length or 'at least 1'} value(s), got {argument!r}")
        for v in values:
            if (self.lower is not None and v < self.lower) or (self.upper is not None and v > self.upper):
                raise ValueError(f"{v} is outside [{self.lower}, {self.upper}]")
        return values

    def flag_type(self) -> str:
        return f"comma-separated list of {self.kind.__name__}"


def DEFINE_number_list(name: str, default: str, help: str, kind: type = int, lower=None, upper=None,
                       length: int = 0) -> flags.FlagHolder:  # noqa: N802 (absl naming)
    return flags.DEFINE(NumberListParser(kind, lower, upper, length), name, default, help,
                        serializer=flags.CsvListSerializer(","))


def run(main: Callable[[], int]) -> None:
    """`app.run(main)`, with flag errors and `app.UsageError` as one-line errors (exit 2)."""
    def checked(argv: list[str]) -> int:
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}; pass flags as --name=value (--help lists them)")
        try:
            return main() or 0
        except app.UsageError as e:
            fail(str(e))
    app.run(checked, flags_parser=_parse_flags)
