"""What README.md and docs/ name is current: the files, the modules and names, the issue references.

A path such as ``irnet/nets/warm_start.py`` or ``tests/training/test_ddp.py`` must exist, a dotted
name such as ``irnet.nets.ODENet`` must import (and not only through an old module path kept for
old configs, which docs/layout.md names on purpose), and no document may cite an issue number of a
tracker its reader cannot see: each names the capability instead ("the speed targets").
"""

from __future__ import annotations

import importlib
import re
import warnings

import pytest

from helpers.training import REPO

DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "docs").glob("*/*/summary.md")),  # the studies' published summaries
]
PATH = re.compile(
    r"(?<![\w./-])((?:irnet|callbacks|datamodules|tests|benchmarks|configs|docs)/[\w./-]*\w/?)"
)
DOTTED = re.compile(r"(?<![\w./-])(irnet(?:\.[A-Za-z_]\w*)+)")
TRACKER = re.compile(r"\bissues? ?#?\d+|\bissue\d+|\(#\d+\)", re.I)
OLD_PATHS_SHOWN = {"layout.md"}  # shows old module paths that still import, on purpose


def mentions(pattern: re.Pattern) -> list[tuple[str, int, str]]:
    """``(doc, line number, match)`` for every match of ``pattern`` in the documents."""
    found = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            found += [
                (doc.name, number, m.group(1 if m.groups() else 0)) for m in pattern.finditer(line)
            ]
    return found


def resolves(name: str) -> str | None:
    """Why the dotted ``name`` does not resolve to a current module or attribute, else None."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            with warnings.catch_warnings():  # an old module path warns that it moved
                warnings.simplefilter("ignore", DeprecationWarning)
                module = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        if module.__spec__.origin is None:  # a view made for an old module path, not a file
            return f"{'.'.join(parts[:i])} is an old module path"
        obj = module
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return f"{'.'.join(parts[:i])} has no {'.'.join(parts[i:])}"
            obj = getattr(obj, attr)
        return None
    return "does not import"


def test_every_path_the_documents_name_exists():
    stale = [
        f"{doc}:{line}: {path}"
        for doc, line, path in mentions(PATH)
        if not any(c in path for c in "<*") and not (REPO / path).exists()
    ]
    assert not stale, "paths that do not exist:\n" + "\n".join(stale)


def test_every_dotted_irnet_name_the_documents_use_imports():
    problems = []
    for doc, line, name in mentions(DOTTED):
        why = resolves(name)
        if why and not (doc in OLD_PATHS_SHOWN and why.endswith("old module path")):
            problems.append(f"{doc}:{line}: {name}: {why}")
    assert not problems, "\n".join(problems)


def test_the_documents_cite_no_tracker_numbers():
    files = [*DOCS, REPO / "docs" / "make_figures.py"]
    cited = [
        f"{path.name}:{number}: {m.group(0)}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for m in TRACKER.finditer(line)
    ]
    assert not cited, "name the capability, not the issue:\n" + "\n".join(cited)


@pytest.mark.parametrize("name", ["irnet.nets.ODENet", "irnet.cli.main", "irnet.reproduce.ex1"])
def test_resolves_accepts_current_names(name):
    assert resolves(name) is None


def test_resolves_flags_missing_and_old_names():
    assert resolves("irnet.nets.NoSuchNet") == "irnet.nets has no NoSuchNet"
    assert "old module path" in resolves("irnet.staged_net.StagedConvODENet")
