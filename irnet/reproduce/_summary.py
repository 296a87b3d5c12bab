"""What a study writes beside its cells' numbers, and how a saved run is read back.

* :func:`machine`: one line naming the machine (CPU, workers × threads, OS, Python, torch);
* :func:`render_summary`: summary.md, with the command, the machine, the time taken, the
  study's tables and its figures;
* :data:`DRAWING_KEYS`: result keys that only feed figures, left out of results.json unless a
  study publishes them (its ``PUBLISHED_DRAWINGS``);
* :func:`saved_run`: the run last recorded in a log directory, finished or not, for
  ``--replot`` (:class:`ReplotWithoutRun` where there is none).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Optional, Sequence

import torch

from irnet.reproduce._journal import Journal

# in the figures, not results.json
DRAWING_KEYS = ("grid_output", "trajectories", "field", "decision")


def machine(workers: int, threads: int = 1) -> str:
    """One line: CPU, cores used, OS, Python and torch versions."""
    cpu = _cpu_model() or platform.processor() or platform.machine()
    return (
        f"{cpu}, {workers} worker process(es) × {threads} torch thread(s), {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
    )


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else an empty string."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
    except OSError:
        return ""


def render_summary(name: str, meta: dict, table: str, figures: Sequence[Path], out: Path) -> str:
    """summary.md of study ``name``: ``meta``'s command, machine and minutes, ``table`` (the
    study's tables) and ``figures`` (linked relative to ``out``)."""
    images = "\n".join(f"![{f.stem}]({f.relative_to(out)})" for f in figures)
    return (
        f"# {name}\n\n`{meta['command']}`\n\n{meta['machine']}; {meta['minutes']:.1f} minutes"
        f"{_resumed_note(meta.get('resumed'))}.\n\n"
        f"Mean ± standard deviation over seeds.\n\n{table}\n\n{images}\n"
    )


def _resumed_note(resumed: Optional[dict]) -> str:
    """What a run that took over an earlier one's finished cells says of them: its own
    minutes are only those of the cells it trained."""
    if not resumed:
        return ""
    n = resumed["cells"]
    return (
        f" for the cells this run trained; it resumed {n} finished cell{'s' * (n != 1)} of an "
        f"earlier run (their machines not recorded here), and all its cells' run times sum to "
        f"{resumed['cell_minutes']:.1f} minutes"
    )


class ReplotWithoutRun(ValueError):
    """``--replot`` asked for a run that never finished a cell."""


def saved_run(log_dir: Path, resume_command: str = "") -> tuple[dict, list[dict]]:
    """``(meta, results)`` of the last run that wrote ``log_dir/cells.json`` (for ``--replot``),
    or of an unfinished one: the cells its journal holds (a partial study's figures and tables),
    with ``resume_command``, the command that finishes it, as its command and its cells' run
    times, summed, as its minutes."""
    path = log_dir / "cells.json"
    journal = Journal.of_study(log_dir)
    if journal.path.is_file():  # an unfinished (killed) run is newer than any cells.json
        results = journal.results()
        return {
            "command": resume_command or "(unfinished run, from its journal)",
            "minutes": sum(r["seconds"] for r in results) / 60,
            "machine": (
                f"an unfinished run ({len(results)} cell{'s' * (len(results) != 1)} finished; "
                "the command above resumes it), its machines not recorded in the journal; "
                "minutes: the finished cells' run times, summed"
            ),
            "partial": True,
        }, results
    if not path.is_file():
        raise ReplotWithoutRun(
            f"--replot needs a finished run's {path}; run the study without --replot first "
            "(or pass its --log-dir)"
        )
    saved = json.loads(path.read_text())
    return saved["meta"], saved["cells"]
