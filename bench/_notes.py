"""Write a benchmark table into BUILD_NOTES.md between <!-- NAME:begin/end --> markers."""
from __future__ import annotations

import pathlib

NOTES = pathlib.Path(__file__).resolve().parent.parent / "BUILD_NOTES.md"


def replace_section(name: str, text: str, path: pathlib.Path = NOTES) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text}\n{end}"
    doc = path.read_text() if path.exists() else ""
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(doc)


def publish_table(name: str, caption: str, header: list[str], rows: list[str], write: bool) -> str:
    """Print a markdown table (caption, header row, rows) and, if `write`, store it under `name`."""
    table = "\n".join([caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows])
    print("\n" + table)
    if write:
        replace_section(name, table)
    return table
