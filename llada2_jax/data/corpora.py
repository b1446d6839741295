"""Text corpora as deterministic lists of named documents, with a held-out split and size caps.

A `Document` carries a stable `name` (file path relative to the corpus root, or `file:line`, or
`book/chapter`) so that the train / held-out split is a pure function of the name: adding or
removing other documents never moves a document between splits.

Built-in corpora (see /work/shared/assets.md):
  "stdlib"       the CPython standard library sources of the running interpreter (always present)
  "python_docs"  Python 3.11 documentation reST sources (apt package python3.11-doc)
  "kjv"          King James Bible, one document per chapter (apt package bible-kjv)
Anything else passed to `load_corpus` is a path: a text file (one document), a directory (every
`*.txt`, `*.md`, `*.py`, `*.rst` file below it, one document each) or a `.jsonl` file (one
document per line, text in a configurable field). Sharded corpora read one record at a time
(`arrayrecord:<glob>`, `parquet:<glob>`, `jsonl:<glob>`) live in `data/streaming.py`, whose
`load_corpora` takes both kinds.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterable, Iterator
from typing import NamedTuple

CORPORA = ("stdlib", "python_docs", "kjv")
SPLITS = ("train", "heldout", "all")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
PYTHON_DOCS_DIR = "/usr/share/doc/python3.11/html/_sources"


class Document(NamedTuple):
    name: str
    text: str


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def stdlib_documents(root: str | None = None) -> Iterator[Document]:
    """Every `.py` file of the standard library, sorted by relative path.

    Skips test packages (`test*` directories or modules), `site-packages` and `idlelib/idle_test`.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames
                       if not d.startswith("test") and d not in ("site-packages", "__pycache__")
                       and os.path.join(rel, d) != os.path.join("idlelib", "idle_test")]
        paths += [os.path.join(dirpath, f) for f in filenames
                  if f.endswith(".py") and not f.startswith("test")]
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        yield Document(os.path.relpath(path, root), _read_text(path))


def text_documents(path: str) -> Iterator[Document]:
    """A text file as one document, or every text file below a directory (sorted)."""
    if os.path.isfile(path):
        yield Document(os.path.basename(path), _read_text(path))
        return
    if not os.path.isdir(path):
        raise FileNotFoundError(f"corpus path {path!r} does not exist")
    files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if p.endswith(TEXT_SUFFIXES) and os.path.isfile(p))
    if not files:
        raise ValueError(f"corpus directory {path!r} holds no {'/'.join(TEXT_SUFFIXES)} files")
    for p in files:
        yield Document(os.path.relpath(p, path), _read_text(p))


def jsonl_documents(path: str, field: str = "text") -> Iterator[Document]:
    """One document per non-empty line of a JSON-lines file, text taken from `field`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"jsonl corpus {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{lineno}: field {field!r} missing or not a string "
                                 f"(keys: {sorted(record)})")
            yield Document(f"{os.path.basename(path)}:{lineno}", record[field])


def python_docs_documents(root: str = PYTHON_DOCS_DIR) -> Iterator[Document]:
    """The Python 3.11 documentation reST sources, one document per page."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"{root} not found: install the Python docs corpus with "
            "`apt-get install -y python3.11-doc`")
    files = sorted(glob.glob(os.path.join(root, "**", "*.rst.txt"), recursive=True))
    for p in files:
        yield Document(os.path.relpath(p, root), _read_text(p))


_VERSE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")


def kjv_documents() -> Iterator[Document]:
    """The King James Bible from the `bible` command, one document per chapter."""
    if shutil.which("bible") is None:
        raise FileNotFoundError(
            "the `bible` command was not found: install the KJV corpus with "
            "`apt-get install -y bible-kjv`")
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    chapter, verses = None, []
    for line in out.splitlines():
        m = _VERSE.match(line)
        if m is None:
            continue
        key = f"{m.group(1)}/{m.group(2)}"
        if key != chapter and verses:
            yield Document(chapter, "\n".join(verses) + "\n")
            verses = []
        chapter = key
        verses.append(m.group(4).rstrip())
    if verses:
        yield Document(chapter, "\n".join(verses) + "\n")


def is_heldout(name: str, heldout_fraction: float) -> bool:
    """Deterministic split: held out when the hash of the name falls below the fraction."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < heldout_fraction


def select(documents: Iterable[Document], *, split: str = "all", heldout_fraction: float = 0.01,
           max_documents: int | None = None, max_bytes: int | None = None) -> list[Document]:
    """Keep one split, then the first documents up to `max_documents` and `max_bytes` (UTF-8).

    The byte cap stops before the first document that would cross it (at least one is kept).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    for field, value in (("max_documents", max_documents), ("max_bytes", max_bytes)):
        if value is not None and value <= 0:
            raise ValueError(f"{field}={value} must be positive or None")
    kept: list[Document] = []
    total = 0
    for doc in documents:
        if split != "all" and is_heldout(doc.name, heldout_fraction) != (split == "heldout"):
            continue
        if max_documents is not None and len(kept) >= max_documents:
            break
        size = len(doc.text.encode("utf-8"))
        if max_bytes is not None and kept and total + size > max_bytes:
            break
        kept.append(doc)
        total += size
    return kept


def load_corpus(source: str, *, split: str = "all", heldout_fraction: float = 0.01,
                max_documents: int | None = None, max_bytes: int | None = None,
                jsonl_field: str = "text") -> list[Document]:
    """Documents of a named corpus (`CORPORA`) or of a path, split and capped (see `select`)."""
    return select(iter_documents(source, jsonl_field), split=split, heldout_fraction=heldout_fraction,
                  max_documents=max_documents, max_bytes=max_bytes)


def iter_documents(source: str, jsonl_field: str = "text") -> Iterator[Document]:
    """The documents of a named corpus or a path, one at a time (nothing else is held)."""
    if source == "stdlib":
        docs = stdlib_documents()
    elif source == "python_docs":
        docs = python_docs_documents()
    elif source == "kjv":
        docs = kjv_documents()
    elif source.endswith(".jsonl"):
        docs = jsonl_documents(source, jsonl_field)
    elif os.path.exists(source):
        docs = text_documents(source)
    else:
        raise ValueError(f"corpus {source!r} is neither one of {CORPORA} nor an existing path")
    return docs


def texts(documents: Iterable[Document]) -> list[str]:
    """Just the texts (what tokenizer training and the pipelines consume)."""
    return [d.text for d in documents]
