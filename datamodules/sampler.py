"""Distributed sampling that splits each global batch over the processes, without padding.

Lightning's default ``DistributedSampler`` gives every process ``ceil(N / W)``
samples, repeating some to make the shares equal (51 samples on 2 processes
become 52), and then batches each share on its own: a run on W processes
neither sees the batches of a one-process run nor weights every sample once.
:class:`GlobalBatchSlices` instead forms the batches exactly as one process
would (same order, same shuffling generator) and hands process r its part of
each: the shares of a batch differ by at most one sample and together are the
batch. The module weights each process's loss by its share
(:class:`~irnet.module.ImplicitNetModule`), so the averaged gradient is that
of the whole batch.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from irnet._misc import check_int


def even_slice(size: int, parts: int, index: int) -> slice:
    """Part ``index`` of ``range(size)`` cut into ``parts`` contiguous pieces whose sizes differ
    by at most one."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


class GlobalBatchSlices(DistributedSampler):
    """Yields, for process ``rank`` of ``num_replicas``, its slice of every global batch.

    Use it as the ``sampler`` of a ``DataLoader`` with ``batch_size=None``: each
    item is a list of indices, which a ``TensorDataset`` turns into a batch. It
    subclasses ``DistributedSampler`` only so that Lightning keeps it instead
    of injecting its own; it does not pad and ignores ``set_epoch`` (the
    shuffling generator advances from epoch to epoch as in one process).

    Args:
        size: samples in the data set.
        batch_size: samples per global batch.
        num_replicas: processes (the world size).
        rank: this process's global rank.
        shuffle: draw a new order every epoch from ``generator``.
        generator: the generator of the order (the one a one-process
            ``DataLoader`` would be given).

    Raises:
        ValueError: if some global batch has fewer samples than processes
            (a process would get an empty batch).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        num_replicas: int,
        rank: int,
        shuffle: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        # DistributedSampler.__init__ is not called: it needs a process group and pads.
        self.size = check_int("size", size, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_replicas = check_int("num_replicas", num_replicas, 1)
        self.rank = check_int("rank", rank, 0)
        if rank >= num_replicas:
            raise ValueError(f"rank must be < num_replicas = {num_replicas}, got {rank}")
        smallest = size % batch_size or min(batch_size, size)
        if smallest < num_replicas:
            raise ValueError(
                f"batch_size {batch_size} on {size} samples leaves a batch of {smallest}, "
                f"fewer than the {num_replicas} processes; choose a batch_size whose last batch "
                f"has at least {num_replicas} samples (or use fewer processes)"
            )
        self.shuffle, self.epoch, self.seed, self.drop_last = shuffle, 0, 0, False
        order = (
            RandomSampler(range(size), generator=generator)
            if shuffle
            else SequentialSampler(range(size))
        )
        self.batches = BatchSampler(order, batch_size, drop_last=False)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[even_slice(len(batch), self.num_replicas, self.rank)]

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        """Kept for Lightning's call; the order does not depend on it."""
        self.epoch = epoch
