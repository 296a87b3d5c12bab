"""Helpers of ``bench_training.py``: an epoch timer callback and a forward-iteration recorder.

``EpochTimer`` is loaded by the ``python -m irnet fit`` subprocesses that
``bench_training.py`` starts (``PYTHONPATH`` holds this folder, and the
callback is appended to the config's own with ``--trainer.callbacks+=…``).
Both classes use public attributes only: a block is any module of
``net.blocks`` with a ``forward_stats`` attribute whose ``iterations`` is a
per-sample tensor.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch import nn


def solver_blocks(net: Any) -> list[nn.Module]:
    """The network's blocks that report forward statistics (none if it has no ``blocks``)."""
    return [b for b in getattr(net, "blocks", []) if hasattr(b, "forward_stats")]


class IterationRecorder:
    """Mean forward iterations of the main pass of each training step, per layer and sample.

    A forward hook on every block records the block's first solve after
    :meth:`new_step` (the clean pass that ``train/iters`` logs); later solves
    of the same step (R_rnd's perturbed streams) are counted apart.
    """

    def __init__(self, net: Any) -> None:
        self.blocks = solver_blocks(net)
        self.main: list[torch.Tensor] = []  # per (step, layer): mean over samples
        self.extra: list[torch.Tensor] = []  # later solves in the same step
        self._seen: set[int] = set()
        self.active = True  # record only while set (e.g. not during validation)
        self._handles = [b.register_forward_hook(self._hook) for b in self.blocks]

    def _hook(self, block: nn.Module, inputs: Any, output: Any) -> None:
        if not self.active:
            return
        stats = getattr(block, "forward_stats", None)
        iterations = getattr(stats, "iterations", None)
        if iterations is None:
            return
        target = self.extra if id(block) in self._seen else self.main
        self._seen.add(id(block))
        target.append(iterations.detach().float().mean())

    def new_step(self) -> None:
        self._seen.clear()

    def take(self) -> Optional[float]:
        """Mean of the main-pass records since the last call (``None`` if none), then reset."""
        records, self.main, self.extra = self.main, [], []
        return float(torch.stack(records).mean()) if records else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class EpochTimer(pl.Callback):
    """Wall-clock time of every training epoch, written as JSON when training ends.

    An epoch runs from one ``on_train_epoch_start`` to the next (the last one
    to ``on_train_end``): training steps, validation, logging, checkpoints and
    every other callback's epoch work, but not the start-up, the sanity check
    or the final teardown.

    Args:
        path: where to write ``{"epoch_s": [...], "iterations": [...], "threads": n}``.
        threads: ``torch.set_num_threads`` at ``setup`` (``None``: leave as is).
    """

    def __init__(self, path: str, threads: Optional[int] = None) -> None:
        self.path = path
        self.threads = threads
        self.starts: list[float] = []
        self.end: Optional[float] = None
        self.iterations: list[Optional[float]] = []
        self.recorder: Optional[IterationRecorder] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recorder = IterationRecorder(getattr(pl_module, "net", None))
        self.recorder.active = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.recorder is not None:
            self.recorder.new_step()
            self.recorder.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.recorder is not None:
            self.recorder.active = False  # leave out validation and callbacks' own passes

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            self.iterations.append(self.recorder.take())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = time.perf_counter()
        if self.recorder is not None:
            self.recorder.remove()
        marks = self.starts + [self.end]
        result = {
            "epoch_s": [b - a for a, b in zip(marks, marks[1:])],
            "iterations": self.iterations,
            "threads": torch.get_num_threads(),
        }
        with open(self.path, "w") as f:
            json.dump(result, f)
