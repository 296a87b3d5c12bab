"""Bit-for-bit comparison of two training states (checkpoints): weights, optimiser, schedule."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
from pytorch_lightning.callbacks import Callback

# what a resumed run must reproduce exactly (callback states hold paths and differ by design)
TRAINING_STATE = ("epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers")


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` equal in every tensor element, dtype and shape, and every other value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), (
            f"{where}: max difference {(a.double() - b.double()).abs().max().item():.3e}"
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (
            f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        )
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"  # NaN equals NaN here


def assert_same_training_state(first: dict, second: dict) -> int:
    """:func:`assert_identical` over :data:`TRAINING_STATE`; returns the number of tensors."""
    for key in TRAINING_STATE:
        assert_identical(first[key], second[key], key)
    return _count_tensors([first[k] for k in TRAINING_STATE])


def _count_tensors(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return 1
    if isinstance(tree, dict):
        return sum(_count_tensors(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_count_tensors(v) for v in tree)
    return 0


class KillAt(Callback):
    """SIGKILLs its own process in the middle of a training step of ``epoch`` (after backward,
    before the optimiser step): a crash mid-run, after the checkpoints of earlier epochs exist."""

    def __init__(self, epoch: int = 3) -> None:
        self.epoch = epoch

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class FailOnRank(Callback):
    """Raises in one DDP rank at the start of ``epoch``: a child process dying with an error."""

    def __init__(self, rank: int = 1, epoch: int = 1) -> None:
        self.rank, self.epoch = rank, epoch

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch == self.epoch:
            raise RuntimeError(f"rank {self.rank} failed on purpose")
