"""A progress bar over the epochs of a seed study, reported by the workers as they train.

The seeds bar advances when a seed (or a whole ensemble of seeds) finishes, so a study of one
ensemble of 20 seeds would show nothing for its whole run. Here each fit reports to its study's
process: its total (members × max epochs) when it starts and its members at each epoch's end;
a thread of the study's process moves a second bar, over every member's epochs.
"""

from __future__ import annotations

import queue as queue_module
import threading
from typing import Any, Optional

from pytorch_lightning import Callback
from tqdm import tqdm

_reports: Any = None  # this process's queue to the study's bar (set by :func:`install`)


def install(reports: Any) -> None:
    """Send this process's epoch reports to ``reports`` (a queue; ``None``: report nothing)."""
    global _reports
    _reports = reports


class EpochReporter(Callback):
    """Reports a fit of ``members`` networks: its total member-epochs at the start, then
    ``members`` at the end of each training epoch."""

    def __init__(self, reports: Any, members: int) -> None:
        self.reports, self.members = reports, members

    def on_train_start(self, trainer, pl_module) -> None:
        self.reports.put(("total", self.members * int(trainer.max_epochs or 0)))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.reports.put(("epochs", self.members))


def reporter(members: int) -> Optional[EpochReporter]:
    """A reporter to this process's study bar, or ``None`` when none is installed."""
    return None if _reports is None else EpochReporter(_reports, members)


class EpochBar:
    """``with EpochBar(queue) as bar:`` draws the reports that arrive on ``queue`` (a
    ``queue.Queue`` for fits in this process, a multiprocessing one for workers) until the
    block ends."""

    def __init__(self, reports: Optional[Any] = None, desc: str = "epochs") -> None:
        self.reports = reports if reports is not None else queue_module.Queue()
        self.bar = tqdm(total=0, desc=desc, unit="epoch")
        self._thread = threading.Thread(target=self._drain, daemon=True)

    def __enter__(self) -> "EpochBar":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.reports.put(None)  # the drain's sentinel: every report before it is drawn first
        self._thread.join()
        self.bar.close()

    def _drain(self) -> None:
        while (report := self.reports.get()) is not None:
            kind, count = report
            if kind == "total":
                self.bar.total += count
                self.bar.refresh()
            else:
                self.bar.update(count)
