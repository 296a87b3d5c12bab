"""The solver loops settle their per-sample bookkeeping a few iterations at a time
(irnet._iterate): the answers and statistics must be exactly those of settling after
every iteration, whatever the schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import irnet._iterate as progress_module
from irnet import ImplicitResidualBlock
from irnet._iterate import Progress, settle, start
from irnet.device_path import forced_path
from irnet.linear import Neumann
from irnet.linear.base import AdjointOperator
from irnet.solvers import Anderson, FixedPoint, FixedPointProblem


def settle_one_by_one(progress: Progress, iterates, norms, tol, patience=None) -> Progress:
    """The reference: the bookkeeping the loops did after every iteration, before batching it."""
    best, best_res, active, iterations, stalled = progress
    for y, res in zip(iterates, norms):
        iterations = iterations + active.long()
        take = active & (res < best_res)
        best = torch.where(take.view(-1, *[1] * (best.dim() - 1)), y, best)
        best_res = torch.where(take, res, best_res)
        stalled = torch.where(take, 0, stalled + 1)
        active = active & (res > tol)
        if patience is not None:
            active = active & (stalled < patience)
    return Progress(
        best, best_res, active, iterations, stalled if patience is not None else progress.stalled
    )


def _norms(count: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Residual norms that fall, rise, tie, stall and turn NaN, on a grid (so that ties occur)."""
    norms = torch.randint(0, 12, (count, batch), generator=generator).double() / 4
    norms[:, 0] = torch.linspace(3, 0, count)  # falls steadily, meets the tolerance near the end
    norms[count // 2 :, 1] = math.nan  # turns non-finite
    norms[:, 2] = 2.0  # never improves: stalls
    norms[1, 3] = norms[4, 3] = -1.0  # below tolerance at once (frozen at its second iterate)
    return list(norms)


@pytest.mark.parametrize("patience", [None, 3])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 16])
def test_settling_in_chunks_is_settling_after_every_iteration(patience, chunk):
    generator = torch.Generator().manual_seed(chunk)
    batch, count, tol = 9, 16, 0.3
    norms = _norms(count, batch, generator)
    iterates = [torch.randn(batch, 2, 3, generator=generator, dtype=torch.float64) for _ in norms]
    initial = start(
        torch.zeros(batch, 2, 3, dtype=torch.float64),
        torch.full((batch,), 2.5, dtype=torch.float64),
        tol,
    )
    expected = settle_one_by_one(initial, iterates, norms, tol, patience)
    settled = initial
    for i in range(0, count, chunk):
        settled = settle(
            settled, torch.stack(iterates[i : i + chunk]), norms[i : i + chunk], tol, patience
        )
    for got, want in zip(settled[:4], expected[:4]):
        assert torch.equal(got, want)
    # the stall counter matters only while a sample is active (the reference keeps counting after)
    assert torch.equal(settled.stalled[expected.active], expected.stalled[expected.active])
    assert (
        not expected.active[[0, 1, 3]].any() and expected.iterations.min() < count
    )  # the cases occurred
    if patience is not None:
        assert (
            not expected.active[2] and expected.iterations[2] == patience + 1
        )  # one new low, then the stall


class _Tanh(nn.Module):
    def __init__(self, dim: int = 4, scale: float = 0.9) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim).double()
        with torch.no_grad():
            self.lin.weight.mul_(scale)

    def forward(self, y):
        return torch.tanh(self.lin(y))


@pytest.mark.parametrize(
    "solver",
    [FixedPoint(atol=1e-9, max_iter=60), Anderson(atol=1e-9, max_iter=60)],
    ids=["FixedPoint", "Anderson"],
)
def test_a_blocks_answers_and_statistics_do_not_depend_on_the_schedule(monkeypatch, solver):
    torch.manual_seed(0)
    F = _Tanh()
    x = torch.randn(16, 4, dtype=torch.float64)
    x[:4] *= 0.01  # some samples converge much earlier than others
    results = []
    # (1, …): the shared loop, settled after every iteration; FixedPoint's rows loop otherwise,
    # looking at its residuals at most every ``look`` iterations (Anderson: the shared loop)
    for schedule, look, first in [
        ((1, False), 8, 4),
        ((1, True), 8, 4),
        ((2, True), 1, 0),
        ((3, False), 3, 4),
        ((8, True), 8, 1),
        ((60, True), 2, 0),
    ]:
        monkeypatch.setattr(progress_module, "settle_schedule", lambda like, s=schedule: s)
        monkeypatch.setattr(progress_module, "CHECK_AT_MOST_EVERY", look)
        monkeypatch.setattr(progress_module, "ONE_BY_ONE_FIRST", first)
        block = ImplicitResidualBlock(F, theta=0.8, solver=solver)
        xx = x.clone().requires_grad_()
        y = block(xx)
        (grad,) = torch.autograd.grad(y.square().sum(), xx)
        results.append((y, grad, block.forward_stats))
    y1, g1, s1 = results[0]
    assert s1.iterations.min() < s1.iterations.max() and bool(s1.converged.all())
    for y, grad, stats in results[1:]:
        assert torch.equal(y, y1) and torch.equal(grad, g1)
        for field in ("iterations", "residual", "converged", "diverged"):
            assert torch.equal(getattr(stats, field), getattr(s1, field))


def test_neumann_answers_and_stalls_do_not_depend_on_the_schedule(monkeypatch):
    torch.manual_seed(1)
    F = _Tanh(dim=5, scale=4.0)
    y = torch.randn(12, 5, dtype=torch.float64)
    y[:6] *= (
        20.0  # tanh saturated: a small Jacobian, the series converges; near 0 it grows or stalls
    )
    y[6:] *= 0.01
    operator = AdjointOperator(F, y, theta=1.0)
    b = torch.randn(12, 5, dtype=torch.float64)
    results = []
    # (1, …): term by term; else the rows loop (neumann_rows) after ``first`` terms one by one
    for schedule, look, first in [
        ((1, False), 8, 4),
        ((1, True), 8, 4),
        ((2, True), 1, 0),
        ((4, True), 3, 4),
        ((7, False), 8, 1),
        ((80, True), 5, 0),
    ]:
        monkeypatch.setattr(progress_module, "settle_schedule", lambda like, s=schedule: s)
        monkeypatch.setattr(progress_module, "CHECK_AT_MOST_EVERY", look)
        monkeypatch.setattr(progress_module, "ONE_BY_ONE_FIRST", first)
        results.append(Neumann(rtol=1e-8, max_iter=80, patience=4).solve(operator, b))
    g1, s1 = results[0]
    assert bool(s1.diverged.any()) and bool(s1.converged.any())  # both kinds of sample occurred
    for g, stats in results[1:]:
        assert torch.equal(g, g1)
        for field in ("iterations", "residual", "converged", "diverged"):
            assert torch.equal(getattr(stats, field), getattr(s1, field))


def test_the_record_stays_within_its_memory_budget(monkeypatch):
    from irnet._iterate import _SCRATCH, settle_schedule

    with forced_path("cpu"):
        assert settle_schedule(torch.empty(51, 4)) == (
            32,
            True,
        )  # small states: a replay every 32 at most
        assert settle_schedule(torch.empty(2**21)) == (
            2,
            True,
        )  # 8 MiB iterates: 16 MiB of them at once
        assert settle_schedule(torch.empty(2**25)) == (1, True)  # larger: one at a time
    with forced_path("accelerator"):  # no quick test (a host read); 256 MiB of iterates at most
        assert settle_schedule(torch.empty(51, 4)) == (32, False)
        assert settle_schedule(torch.empty(2**25)) == (2, False)
    # a scratch buffer over SCRATCH_KEPT_BYTES is freed after its solve; smaller ones are kept
    _SCRATCH.clear()
    monkeypatch.setattr(progress_module, "SCRATCH_KEPT_BYTES", 1024)
    block = ImplicitResidualBlock(_Tanh(), theta=0.8, solver=FixedPoint(atol=1e-12, max_iter=60))
    block(torch.randn(16, 4, dtype=torch.float64))
    assert (
        block.forward_stats.iterations.max() > 8 and not _SCRATCH
    )  # the record was used, then dropped
    monkeypatch.setattr(progress_module, "SCRATCH_KEPT_BYTES", 2**20)
    block(torch.randn(16, 4, dtype=torch.float64))
    assert len(_SCRATCH) == 1


class _Counted(nn.Module):
    """``F(y) = rate · y``, counting its calls; ``blow_up`` overflows to NaN on the last sample."""

    def __init__(self, rate: float, blow_up: bool = True) -> None:
        super().__init__()
        self.rate, self.blow_up, self.calls = rate, blow_up, 0

    def forward(self, y):
        self.calls += 1
        out = self.rate * y
        if self.blow_up:
            out[-1] = torch.exp(1e3 * y[-1].abs())  # overflows: inf, then NaN (inf − inf)
        return out


@pytest.mark.parametrize("max_iter", [1, 7, 40])
def test_the_fixed_point_rows_loop_is_the_iteration_by_iteration_loop(monkeypatch, max_iter):
    # Samples that converge at the start, converge later, never converge (max_iter) and blow up.
    y0 = torch.randn(6, 3, dtype=torch.float64)
    y0[0] = 0.0  # r(y0) = 0: converged before any iteration
    problem = FixedPointProblem(_Counted(0.5), y0 * 0.1, theta=1.0)
    results = []
    for schedule, look, first in [
        ((1, False), 8, 4),
        ((2, True), 1, 0),
        ((5, True), 3, 2),
        ((64, True), 8, 0),
        ((64, True), 8, 4),
    ]:
        monkeypatch.setattr(progress_module, "settle_schedule", lambda like, s=schedule: s)
        monkeypatch.setattr(progress_module, "CHECK_AT_MOST_EVERY", look)
        monkeypatch.setattr(progress_module, "ONE_BY_ONE_FIRST", first)
        results.append(FixedPoint(atol=1e-6, max_iter=max_iter).solve(problem, y0))
    y1, s1 = results[0]
    assert s1.iterations[0] == 0 and bool(s1.converged[0]) and bool(s1.diverged[-1])
    for y, stats in results[1:]:
        assert torch.equal(y, y1)
        for field in ("iterations", "residual", "converged", "diverged"):
            assert torch.equal(getattr(stats, field), getattr(s1, field))


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.7, 0.9])
def test_the_rows_loop_stops_within_an_iteration_of_a_linear_convergence(monkeypatch, rate):
    # The residuals of y ← c + rate·y fall by ``rate`` per step: the looks predicted from
    # that rate end the solve at most one evaluation after the iteration-by-iteration loop.
    monkeypatch.setattr(
        progress_module, "ONE_BY_ONE_FIRST", 0
    )  # the rows loop from the first iteration
    F = _Counted(rate, blow_up=False)
    y0 = torch.randn(5, 3, dtype=torch.float64)
    problem = FixedPointProblem(F, torch.zeros_like(y0), theta=1.0)
    y, stats = FixedPoint(atol=1e-9, max_iter=500).solve(problem, y0)
    assert bool(stats.converged.all())
    needed = int(stats.iterations.max()) + 1  # the evaluations that reveal the last residual
    assert needed <= F.calls <= needed + 1
