"""docs/ names no folder of the machine a study ran on.

A study's ``summary.md`` and ``results.json`` record its command, its log folders and its
checkpoints; published under docs/, they must name them relative to the repository
(``docs/reproduce/<study>``, ``runs/...``), never as absolute paths of the machine that ran
it (``/work/...``, ``/home/...``, ``/tmp/...``, ``C:\\...``), which no reader has. The
documents themselves are held to the same rule.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.training import REPO

DOCS = REPO / "docs"
FILES = sorted(
    path
    for pattern in ("**/*.md", "**/*.json", "**/*.jsonl")
    for path in DOCS.glob(pattern)
    if path.is_file()
)
# A POSIX path from the root of a machine's usual home, work or scratch folders (not preceded
# by a word character, a dot, a slash or a tilde, so URLs and relative paths do not match), or
# a Windows path from a drive letter.
ABSOLUTE = re.compile(
    r"(?<![\w.~/-])/(?:work|home|tmp|root|Users|mnt|scratch|private|var/folders)/"
    r"|(?<![\w\\])[A-Za-z]:\\(?=[\w.$ -])"
)


def strings(value: object) -> Iterator[str]:
    """Every string in a parsed JSON value: keys and values, at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def texts(path: Path) -> Iterator[str]:
    """The text to search: a document's lines, or the strings of a JSON (lines) file."""
    text = path.read_text()
    if path.suffix == ".md":
        yield from text.splitlines()
    elif path.suffix == ".jsonl":
        for line in text.splitlines():
            if line.strip():
                yield from strings(json.loads(line))
    else:
        yield from strings(json.loads(text))


def test_the_docs_have_files_to_check():
    names = {path.relative_to(DOCS).as_posix() for path in FILES}
    assert "REPORT.md" in names
    assert "reproduce/robustness/results.json" in names
    assert any(name.startswith("seeds/") and name.endswith("results.json") for name in names)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_no_absolute_path_of_a_machine(path: Path):
    found = sorted(
        {m.group(0) + s[m.end() : m.end() + 40] for s in texts(path) for m in ABSOLUTE.finditer(s)}
    )
    assert not found, f"docs/{path.relative_to(DOCS).as_posix()} names absolute paths: {found[:5]}"


@pytest.mark.parametrize(
    "text",
    [
        "--out /work/notes/studies/R/out",
        "/home/user/irnet/runs",
        "saved in /tmp/x.ckpt",
        "(/root/.cache/x)",
        "/Users/me/irnet",
        r"C:\Users\me\irnet",
    ],
)
def test_the_pattern_finds_absolute_paths(text: str):
    assert ABSOLUTE.search(text)


@pytest.mark.parametrize(
    "text",
    [
        "--out docs/reproduce/robustness --log-dir runs/studies/R/runs",
        "https://example.org/home/page",
        "runs/tmp/seed0",
        "~/work/irnet",
        "θ: 1.0, h: 0.5",
        "the ratio 3:\\ 4",
    ],
)
def test_the_pattern_lets_relative_paths_and_urls_pass(text: str):
    assert not ABSOLUTE.search(text)
