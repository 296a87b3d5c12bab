"""Structured right-hand sides F: Hamiltonian, parabolic and hollow, after the authors' code.

Each is a residual function like :class:`~irnet.nets.MLPResidual` (same-shape ``F(y)``, the
step h included), with a structure on its Jacobian ``J = ∂F/∂y`` that holds for every weight:

* :class:`HamiltonianResidual` — the conservative system of the paper's eq. (4): the state is
  split into halves (p, q); ``ṗ = ∇_q H``, ``q̇ = −∇_p H`` for a learned energy
  ``H(p, q) = Σ S(K1 q + b1) + Σ S(K2 p + b2)`` (S′ = σ), so ``F = h·𝕁∇H`` with
  ``𝕁 = [[0, I], [−I, 0]]`` and J is Hamiltonian: ``Jᵀ𝕁 + 𝕁J = 0`` (its eigenvalues come in
  pairs ±λ; a time-reversible, volume-preserving flow).
* :class:`ParabolicResidual` — ``F(y) = −h Kᵀσ(Ky + b)`` (Haber & Ruthotto, the paper's
  ref. 10): ``J = −h Kᵀ diag(σ′) K`` is symmetric negative semi-definite for monotone σ, so the
  flow is diffusive and its steps are stable for every h at θ = 1.
* :class:`HollowResidual` — an MLP whose output i does not depend on input i: ``J`` has a zero
  diagonal (the authors use it for cheap divergences).

:data:`RHS` names them for ``ODENet(rhs=…)``, and :func:`make_residual` builds one. Each
takes the spectral window (:mod:`irnet.nets.spectral_window`); ``lipschitz`` (the networks'
``contraction``) is implemented for the parabolic one (``Lip(F) ≤ h·a·‖K‖²``) and refused by
the other two.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from irnet._misc import check_choice, check_int, check_positive
from irnet.nets.contraction import ACTIVATION_LIPSCHITZ, LipschitzConstraint
from irnet.nets.residual import ACTIVATIONS, MLPResidual, make_activation
from irnet.nets.spectral_window import make_window

#: the right-hand sides ``ODENet(rhs=…)`` accepts
RHS = ("mlp", "hamiltonian", "parabolic", "hollow")
#: the right-hand sides with a Lipschitz bound (``contraction``)
BOUNDED_RHS = ("mlp", "parabolic")
#: monotone activations (σ′ ≥ 0), which the parabolic F needs
MONOTONE_ACTIVATIONS = ("relu", "tanh")


def _no_lipschitz(kind: str, lipschitz: Optional[float]) -> None:
    if lipschitz is not None:
        raise ValueError(
            f"contraction (a Lipschitz bound) is implemented for rhs {BOUNDED_RHS} only, not "
            f"for {kind!r}: leave contraction null, or use stability_limits"
        )


class _Structured(nn.Module):
    """What the three share: step, activation, window options."""

    def __init__(self, step: float, activation: str) -> None:
        super().__init__()
        self.step = check_positive("step", step)
        self.activation = make_activation(activation)
        self.activation_lipschitz = ACTIVATION_LIPSCHITZ[activation]
        self.window = None

    def _target(self, lipschitz: float) -> float:
        return math.sqrt(
            check_positive("lipschitz", lipschitz) / (self.step * self.activation_lipschitz)
        )

    def _out(self, f: Tensor, y: Tensor) -> Tensor:
        """``h·f`` without a window; ``window(f / a, y)`` with one (f from normalised weights)."""
        if self.window is None:
            return self.step * f
        return self.window(f / self.activation_lipschitz, y)


class HamiltonianResidual(_Structured):
    """``F(p, q) = h·(K1ᵀσ(K1 q + b1), −K2ᵀσ(K2 p + b2))``: ``h·𝕁∇H`` for a learned H.

    Args:
        dim: state size (even: p and q are its halves).
        width: hidden units of each half's potential (rows of K1 and of K2).
        step: the time step h.
        activation: σ, the derivative of the potential's S (any of ``ACTIVATIONS``).
        lipschitz: not implemented (raises if set).
        stability_limits, theta, learn_scales, learn_shift, power_iters: the spectral window,
            as for :class:`~irnet.nets.MLPResidual` (K1, K2 normalised).

    Example:
        >>> F = HamiltonianResidual(4, width=3)
        >>> F(torch.zeros(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        dim: int,
        width: int = 100,
        step: float = 1.0,
        activation: str = "relu",
        lipschitz: Optional[float] = None,
        stability_limits: Optional[list[float]] = None,
        theta: float = 1.0,
        learn_scales: bool = False,
        learn_shift: bool = False,
        power_iters: int = 1,
    ) -> None:
        super().__init__(step, activation)
        _no_lipschitz("hamiltonian", lipschitz)
        if check_int("dim", dim, 2) % 2:
            raise ValueError(f"dim must be even for the hamiltonian rhs (two halves), got {dim}")
        half = dim // 2
        width = check_int("width", width, 1)
        self.K1 = nn.Parameter(torch.empty(width, half))
        self.K2 = nn.Parameter(torch.empty(width, half))
        self.b1 = nn.Parameter(torch.zeros(width))
        self.b2 = nn.Parameter(torch.zeros(width))
        self.constraint = None
        self.window = make_window(
            stability_limits, theta, (dim,), learn_scales, learn_shift, power_iters
        )
        if self.window is not None:
            self.window.add("K1", (half,))
            self.window.add("K2", (half,))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """K1, K2 ~ N(0, 1), each divided by its spectral norm (ρ(KᵢᵀKᵢ) = 1); biases 0."""
        self._draw(1.0)

    @torch.no_grad()
    def bounded_init(self, lipschitz: float) -> None:
        """‖K1‖ = ‖K2‖ = √(lipschitz / (h·a)), biases 0: ``Lip(F) ≤ h·a·max‖Kᵢ‖² = lipschitz``."""
        self._draw(self._target(lipschitz))

    def _draw(self, norm: float) -> None:
        for w in (self.K1, self.K2):
            nn.init.normal_(w)
            w *= norm / torch.linalg.matrix_norm(w, ord=2)
        self.b1.zero_()
        self.b2.zero_()
        self.warm_up()

    def warm_up(self) -> None:
        """Converge the spectral window's power iterations on the current weights (if any)."""
        if self.window is not None:
            self.window.warm_up(K1=self.K1, K2=self.K2)

    def forward(self, y: Tensor) -> Tensor:
        K1, K2 = self.K1, self.K2
        if self.window is not None:
            K1, K2 = self.window.normalized("K1", K1), self.window.normalized("K2", K2)
        p, q = y.chunk(2, dim=-1)
        dp = Fn.linear(self.activation(Fn.linear(q, K1, self.b1)), K1.t())
        dq = -Fn.linear(self.activation(Fn.linear(p, K2, self.b2)), K2.t())
        return self._out(torch.cat([dp, dq], dim=-1), y)


class ParabolicResidual(_Structured):
    """``F(y) = −h Kᵀσ(Ky + b)``: a symmetric negative semi-definite Jacobian (σ monotone).

    Args:
        dim: state size.
        width: hidden units (rows of K).
        step: the time step h.
        activation: a monotone σ: ``"relu"`` or ``"tanh"`` (GELU is not monotone).
        lipschitz: if set, ``Lip(F) ≤ lipschitz`` at every evaluation: K rescaled whenever
            ``h·a·‖K‖²`` exceeds it (:class:`~irnet.nets.LipschitzConstraint` on K twice).
        stability_limits, theta, learn_scales, learn_shift, power_iters: the spectral window,
            as for :class:`~irnet.nets.MLPResidual` (K normalised).

    Example:
        >>> F = ParabolicResidual(2, width=3)
        >>> F(torch.zeros(1, 2)).shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        dim: int,
        width: int = 100,
        step: float = 1.0,
        activation: str = "relu",
        lipschitz: Optional[float] = None,
        stability_limits: Optional[list[float]] = None,
        theta: float = 1.0,
        learn_scales: bool = False,
        learn_shift: bool = False,
        power_iters: int = 1,
    ) -> None:
        if activation in ACTIVATIONS and activation not in MONOTONE_ACTIVATIONS:
            raise ValueError(
                f"activation must be monotone for the parabolic rhs, one of "
                f"{MONOTONE_ACTIVATIONS}, got {activation!r}"
            )
        super().__init__(step, activation)
        self.K = nn.Parameter(torch.empty(check_int("width", width, 1), check_int("dim", dim, 1)))
        self.bias = nn.Parameter(torch.zeros(width))
        self.constraint = (
            None
            if lipschitz is None
            else LipschitzConstraint(
                check_positive("lipschitz", lipschitz), self.step * self.activation_lipschitz
            )
        )
        self.window = make_window(
            stability_limits, theta, (dim,), learn_scales, learn_shift, power_iters, lipschitz
        )
        if self.window is not None:
            self.window.add("K", (dim,))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """K ~ N(0, 1) divided by its spectral norm (ρ(KᵀK) = 1); b = 0."""
        self._draw(1.0)

    @torch.no_grad()
    def bounded_init(self, lipschitz: float) -> None:
        """‖K‖ = √(lipschitz / (h·a)), b = 0: ``Lip(F) ≤ h·a·‖K‖² = lipschitz``."""
        self._draw(self._target(lipschitz))

    def _draw(self, norm: float) -> None:
        nn.init.normal_(self.K)
        self.K *= norm / torch.linalg.matrix_norm(self.K, ord=2)
        self.bias.zero_()
        self.warm_up()

    def warm_up(self) -> None:
        """Converge the spectral window's power iterations on the current weight (if any)."""
        if self.window is not None:
            self.window.warm_up(K=self.K)

    def weight(self) -> Tensor:
        """K as F uses it: normalised in a window, rescaled under a Lipschitz bound, else K."""
        if self.window is not None:
            return self.window.normalized("K", self.K)
        if self.constraint is not None:
            return self.constraint(self.K, self.K)[0]
        return self.K

    def forward(self, y: Tensor) -> Tensor:
        K = self.weight()
        return self._out(-Fn.linear(self.activation(Fn.linear(y, K, self.bias)), K.t()), y)


class HollowResidual(_Structured):
    """``F_i(y) = h · γ2_i σ(γ1 (y with y_i = 0) + b)``: output i ignores input i.

    The Jacobian's diagonal is zero. It costs ``dim`` hidden layers per sample (one per masked
    input), computed together: ``σ(γ1 y + b − γ1[:, i] y_i)`` for every i.

    Args:
        dim: state size.
        width: hidden width (rows of γ1).
        step: the time step h.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        lipschitz: not implemented (raises if set).
        stability_limits, theta, learn_scales, learn_shift, power_iters: the spectral window,
            as for :class:`~irnet.nets.MLPResidual`; γ1 is normalised by its spectral norm and
            γ2 by its Frobenius norm (``‖J‖₂ ≤ h·a·‖γ1‖₂‖γ2‖_F`` for this F).

    Example:
        >>> F = HollowResidual(3, width=4)
        >>> F(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        dim: int,
        width: int = 100,
        step: float = 1.0,
        activation: str = "relu",
        lipschitz: Optional[float] = None,
        stability_limits: Optional[list[float]] = None,
        theta: float = 1.0,
        learn_scales: bool = False,
        learn_shift: bool = False,
        power_iters: int = 1,
    ) -> None:
        super().__init__(step, activation)
        _no_lipschitz("hollow", lipschitz)
        self.gamma1 = nn.Parameter(
            torch.empty(check_int("width", width, 1), check_int("dim", dim, 1))
        )
        self.bias = nn.Parameter(torch.zeros(width))
        self.gamma2 = nn.Parameter(torch.empty(dim, width))
        self.constraint = None
        self.window = make_window(
            stability_limits, theta, (dim,), learn_scales, learn_shift, power_iters
        )
        if self.window is not None:
            self.window.add("gamma1", (dim,))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As :meth:`MLPResidual.reset_parameters`: γ1, γ2 ~ N(0, 1) divided by √ρ(γ2 γ1)."""
        MLPResidual.reset_parameters(self)  # the same draw; it calls warm_up

    @torch.no_grad()
    def bounded_init(self, lipschitz: float) -> None:
        """‖γ1‖₂ = ‖γ2‖_F = √(lipschitz / (h·a)), b = 0: ``Lip(F) ≤ lipschitz``."""
        target = self._target(lipschitz)
        for w, ord in ((self.gamma1, 2), (self.gamma2, "fro")):
            nn.init.normal_(w)
            w *= target / torch.linalg.matrix_norm(w, ord=ord)
        self.bias.zero_()
        self.warm_up()

    def warm_up(self) -> None:
        """Converge the spectral window's power iterations on γ1 (if any)."""
        if self.window is not None:
            self.window.warm_up(gamma1=self.gamma1)

    def forward(self, y: Tensor) -> Tensor:
        gamma1, gamma2 = self.gamma1, self.gamma2
        if self.window is not None:
            gamma1 = self.window.normalized("gamma1", gamma1)
            gamma2 = gamma2 / torch.linalg.vector_norm(gamma2).clamp_min(
                torch.finfo(gamma2.dtype).tiny
            )
        pre = Fn.linear(y, gamma1, self.bias)  # (batch, width)
        # (batch, dim, width): row i is the hidden layer with input i masked out
        hidden = self.activation(pre.unsqueeze(-2) - y.unsqueeze(-1) * gamma1.t())
        return self._out((hidden * gamma2).sum(-1), y)


_CLASSES = {
    "mlp": MLPResidual,
    "hamiltonian": HamiltonianResidual,
    "parabolic": ParabolicResidual,
    "hollow": HollowResidual,
}


def make_residual(
    rhs: str,
    dim: int,
    width: int,
    step: float,
    activation: str,
    lipschitz: Optional[float] = None,
    **window,
) -> nn.Module:
    """The residual function ``rhs`` (one of :data:`RHS`) with these arguments.

    Raises:
        ValueError: naming ``rhs`` and the choices for an unknown one; for ``lipschitz`` with
            an rhs outside :data:`BOUNDED_RHS`.

    Example:
        >>> type(make_residual("parabolic", dim=2, width=3, step=0.5, activation="tanh")).__name__
        'ParabolicResidual'
    """
    cls = _CLASSES[check_choice("rhs", rhs, RHS)]
    return cls(dim, width, step, activation, lipschitz, **window)
