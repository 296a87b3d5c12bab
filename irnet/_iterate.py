"""Per-sample bookkeeping of the solver loops, and where a loop on the accelerator path looks.

Every solver loop in irnet (the forward solvers and the Neumann adjoint) treats each sample on
its own: a sample is frozen at its first iterate within tolerance, keeps its lowest-residual
iterate if it never gets there, counts the iterations that served it, and (Neumann) is stopped
once its residual has gone ``patience`` steps without a new low. Done after every iteration,
that is eight to twelve small tensor operations; on the toy sets' states each costs a few
microseconds, together a large share of an evaluation of F.

So a loop only records each iteration's iterate and residual norms (:class:`Record`) and hands
a few iterations at once to :func:`settle`, which replays them in a dozen vectorised
operations. The answers, residuals, counts and stall counters are exactly those of settling
after every iteration; the only difference is that the loop may run a few iterations past the
point where every sample is done (:func:`settle_schedule`). The recorded iterates live in the
rows of a scratch buffer kept between solves (:func:`take_scratch`): a solver computes an
iterate straight into its row where it can (:meth:`Record.slot`), else it is copied there. A
list of fresh tensors would make the allocator map new pages for every solve, and the page
faults cost more than the copies.

On a GPU every look at a residual waits for the device, so a loop there cannot test after
every iteration as it does on the CPU. It runs on blindly and looks where the solve is
predicted to end: first after as many iterations as the same solve (the same block) needed
last time — between two optimiser steps that count rarely changes — then, if some sample is
still active, where its residual, falling at the rate seen so far, is predicted to meet its
tolerance (:class:`CheckSchedule`). A solve whose need did not change reads once and takes
exactly the iterations the CPU path takes; one that needs more reads twice or so.
:class:`IterationMemory` keeps the counts per solver object and key (the block's F and the
state's shape), :class:`StopChecks` makes one solve's looks, and the solvers get both from
the mixin :class:`RemembersIterations`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Hashable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from irnet._misc import per_sample
from irnet.device_path import on_accelerator_path

# settlements
SETTLE_AT_MOST_ON_CPU = 32  # iterations recorded between settlements on the CPU ...
RECORD_BYTES_ON_CPU = 16 * 2**20  # ... and at most this much memory of recorded iterates
SETTLE_AT_MOST_ON_ACCELERATOR = 32  # on a GPU: the same (settlements read nothing) ...
RECORD_BYTES_ON_ACCELERATOR = 256 * 2**20  # ... fewer if the recorded iterates would exceed this
SETTLE_ONE_BY_ONE = 2  # this few iterations are settled one at a time (cheaper than the replay)
ONE_BY_ONE_FIRST = 4  # on the CPU, a solve's first iterations are settled as they come
# scratch buffers
SCRATCH_KEPT_BYTES = 64 * 2**20  # a scratch buffer larger than this is freed after its solve
SCRATCH_BUFFERS = 8  # scratch buffers kept between solves (one per shape, dtype and device in use)
# looks on the accelerator path
CHECK_AT_MOST_EVERY = 8  # iterations between two looks at the residuals (CheckSchedule), at most
FIRST_LOOK = 1  # where a solve without a remembered count first looks
LOOK_EVERY_WHEN_RAN_OUT = 8  # a key whose solves keep running out looks once in this many solves
REMEMBERED_AT_MOST = 4096  # the most keys an IterationMemory keeps (least recently used go first)

Tolerance = Union[Tensor, float]  # one for all samples, or one per sample


# -- per-sample progress and its settlement --------------------------------------------------------


class Progress(NamedTuple):
    """Where each sample of a solve stands after the iterations settled so far."""

    best: Tensor  # its answer so far: the first iterate within tolerance, else the lowest-residual
    best_res: Tensor  # the residual norm of ``best``
    active: Tensor  # still iterating: not converged, not non-finite, not stalled
    iterations: Tensor  # iterations that served it (taken while it was active)
    stalled: Tensor  # iterations since its last new lowest residual (used with ``patience``)


def start(iterate: Tensor, res: Tensor, tol: Tolerance) -> Progress:
    """The progress at the initial iterate, whose residual norms are ``res``."""
    zeros = torch.zeros_like(res, dtype=torch.long)
    return Progress(iterate, res, res > tol, zeros, zeros)


def settle_schedule(iterate: Tensor) -> tuple[int, bool]:
    """``(every, quick_exit)`` for a solve of iterates like ``iterate``: settle every ``every``
    iterations, and with ``quick_exit`` also as soon as no sample's current residual is above
    tolerance.

    On the CPU path a settlement costs as much as a few evaluations of a small F, so it comes rarely
    (at most every ``SETTLE_AT_MOST_ON_CPU`` iterations, within ``RECORD_BYTES_ON_CPU`` of recorded
    iterates), and the quick test, read at every iteration, ends a converged solve at once. On the
    accelerator path every read of a flag waits for the device: settlements read nothing, and the
    loop looks only where :class:`StopChecks` says.
    """
    size = max(1, iterate.numel() * iterate.element_size())
    if on_accelerator_path(iterate):
        every = min(SETTLE_AT_MOST_ON_ACCELERATOR, RECORD_BYTES_ON_ACCELERATOR // size)
        return max(1, every), False
    return max(1, min(SETTLE_AT_MOST_ON_CPU, RECORD_BYTES_ON_CPU // size)), True


def settle(
    progress: Progress,
    iterates: Tensor,
    norms: Union[Tensor, Sequence[Tensor]],
    tol: Tolerance,
    patience: Optional[int] = None,
) -> Progress:
    """Apply the iterations with ``iterates[j]`` (stacked) and residual norms ``norms[j]`` (stacked
    or a list) to ``progress``.

    Equivalent to, for each iteration in order and each sample: if the sample is active, count the
    iteration, take the iterate if its residual is below the best so far (a NaN residual never is),
    and deactivate the sample if its residual is not above ``tol`` (met or non-finite) or, with
    ``patience``, if ``patience`` iterations in a row brought no new low.
    """
    if len(norms) <= SETTLE_ONE_BY_ONE:
        for iterate, res in zip(iterates, norms):
            progress = settle_one(progress, iterate, res, tol, patience)
        return progress
    norm_stack = norms if isinstance(norms, Tensor) else torch.stack(list(norms))
    count, batch = norm_stack.shape
    steps = torch.arange(count, device=norm_stack.device).unsqueeze(1)
    stops = ~(norm_stack > tol)  # met, or not finite
    stalled = progress.stalled
    if patience is None:
        first_stop = torch.where(stops, steps, count).amin(0)
        served = progress.active & (steps <= first_stop)
        # the lowest served residual (the first of equals), if below the best so far; NaN never is
        lowest, index = torch.where(served, norm_stack.nan_to_num(nan=math.inf), math.inf).min(0)
        took = lowest < progress.best_res
        best_res = torch.where(took, lowest, progress.best_res)
    else:
        comparable = norm_stack.nan_to_num(nan=math.inf)
        best_before = torch.cat(
            [progress.best_res.nan_to_num(nan=math.inf).unsqueeze(0), comparable]
        ).cummin(0)
        new_low = comparable < best_before.values[:-1]
        last_low = torch.where(new_low, steps, -1).cummax(0).values
        stalled_at = torch.where(last_low >= 0, steps - last_low, progress.stalled + steps + 1)
        first_stop = torch.where(stops | (stalled_at >= patience), steps, count).amin(0)
        served = progress.active & (steps <= first_stop)
        # the last new low is the lowest
        last_take = torch.where(served & new_low, steps, -1).amax(0)
        took, index, stalled = last_take >= 0, last_take.clamp_min(0), stalled_at[-1]
        best_res = torch.where(
            took, norm_stack[index, torch.arange(batch, device=index.device)], progress.best_res
        )
    best = torch.where(
        per_sample(took, progress.best),
        iterates[index, torch.arange(batch, device=index.device)],
        progress.best,
    )
    return Progress(
        best,
        best_res,
        progress.active & (first_stop == count),
        progress.iterations + served.sum(0),
        stalled,
    )


def settle_one(
    progress: Progress, iterate: Tensor, res: Tensor, tol: Tolerance, patience: Optional[int] = None
) -> Progress:
    """:func:`settle` for one iteration, step by step (fewer operations than the replay)."""
    took = progress.active & (res < progress.best_res)
    still = progress.active & (res > tol)
    stalled = progress.stalled
    if patience is not None:
        stalled = torch.where(took, 0, stalled + 1)
        still = still & (stalled < patience)
    return Progress(
        torch.where(per_sample(took, progress.best), iterate, progress.best),
        torch.where(took, res, progress.best_res),
        still,
        progress.iterations + progress.active,
        stalled,
    )


# -- recording a solve's iterations ----------------------------------------------------------------


class Record:
    """The iterations of a solve since its last settlement, and its :class:`Progress`.

    ``add`` each iteration's iterate and residual norms; it settles when the schedule says so
    (:func:`settle_schedule`, or ``last``) and answers whether every sample is then done. The
    first few iterations of a solve on the CPU are settled one by one, as they come: most solves
    of a trained network end within them, and for so few the replay costs more than it saves.
    With ``checks`` (the accelerator path) a settlement reads nothing; the record looks (one host
    read) only where ``checks`` says, and not at all at the last iteration.

    Args:
        progress: the progress at the initial iterate (:func:`start`).
        tol: the tolerance on the residual norms.
        patience: stop a sample after this many iterations without a new lowest residual.
        checks: where to look on the accelerator path (:class:`StopChecks`).
    """

    def __init__(
        self,
        progress: Progress,
        tol: Tolerance,
        patience: Optional[int] = None,
        checks: Optional[StopChecks] = None,
    ) -> None:
        self.progress, self.tol, self.patience = progress, tol, patience
        self.every, self.quick_exit = settle_schedule(progress.best)
        self.checks = checks  # the accelerator path's looks (None: look at every settlement)
        self.taken = 0  # iterations added
        self._counted_before = progress.iterations  # the counts before the first iteration
        self._one_by_one = ONE_BY_ONE_FIRST if self.quick_exit else 0
        self._buffer: Optional[Tensor] = None  # scratch for iterates without a graph (lazily)
        self._iterates: list[Tensor] = []  # iterates with a graph (unrolled), kept as they are
        self._norms: list[Tensor] = []
        self._slots: dict[int, Tensor] = {}  # rows handed out by ``slot``, not yet added
        self._live_row = -1  # the row of the last iterate added (a solver may still read it)

    def slot(self, like: Tensor, ahead: int) -> Optional[Tensor]:
        """Where to compute the iterate that the ``ahead``-th ``add`` from now will record (0: the
        next), so that ``add`` finds it in place instead of copying it; None where it would be kept
        as it is (one by one, or with a graph). Never a row the solver may still read from."""
        if self._one_by_one > ahead or like.requires_grad:
            return None
        row = 0 if self._one_by_one else len(self._norms) + ahead
        if row == self._live_row or row in self._slots:
            return None
        self._slots[row] = view = self._scratch(like)[row]
        return view

    def add(self, iterate: Tensor, norms: Tensor, last: bool = False) -> bool:
        """Record one iteration; returns True once no sample is active (the loop should stop)."""
        if self._one_by_one:
            self._one_by_one -= 1
            self.progress = settle_one(self.progress, iterate, norms, self.tol, self.patience)
            return not bool(self.progress.active.any())
        if iterate.requires_grad or self._iterates:  # with a graph (unrolled): keep the tensors
            if not self._iterates and self._norms:  # rows recorded before the first with a graph
                self._iterates = list(self._buffer[: len(self._norms)].clone())
            self._iterates.append(iterate)
        else:
            row = len(self._norms)
            if self._slots.pop(row, None) is not iterate:  # not computed in place: copy it there
                self._slots = {r: v for r, v in self._slots.items() if v is not iterate}
                self._scratch(iterate)[row].copy_(iterate)
            self._live_row = row
        self._norms.append(norms)
        self.taken += 1
        if self.checks is not None:
            return self._add_without_reads(norms, last)
        if not (
            last
            or len(self._norms) == self.every
            or (self.quick_exit and not self._any_above(norms))
        ):
            return False
        self._settle()
        return not bool(self.progress.active.any())

    def done_at_start(self) -> bool:
        """Whether every sample is done at the initial iterate (on the accelerator path: only if
        ``checks`` looks there)."""
        if self.checks is None:
            return not bool(self.progress.active.any())
        excess = excess_of(self.progress.active, self.progress.best_res, self.tol)
        self.checks.start(excess)
        return self.checks.due(0) and self._look(excess)

    def _add_without_reads(self, norms: Tensor, last: bool) -> bool:
        if last:  # the loop ends anyway: nothing to read
            self._settle()
            return True
        if self.checks.due(self.taken):
            self._settle()
            return self._look(excess_of(self.progress.active, norms, self.tol))
        if len(self._norms) == self.every:
            self._settle()
        return False

    def _look(self, excess: Tensor) -> bool:
        needed = (self.progress.iterations - self._counted_before).amax()
        unsolved = (~(self.progress.best_res <= self.tol)).any()  # NaN is unsolved
        return self.checks.look(self.taken, self.progress.active, excess, needed, unsolved)

    def close(self) -> Progress:
        """Settle what is left, hand the scratch buffer back and return the final progress."""
        if self._norms:
            self._settle()
        if self._buffer is not None:
            give_back_scratch(self._buffer)
            self._buffer = None
        return self.progress

    def _scratch(self, like: Tensor) -> Tensor:
        # ``every`` rows, one for an iterate computed ahead, one for a slot that a settlement
        # displaced
        if self._buffer is None:
            self._buffer = take_scratch(like, self.every + 2)
        return self._buffer

    def _settle(self) -> None:
        iterates = (
            torch.stack(self._iterates) if self._iterates else self._buffer[: len(self._norms)]
        )
        self.progress = settle(self.progress, iterates, self._norms, self.tol, self.patience)
        self._iterates, self._norms = [], []

    def _any_above(self, norms: Tensor) -> bool:
        # One reduction and one read; a NaN anywhere answers "none above", and the settlement
        # sorts it out.
        if isinstance(self.tol, Tensor):
            return bool((norms > self.tol).any())
        return float(norms.detach().amax()) > self.tol


def excess_of(active: Tensor, res: Tensor, tol: Tolerance) -> Tensor:
    """The largest ``res / tol`` over the active samples, a device scalar (0 if none is active)."""
    ratio = res / tol
    return torch.where(active, ratio, torch.zeros_like(ratio)).amax()


# -- scratch buffers kept between solves -----------------------------------------------------------

_SCRATCH: "OrderedDict[tuple, Tensor]" = OrderedDict()


def _scratch_key(shape: Sequence[int], like: Tensor) -> tuple:
    return tuple(shape), like.dtype, like.device, torch.is_inference_mode_enabled()


def take_scratch(like: Tensor, count: int) -> Tensor:
    """A buffer for ``count`` tensors like ``like``, taken out of the cache while in use (a solve
    nested in F gets its own)."""
    shape = (count, *like.shape)
    buffer = _SCRATCH.pop(_scratch_key(shape, like), None)
    return buffer if buffer is not None else like.new_empty(shape)


def give_back_scratch(buffer: Tensor) -> None:
    if buffer.numel() * buffer.element_size() > SCRATCH_KEPT_BYTES:
        return  # large states: the allocation is cheap beside their solve, the memory is not
    _SCRATCH[_scratch_key(buffer.shape, buffer)] = buffer
    while len(_SCRATCH) > SCRATCH_BUFFERS:
        _SCRATCH.popitem(last=False)


# -- where a loop on the accelerator path looks ----------------------------------------------------


class CheckSchedule:
    """When a loop that computes its residual norms a few iterations at a time looks at them next.

    A look costs a host read, so it comes where the worst sample is predicted to meet its
    tolerance: at the loop's first two iterations, then after as many iterations as the largest
    ratio of residual to tolerance, falling at the rate seen between the last two looks, needs to
    reach 1 — at most :data:`CHECK_AT_MOST_EVERY` apart, and at the next iteration once it is not
    falling or not finite. A linearly converging solve stops at or just after its last needed
    iteration; a long one reads rarely.
    """

    def __init__(self, first: int = 0) -> None:
        self.next = first  # the first look: where the loop starts
        self._last: Optional[tuple[int, float]] = None

    def due(self, iteration: int) -> bool:
        return iteration >= self.next

    def seen(self, iteration: int, excess: float) -> None:
        """Record a look at ``iteration``: the largest residual / tolerance was ``excess``."""
        self.next = iteration + self._wait(iteration, excess)
        self._last = (iteration, excess)

    def _wait(self, iteration: int, excess: float) -> int:
        if self._last is None:
            return 1
        before_iteration, before = self._last
        if not (0 < excess < before < math.inf):
            return CHECK_AT_MOST_EVERY if excess >= before else 1
        log_rate = math.log(excess / before) / (iteration - before_iteration)
        return max(1, min(CHECK_AT_MOST_EVERY, math.ceil(math.log(1 / excess) / log_rate)))


class IterationMemory:
    """The iterations each solve needed the last two times, by key (least recently used forgotten).

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
        """Where to look first: the larger of the last two counts (:data:`FIRST_LOOK` for a new
        key)."""
        return max(self._needed.get(key, (FIRST_LOOK,)))

    def ran_out(self, key: Hashable) -> bool:
        """Whether the last solve of ``key`` ran to ``max_iter`` without a look seeing it done."""
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
        first: the iteration count of the first look (0: at the initial iterate; ``math.inf``:
            none).
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

    def look(
        self,
        taken: int,
        active: Tensor,
        excess: Tensor,
        needed: Optional[Tensor] = None,
        unsolved: Optional[Tensor] = None,
    ) -> bool:
        """Read whether every sample is done (one host read); plan the next look if not.

        Read in the same host read, both optional device scalars: ``needed``, the most iterations
        any sample has needed so far — once every sample is done, where the next solve of the same
        key should look first (:attr:`needed`); ``unsolved``, whether any sample is done without
        meeting its tolerance (:attr:`all_solved`, which lets a chain of solvers stop without a
        read).
        """
        needed = excess.new_full((), -1) if needed is None else needed
        unsolved = excess.new_full((), -1) if unsolved is None else unsolved
        values = [
            active.any().to(excess.dtype),
            excess.reshape(()),
            needed.reshape(()).to(excess.dtype),
            unsolved.reshape(()).to(excess.dtype),
        ]
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
    """What makes "the same solve" from one step to the next: its block (F), the state's shape."""
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

    def remember(
        self, owner: object, like: Tensor, taken: int, checks: Optional[StopChecks] = None
    ) -> None:
        """After a solve of ``taken`` iterations on the accelerator path: the next one of the same
        key looks first where this one's last sample was done (``checks.needed``). A solve that
        ended unseen (at ``max_iter``) keeps the counts as they were and marks the key
        (:meth:`IterationMemory.mark_ran_out`): its next solves run blind, looking once in a
        while."""
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
