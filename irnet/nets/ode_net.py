"""The paper's ODE-style implicit networks (eq. 11): lift, implicit blocks over time T, readout."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from irnet._misc import check_choice, check_int, check_positive, check_unit_interval
from irnet.layer import ImplicitResidualBlock
from irnet.linear import GMRES, LinearSolver
from irnet.nets.contraction import NormGroup
from irnet.nets.ensemble import make_ensemble
from irnet.nets.residual import (
    BOUNDED_INIT_LIPSCHITZ,
    CONV_INITS,
    INITS,
    READOUTS,
    ConvResidual,
)
from irnet.nets.rhs import BOUNDED_RHS, RHS, make_residual
from irnet.nets.warm_start import WarmStartCache
from irnet.solvers import NonlinearSolver


class ImplicitODENet(nn.Module, ABC):
    """A lift, ``layers`` implicit residual blocks over time ``T``, and a readout.

    Subclasses build ``self.blocks`` and define :meth:`lift` and :meth:`readout`;
    everything that walks through depth (regularisers, callbacks) uses
    :meth:`trajectory`.
    """

    blocks: nn.ModuleList
    #: off unless a subclass sets it (one that builds ``blocks`` itself need not know it)
    warm_start_cache: Optional[WarmStartCache] = None
    #: networks trained at once (:mod:`irnet.nets.ensemble`); their states are sample-major rows
    members: int = 1

    @staticmethod
    def thetas(theta: Union[float, Sequence[float]], layers: int) -> list[float]:
        """One θ per layer from a scalar or a list of length ``layers``."""
        if isinstance(theta, (int, float)) and not isinstance(theta, bool):
            return [check_unit_interval("theta", theta)] * layers
        theta = list(theta)
        if len(theta) != layers:
            raise ValueError(
                f"theta must be a number or a list of {layers} numbers (one per layer), "
                f"got a list of {len(theta)}"
            )
        return [check_unit_interval(f"theta[{i}]", t) for i, t in enumerate(theta)]

    @staticmethod
    def lipschitz_bounds(
        contraction: Optional[float], thetas: Sequence[float]
    ) -> list[Optional[float]]:
        """Each layer's bound on Lip(F_t) for a contraction factor κ: κ / θ_t (none at θ_t = 0).

        Then θ_t · Lip(F_t) ≤ κ, so each layer's fixed-point map y ↦ c + θ_t F_t(y)
        is a κ-contraction.
        """
        if contraction is None:
            return [None] * len(thetas)
        if (
            isinstance(contraction, bool)
            or not isinstance(contraction, (int, float))
            or not 0 < contraction < 1
        ):
            raise ValueError(f"contraction must be null or a number in (0, 1), got {contraction!r}")
        return [contraction / t if t > 0 else None for t in thetas]

    @staticmethod
    def check_window(contraction: Optional[float], stability_limits) -> None:
        """``contraction`` and ``stability_limits`` exclude each other."""
        if contraction is not None and stability_limits is not None:
            raise ValueError(
                "contraction and stability_limits are mutually exclusive (both bound each "
                "layer's F, differently): set one of them to null"
            )

    @staticmethod
    def bounded_init(residuals: Sequence[nn.Module], stationary: bool = False) -> None:
        """``init="bounded"``: each F_t drawn with ``Lip(F_t) = c / layers``, ``c`` being
        ``BOUNDED_INIT_LIPSCHITZ``.

        With F_t(0) = 0, layer t maps ``‖x‖`` to at most
        ``(1 + (1−θ)ℓ) / (1 − θℓ) · ‖x‖`` (ℓ = c / layers), so the initial
        network's state grows by at most the product of those factors,
        ``≤ exp(c / (1 − c/layers))`` whatever the seed (docs/contraction.md).
        """
        lipschitz = BOUNDED_INIT_LIPSCHITZ / len(residuals)
        for i, F in enumerate(residuals):
            if stationary and i > 0:
                F.load_state_dict(residuals[0].state_dict())
            else:
                F.bounded_init(lipschitz)

    @abstractmethod
    def lift(self, x: Tensor) -> Tensor:
        """Input to the initial state y(0)."""

    @abstractmethod
    def readout(self, y: Tensor) -> Tensor:
        """Final state y(T) to the network's output."""

    def trajectory(self, x: Tensor) -> list[Tensor]:
        """Hidden states ``[y(0), y_1, …, y_T]`` (``layers + 1`` tensors).

        With ``warm_start`` on, each implicit layer's solve starts from the
        sample's fixed point of its last pass (see :mod:`irnet.nets.warm_start`).
        """
        cache = self.warm_start_cache
        if cache is None:
            states = [self.lift(x)]
            for block in self.blocks:
                states.append(block(states[-1]))
            return states
        keys = cache.keys(x)
        guesses = cache.lookup(keys, len(self.blocks)) or [None] * len(self.blocks)
        states = [self.lift(x)]
        # an ensemble's rows of one input are stored together, as one row of the cache
        as_rows = (lambda g: g) if self.members == 1 else (lambda g: g.reshape(states[0].shape))
        for block, guess in zip(self.blocks, guesses):
            states.append(block(states[-1], guess=None if guess is None else as_rows(guess)))
        per_input = (lambda y: y) if self.members == 1 else (lambda y: y.reshape(len(x), -1))
        cache.store(
            keys,
            [
                per_input(y) if block.theta > 0 else None
                for block, y in zip(self.blocks, states[1:])
            ],
        )
        return states

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.trajectory(x)[-1])

    @property
    def warm_start(self) -> bool:
        """Whether solves start from each sample's previous fixed points."""
        return self.warm_start_cache is not None

    @contextmanager
    def warm_start_paused(self) -> Iterator[None]:
        """Solve cold and leave the cache alone inside the context.

        For auxiliary passes on inputs that will not come again (R_rnd's
        perturbed copies, a monitor's probes): they would only fill the cache.
        """
        cache, self.warm_start_cache = self.warm_start_cache, None
        before = getattr(self, "_paused_cache", None)
        if cache is not None:
            self._paused_cache = cache  # still moved by ``_apply`` meanwhile
        try:
            yield
        finally:
            self.warm_start_cache, self._paused_cache = cache, before

    def _make_blocks(
        self,
        residuals: list[nn.Module],
        theta,
        solver,
        linear_solver,
        backward,
        warm_start: bool = False,
        warm_start_capacity: int = 8192,
        compile: bool = False,
        scheme: str = "linear",
    ):
        thetas = self.thetas(theta, len(residuals))
        NormGroup([F.constraint for F in residuals if getattr(F, "constraint", None) is not None])
        self.blocks = nn.ModuleList(
            ImplicitResidualBlock(F, t, solver, linear_solver, backward, scheme=scheme)
            for F, t in zip(residuals, thetas)
        )
        if not isinstance(warm_start, bool):
            raise ValueError(f"warm_start must be true or false, got {warm_start!r}")
        self.warm_start_cache = WarmStartCache(warm_start_capacity) if warm_start else None
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be true or false, got {compile!r}")
        if compile:
            for F in residuals:
                F.compile()

    # The cache travels with checkpoints, so a resumed run starts where it stopped.
    def get_extra_state(self) -> dict:
        return (
            {}
            if self.warm_start_cache is None
            else {"warm_start": self.warm_start_cache.state_dict()}
        )

    def set_extra_state(self, state: dict) -> None:
        if self.warm_start_cache is not None and state.get("warm_start") is not None:
            # On the parameters' device and dtype: a checkpoint's rows are on the CPU, and
            # the network may already be where it trains (or be moved there afterwards).
            like = next((p for p in self.parameters() if p.is_floating_point()), None)
            device, dtype = (None, None) if like is None else (like.device, like.dtype)
            self.warm_start_cache.load_state_dict(state["warm_start"], device, dtype)

    def _apply(self, fn, recurse: bool = True):
        # The warm-start cache is a plain object, not a buffer (its rows are per rank and
        # not in the state dict's tensors): it follows the network's device and dtype here.
        super()._apply(fn, recurse)
        for cache in (self.warm_start_cache, getattr(self, "_paused_cache", None)):
            if cache is not None:
                cache.apply(fn)
        return self


class ODENet(ImplicitODENet):
    """The paper's network (eq. 11): y(0) = (x, x) ∈ ℝ²ⁿ, ``layers`` blocks over [0, T].

    Layer t uses ``F_t(y) = h · γ2_t σ(γ1_t y + b_t)`` with ``h = T / layers`` (``rhs="mlp"``,
    the default; ``rhs`` picks another residual function).
    θ = 0 everywhere gives the explicit ResNet the paper compares against.

    Args:
        in_features: input size n (the state has 2n components).
        out_features: output size (regression outputs or class logits).
        layers: number of blocks.
        T: final time.
        width: hidden width of each F_t.
        theta: θ for every layer, or a list with one θ per layer.
        activation: ``"relu"`` (paper), ``"tanh"`` or ``"gelu"``.
        solver: forward solver (default ``FixedPoint()``).
        linear_solver: adjoint solver (default ``Neumann()``).
        backward: ``"implicit"`` or ``"unrolled"``.
        warm_start: start each layer's solve from the sample's fixed point of
            its previous pass (:mod:`irnet.nets.warm_start`); same tolerance, fewer
            iterations. Safe where the fixed-point maps contract.
        warm_start_capacity: the most samples the warm-start cache keeps.
        compile: compile each residual function with ``torch.compile`` (in
            place, so checkpoints keep their keys). Off by default: on the
            CPU it costs minutes of compilation and ran slower than eager for
            these small states (docs/benchmarks.md); set ``TMPDIR`` to a folder
            of the run, where inductor keeps its cache.
        stationary_init: start every layer from the same weights (the paper's
            "initial stationary weights"); otherwise each layer draws its own.
        readout: ``"component"`` reads ``y(T)[component : component + out_features]``
            (Example 1 reads y(T)[1]); ``"linear"`` applies a linear head
            (classification).
        component: first state component read by the ``"component"`` readout.
        contraction: κ in (0, 1), or ``None`` (off). If set, every implicit
            layer's F_t is constrained at every evaluation so that
            θ_t · Lip(F_t) ≤ κ: its fixed-point map is a κ-contraction, and
            fixed-point and Neumann iterations converge at rate κ
            (docs/contraction.md). Layers with θ = 0 are left alone.
        init: ``"paper"`` (γ ~ N(0, 1) divided by √ρ(γ2 γ1), the paper's; some
            seeds start with outputs of 1e3–1e9 at T = 10) or ``"bounded"``
            (γ1, γ2 scaled so that every F_t has ``Lip(F_t) = 1 / layers`` and
            b = 0: the initial network is Lipschitz with a constant at most
            ``exp(1 / (1 − 1/layers))`` for every seed; docs/contraction.md).
        rhs: the residual functions: ``"mlp"`` (the paper's, above), ``"hamiltonian"``,
            ``"parabolic"`` or ``"hollow"`` (:mod:`irnet.nets.rhs`). ``contraction`` works
            with ``"mlp"`` and ``"parabolic"`` only.
        stability_limits: ``[min, init, max]`` (or ``[min, max]``), or ``None`` (off): the
            spectral window (:mod:`irnet.nets.spectral_window`, docs/contraction.md). Every
            F_t is spectrally normalised and shifted so that the eigenvalues of ∂F_t/∂y lie in
            the disc with diameter ``R⁻¹([min, max])`` for its θ_t; at θ = 1 every layer's
            Jacobian then has eigenvalue moduli in [min, max]. ``init`` sets where the window
            starts. Excludes ``contraction``.
        learn_scales: learn the window's per-feature scales (else fixed).
        learn_shift: learn the window's ends inside ``R⁻¹([min, max])`` (else fixed).
        power_iters: power iterations per optimiser step for the spectral normalisation.
        scheme: the θ-step of every block: ``"linear"`` (the paper's,
            ``y = x + (1 − θ)F(x) + θF(y)``) or ``"one_leg"`` (the authors' code,
            ``y = x + F((1 − θ)x + θy)``); docs/schemes.md.
        ensemble: E, the networks trained at once (:mod:`irnet.nets.ensemble`,
            docs/ensembles.md): member k is this network built right after
            ``torch.manual_seed(member_seeds[k])``, its weights slice k of every parameter. The
            output has ``batch · E`` rows, sample-major (row ``b · E + k`` is member k's
            answer for sample b). ``rhs="mlp"`` without ``stability_limits`` for now.
        member_seeds: the members' seeds; by default the global seed (``seed_everything``)
            plus 0, 1, …, E − 1, so that member k is the single run with that seed.

    Example:
        >>> net = ODENet(in_features=1, out_features=1, layers=3, width=8, init="bounded")
        >>> len(net.blocks)
        3
        >>> net(torch.zeros(5, 1)).shape
        torch.Size([5, 1])
    """

    def __init__(
        self,
        in_features: int = 1,
        out_features: int = 1,
        layers: int = 10,
        T: float = 10.0,
        width: int = 100,
        theta: Union[float, list[float]] = 0.5,
        activation: str = "relu",
        solver: Optional[NonlinearSolver] = None,
        linear_solver: Optional[LinearSolver] = None,
        backward: str = "implicit",
        warm_start: bool = False,
        warm_start_capacity: int = 8192,
        compile: bool = False,
        stationary_init: bool = True,
        readout: str = "component",
        component: int = 1,
        contraction: Optional[float] = None,
        init: str = "paper",
        rhs: str = "mlp",
        stability_limits: Optional[list[float]] = None,
        learn_scales: bool = False,
        learn_shift: bool = False,
        power_iters: int = 1,
        scheme: str = "linear",
        ensemble: int = 1,
        member_seeds: Optional[list[int]] = None,
    ) -> None:
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if check_int("ensemble", ensemble, 1) > 1 and (rhs != "mlp" or stability_limits):
            raise ValueError(
                "ensemble supports rhs='mlp' without stability_limits for now, got "
                f"rhs={rhs!r}, stability_limits={stability_limits!r}"
            )
        self.rhs = check_choice("rhs", rhs, RHS)
        if contraction is not None and rhs not in BOUNDED_RHS:
            raise ValueError(
                f"contraction is implemented for rhs {BOUNDED_RHS} (their Lipschitz bounds), "
                f"not for rhs={rhs!r}: leave contraction null, or use stability_limits"
            )
        self.check_window(contraction, stability_limits)
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.layers = check_int("layers", layers, 1)
        self.T = check_positive("T", T)
        self.readout_kind = check_choice("readout", readout, READOUTS)
        dim = 2 * in_features
        if readout == "component" and not 0 <= component <= dim - out_features:
            raise ValueError(
                f"component must be in [0, {dim - out_features}] to read "
                f"{out_features} of the {dim} states, got {component}"
            )
        self.component = component
        step = self.T / layers
        self.init = check_choice("init", init, INITS)
        self.contraction = contraction
        self.stability_limits = stability_limits
        thetas = self.thetas(theta, layers)
        bounds = self.lipschitz_bounds(contraction, thetas)
        residuals = [
            make_residual(
                rhs,
                dim,
                width,
                step,
                activation,
                bound,
                stability_limits=stability_limits,
                theta=t,
                learn_scales=learn_scales,
                learn_shift=learn_shift,
                power_iters=power_iters,
            )
            for bound, t in zip(bounds, thetas)
        ]
        if init == "bounded":
            self.bounded_init(residuals, stationary_init)
        elif stationary_init:
            for F in residuals[1:]:
                F.load_state_dict(residuals[0].state_dict())
        self._make_blocks(
            residuals,
            theta,
            solver,
            linear_solver,
            backward,
            warm_start,
            warm_start_capacity,
            compile,
            scheme,
        )
        self.head = nn.Linear(dim, out_features) if readout == "linear" else None
        make_ensemble(self, config, ensemble, member_seeds)

    def lift(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (batch, {self.in_features}), got {tuple(x.shape)}")
        y = torch.cat([x, x], dim=1)
        return y if self.members == 1 else y.repeat_interleave(self.members, 0)

    def readout(self, y: Tensor) -> Tensor:
        if self.head is not None:
            return self.head(y)
        return y[:, self.component : self.component + self.out_features]


class ConvODENet(ImplicitODENet):
    """Convolutional implicit network for images: repeat-lift, conv blocks, linear head.

    The input's channels are repeated to ``channels`` (the image analogue of the
    paper's y(0) = (x, x)); every block solves with a convolutional F, and its
    backward goes through the matrix-free linear solver (GMRES by default).

    Args:
        in_channels: image channels.
        image_size: height = width of the images.
        num_classes: classes (logits out).
        channels: state channels (a multiple of ``in_channels``).
        hidden_channels: channels inside each F.
        layers: number of blocks.
        T: final time (h = T / layers).
        theta: θ for every layer, or one per layer.
        activation: activation inside F.
        solver: forward solver (default ``FixedPoint()``).
        linear_solver: adjoint solver (default ``GMRES()``).
        backward: ``"implicit"`` or ``"unrolled"``.
        warm_start: start each layer's solve from the sample's fixed point of
            its previous pass (:mod:`irnet.nets.warm_start`); same tolerance, fewer
            iterations. Safe where the fixed-point maps contract.
        warm_start_capacity: the most samples the warm-start cache keeps.
        compile: compile each residual function with ``torch.compile`` (in
            place, so checkpoints keep their keys). Off by default: on the
            CPU it costs minutes of compilation and ran slower than eager for
            these small states (docs/benchmarks.md); set ``TMPDIR`` to a folder
            of the run, where inductor keeps its cache.
        contraction: κ in (0, 1), or ``None`` (off): θ_t · Lip(F_t) ≤ κ for
            every implicit layer at every evaluation (as in :class:`ODENet`),
            with the convolutions' operator norms bounded through the FFT on
            ``image_size`` images.
        init: ``"default"`` (PyTorch's convolution initialisation) or
            ``"bounded"`` (kernels rescaled so that ``Lip(F_t) = 1 / layers``,
            biases 0, as :class:`ODENet`'s ``init="bounded"``).
        preactivation: σ before each convolution, ``F(y) = h·conv(σ(conv(σ(y))))``, as the
            authors' convolutional right-hand side (default off).
        stability_limits: the spectral window, as in :class:`ODENet` (kernels normalised by
            their operator norms on ``image_size`` images; per-channel scales). Excludes
            ``contraction``.
        learn_scales: learn the window's per-channel scales (else fixed).
        learn_shift: learn the window's ends (else fixed).
        power_iters: power iterations per optimiser step for the spectral normalisation.
        scheme: the θ-step of every block: ``"linear"`` (the paper's,
            ``y = x + (1 − θ)F(x) + θF(y)``) or ``"one_leg"`` (the authors' code,
            ``y = x + F((1 − θ)x + θy)``); docs/schemes.md.
        ensemble: E, the networks trained at once, as in :class:`ODENet` (each block's
            convolutions become one grouped convolution; docs/ensembles.md). Not with
            ``stability_limits`` for now.
        member_seeds: the members' seeds, as in :class:`ODENet`.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        channels: int = 8,
        hidden_channels: int = 16,
        layers: int = 4,
        T: float = 1.0,
        theta: Union[float, list[float]] = 0.5,
        activation: str = "relu",
        solver: Optional[NonlinearSolver] = None,
        linear_solver: Optional[LinearSolver] = None,
        backward: str = "implicit",
        warm_start: bool = False,
        warm_start_capacity: int = 8192,
        compile: bool = False,
        contraction: Optional[float] = None,
        init: str = "default",
        preactivation: bool = False,
        stability_limits: Optional[list[float]] = None,
        learn_scales: bool = False,
        learn_shift: bool = False,
        power_iters: int = 1,
        scheme: str = "linear",
        ensemble: int = 1,
        member_seeds: Optional[list[int]] = None,
    ) -> None:
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if check_int("ensemble", ensemble, 1) > 1 and stability_limits:
            raise ValueError(
                f"ensemble supports networks without stability_limits for now, got "
                f"stability_limits={stability_limits!r}"
            )
        self.check_window(contraction, stability_limits)
        self.in_channels = check_int("in_channels", in_channels, 1)
        if check_int("channels", channels, 1) % in_channels:
            raise ValueError(
                f"channels must be a multiple of in_channels={in_channels}, got {channels}"
            )
        self.channels = channels
        self.image_size = check_int("image_size", image_size, 1)
        self.layers = check_int("layers", layers, 1)
        self.T = check_positive("T", T)
        step = self.T / layers
        self.init = check_choice("init", init, CONV_INITS)
        self.contraction = contraction
        self.stability_limits = stability_limits
        thetas = self.thetas(theta, layers)
        bounds = self.lipschitz_bounds(contraction, thetas)
        residuals = [
            ConvResidual(
                channels,
                hidden_channels,
                3,
                step,
                activation,
                bound,
                image_size,
                preactivation=preactivation,
                stability_limits=stability_limits,
                theta=t,
                learn_scales=learn_scales,
                learn_shift=learn_shift,
                power_iters=power_iters,
            )
            for bound, t in zip(bounds, thetas)
        ]
        if init == "bounded":
            self.bounded_init(residuals)
        linear_solver = linear_solver if linear_solver is not None else GMRES()
        self._make_blocks(
            residuals,
            theta,
            solver,
            linear_solver,
            backward,
            warm_start,
            warm_start_capacity,
            compile,
            scheme,
        )
        self.head = nn.Linear(channels * image_size**2, check_int("num_classes", num_classes, 2))
        make_ensemble(self, config, ensemble, member_seeds)

    def lift(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape (batch, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        y = x.repeat(1, self.channels // self.in_channels, 1, 1)
        return y if self.members == 1 else y.repeat_interleave(self.members, 0)

    def readout(self, y: Tensor) -> Tensor:
        return self.head(y.flatten(1))
