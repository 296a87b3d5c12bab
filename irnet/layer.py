"""The implicit residual block ``y = x + (1 − θ)F(x) + θF(y)`` (paper eq. 7).

Or, with ``scheme="one_leg"``, the one-leg θ-step ``y = x + F((1 − θ)x + θy)`` of the authors'
later code: the same step on linear F, another on nonlinear F (docs/schemes.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from irnet._adjoint import ImplicitAdjoint
from irnet._misc import check_choice, check_int, check_unit_interval, per_sample, sample_norm
from irnet._scope import SolveScope, check_batch_statistics
from irnet.device_path import on_accelerator_path
from irnet.linear import LinearSolver, Neumann
from irnet.solvers import FixedPoint, FixedPointProblem, NonlinearSolver
from irnet.stats import SolverStats, report_failures, warn_if_failed

BACKWARD_MODES = ("implicit", "unrolled")
SCHEMES = ("linear", "one_leg")
"""The θ-steps a block can take: ``y = x + (1−θ)F(x) + θF(y)`` or ``y = x + F((1−θ)x + θy)``."""


def _nan_where_diverged(y: Tensor, stats: SolverStats) -> Tensor:
    """A diverged sample (non-finite iterates) has no plausible answer: its best iterate (often
    the start) would pass for one. It comes out as NaN instead."""
    broken = stats.diverged & ~stats.converged
    return torch.where(per_sample(broken, y), torch.full_like(y, float("nan")), y)


def _moved(stats: Optional[SolverStats], fn) -> Optional[SolverStats]:
    """``stats`` with every tensor passed through a module's ``_apply`` function."""
    if stats is None:
        return None
    return dataclasses.replace(
        stats,
        **{
            f.name: fn(getattr(stats, f.name))
            for f in dataclasses.fields(stats)
            if isinstance(getattr(stats, f.name), Tensor)
        },
    )


class NonFiniteInputError(ValueError):
    """A block's input holds NaN or Inf (raised by a solve that did not converge).

    :class:`~irnet.module.ImplicitNetModule` turns it into a
    :class:`~irnet.failure.TrainingFailure` naming the layer that produced it.
    """


def check_inputs_finite(inputs: list[Tensor]) -> None:
    """Raise :class:`NonFiniteInputError` if any of the blocks' ``inputs`` holds NaN or Inf.

    The accelerator path's version of the check a block makes on the CPU path after a solve that
    did not converge: one host read for all the blocks of a pass (the module makes it once per
    step).
    """
    if not inputs:
        return
    finite = torch.stack([torch.isfinite(t).all() for t in inputs]).tolist()
    if not all(finite):
        raise NonFiniteInputError(
            f"x (the block's input) contains NaN or Inf at layer {finite.index(False)}; "
            "the solve would not end well"
        )


class ImplicitResidualBlock(nn.Module):
    """Residual layer whose output solves ``y = x + (1 − θ)F(x) + θF(y)``.

    θ = 0 is the explicit ResNet layer ``x + F(x)`` (no solve), θ = 1 backward
    Euler, θ = 0.5 the trapezoidal rule. With ``scheme="one_leg"`` the output
    solves the one-leg step ``y = x + F((1 − θ)x + θy)`` instead (θ = 0.5: the
    implicit midpoint rule); θ = 0 and θ = 1 are the same step in both schemes,
    and so is every θ for an affine F (docs/schemes.md). The forward pass solves
    for ``y`` with ``solver`` outside autograd. With ``backward="implicit"`` the
    gradient comes from the implicit function theorem: one adjoint solve with
    ``linear_solver`` on ``v ↦ v − θ J_F(z)ᵀ v`` (``z = y``; one-leg:
    ``z = (1 − θ)x + θy``); only the block's input and
    output (and F's own activations at them) are kept for backward, whatever the
    number of iterations. ``backward="unrolled"`` differentiates through the
    solver's iterations instead (a reference; memory grows with iterations). It
    is the derivative of the iterations actually taken, so it approaches the
    exact gradient as they converge — except for a sample whose initial guess
    (the input) already meets ``atol``: it takes no iteration and its
    derivative is the identity's.

    A sample whose solve diverged (non-finite iterates, ``forward_stats.diverged``)
    comes out as NaN, never as a plausible-looking iterate; one that merely did
    not converge returns its best iterate, flagged in the statistics and warned.

    Every evaluation of F in one forward — the solve, the graph at the
    solution, and the adjoint solve in backward — sees the same map:

    * precision: under ``torch.autocast`` (Lightning's ``bf16-mixed``,
      ``16-mixed``) the solve and the adjoint run in float32 with autocast off;
      a half-precision input or model (``bf16-true``, ``16-true``) is solved in
      float32 through float32 casts of F's half parameters, whose gradients
      still reach them, and the output has the input's dtype;
    * dropout (any ``nn.Dropout*`` module in F, in training mode): one mask per
      forward, held for the whole solve and its adjoint (variational dropout);
      in eval mode dropout is the identity;
    * BatchNorm: refused. A BatchNorm in F that is in training mode (or has
      ``track_running_stats=False``) raises ``ValueError`` at construction and
      in forward, since batch statistics couple the samples and change at every
      iteration; in eval mode, with running statistics, it is accepted.

    Args:
        F: module (or plain callable) mapping a tensor to one of the same
            shape, acting on each sample separately. A plain callable is taken
            to have no parameters: gradients reach ``x`` only (wrap a function
            with parameters in an ``nn.Module``).
        theta: implicitness θ in [0, 1].
        solver: forward solver; default ``FixedPoint()``.
        linear_solver: adjoint solver; default ``Neumann()``.
        backward: ``"implicit"`` or ``"unrolled"``.
        scheme: ``"linear"`` (paper eq. 7, the default) or ``"one_leg"``.

    Attributes:
        forward_stats: :class:`~irnet.stats.SolverStats` of the last forward solve.
        backward_stats: :class:`~irnet.stats.SolverStats` of the last adjoint
            solve (``None`` before the first implicit backward).

    Example:
        Backward Euler (θ = 1) with ``F(y) = y / 2`` solves ``y = x + y / 2``, so ``y = 2x``;
        the fixed-point iteration from ``y = x`` halves the error at every step:

        >>> F = nn.Linear(2, 2, bias=False)
        >>> F.weight.data = 0.5 * torch.eye(2)
        >>> block = ImplicitResidualBlock(F, theta=1.0)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
        >>> y = block(x)
        >>> torch.allclose(y, 2 * x, atol=1e-4)
        True
        >>> block.forward_stats.converged
        tensor([True, True])
        >>> block.forward_stats.iterations  # the larger input takes one halving more
        tensor([16, 17])
    """

    scheme: str = "linear"  # blocks pickled before the option take the paper's step
    #: refuse an input holding NaN/Inf (an ensemble's block lets a broken member's rows through)
    refuse_nonfinite_input: bool = True

    def __init__(
        self,
        F: Union[nn.Module, Callable[[Tensor], Tensor]],
        theta: float = 0.5,
        solver: Optional[NonlinearSolver] = None,
        linear_solver: Optional[LinearSolver] = None,
        backward: str = "implicit",
        scheme: str = "linear",
    ) -> None:
        super().__init__()
        if not callable(F):
            raise ValueError(f"F must be an nn.Module or a callable, got {type(F).__name__}")
        if isinstance(F, nn.Module):
            check_batch_statistics(F)
        if solver is not None and not isinstance(solver, NonlinearSolver):
            raise ValueError(f"solver must be an irnet.solvers solver, got {type(solver).__name__}")
        if linear_solver is not None and not isinstance(linear_solver, LinearSolver):
            raise ValueError(
                f"linear_solver must be an irnet.linear solver, got {type(linear_solver).__name__}"
            )
        self.F = F
        self.theta = check_unit_interval("theta", theta)
        self.solver = solver if solver is not None else FixedPoint()
        self.linear_solver = linear_solver if linear_solver is not None else Neumann()
        self.backward_mode = check_choice("backward", backward, BACKWARD_MODES)
        self.scheme = check_choice("scheme", scheme, SCHEMES)
        self.forward_stats: Optional[SolverStats] = None
        self.backward_stats: Optional[SolverStats] = None

    def forward(self, x: Tensor, guess: Optional[Tensor] = None) -> Tensor:
        """Solve the layer for a batch ``x`` (first dimension is the batch).

        ``guess`` optionally warm-starts the solve (e.g. each sample's previous
        fixed point; NaN rows start from the explicit step as usual).
        """
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
        # Solvers run in the input's dtype, in float32 under mixed precision (the
        # library's convention); one dropout draw serves every evaluation of F;
        # a BatchNorm using batch statistics is refused.
        scope = SolveScope(self.F, x)
        x_solve = x.to(scope.dtype)
        with scope:
            y = self._forward(x_solve, guess)
        scope.hold_for_backward(y, x_solve)
        return y.to(x.dtype)

    @property
    def _one_leg(self) -> bool:
        """Whether this block's step differs in form from the linear one: one-leg, 0 < θ < 1."""
        return self.scheme == "one_leg" and 0 < self.theta < 1

    def _forward(self, x: Tensor, guess: Optional[Tensor] = None) -> Tensor:
        one_leg = self._one_leg
        # F(x) is needed for the explicit part of the linear step (and is the whole of θ = 0's).
        fx = self._apply_F(x) if self.theta < 1 and not one_leg else None
        if self.theta == 0:
            self.forward_stats = SolverStats.trivial(x.shape[0], x.device, x.dtype)
            return x + fx
        if fx is None:  # θ = 1 or one-leg: c is x itself, only check F once
            self._check_shape(x, lambda: self.F(x))
        explicit = x if fx is None else x + (1 - self.theta) * fx
        if self.backward_mode == "unrolled":
            problem = FixedPointProblem(
                self.F, explicit, self.theta, differentiable=True, one_leg=one_leg
            )
            return self._solve(problem, x, x)
        graph = torch.is_grad_enabled() and self._needs_grad(x)
        # A fixed-count solve's answer is measured by the evaluation of F(y*) with its graph below,
        # not by one more of its own: F is evaluated k + 2 times for k iterations (F(x), k, F(y*)).
        measure_here = graph and isinstance(self.solver, FixedPoint) and self.solver.fixed_count
        with torch.no_grad():
            problem = FixedPointProblem(
                self.F,
                explicit.detach(),
                self.theta,
                measure_answer=not measure_here,
                one_leg=one_leg,
            )
            start = self._initial_guess(x, fx, guess)
            if measure_here:
                y_star, _ = self.solver.solve(problem, start)
            else:
                y_star = self._solve(problem, start, x)
        if not graph:
            return y_star
        # One evaluation of F at the solution with a graph serves both the output's autograd
        # (∂/∂x and ∂/∂γ through ``y_graph``) and the adjoint's vector–Jacobian products.
        with torch.enable_grad():
            y_leaf = y_star.detach().requires_grad_()
            if one_leg:
                # F(z*), z* = (1−θ)x + θy*: its Jacobian in y* is θJ_F(z*) already (adjoint θ 1),
                # and its graph reaches x through z* as well as through y_graph's x.
                f_star = self.F(torch.lerp(x, y_leaf, self.theta))
                y_graph, adjoint_theta = x + f_star, 1.0
            else:
                f_star = self.F(y_leaf)
                y_graph, adjoint_theta = explicit + self.theta * f_star, self.theta
        if measure_here:  # r(y*) = y* − x − (1−θ)F(x) − θF(y*); a non-finite answer is NaN already
            self._accept(
                y_star, self.solver.answer_stats(sample_norm(y_star - y_graph.detach())), x
            )
        return ImplicitAdjoint.apply(
            y_graph,
            y_leaf,
            f_star,
            adjoint_theta,
            self.linear_solver,
            self._record_backward,
            self.F,
        )

    def _initial_guess(self, x: Tensor, fx: Optional[Tensor], guess: Optional[Tensor]) -> Tensor:
        """Where the solve starts: the explicit step ``x + F(x)`` (reusing F(x)), or a warm start.

        ``guess`` may hold NaN rows for samples without a previous fixed point;
        they start from the explicit step. At θ = 1 and in the one-leg scheme, where
        F(x) is not otherwise needed, the start is x itself, whose first iterate is the
        explicit step (both maps send x to ``x + F(x)``).
        """
        start = x.detach() if fx is None else x.detach() + fx.detach()
        if guess is None:
            return start
        known = torch.isfinite(guess.flatten(1)).all(1)
        return torch.where(per_sample(known, start), guess.to(start.dtype), start)

    def _solve(self, problem: FixedPointProblem, y0: Tensor, x: Tensor) -> Tensor:
        return self._accept(*self.solver.solve(problem, y0), x)

    def _accept(self, y: Tensor, stats: SolverStats, x: Tensor) -> Tensor:
        """Keep the solve's statistics, report failures, NaN out samples whose solve diverged."""
        self.forward_stats = stats
        if on_accelerator_path(y):
            # No host read: the warning waits for the step's one read (flush_failure_warnings), a
            # NaN input for the module's one check per step (check_inputs_finite), and diverged
            # samples are masked unconditionally.
            report_failures(stats, self._forward_what, self.solver, deferred=True)
            return _nan_where_diverged(y, stats)
        # The CPU path's read: did every sample converge? Only if not is the input checked.
        if not bool(stats.converged.all()):
            if self.refuse_nonfinite_input and not bool(torch.isfinite(x).all()):
                raise NonFiniteInputError(
                    "x (the block's input) contains NaN or Inf; the solve would not end well"
                )
            warn_if_failed(stats, self._forward_what, self.solver)
            y = _nan_where_diverged(y, stats)
        return y

    @property
    def _forward_what(self) -> str:
        return f"Forward solve ({type(self.solver).__name__})"

    def _record_backward(self, stats: SolverStats) -> None:
        self.backward_stats = stats
        if self.linear_solver.approximate:
            return  # JacobianFree / Phantom miss the exact adjoint by design
        report_failures(
            stats,
            f"Adjoint solve ({type(self.linear_solver).__name__})",
            self.linear_solver,
            deferred=on_accelerator_path(stats.residual),
        )

    def _apply(self, fn, recurse: bool = True):
        # The last solves' statistics follow the block to its new device (and dtype).
        super()._apply(fn, recurse)
        self.forward_stats = _moved(self.forward_stats, fn)
        self.backward_stats = _moved(self.backward_stats, fn)
        return self

    def _apply_F(self, x: Tensor) -> Tensor:
        fx = self.F(x)
        self._check_shape(x, lambda: fx)
        return fx

    def _check_shape(self, x: Tensor, output) -> None:
        if getattr(self, "_checked_shape", None) == x.shape:
            return
        with torch.no_grad():
            out = output()
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"F must map a tensor to a tensor of the same shape: input {tuple(x.shape)}, "
                f"output {got}"
            )
        self._checked_shape = x.shape

    def _needs_grad(self, x: Tensor) -> bool:
        if not isinstance(self.F, nn.Module):  # a plain callable: no parameters we can see
            return x.requires_grad
        return x.requires_grad or any(p.requires_grad for p in self.F.parameters())

    def fixed_point_residuals(self, x: Tensor, iterations: int) -> Tensor:
        """Differentiable ``‖r(yᵏ)‖₂`` of fixed-point iterates ``y¹ … y^K`` from ``y⁰ = x``.

        The unrolled iterates the fixed-point regulariser R_fp (paper eq. 9)
        needs; built with autograd so the norms depend on F's parameters. They
        iterate the block's own map, and ``r`` is its own step's residual (one-leg:
        ``y − x − F((1−θ)x + θy)``); ``y¹ = x + F(x)`` in both schemes.

        Returns:
            Tensor of shape ``(iterations, batch)``.
        """
        check_int("iterations", iterations, 1)
        one_leg = self._one_leg
        # The same precision and dropout draw as the block's own solve.
        with SolveScope(self.F, x) as scope:
            x = x.to(scope.dtype)
            linear_explicit = self.theta < 1 and not one_leg
            explicit = x + (1 - self.theta) * self.F(x) if linear_explicit else x
            problem = FixedPointProblem(
                self.F, explicit, self.theta, differentiable=True, one_leg=one_leg
            )
            y, norms = problem.map(x), []
            for _ in range(iterations):
                g = problem.map(y)
                norms.append(sample_norm(y - g))
                y = g
        return torch.stack(norms)

    def map_jacobian_products(
        self, y: Tensor, vectors: Tensor, x: Optional[Tensor] = None
    ) -> Tensor:
        """Differentiable ``vᵀ (θ ∂F/∂y)(z)`` for each of ``S`` vectors ``v`` per sample.

        The Jacobian of the block's fixed-point map at ``y``: of ``y ↦ c + θF(y)``
        (``z = y``), or in the one-leg scheme of ``y ↦ x + F((1−θ)x + θy)``
        (``z = (1−θ)x + θy``, which needs the layer's input ``x``), applied from the
        left by vector–Jacobian products (one graph of F for all ``S``); the Jacobian
        regulariser uses it. The result keeps its graph, so it can be differentiated
        in F's parameters, in ``y`` and in ``x``.

        Args:
            y: points, ``(batch, …)`` (typically the layer's fixed points).
            vectors: ``(S, batch, …)``.
            x: the layer's inputs, ``(batch, …)``: needed by a one-leg block with
                0 < θ < 1, ignored otherwise.

        Returns:
            Tensor of shape ``(S, batch, …)``.

        Raises:
            ValueError: ``vectors`` or ``x`` has the wrong shape, or a one-leg block
                (0 < θ < 1) got no ``x``.
        """
        if vectors.shape[1:] != y.shape:
            raise ValueError(
                f"vectors must have shape (S, *y.shape) = (S, {', '.join(map(str, y.shape))}), "
                f"got {tuple(vectors.shape)}"
            )
        one_leg = self._one_leg
        if one_leg and x is None:
            raise ValueError(
                "map_jacobian_products needs the layer's input x for scheme='one_leg' "
                f"(θ = {self.theta}): the map's Jacobian θJ_F((1−θ)x + θy) depends on it"
            )
        if one_leg and x.shape != y.shape:
            raise ValueError(f"x must have y's shape {tuple(y.shape)}, got {tuple(x.shape)}")
        with SolveScope(self.F, y) as scope, torch.enable_grad():
            y = y.to(scope.dtype)
            if not y.requires_grad:
                y = y.detach().requires_grad_()
            # One-leg: the stage's dependence on y carries the factor θ itself.
            f = self.F(torch.lerp(x.to(scope.dtype), y, self.theta)) if one_leg else self.F(y)
            products = [
                torch.autograd.grad(f, y, v.to(f.dtype), create_graph=True, retain_graph=True)[0]
                for v in vectors
            ]
        stacked = torch.stack(products)
        return stacked if one_leg else self.theta * stacked

    def extra_repr(self) -> str:
        return (
            f"theta={self.theta}, solver={self.solver!r}, linear_solver={self.linear_solver!r}, "
            f"backward={self.backward_mode!r}, scheme={self.scheme!r}"
        )
