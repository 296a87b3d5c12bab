"""A study's finished cells on disk, one JSON line each, so that a killed study resumes.

A study of hours (``reproduce ex1`` at the paper's budget) must not lose its
finished cells to a crash, a kill or the end of a session. :func:`irnet.reproduce._runner.run_cells`
appends every cell's result to a :class:`Journal` as it arrives; a re-run of the
same command skips the cells already there. The study deletes the journal once
its ``cells.json`` is written, so the next run after a finished one starts afresh.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

# in a study's log dir: the finished cells of a run in progress (or killed)
FILE_NAME = "cells.partial.jsonl"


def cell_key(cell: dict) -> str:
    """The identity of a cell: its settings as canonical JSON (not its results)."""
    return json.dumps(cell, sort_keys=True, default=float)


class Journal:
    """Append-only record of the finished cells of a study at ``path`` (JSON lines)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def of_study(cls, log_dir: Path) -> "Journal":
        """The journal of the study whose TensorBoard logs go to ``log_dir``."""
        return cls(Path(log_dir) / FILE_NAME)

    def finished(self, cells: Iterable[dict]) -> dict[str, dict]:
        """The results already recorded for any of ``cells``, by :func:`cell_key`.

        A last line cut short by a kill is ignored (that cell runs again).
        """
        wanted = {cell_key(cell) for cell in cells}
        return {
            entry["key"]: entry["result"] for entry in self._entries() if entry.get("key") in wanted
        }

    def record(self, cell: dict, result: dict) -> None:
        """Append one finished cell (flushed at once: a kill loses at most the running cells)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write(json.dumps({"key": cell_key(cell), "result": result}, default=float) + "\n")

    def results(self) -> list[dict]:
        """Every recorded result, in the order finished: a partial study's, for a report."""
        return [entry["result"] for entry in self._entries()]

    def _entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def seed_from_published(journal: Journal, published: Path, cells: Sequence[dict]) -> int:
    """Start a missing journal from those of ``cells`` that a study published in ``results.json``.

    A study that outlives one machine (its log dir is gone, its ``results.json`` was committed)
    then resumes where it stopped, and a wider grid (more θ, seeds or variants) builds on a
    narrower one, instead of training those cells again. A cell counts when every one of its
    settings equals a published result's. Nothing is seeded when the published results cover
    the whole grid (re-running a finished study trains it again). A history thinned for
    ``results.json`` (``history_stride``) comes back at full length, NaN between the epochs
    kept, so that it lines up with the new cells' (and is thinned the same way again).
    Returns the number of cells recorded.
    """
    if journal.path.is_file() or not Path(published).is_file():
        return 0
    results = json.loads(Path(published).read_text()).get("cells", [])
    matches = [
        (cell, next((r for r in results if all(r.get(k) == v for k, v in cell.items())), None))
        for cell in cells
    ]
    found = [(cell, result) for cell, result in matches if result is not None]
    if len(found) == len(matches):
        return 0
    for cell, result in found:
        journal.record(cell, unthinned(result))
    return len(found)


def unthinned(result: dict) -> dict:
    """``result`` with each thinned ``history`` list back at one entry per epoch (NaN where
    none was kept)."""
    stride = result.get("history_stride", 1)
    if stride <= 1 or "history" not in result:
        return result
    history = {}
    for key, values in result["history"].items():
        if key == "stopped" or not isinstance(values, list):
            history[key] = values
            continue
        full = [math.nan] * result.get("epochs", len(values) * stride)
        kept = min(len(values), len(full) // stride)
        full[stride - 1 : stride * kept : stride] = values[:kept]
        history[key] = full
    return {k: v for k, v in result.items() if k != "history_stride"} | {"history": history}
