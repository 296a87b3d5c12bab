"""L-BFGS against the other forward solvers on three small fixed-point problems (docs/solvers.md).

Each problem is ``y = x + F(y)`` (θ = 1) in float64 on the CPU, five draws of F with 8 samples
each, ``y⁰ = x = 2·randn``, atol 1e-10, at most 300 iterations:

* a contracting MLP ``F = W₂ tanh(W₁y + b)``, n = 16, Lip(F) = 0.8;
* a non-contracting ``F = Ay + tanh(y + b)`` with A symmetric, eigenvalues in [−3, −1.5], n = 16
  (``I − ∂F/∂y ⪰ 1.5 I``: ½‖r‖² has no minimum but the root);
* the same F with a non-symmetric A, eigenvalues in [−3, 3], n = 6.

Printed per solver: samples solved (of 40), iterations (mean, max), evaluations of F per solve
(vector–Jacobian products included) and the best of three CPU times per solve, one torch thread.

    python benchmarks/bench_descent_solvers.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from irnet.solvers import (  # noqa: E402
    LBFGS,
    Anderson,
    Broyden,
    FixedPoint,
    FixedPointProblem,
    NonlinearCG,
    NonlinearSolver,
)

DTYPE = torch.float64
ATOL, MAX_ITER, DRAWS, SAMPLES = 1e-10, 300, 5, 8


class Counted(torch.nn.Module):
    """``F`` that counts its evaluations."""

    def __init__(self, F: Callable) -> None:
        super().__init__()
        self.F, self.calls = F, 0

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.F(y)


def contracting_mlp(n: int, width: int, lipschitz: float, seed: int) -> Callable:
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(width, n, generator=g, dtype=DTYPE)
    w1 /= torch.linalg.matrix_norm(w1, 2)
    w2 = torch.randn(n, width, generator=g, dtype=DTYPE)
    w2 *= lipschitz / torch.linalg.matrix_norm(w2, 2)
    b = 0.5 * torch.randn(width, generator=g, dtype=DTYPE)
    return lambda y: torch.tanh(y @ w1.T + b) @ w2.T


def linear_plus_tanh(n: int, eigenvalues: torch.Tensor, symmetric: bool, seed: int) -> Callable:
    g = torch.Generator().manual_seed(seed)
    if symmetric:
        basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
        inverse = basis.T
    else:
        basis = torch.eye(n, dtype=DTYPE) + 0.3 * torch.randn(n, n, generator=g, dtype=DTYPE)
        inverse = torch.linalg.inv(basis)
    a = basis @ torch.diag(eigenvalues) @ inverse
    b = torch.randn(n, generator=g, dtype=DTYPE)
    return lambda y: y @ a.T + torch.tanh(y + b)


PROBLEMS = {
    "contracting MLP, n = 16, Lip 0.8": (
        16,
        lambda s: contracting_mlp(16, 32, 0.8, s),
    ),
    "non-contracting, I − ∂F/∂y ⪰ 1.5 I, n = 16": (
        16,
        lambda s: linear_plus_tanh(16, torch.linspace(-3, -1.5, 16, dtype=DTYPE), True, s),
    ),
    "non-contracting, spectrum [−3, 3], n = 6": (
        6,
        lambda s: linear_plus_tanh(6, torch.linspace(-3, 3, 6, dtype=DTYPE), False, s),
    ),
}
SOLVERS: dict[str, Callable[[], NonlinearSolver]] = {
    "FixedPoint": lambda: FixedPoint(atol=ATOL, max_iter=MAX_ITER),
    "Anderson(5)": lambda: Anderson(atol=ATOL, max_iter=MAX_ITER, history=5),
    "Broyden": lambda: Broyden(atol=ATOL, max_iter=MAX_ITER),
    "NonlinearCG": lambda: NonlinearCG(atol=ATOL, max_iter=MAX_ITER),
    "LBFGS(10)": lambda: LBFGS(atol=ATOL, max_iter=MAX_ITER),
}


def measure(n: int, draw: Callable, make: Callable[[], NonlinearSolver]) -> tuple:
    """(solved, iterations, F evaluations, seconds) summed over the draws."""
    iterations, solved, calls, seconds = [], 0, 0, 0.0
    for k in range(DRAWS):
        F = Counted(draw(k))
        x = 2 * torch.randn(
            SAMPLES, n, dtype=DTYPE, generator=torch.Generator().manual_seed(100 + k)
        )
        problem = FixedPointProblem(F, x, 1.0)
        make().solve(problem, x)  # warm-up
        F.calls = 0
        _, stats = make().solve(problem, x)
        calls += F.calls
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            make().solve(problem, x)
            best = min(best, time.perf_counter() - start)
        seconds += best
        iterations += stats.iterations.tolist()
        solved += int(stats.converged.sum())
    return solved, torch.tensor(iterations, dtype=DTYPE), calls, seconds


def main() -> None:
    torch.set_num_threads(1)
    for problem, (n, draw) in PROBLEMS.items():
        print(f"\n{problem}: {DRAWS} draws × {SAMPLES} samples, θ = 1, atol {ATOL}")
        for name, make in SOLVERS.items():
            solved, its, calls, secs = measure(n, draw, make)
            print(
                f"  {name:12s} solved {solved:2d}/{DRAWS * SAMPLES}  iterations mean "
                f"{its.mean():6.1f} max {int(its.max()):3d}  F per solve {calls / DRAWS:6.1f}  "
                f"ms per solve {1000 * secs / DRAWS:6.1f}"
            )


if __name__ == "__main__":
    main()
