"""Shared test problems: solver tables, residual functions with known answers, references.

Like torchdiffeq's ``tests/helpers/problems.py``: the tests parametrize over the compact
tables below, so a new solver is tested everywhere by adding one line here.
Everything runs in float64 unless a test asks for another dtype.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from irnet.linear import GMRES, Direct, LinearSolver, Neumann
from irnet.solvers import (
    LBFGS,
    Anderson,
    Broyden,
    Fallback,
    FixedPoint,
    GradientDescent,
    NonlinearCG,
    NonlinearSolver,
)

DTYPE = torch.float64

# Tight tolerances for gradient checks: finite differences of a solve that is
# only accurate to `tol` carry an error of about tol / eps (1e-12 / 1e-6).
TIGHT = 1e-12

# -- solver tables ---------------------------------------------------------------

SOLVERS: dict[str, Callable[..., NonlinearSolver]] = {
    "fixed_point": lambda atol=TIGHT, max_iter=500: FixedPoint(atol=atol, max_iter=max_iter),
    "anderson": lambda atol=TIGHT, max_iter=500: Anderson(atol=atol, max_iter=max_iter),
    "gradient_descent": lambda atol=TIGHT, max_iter=500: GradientDescent(
        atol=atol, max_iter=max_iter
    ),
    "cg_fletcher_reeves": lambda atol=TIGHT, max_iter=500: NonlinearCG(
        atol=atol, max_iter=max_iter, beta="fletcher-reeves"
    ),
    "cg_polak_ribiere": lambda atol=TIGHT, max_iter=500: NonlinearCG(
        atol=atol, max_iter=max_iter, beta="polak-ribiere"
    ),
    "broyden": lambda atol=TIGHT, max_iter=500: Broyden(atol=atol, max_iter=max_iter),
    "lbfgs": lambda atol=TIGHT, max_iter=500: LBFGS(atol=atol, max_iter=max_iter),
    # A short FixedPoint first, so that on the slower problems the chain hands samples on.
    "fallback": lambda atol=TIGHT, max_iter=500: Fallback(
        [
            FixedPoint(atol=atol, max_iter=max(1, max_iter // 50)),
            Anderson(atol=atol, max_iter=max_iter),
            Broyden(atol=atol, max_iter=max_iter),
        ]
    ),
}

LINEAR_SOLVERS: dict[str, Callable[..., LinearSolver]] = {
    "neumann": lambda rtol=TIGHT, max_iter=500: Neumann(rtol=rtol, max_iter=max_iter),
    "gmres": lambda rtol=TIGHT, max_iter=500: GMRES(rtol=rtol, max_iter=max_iter, restart=20),
    "direct": lambda rtol=TIGHT, max_iter=500: Direct(rtol=rtol),
}

# Classes, for argument validation.
SOLVER_CLASSES = (FixedPoint, Anderson, GradientDescent, NonlinearCG, Broyden, LBFGS)
LINEAR_CLASSES = (Neumann, GMRES, Direct)
ITERATIVE_LINEAR_CLASSES = (Neumann, GMRES)

THETAS = (0.25, 0.5, 1.0)


# -- residual functions F (per-sample, shape-preserving) -------------------------------


def mlp(
    n: int = 3,
    width: int = 6,
    activation: type[nn.Module] = nn.Tanh,
    lipschitz: float = 0.8,
    seed: int = 0,
    dtype: torch.dtype = DTYPE,
) -> nn.Sequential:
    """``F(y) = W₂ σ(W₁ y + b₁) + b₂`` with ``‖W₂‖₂‖W₁‖₂ = lipschitz``.

    With a 1-Lipschitz σ (tanh, ReLU) ``F`` is then a contraction of constant
    ``lipschitz``, so ``θF`` is one for every θ ∈ [0, 1] and fixed-point
    iteration and the Neumann series converge.
    """
    gen = torch.Generator().manual_seed(seed)
    first, second = nn.Linear(n, width), nn.Linear(width, n)
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
            layer.bias.copy_(0.5 * torch.randn(layer.bias.shape, generator=gen))
            layer.weight.div_(torch.linalg.matrix_norm(layer.weight, ord=2))
        second.weight.mul_(lipschitz)
    return nn.Sequential(first, activation(), second).to(dtype)


class LinearF(nn.Module):
    """``F(y) = A y + b`` per sample (``y`` of shape (batch, n)); its Jacobian is ``A``."""

    def __init__(self, A: Tensor, b: Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, y: Tensor) -> Tensor:
        return y @ self.A.T + self.b


def matrix_with_spectrum(eigenvalues: list[float], seed: int = 0, dtype=DTYPE) -> Tensor:
    """A non-symmetric ``S diag(λ) S⁻¹`` with the given (real) eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    S = torch.eye(n, dtype=dtype) + 0.3 * torch.randn(n, n, generator=gen, dtype=dtype)
    return S @ torch.diag(torch.tensor(eigenvalues, dtype=dtype)) @ torch.linalg.inv(S)


def contraction(n: int = 4, radius: float = 0.6, seed: int = 0, dtype=DTYPE) -> Tensor:
    """A random matrix with 2-norm ``radius`` (so a contraction for radius < 1)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=gen, dtype=dtype)
    return radius * A / torch.linalg.matrix_norm(A, ord=2)


def linear_solution(A: Tensor, b: Tensor, x: Tensor, theta: float) -> Tensor:
    """Closed form of ``y = x + (1−θ)(Ax + b) + θ(Ay + b)``.

    That is ``y = (I − θA)⁻¹(x + (1−θ)(Ax + b) + θb)``, per sample (rows of ``x``).
    """
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    rhs = x + (1 - theta) * (x @ A.T + b) + theta * b
    return torch.linalg.solve(eye - theta * A, rhs.T).T


class Scale(nn.Module):
    """``F(y) = a·y`` elementwise (``a = −1``: the scalar contraction; ``a = 3``: expansive)."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, y: Tensor) -> Tensor:
        return self.a * y


class Cos(nn.Module):
    """``F(y) = cos(y)`` elementwise; with θ = 1 and x = 0 the answer is the Dottie number."""

    def forward(self, y: Tensor) -> Tensor:
        return torch.cos(y)


DOTTIE = 0.7390851332151607  # the root of y = cos(y)


def conv_f(channels: int = 2, lipschitz: float = 0.7, seed: int = 0, dtype=DTYPE) -> nn.Module:
    """A small convolutional ``F`` on images (B, C, H, W) with Lipschitz constant ≤ ``lipschitz``.

    Each convolution is divided by the Schur-test bound of its operator 2-norm,
    ``sqrt(‖K‖₁→₁ ‖K‖∞→∞)`` from the absolute kernel sums, so it is
    1-Lipschitz; tanh is 1-Lipschitz, and the second convolution is scaled by
    ``lipschitz``.
    """
    gen = torch.Generator().manual_seed(seed)
    first = nn.Conv2d(channels, 4, 3, padding=1)
    second = nn.Conv2d(4, channels, 3, padding=1)
    with torch.no_grad():
        for conv in (first, second):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
            conv.bias.copy_(0.3 * torch.randn(conv.bias.shape, generator=gen))
            # ‖conv‖₂ ≤ sqrt(max row sum · max column sum) of |kernel| (Schur test).
            w = conv.weight.abs().sum(dim=(2, 3))  # (out, in)
            bound = math.sqrt(float(w.sum(1).max()) * float(w.sum(0).max()))
            conv.weight.div_(bound)
        second.weight.mul_(lipschitz)
    return nn.Sequential(first, nn.Tanh(), second).to(dtype)


# -- references ---------------------------------------------------------------------


def residual_norm(F: nn.Module, x: Tensor, y: Tensor, theta: float) -> Tensor:
    """Per-sample ``‖y − x − (1−θ)F(x) − θF(y)‖₂`` (recomputed from scratch)."""
    with torch.no_grad():
        r = y - x - (1 - theta) * F(x) - theta * F(y)
    return torch.linalg.vector_norm(r.flatten(1), dim=1)


def sample_jacobian(F: nn.Module, z: Tensor) -> Tensor:
    """Dense Jacobian ``∂F(z)/∂z`` of one sample ``z`` (no batch dim), shape (n, n)."""
    n = z.numel()

    def f(v: Tensor) -> Tensor:
        return F(v.reshape(1, *z.shape)).reshape(n)

    return torch.autograd.functional.jacobian(f, z.detach().reshape(n))


def ift_gradients(
    F: nn.Module, x: Tensor, y: Tensor, theta: float, w: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Dense implicit-function-theorem gradients of ``L = Σ w · y`` at the solution ``y``.

    Per sample: ``dy/dx = (I − θJ_y)⁻¹(I + (1−θ)J_x)``, so
    ``∇_x L = (I + (1−θ)J_x)ᵀ g`` with ``g = (I − θJ_y)⁻ᵀ w``, and
    ``∇_γ L = Σ ((1−θ)∂F(x)/∂γ + θ∂F(y)/∂γ)ᵀ g``. Jacobians come from
    ``torch.autograd.functional.jacobian`` and the solves from ``torch.linalg``:
    nothing of irnet's linear solvers is used.
    """
    batch = x.shape[0]
    n = x[0].numel()
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    gx, gs = [], []
    for i in range(batch):
        J_y = sample_jacobian(F, y[i])
        J_x = sample_jacobian(F, x[i])
        dydx = torch.linalg.solve(eye - theta * J_y, eye + (1 - theta) * J_x)
        gx.append((dydx.T @ w[i].reshape(n)).reshape(x[i].shape))
        gs.append(torch.linalg.solve((eye - theta * J_y).T, w[i].reshape(n)).reshape(x[i].shape))
    g = torch.stack(gs)
    params = [p for p in F.parameters()]
    with torch.enable_grad():
        total = ((1 - theta) * F(x.detach()) + theta * F(y.detach())) * g
        grads = torch.autograd.grad(total.sum(), params) if params else ()
    return torch.stack(gx), list(grads)


# -- memory ---------------------------------------------------------------------------


class _Packed:
    """Holder of one tensor saved for backward; alive as long as the graph keeps it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class SavedTensors:
    """Track tensors saved for backward by the graphs built inside the context.

    Every packed tensor goes into a holder object tracked in a ``WeakSet``: the
    holders of graphs that were freed (the transient inner graphs of gradient
    descent or nonlinear CG, say) disappear, so :meth:`alive_bytes` counts only
    what the autograd graph still holds after the forward pass.
    """

    def __init__(self) -> None:
        self._holders: weakref.WeakSet[_Packed] = weakref.WeakSet()

    @contextmanager
    def track(self) -> Iterator["SavedTensors"]:
        def pack(t: Tensor) -> _Packed:
            holder = _Packed(t)
            self._holders.add(holder)
            return holder

        def unpack(holder: _Packed) -> Tensor:
            return holder.tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield self

    def alive_bytes(self) -> int:
        """Bytes of the saved tensors that are still referenced by a graph."""
        return sum(h.tensor.numel() * h.tensor.element_size() for h in list(self._holders))

    def alive_count(self) -> int:
        return len(list(self._holders))
