"""When a solver loop on the accelerator path reads whether it is done.

On a GPU every look at a residual waits for the device, so a loop there cannot test after every
iteration as it does on the CPU. It runs on blindly and looks where the solve is predicted to
end: first after as many iterations as the same solve (the same block) needed last time — between
two optimiser steps that count rarely changes — then, if some sample is still active, where its
residual, falling at the rate seen so far, is predicted to meet its tolerance
(:class:`~irnet.progress.CheckSchedule`). A solve whose need did not change reads once and takes
exactly the iterations the CPU path takes; one that needs more reads twice or so.

:class:`IterationMemory` keeps the counts, per solver object and key (the block's F).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Hashable, Optional

import torch
from torch import Tensor

from irnet.device_path import on_accelerator_path
from irnet.progress import CheckSchedule

#: where a solve without a remembered count first looks
FIRST_LOOK = 1
#: a key whose solves keep running out of iterations looks once in this many solves
LOOK_EVERY_WHEN_RAN_OUT = 8
#: the most keys an IterationMemory keeps (least recently used are forgotten)
REMEMBERED_AT_MOST = 4096


class IterationMemory:
    """The iterations each solve needed the last two times, by key (least recently used are forgotten).

    A solve looks first at the larger of the two: a need that wavers by one between steps (common
    with warm starts) then costs one read and at most one iteration past the CPU path's, where
    looking at the last count alone would cost a second read every other step. A key whose last
    solve ran out of iterations without a look seeing it done runs blind (no read, as many
    iterations as the CPU path takes for an unconverged solve), looking once every
    :data:`LOOK_EVERY_WHEN_RAN_OUT` solves to find out whether it converges again.
    """

    def __init__(self) -> None:
        self._needed: "OrderedDict[Hashable, tuple[int, ...]]" = OrderedDict()
        self._ran_out: dict = {}  # key -> solves run out in a row
        self._solved: set = set()  # keys whose last solve was seen to end with every sample solved

    def expected(self, key: Hashable) -> int:
        """Where to look first: the larger of the last two counts, or :data:`FIRST_LOOK` for a new key."""
        return max(self._needed.get(key, (FIRST_LOOK,)))

    def ran_out(self, key: Hashable) -> bool:
        """Whether the last solve of ``key`` ran to its ``max_iter`` without a look seeing it done."""
        return key in self._ran_out

    def blind(self, key: Hashable) -> bool:
        """Whether the next solve of ``key`` should run without looking (it keeps running out)."""
        return self._ran_out.get(key, 0) % LOOK_EVERY_WHEN_RAN_OUT != 0

    def remember(self, key: Hashable, taken: int) -> None:
        before = self._needed.get(key)
        self._needed[key] = (taken,) if before is None else (before[-1], taken)
        self._needed.move_to_end(key)
        self._ran_out.pop(key, None)
        while len(self._needed) > REMEMBERED_AT_MOST:
            forgotten = self._needed.popitem(last=False)[0]
            self._ran_out.pop(forgotten, None)
            self._solved.discard(forgotten)

    def solved_all(self, key: Hashable) -> bool:
        """Whether the last solve of ``key`` was seen to end with every sample within tolerance."""
        return key in self._solved

    def note_solved(self, key: Hashable, solved: Optional[bool]) -> None:
        if solved:
            self._solved.add(key)
        else:
            self._solved.discard(key)

    def mark_ran_out(self, key: Hashable) -> None:
        if key in self._ran_out or len(self._ran_out) < REMEMBERED_AT_MOST:
            self._ran_out[key] = self._ran_out.get(key, 0) + 1


class StopChecks:
    """The looks of one solve on the accelerator path.

    Each look is one host read: whether any sample is still active, and the largest ratio of an
    active sample's residual to its tolerance (its excess), read together (with the excess at
    the start, at the first look, to measure the rate).

    Args:
        first: the iteration count of the first look (0: at the initial iterate; ``math.inf``: none).
        once: look only once (the last solve of this key ran out of iterations: an unconverged
            solve would otherwise read every few iterations to its end).
    """

    def __init__(self, first: float, once: bool = False) -> None:
        self._schedule = CheckSchedule(first=max(0, first))
        self._once = once
        self._start: Optional[Tensor] = None
        self.looks = 0
        self.needed: Optional[int] = None  # known once a look found every sample done ...
        self.all_solved: Optional[bool] = None  # ... and whether each met its tolerance

    def start(self, excess: Tensor) -> None:
        """The excess at the initial iterate (a device scalar, read at the first look)."""
        self._start = excess

    def due(self, taken: int) -> bool:
        """Whether to look after ``taken`` iterations."""
        return self._schedule.due(taken)

    def look(self, taken: int, active: Tensor, excess: Tensor, needed: Optional[Tensor] = None,
             unsolved: Optional[Tensor] = None) -> bool:
        """Read whether every sample is done (one host read); plan the next look if not.

        Read in the same host read, both optional device scalars: ``needed``, the most iterations any
        sample has needed so far — once every sample is done, where the next solve of the same key
        should look first (:attr:`needed`); ``unsolved``, whether any sample is done without meeting
        its tolerance (:attr:`all_solved`, which lets a chain of solvers stop without a read).
        """
        needed = excess.new_full((), -1) if needed is None else needed
        unsolved = excess.new_full((), -1) if unsolved is None else unsolved
        values = [active.any().to(excess.dtype), excess.reshape(()), needed.reshape(()).to(excess.dtype),
                  unsolved.reshape(()).to(excess.dtype)]
        if self._start is not None and taken > 0:
            values.append(self._start.reshape(()))
        read = torch.stack(values).tolist()
        self.looks += 1
        if len(read) == 5:  # the start as the first point of the rate
            self._schedule.seen(0, read[4])
            self._start = None
        if not read[0]:
            self.needed = int(read[2]) if read[2] >= 0 else None
            self.all_solved = read[3] == 0 if read[3] >= 0 else None
            return True
        self._schedule.seen(taken, read[1])
        if self._once:
            self._schedule.next = math.inf  # run to the end without another read
        return False


def solve_key(owner: object, like: Tensor) -> tuple:
    """What makes "the same solve" from one step to the next: its block (F) and the state's shape."""
    return id(owner), tuple(like.shape)


class RemembersIterations:
    """Mixin of the solvers: the accelerator path's looks, placed by the counts of the last solves.

    ``owner`` names the solve's block (its F); the key adds the state's shape, so a block's main
    pass and its perturbed passes of another batch size are remembered apart.
    """

    @property
    def iteration_memory(self) -> IterationMemory:
        """The iterations each of this solver's solves needed last time."""
        memory = self.__dict__.get("_iteration_memory")
        if memory is None:
            memory = self.__dict__["_iteration_memory"] = IterationMemory()
        return memory

    def stop_checks(self, owner: object, like: Tensor) -> Optional[StopChecks]:
        """The looks of a solve on the accelerator path (``None`` on the CPU path)."""
        if not on_accelerator_path(like):
            return None
        key, memory = solve_key(owner, like), self.iteration_memory
        if memory.blind(key):
            return StopChecks(math.inf)
        return StopChecks(memory.expected(key), once=memory.ran_out(key))

    def remember(self, owner: object, like: Tensor, taken: int, checks: Optional[StopChecks] = None) -> None:
        """After a solve of ``taken`` iterations on the accelerator path: the next one of the same key
        looks first where this one's last sample was done (``checks.needed``). A solve that ended
        unseen (at ``max_iter``) keeps the counts as they were and marks the key
        (:meth:`IterationMemory.mark_ran_out`): its next solves run blind, looking once in a while."""
        if not on_accelerator_path(like):
            return
        key, memory = solve_key(owner, like), self.iteration_memory
        memory.note_solved(key, None if checks is None else checks.all_solved)
        if checks is None:
            memory.remember(key, taken)
        elif checks.needed is not None:
            memory.remember(key, checks.needed)
        else:
            memory.mark_ran_out(key)


__all__ = ["FIRST_LOOK", "IterationMemory", "LOOK_EVERY_WHEN_RAN_OUT", "REMEMBERED_AT_MOST", "RemembersIterations", "StopChecks",
           "solve_key"]
