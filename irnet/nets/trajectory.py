"""A network that learns an ODE's flow: one implicit θ-step per time step, states as outputs.

For fitting trajectories (the authors' stiff and Lotka–Volterra examples): the input is an
initial state, each of ``layers`` implicit residual blocks advances it by one step h = T / layers
of a learned right-hand side, and the output is the states at every ``observe_every``-th step,
compared with the observed states. Every step has its own residual function (the stiff example's
right-hand side depends on time), unless ``shared`` makes one F serve all of them.

The network lists its blocks (an :class:`~irnet.nets.protocol.ImplicitNetwork`: solver
statistics and failure diagnosis see them) but is not a trajectory network in the sense of
:class:`~irnet.nets.protocol.TrajectoryNetwork`: its output is a sequence of states, not a
readout of the last one, so :class:`~irnet.module.ImplicitNetModule` trains it through
``forward`` (and the regularisers along the depth do not apply).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from irnet._misc import check_bool, check_choice, check_int, check_positive
from irnet.layer import ImplicitResidualBlock
from irnet.linear import LinearSolver
from irnet.nets.contraction import NormGroup
from irnet.nets.ode_net import ImplicitODENet
from irnet.nets.residual import INITS, MLPResidual
from irnet.nets.spectral_window import check_limits, stability_function
from irnet.nets.warm_start import WarmStartCache
from irnet.solvers import NonlinearSolver


def amplification_limits(
    eigenvalue_limits: Optional[Sequence[float]], theta: float, step: float
) -> Optional[list[float]]:
    """The θ-step's amplification factors ``R(θ, hλ)`` at the eigenvalue limits λ (``None``
    stays ``None``): R increases with λ below 1/(θh), so the order is kept.

    Raises:
        ValueError: naming ``eigenvalue_limits``, if they are not 2 or 3 increasing finite
            numbers, or some hλ reaches the step's pole 1/θ.

    Example:
        >>> [round(r, 6) for r in amplification_limits([-25, -20, -15], 1.0, 0.1)]
        [0.285714, 0.333333, 0.4]
    """
    if eigenvalue_limits is None:
        return None
    limits = check_limits("eigenvalue_limits", eigenvalue_limits)
    if theta > 0 and step * limits[-1] >= 1 / theta:
        raise ValueError(
            f"eigenvalue_limits' max must be < 1/(theta*h) = {1 / (theta * step):g} (the "
            f"step's pole), got {limits[-1]!r}"
        )
    return [stability_function(theta, step * lam) for lam in limits]


class FlowNet(nn.Module):
    """``layers`` implicit θ-steps from an initial state; the states at the observation steps out.

    Step k solves ``y_k = y_{k−1} + (1 − θ) F_k(y_{k−1}) + θ F_k(y_k)`` with
    ``F_k(y) = h · γ2_k σ(γ1_k y + b_k)`` (:class:`~irnet.nets.residual.MLPResidual`,
    h = T / layers). θ = 0 is forward Euler, ½ the trapezoidal rule, 1 backward Euler.

    Args:
        features: size of the state (1 for the stiff example, 2 for Lotka–Volterra).
        layers: steps (one per data step).
        T: final time.
        width: hidden width of each F_k.
        theta: θ of every step, or a list with one per step.
        observe_every: steps between the returned states; must divide ``layers``.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        solver: forward solver (default ``FixedPoint()``; a stiff step needs one that does not
            rely on the fixed-point map contracting, e.g. ``Anderson``).
        linear_solver: adjoint solver (default ``Neumann()``).
        backward: ``"implicit"`` or ``"unrolled"``.
        shared: one residual function for every step (an autonomous ODE), else one per step.
        init: ``"paper"`` (γ ~ N(0, 1) divided by √ρ(γ2 γ1)) or ``"bounded"`` (each F_k with
            Lipschitz constant 1 / layers, b = 0).
        scheme: ``"linear"`` (above) or ``"one_leg"`` (``y_k = y_{k−1} + F_k((1 − θ)y_{k−1} +
            θ y_k)``); docs/schemes.md.
        contraction: κ in (0, 1), or ``None`` (off): every step's F_k constrained so that
            θ_k · Lip(F_k) ≤ κ, as in :class:`~irnet.nets.ODENet` (docs/contraction.md). A stiff
            step (θ h |λ| ≥ 1) cannot then be represented: leave it off there.
        warm_start: start each step's solve from the sample's solution of its previous pass
            (:mod:`irnet.nets.warm_start`).
        warm_start_capacity: the most samples the warm-start cache keeps.
        eigenvalue_limits: ``[min, init, max]`` (or ``[min, max]``), or ``None`` (off): the
            spectral window (:mod:`irnet.nets.spectral_window`) on the learned right-hand side
            f = F_k / h: the eigenvalues of ∂f/∂y stay in the disc with diameter [min, max]
            whatever the weights (the authors' ``eiglims``; their stiff example uses
            [−25, −15] around the true λ = −20). Mapped per step to the amplification limits
            ``R(θ_k h λ)`` of ``stability_limits`` (docs/contraction.md). Excludes
            ``contraction``; with ``shared``, every step must have the same θ.
        learn_scales, learn_shift, power_iters: the window's options, as in
            :class:`~irnet.nets.ODENet`.

    Example:
        >>> net = FlowNet(features=2, layers=4, T=1.0, width=8, observe_every=2)
        >>> net(torch.zeros(3, 2)).shape
        torch.Size([3, 2, 2])
        >>> net.states(torch.zeros(3, 2)).shape
        torch.Size([3, 5, 2])
    """

    def __init__(
        self,
        features: int = 1,
        layers: int = 20,
        T: float = 1.0,
        width: int = 16,
        theta: Union[float, list[float]] = 0.5,
        observe_every: int = 1,
        activation: str = "tanh",
        solver: Optional[NonlinearSolver] = None,
        linear_solver: Optional[LinearSolver] = None,
        backward: str = "implicit",
        shared: bool = False,
        init: str = "paper",
        scheme: str = "linear",
        contraction: Optional[float] = None,
        warm_start: bool = False,
        warm_start_capacity: int = 8192,
        eigenvalue_limits: Optional[list[float]] = None,
        learn_scales: bool = False,
        learn_shift: bool = False,
        power_iters: int = 1,
    ) -> None:
        super().__init__()
        self.features = check_int("features", features, 1)
        self.layers = check_int("layers", layers, 1)
        self.T = check_positive("T", T)
        self.observe_every = check_int("observe_every", observe_every, 1)
        if self.layers % self.observe_every:
            raise ValueError(
                f"observe_every must divide layers={self.layers}, got {self.observe_every}"
            )
        self.shared = check_bool("shared", shared)
        self.init = check_choice("init", init, INITS)
        thetas = ImplicitODENet.thetas(theta, self.layers)
        step = self.T / self.layers
        self.contraction = contraction
        bounds = ImplicitODENet.lipschitz_bounds(contraction, thetas)
        if shared:  # one F for every step: the tightest of the steps' bounds
            bounds = [min((b for b in bounds if b is not None), default=None)]
        if eigenvalue_limits is not None and contraction is not None:
            raise ValueError(
                "eigenvalue_limits and contraction are mutually exclusive (both bound each "
                "step's F): set one of them"
            )
        if shared and eigenvalue_limits is not None and len(set(thetas)) > 1:
            raise ValueError("eigenvalue_limits with shared=True need one theta for every step")
        self.eigenvalue_limits = eigenvalue_limits
        window = {
            "learn_scales": learn_scales,
            "learn_shift": learn_shift,
            "power_iters": power_iters,
        }
        residuals = [
            MLPResidual(
                features,
                width,
                step,
                activation,
                bound,
                stability_limits=amplification_limits(eigenvalue_limits, theta_k, step),
                theta=theta_k,
                **window,
            )
            for bound, theta_k in zip(bounds, thetas)
        ]
        if init == "bounded":
            ImplicitODENet.bounded_init(residuals)
        NormGroup([F.constraint for F in residuals if F.constraint is not None])
        self.residuals = nn.ModuleList(residuals)
        self.blocks = nn.ModuleList(
            ImplicitResidualBlock(
                residuals[0 if shared else k], t, solver, linear_solver, backward, scheme=scheme
            )
            for k, t in enumerate(thetas)
        )
        check_bool("warm_start", warm_start)
        self.warm_start_cache = WarmStartCache(warm_start_capacity) if warm_start else None

    @property
    def step(self) -> float:
        """The step h = T / layers."""
        return self.T / self.layers

    def states(self, x: Tensor) -> Tensor:
        """Every state ``y_0 = x, y_1, …, y_layers``, shape ``(batch, layers + 1, features)``."""
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"x must have shape (batch, {self.features}), got {tuple(x.shape)}")
        cache = self.warm_start_cache
        keys = None if cache is None else cache.keys(x)
        guesses = (None if cache is None else cache.lookup(keys, len(self.blocks))) or [None] * len(
            self.blocks
        )
        states = [x]
        for block, guess in zip(self.blocks, guesses):
            states.append(block(states[-1], guess=guess))
        if cache is not None:
            cache.store(keys, [y if b.theta > 0 else None for b, y in zip(self.blocks, states[1:])])
        return torch.stack(states, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """The states at steps ``observe_every, 2·observe_every, …, layers``: shape
        ``(batch, layers // observe_every, features)``."""
        # contiguous: metrics flatten it with ``view``
        return self.states(x)[:, self.observe_every :: self.observe_every].contiguous()

    # The warm-start cache travels with checkpoints and follows the network's device and dtype,
    # as ImplicitODENet's does.
    def get_extra_state(self) -> dict:
        cache = self.warm_start_cache
        return {} if cache is None else {"warm_start": cache.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        if self.warm_start_cache is not None and state.get("warm_start") is not None:
            like = next(self.parameters())
            self.warm_start_cache.load_state_dict(state["warm_start"], like.device, like.dtype)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.warm_start_cache is not None:
            self.warm_start_cache.apply(fn)
        return self
