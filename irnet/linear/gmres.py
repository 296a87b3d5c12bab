"""Batched, restarted, matrix-free GMRES (Saad & Schultz 1986) for the adjoint system.

On the CPU the loop reads after every Arnoldi step whether a sample is still above its
tolerance, and after every cycle whether the true residuals all meet it (reads are free there).
On the accelerator path (:mod:`irnet.device_path`) each read would wait for the device, so it
reads only where :class:`~irnet._iterate.StopChecks` says, once per look, as the forward
solvers' shared loop does: first after as many Krylov steps as the same solve took last time.
A look closes the cycle where it stands (the correction and the true residual, one product)
and asks, in one read, whether any sample is still active in the cycle or above its tolerance
once closed; steps taken past a sample's convergence do not touch its answer, so answers and
counts are the CPU path's.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from irnet._iterate import StopChecks, excess_of
from irnet._misc import check_int, sample_dot, sample_norm
from irnet.device_path import on_accelerator_path
from irnet.linear.base import AdjointOperator, LinearSolver, safe_norm
from irnet.stats import SolverStats


class _System(NamedTuple):
    """``A g = b`` flattened per sample."""

    b: Tensor
    b_norm: Tensor  # ‖b‖ per sample (the smallest positive number for b = 0)
    apply: Callable[[Tensor], Tensor]  # v ↦ A v


class _Iterate(NamedTuple):
    """Where the solve stands between cycles (flattened per sample)."""

    x: Tensor  # the answer so far
    r: Tensor  # its residual b − A x
    res: Tensor  # ‖r‖ / ‖b‖


class _Cycle:
    """One Arnoldi cycle of at most ``steps`` columns from residual ``r``: the Krylov basis, the
    Hessenberg matrix (rotated to triangular by Givens rotations) and the rotated right-hand side.

    ``used`` counts each sample's columns: those built while it was ``active`` (its estimated
    residual ``|rhs[j+1]| / ‖b‖`` above ``rtol``); its correction uses only those.
    """

    def __init__(self, r: Tensor, active: Tensor, steps: int) -> None:
        batch = r.shape[0]
        self.tiny = torch.finfo(r.dtype).tiny
        beta = sample_norm(r)
        self.basis = [r / beta.clamp_min(self.tiny)[:, None]]
        self.H = r.new_zeros(batch, steps + 1, steps)
        self.cos, self.sin = r.new_zeros(batch, steps), r.new_zeros(batch, steps)
        self.rhs = r.new_zeros(batch, steps + 1)
        self.rhs[:, 0] = beta
        self.used = torch.zeros(batch, dtype=torch.long, device=r.device)
        self.active = active
        self.built = 0  # columns built

    def step(self, system: _System, rtol: float) -> Tensor:
        """Build the next column; returns each sample's estimated relative residual after it."""
        j, H, cos, sin, rhs, basis, tiny = (
            self.built,
            self.H,
            self.cos,
            self.sin,
            self.rhs,
            self.basis,
            self.tiny,
        )
        w = system.apply(basis[j])
        for i in range(j + 1):  # modified Gram–Schmidt
            H[:, i, j] = sample_dot(w, basis[i])
            w = w - H[:, i, j, None] * basis[i]
        H[:, j + 1, j] = sample_norm(w)
        basis.append(
            torch.where(H[:, j + 1, j, None] > tiny, w / H[:, j + 1, j, None].clamp_min(tiny), 0)
        )
        for i in range(j):  # earlier rotations on the new column
            top = cos[:, i] * H[:, i, j] + sin[:, i] * H[:, i + 1, j]
            H[:, i + 1, j] = -sin[:, i] * H[:, i, j] + cos[:, i] * H[:, i + 1, j]
            H[:, i, j] = top
        radius = torch.hypot(H[:, j, j], H[:, j + 1, j])
        nonzero = radius > tiny
        cos[:, j] = torch.where(nonzero, H[:, j, j] / radius.clamp_min(tiny), 1)
        sin[:, j] = torch.where(nonzero, H[:, j + 1, j] / radius.clamp_min(tiny), 0)
        H[:, j, j] = radius
        H[:, j + 1, j] = 0
        rhs[:, j + 1] = -sin[:, j] * rhs[:, j]
        rhs[:, j] = cos[:, j] * rhs[:, j]
        self.used = torch.where(self.active, j + 1, self.used)
        estimate = rhs[:, j + 1].abs() / system.b_norm
        self.active = self.active & (estimate > rtol)
        self.built = j + 1
        return estimate

    def correction(self, columns: int) -> Tensor:
        """``V y`` with ``R y = g`` solved on each sample's own leading columns, of the first
        ``columns`` built (at least every sample's ``used``)."""
        if columns == 0:
            return torch.zeros_like(self.basis[0])
        # (batch, k)
        keep = torch.arange(columns, device=self.used.device)[None, :] < self.used[:, None]
        both = keep[:, :, None] & keep[:, None, :]
        eye = torch.eye(columns, dtype=self.H.dtype, device=self.H.device)
        R = torch.where(both, self.H[:, :columns, :columns], eye)
        # A breakdown that leaves a zero pivot gives a non-finite correction,
        # which the solve rejects for that sample.
        y = torch.linalg.solve_triangular(
            R, (self.rhs[:, :columns] * keep)[:, :, None], upper=True
        )[:, :, 0]
        return torch.einsum("bk,kbn->bn", y, torch.stack(self.basis[:columns]))


class GMRES(LinearSolver):
    """Restarted GMRES(m) with modified Gram–Schmidt and Givens rotations, per sample.

    Needs only products with ``A = I − θ J_Fᵀ``, so it suits large states
    (convolutional layers) and works where the Neumann series diverges. All
    samples share the Arnoldi loop; each sample's correction uses only the
    Krylov columns built until it met its tolerance, so its answer and its
    count are its own.

    Args:
        rtol: relative tolerance ``‖A g − b‖₂ ≤ rtol · ‖b‖₂`` per sample.
        max_iter: the most Krylov steps (operator applications) in all cycles.
        restart: Krylov steps per cycle before restarting.
    """

    def __init__(self, rtol: float = 1e-5, max_iter: int = 50, restart: int = 20) -> None:
        super().__init__(rtol, max_iter)
        self.restart = check_int("restart", restart, 1)

    def solve(self, operator: AdjointOperator, b: Tensor) -> tuple[Tensor, SolverStats]:
        shape = b.shape

        def apply(v: Tensor) -> Tensor:
            return operator(v.view(shape)).flatten(1)

        system = _System(b.flatten(1), safe_norm(b), apply)
        if on_accelerator_path(b):
            now, iterations = self._solve_without_reads(operator, b, system)
        else:
            now, iterations = self._solve_on_cpu(system)
        converged = now.res <= self.rtol
        diverged = ~converged & ~torch.isfinite(now.res)
        return now.x.view(shape), SolverStats(iterations, now.res, converged, diverged)

    def _solve_on_cpu(self, system: _System) -> tuple[_Iterate, Tensor]:
        x = torch.zeros_like(system.b)
        r = system.b
        res = sample_norm(r) / system.b_norm
        iterations = torch.zeros_like(res, dtype=torch.long)
        used = 0
        while used < self.max_iter and not bool((res <= self.rtol).all()):
            steps = min(self.restart, self.max_iter - used)
            dx, taken = self._cycle(system, r, res > self.rtol, steps)
            x, r, res = _better(_Iterate(x, r, res), dx, system)
            iterations = iterations + taken
            used += steps
        return _Iterate(x, r, res), iterations

    def _cycle(self, system: _System, r: Tensor, active: Tensor, steps: int):
        """One Arnoldi cycle of at most ``steps`` columns from residual ``r`` (the CPU path).

        Returns the correction to the iterate and the steps each sample used.
        """
        cycle = _Cycle(r, active, steps)
        for _ in range(steps):
            cycle.step(system, self.rtol)
            if not bool(cycle.active.any()):
                break
        return cycle.correction(int(cycle.used.max())), cycle.used

    def _solve_without_reads(
        self, operator: AdjointOperator, b: Tensor, system: _System
    ) -> tuple[_Iterate, Tensor]:
        """The accelerator path: the CPU path's cycles, reading only at the looks of
        :class:`~irnet._iterate.StopChecks` (none at the solve's last step).

        Returns:
            The final iterate and each sample's Krylov steps.
        """
        now = _Iterate(torch.zeros_like(system.b), system.b, sample_norm(system.b) / system.b_norm)
        iterations = torch.zeros_like(now.res, dtype=torch.long)
        # a plain callable (irnet.analysis.stability's) has no owner
        owner = getattr(operator, "owner", None)
        checks = self.stop_checks(owner, b)
        left = now.res > self.rtol
        checks.start(excess_of(left, now.res, self.rtol))
        done = checks.due(0) and checks.look(0, left, excess_of(left, now.res, self.rtol))
        used = taken = 0  # Krylov steps budgeted (whole cycles, as on the CPU path) and built
        while not done and used < self.max_iter:
            steps = min(self.restart, self.max_iter - used)
            cycle = _Cycle(now.r, left, steps)
            now, done = self._cycle_with_looks(
                cycle, now, system, steps, taken, checks, last=used + steps == self.max_iter
            )
            iterations, left = iterations + cycle.used, now.res > self.rtol
            used += steps
            taken += cycle.built
        self.remember(owner, b, taken, checks)
        return now, iterations

    def _cycle_with_looks(
        self,
        cycle: _Cycle,
        now: _Iterate,
        system: _System,
        steps: int,
        before: int,
        checks: StopChecks,
        last: bool,
    ) -> tuple[_Iterate, bool]:
        """One cycle on the accelerator path, ``before`` Krylov steps into the solve; ``last``: the
        solve's last. Returns the iterate after it and whether the solve is done.

        A look comes after an Arnoldi step and closes the cycle there (one product); the CPU path
        would close it where its last sample became inactive, with the same columns per sample, so
        the same correction. The solve is done if no sample is active in the cycle or above
        ``rtol`` once closed; otherwise the cycle goes on and the closure is dropped. At its length
        the cycle closes (a look only if one is due, none if it is the solve's last).
        """
        for j in range(steps):
            estimate = cycle.step(system, self.rtol)
            taken = before + j + 1
            if j + 1 < steps and not checks.due(taken):
                continue
            closed = _better(now, cycle.correction(cycle.built), system)
            needed = before + cycle.used.amax()  # where the CPU path closes this cycle
            if j + 1 == steps:
                break
            still = cycle.active | (closed.res > self.rtol)
            excess = excess_of(still, torch.where(cycle.active, estimate, closed.res), self.rtol)
            if checks.look(taken, still, excess, needed):
                return closed, True
        left = closed.res > self.rtol
        if last or not checks.due(taken):
            return closed, False
        return closed, checks.look(taken, left, excess_of(left, closed.res, self.rtol), needed)


def _better(now: _Iterate, dx: Tensor, system: _System) -> _Iterate:
    """The iterate after a cycle's correction ``dx`` for each sample whose true residual it does not
    raise (one product)."""
    candidate = now.x + dx
    new_r = system.b - system.apply(candidate)
    new_res = sample_norm(new_r) / system.b_norm
    better = torch.isfinite(new_res) & (new_res <= now.res)
    return _Iterate(
        torch.where(better[:, None], candidate, now.x),
        torch.where(better[:, None], new_r, now.r),
        torch.where(better, new_res, now.res),
    )
