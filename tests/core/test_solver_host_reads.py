"""Every forward solver × adjoint solver on the accelerator path, run and counted on the CPU.

On a GPU every host read waits for the device; the host-read budget of the accelerator path is one
read per solve (forward or adjoint), where the solve decides to stop, and none for a fixed-count
solve.
``forced_path("accelerator")`` runs the accelerator path here and :class:`helpers.sync.HostReads`
counts its reads. For each pair, on a small contractive block solved twice (the second time the
solvers know where the same solve ended last time):

(a) the answers, per-sample counts and residuals are the CPU path's: counts, flags and the
    finishing method exactly; answers, gradients and residuals to float64 round-off (on this
    CPU they are bit for bit the same; a GPU's kernels may round the line search's stacked
    trials or GMRES's wider correction differently);
(b) the repeated forward solve and the repeated adjoint solve read at most once each (a Fallback
    at most once per link it runs, and twice when its first link solves every sample: that link's
    look, then the read that stops the chain);
(c) the repeated solve evaluates F, and the adjoint applies its operator, at most once more than
    on the CPU path.

Then the pieces: GMRES over restarts and changing needs, the stacked line search (with
backtracking, chunks and held dropout), the Fallback's hand-offs, and fixed-count solves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import pytest
import torch
from torch import Tensor, nn

from helpers.problems import DTYPE, LINEAR_SOLVERS, SOLVERS, LinearF, contraction, mlp
from helpers.sync import HostReads
from irnet import ImplicitResidualBlock
from irnet.device_path import forced_path
from irnet.linear import GMRES, AdjointOperator, Direct, JacobianFree, Neumann, Phantom
from irnet.solvers import (
    Anderson,
    Broyden,
    Fallback,
    FixedPoint,
    FixedPointProblem,
    GradientDescent,
)
from irnet.solvers import _line_search as line_search_module
from irnet.stats import SolverStats

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-10
PATHS = ("cpu", "accelerator")
pairs = pytest.mark.parametrize(
    "solver, linear", [(s, lin) for s in SOLVERS for lin in LINEAR_SOLVERS]
)


class CountedF(nn.Module):
    """Wraps F and counts its evaluations."""

    def __init__(self, F: nn.Module) -> None:
        super().__init__()
        self.F, self.calls = F, 0

    def forward(self, y: Tensor) -> Tensor:
        self.calls += 1
        return self.F(y)


class CountedLinks:
    """Counts the links of a Fallback that run (their ``solve`` calls)."""

    def __init__(self, solver) -> None:
        self.count = 0
        for link in getattr(solver, "solvers", ()):
            link.solve = self._counted(link.solve)

    def _counted(self, solve):
        def counted(*args, **kwargs):
            self.count += 1
            return solve(*args, **kwargs)

        return counted


@dataclass(frozen=True)
class Run:
    """The second of two forward and backward passes of one block on one path."""

    y: Tensor
    grads: tuple[Tensor, ...]  # ∂L/∂x, then ∂L/∂γ for F's parameters
    forward: SolverStats
    backward: SolverStats
    forward_reads: int
    backward_reads: int
    F_calls: int  # in the forward pass
    products: int  # applications of the adjoint operator in backward
    links: int  # Fallback links run in the forward pass (0 for other solvers)
    report: str


def count_products(monkeypatch) -> list[int]:
    count = [0]
    vjp = AdjointOperator.vjp

    def counted(self, v):
        count[0] += 1
        return vjp(self, v)

    monkeypatch.setattr(AdjointOperator, "vjp", counted)
    return count


@functools.lru_cache(maxsize=None)
def run(solver: str, linear: str, path: str) -> Run:
    """Two forward and backward passes of a contractive block (θ = ½) on ``path``.

    Returns the second's results.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        products = count_products(monkeypatch)
        F = CountedF(mlp(n=3, width=6, lipschitz=0.8))
        forward = SOLVERS[solver](atol=TOL, max_iter=200)
        block = ImplicitResidualBlock(
            F, 0.5, forward, LINEAR_SOLVERS[linear](rtol=TOL, max_iter=200)
        )
        x = torch.randn(5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        w = torch.randn(5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
        for _ in range(2):
            xr = x.clone().requires_grad_()
            reads, links = HostReads(), CountedLinks(forward)
            F.calls = products[0] = 0
            with forced_path(path), reads.patched():
                with reads.counting():
                    y = block(xr)
                forward_reads, F_calls, report = reads.count, F.calls, reads.report()
                with reads.counting():
                    grads = torch.autograd.grad((y * w).sum(), [xr, *F.parameters()])
            for link in getattr(forward, "solvers", ()):
                del link.solve  # the class's own again
        return Run(
            y.detach(),
            tuple(grads),
            block.forward_stats,
            block.backward_stats,
            forward_reads,
            reads.count - forward_reads,
            F_calls,
            products[0],
            links.count,
            f"forward: {report}; both: {reads.report()}",
        )


def assert_same_stats(got: SolverStats, want: SolverStats) -> None:
    for field in fields(SolverStats):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if a is None or b is None:
            assert a is None and b is None, field.name
        elif a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=field.name)
        else:
            assert torch.equal(a, b), (field.name, a, b)


@pairs
def test_the_accelerator_path_gives_the_cpu_answers(solver, linear):
    cpu, accelerator = run(solver, linear, "cpu"), run(solver, linear, "accelerator")
    assert cpu.forward.converged.all() and cpu.backward.converged.all()
    torch.testing.assert_close(accelerator.y, cpu.y, rtol=1e-12, atol=1e-15)
    for got, want in zip(accelerator.grads, cpu.grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert_same_stats(accelerator.forward, cpu.forward)
    assert_same_stats(accelerator.backward, cpu.backward)


@pairs
def test_a_repeated_solve_reads_at_most_once_forward_and_once_backward(solver, linear):
    accelerator = run(solver, linear, "accelerator")
    solves = max(1, accelerator.links)  # a Fallback: one solve per link it ran
    assert accelerator.forward_reads <= solves, accelerator.report
    assert accelerator.backward_reads <= 1, accelerator.report
    if linear == "direct":
        assert accelerator.backward_reads == 0, accelerator.report


@pairs
def test_a_repeated_solve_evaluates_F_at_most_once_more_than_the_cpu_path(solver, linear):
    cpu, accelerator = run(solver, linear, "cpu"), run(solver, linear, "accelerator")
    assert accelerator.F_calls <= cpu.F_calls + 1, (accelerator.F_calls, cpu.F_calls)
    assert accelerator.products <= cpu.products + 1, (accelerator.products, cpu.products)


# -- fixed-count solves -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "linear",
    [Neumann(max_iter=8, fixed_count=True), Direct(), Phantom(steps=4), JacobianFree()],
    ids=lambda s: type(s).__name__,
)
def test_fixed_count_solves_read_nothing(linear):
    F = mlp(n=3, width=6, lipschitz=0.8)
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(max_iter=8, fixed_count=True), linear)
    x = torch.randn(5, 3, dtype=DTYPE, requires_grad=True)
    reads = HostReads()
    with forced_path("accelerator"), reads.patched(), reads.counting():
        for _ in range(2):  # the first solve too: nothing to learn
            block(x).square().sum().backward()
    assert reads.count == 0, reads.report()


# -- GMRES ------------------------------------------------------------------------------------


def linear_operator(n: int, batch: int, seed: int) -> AdjointOperator:
    A = contraction(n=n, radius=0.9, seed=seed)
    return AdjointOperator(
        LinearF(A, torch.zeros(n, dtype=DTYPE)), torch.randn(batch, n, dtype=DTYPE), 1.0
    )


def gmres_on(
    path: str, solver: GMRES, operator: AdjointOperator, b: Tensor
) -> tuple[Tensor, SolverStats, int]:
    reads = HostReads()
    with forced_path(path), reads.patched(), reads.counting():
        g, stats = solver.solve(operator, b)
    return g, stats, reads.count


@pytest.mark.parametrize("n, restart", [(4, 20), (30, 20), (30, 5), (8, 3)])
def test_gmres_over_restarts_reads_once_when_repeated(n, restart):
    operator, b = linear_operator(n, 6, seed=n), torch.randn(6, n, dtype=DTYPE)
    b[0] *= 1e-3  # the scale of b does not matter (relative tolerance)
    want, want_stats, _ = gmres_on(
        "cpu", GMRES(rtol=TOL, max_iter=200, restart=restart), operator, b
    )
    solver = GMRES(rtol=TOL, max_iter=200, restart=restart)
    reads = [gmres_on("accelerator", solver, operator, b) for _ in range(3)]
    for g, stats, _ in reads:
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-15)
        assert_same_stats(stats, want_stats)
    assert [count for *_, count in reads][1:] == [1, 1]
    if n > restart:
        assert (want_stats.iterations > restart).all(), "restarting was not exercised"


def test_gmres_answers_stay_the_cpu_paths_when_the_need_changes():
    # Remembered counts that are too short (more reads) or too long (wasted steps) change no answer.
    operator = linear_operator(30, 4, seed=0)
    easy, hard = torch.randn(4, 30, dtype=DTYPE), torch.randn(4, 30, dtype=DTYPE)
    solver = GMRES(rtol=1e-4, max_iter=200, restart=20)
    for rtol, b in [(1e-4, easy), (1e-11, hard), (1e-4, easy), (1e-11, hard)]:
        solver.rtol = rtol
        want, want_stats, _ = gmres_on(
            "cpu", GMRES(rtol=rtol, max_iter=200, restart=20), operator, b
        )
        got, stats, _ = gmres_on("accelerator", solver, operator, b)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        assert_same_stats(stats, want_stats)


def test_gmres_with_zero_right_hand_sides_looks_at_the_start_once_learned():
    operator, b = linear_operator(4, 3, seed=1), torch.zeros(3, 4, dtype=DTYPE)
    solver = GMRES(rtol=TOL)
    counts = [gmres_on("accelerator", solver, operator, b)[2] for _ in range(2)]
    g, stats, _ = gmres_on("accelerator", solver, operator, b)
    assert (
        torch.equal(g, torch.zeros_like(b))
        and stats.converged.all()
        and (stats.iterations == 0).all()
    )
    assert counts[1] == 1


def test_gmres_that_ran_out_of_iterations_reads_nothing_the_next_time():
    # The last solve took max_iter steps: the next one looks there first, at its last step, where
    # the solve ends without reading.
    operator, b = linear_operator(30, 4, seed=2), torch.randn(4, 30, dtype=DTYPE)
    solver = GMRES(rtol=1e-14, max_iter=6, restart=4)
    want, want_stats, _ = gmres_on("cpu", GMRES(rtol=1e-14, max_iter=6, restart=4), operator, b)
    for _ in range(2):
        got, stats, count = gmres_on("accelerator", solver, operator, b)
        assert_same_stats(stats, want_stats)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert not stats.converged.any() and count == 0


def test_gmres_takes_a_plain_callable_operator():
    # irnet.analysis.stability hands GMRES a plain function (no ``owner``): such solves share
    # one memory.
    A = contraction(n=6, radius=0.9, seed=4)
    b = torch.randn(3, 6, dtype=DTYPE)
    want, want_stats, _ = gmres_on("cpu", GMRES(rtol=TOL), lambda v: v - v @ A, b)
    solver = GMRES(rtol=TOL)
    for _ in range(2):
        got, stats, count = gmres_on("accelerator", solver, lambda v: v - v @ A, b)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        assert_same_stats(stats, want_stats)
    assert count == 1


# -- the line search --------------------------------------------------------------------------


def search_on(
    path: str, problem: FixedPointProblem, y: Tensor, step0: Tensor, max_backtracks: int = 10
):
    r, grad = problem.residual_and_gradient(y)
    slope = (grad * grad).sum(1)
    reads = HostReads()
    with forced_path(path), reads.patched(), reads.counting():
        found = line_search_module.line_search(
            problem, y, r, grad, slope, step0, max_backtracks=max_backtracks
        )
    return found, reads.count


def wiggly_problem() -> tuple[FixedPointProblem, Tensor]:
    """``F = 3 sin``: ½‖r‖² is far from quadratic along the gradient, so long steps backtrack."""

    class Sin(nn.Module):
        def forward(self, y):
            return 3 * torch.sin(y)

    x = torch.randn(6, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    return FixedPointProblem(Sin(), x, 1.0), x


@pytest.mark.parametrize("max_backtracks", [0, 3, 10])
@pytest.mark.parametrize(
    "stacked_bytes", [None, 1]
)  # all trials in one evaluation of F, or one by one
def test_stacked_backtracking_takes_the_cpu_loops_steps(max_backtracks, stacked_bytes, monkeypatch):
    if stacked_bytes is not None:
        monkeypatch.setattr(line_search_module, "STACKED_AT_MOST_BYTES", stacked_bytes)
    problem, y = wiggly_problem()
    step0 = torch.tensor([1e-3, 0.1, 1.0, 5.0, 40.0, 1e4], dtype=DTYPE)  # short to absurd
    (want_step, want_y, want_r), cpu_reads = search_on("cpu", problem, y, step0, max_backtracks)
    (step, y_new, r_new), reads = search_on("accelerator", problem, y, step0, max_backtracks)
    assert reads == 0 and cpu_reads >= 1
    assert torch.equal(step == 0, want_step == 0)
    torch.testing.assert_close(step, want_step, rtol=0, atol=0)  # powers of two of the same step
    torch.testing.assert_close(y_new, want_y, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(r_new, want_r, rtol=1e-12, atol=1e-15)
    if (
        max_backtracks == 10
    ):  # the case is worth testing: some sample found its step by backtracking
        (first_try, *_), _ = search_on("cpu", problem, y, step0, max_backtracks=0)
        assert ((want_step > 0) & (first_try == 0)).any()
    if max_backtracks == 0:
        assert (want_step == 0).any(), "no sample was left without a step"


def test_stacked_line_search_evaluates_F_twice(monkeypatch):
    # The trial step, then every halving at once.
    problem, y = wiggly_problem()
    F = CountedF(problem.F)
    problem.F = F
    search_on("accelerator", problem, y, torch.full((6,), 5.0, dtype=DTYPE))
    assert F.calls == 2 + 1  # and one for residual_and_gradient in search_on


def test_held_dropout_takes_the_trials_one_by_one():
    # A dropout mask held for the batch does not extend to a stacked batch: with dropout in F the
    # trials go through F one at a time, and the answers are the CPU path's.
    from test_dropout_batchnorm import dropout_mlp

    results = []
    for path in PATHS:
        F = dropout_mlp()
        F.train()
        block = ImplicitResidualBlock(F, 0.5, GradientDescent(atol=TOL, max_iter=200))
        x = torch.randn(4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
        torch.manual_seed(7)
        with forced_path(path), torch.no_grad():
            results.append((block(x), block.forward_stats))
    (want, want_stats), (got, stats) = results
    assert want_stats.converged.all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert_same_stats(stats, want_stats)
    problem = FixedPointProblem(F, x, 0.5)
    assert line_search_module._trials_per_evaluation(problem, x, 11) == 1


# -- Fallback ---------------------------------------------------------------------------------


def fallback_twice(solvers_factory, F: nn.Module, x: Tensor, theta: float, path: str):
    """Solve twice with a fresh chain; the second solve's answer, stats, reads and links run."""
    solver = Fallback(solvers_factory())
    problem = FixedPointProblem(F, x, theta)
    for _ in range(2):
        reads, links = HostReads(), CountedLinks(solver)
        with forced_path(path), reads.patched(), reads.counting(), torch.no_grad():
            y, stats = solver.solve(problem, x)
        for link in solver.solvers:
            del link.solve
    return y, stats, reads, links.count


@pytest.mark.parametrize(
    "name, factory, reads_at_most, links",
    [
        # FixedPoint runs out of iterations: no read after it, Anderson's look, the read that
        # stops the chain
        pytest.param(
            "hands on",
            lambda: [FixedPoint(atol=TOL, max_iter=4), Anderson(atol=TOL), Broyden(atol=TOL)],
            2,
            2,
            id="hands-on",
        ),
        # the first link solves every sample: its look, and the read that stops the chain
        pytest.param(
            "first solves all",
            lambda: [Anderson(atol=TOL), Broyden(atol=TOL)],
            2,
            1,
            id="first-solves-all",
        ),
        # FixedPoint solves every sample in exactly its max_iter (16 here): no read after it, so
        # Anderson runs on frozen samples and, having learnt that, looks at its start
        pytest.param(
            "solves at max_iter",
            lambda: [FixedPoint(atol=TOL, max_iter=16), Anderson(atol=TOL)],
            1,
            2,
            id="solves-at-max-iter",
        ),
    ],
)
def test_fallback_reads_and_answers(name, factory, reads_at_most, links):
    F = mlp(n=3, width=6, lipschitz=0.8)
    x = torch.randn(5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    want, want_stats, _, want_links = fallback_twice(factory, F, x, 1.0, "cpu")
    got, stats, reads, ran = fallback_twice(factory, F, x, 1.0, "accelerator")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert_same_stats(stats, want_stats)
    assert reads.count <= reads_at_most, reads.report()
    assert ran == links
    if name == "solves at max_iter":
        assert (
            want_links == 1 and (want_stats.method == 0).all() and want_stats.iterations.max() == 16
        )


def test_fallback_on_a_mixed_batch_hands_on_as_on_the_cpu():
    # Contracting, slow and expanding samples (test_fallback's gain problem): all three links run.
    from test_fallback import chain, gain_problem

    F, x = gain_problem()
    want, want_stats, _, _ = fallback_twice(chain, F, x, 1.0, "cpu")
    got, stats, reads, links = fallback_twice(chain, F, x, 1.0, "accelerator")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert_same_stats(stats, want_stats)
    assert links == 3 and reads.count <= links, reads.report()
