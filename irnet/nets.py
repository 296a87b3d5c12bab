"""Residual functions F and the paper's ODE-style implicit networks (eq. 11)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from irnet.contraction import ACTIVATION_LIPSCHITZ, LipschitzConstraint, NormGroup, conv_norm
from irnet.layer import ImplicitResidualBlock
from irnet.linear import GMRES, LinearSolver
from irnet.solvers import NonlinearSolver
from irnet.warm_start import WarmStartCache
from irnet.validation import check_choice, check_int, check_positive, check_unit_interval

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
READOUTS = ("component", "linear")
INITS = ("paper", "bounded")
CONV_INITS = ("default", "bounded")
#: c of ``init="bounded"``: the sum over layers of each F_t's Lipschitz bound at initialisation
BOUNDED_INIT_LIPSCHITZ = 1.0


def make_activation(name: str) -> nn.Module:
    """The activation called ``name`` (one of ``ACTIVATIONS``)."""
    return ACTIVATIONS[check_choice("activation", name, tuple(ACTIVATIONS))]()


class MLPResidual(nn.Module):
    """``F(y) = h · γ2 σ(γ1 y + b)``, one layer of the paper's network (eq. 11).

    Args:
        dim: state size (2n for an input of size n).
        width: hidden width (rows of γ1).
        step: the time step h.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        lipschitz: if set, ``Lip(F) ≤ lipschitz`` at every evaluation: γ1 and γ2
            are rescaled together whenever ``h · a · ‖γ2‖₂ ‖γ1‖₂`` exceeds it
            (a = the activation's Lipschitz constant; :mod:`irnet.contraction`).
            The parameters keep their names and raw values.
    """

    def __init__(self, dim: int, width: int = 100, step: float = 1.0, activation: str = "relu",
                 lipschitz: Optional[float] = None):
        super().__init__()
        self.step = check_positive("step", step)
        self.gamma1 = nn.Parameter(torch.empty(check_int("width", width, 1), check_int("dim", dim, 1)))
        self.bias = nn.Parameter(torch.zeros(width))
        self.gamma2 = nn.Parameter(torch.empty(dim, width))
        self.activation = make_activation(activation)
        self.activation_lipschitz = ACTIVATION_LIPSCHITZ[activation]
        self.constraint = None if lipschitz is None else LipschitzConstraint(
            check_positive("lipschitz", lipschitz), self.step * self.activation_lipschitz)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper's Example 1: γ1, γ2 ~ N(0, 1), both divided by √ρ(γ2 γ1); b = 0."""
        nn.init.normal_(self.gamma1)
        nn.init.normal_(self.gamma2)
        rho = torch.linalg.eigvals(self.gamma2 @ self.gamma1).abs().max()
        scale = rho.clamp_min(1e-12).sqrt().to(self.gamma1.dtype)
        self.gamma1 /= scale
        self.gamma2 /= scale
        self.bias.zero_()

    @torch.no_grad()
    def bounded_init(self, lipschitz: float) -> None:
        """γ1, γ2 ~ N(0, 1), each scaled to spectral norm ``√(lipschitz / (h·a))``; b = 0.

        Then ``h · a · ‖γ2‖ ‖γ1‖ = lipschitz`` exactly, whatever the draw, and
        F(0) = 0 (σ(0) = 0 for every activation here), so ``‖F(y)‖ ≤ lipschitz · ‖y‖``.
        """
        target = math.sqrt(check_positive("lipschitz", lipschitz) / (self.step * self.activation_lipschitz))
        for w in (self.gamma1, self.gamma2):
            nn.init.normal_(w)
            w *= target / torch.linalg.matrix_norm(w, ord=2)
        self.bias.zero_()

    def weights(self) -> tuple[Tensor, Tensor]:
        """(γ1, γ2) as F uses them: rescaled under a Lipschitz bound, else the parameters."""
        if self.constraint is None:
            return self.gamma1, self.gamma2
        return self.constraint(self.gamma1, self.gamma2)

    def forward(self, y: Tensor) -> Tensor:
        gamma1, gamma2 = self.weights()
        # Fused ``linear`` (addmm): fewer operations per evaluation than matmul + add.
        return self.step * Fn.linear(self.activation(Fn.linear(y, gamma1, self.bias)), gamma2)


class ConvResidual(nn.Module):
    """``F(y) = h · conv(σ(conv(y)))`` with same-shape convolutions, for image states.

    Args:
        channels: channels of the state.
        hidden_channels: channels between the two convolutions.
        kernel_size: odd kernel size (padding keeps the spatial shape).
        step: the time step h.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        lipschitz: if set, ``Lip(F) ≤ lipschitz`` at every evaluation on images
            of side at most ``image_size``: both kernels are rescaled together
            whenever ``h · a · ‖conv2‖ ‖conv1‖`` exceeds it, with each
            convolution's operator norm bounded exactly through the FFT
            (:func:`irnet.contraction.conv_norm`).
        image_size: the largest image side (required with ``lipschitz``).
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int = 16,
        kernel_size: int = 3,
        step: float = 1.0,
        activation: str = "relu",
        lipschitz: Optional[float] = None,
        image_size: Optional[int] = None,
    ):
        super().__init__()
        if check_int("kernel_size", kernel_size, 1) % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the shape, got {kernel_size}")
        self.step = check_positive("step", step)
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(check_int("channels", channels, 1),
                               check_int("hidden_channels", hidden_channels, 1), kernel_size, padding=pad)
        self.activation = make_activation(activation)
        self.conv2 = nn.Conv2d(hidden_channels, channels, kernel_size, padding=pad)
        self.activation_lipschitz = ACTIVATION_LIPSCHITZ[activation]
        self.image_size = None if image_size is None else check_int("image_size", image_size, 1)
        self.constraint = None
        if lipschitz is not None:
            if image_size is None:
                raise ValueError("image_size is required with lipschitz (the norm bound depends on it)")
            self.constraint = LipschitzConstraint(check_positive("lipschitz", lipschitz),
                                                  self.step * self.activation_lipschitz,
                                                  partial(conv_norm, size=image_size))

    def norm_bound(self, w: Tensor) -> Tensor:
        """Operator-norm bound of one of this F's convolutions with kernel ``w``."""
        return conv_norm(w, self._size())[0]

    def _size(self) -> int:
        if self.image_size is None:
            raise ValueError("image_size is needed to bound the convolutions' norms")
        return self.image_size

    @torch.no_grad()
    def bounded_init(self, lipschitz: float) -> None:
        """Kernels scaled to operator-norm bound ``√(lipschitz / (h·a))`` each; biases 0.

        Then ``Lip(F) ≤ lipschitz`` and F(0) = 0 whatever the draw (the draw is
        PyTorch's default one). Needs ``image_size``.
        """
        target = math.sqrt(check_positive("lipschitz", lipschitz) / (self.step * self.activation_lipschitz))
        for conv in (self.conv1, self.conv2):
            conv.reset_parameters()
            conv.weight *= target / self.norm_bound(conv.weight)
            conv.bias.zero_()

    def forward(self, y: Tensor) -> Tensor:
        if self.constraint is None:
            return self.step * self.conv2(self.activation(self.conv1(y)))
        if max(y.shape[-2:]) > self.image_size:
            raise ValueError(f"y's images must be at most {self.image_size} wide and high under the "
                             f"Lipschitz bound, got {tuple(y.shape[-2:])}")
        w1, w2 = self.constraint(self.conv1.weight, self.conv2.weight)
        hidden = self.activation(Fn.conv2d(y, w1, self.conv1.bias, padding=self.conv1.padding))
        return self.step * Fn.conv2d(hidden, w2, self.conv2.bias, padding=self.conv2.padding)


class ImplicitODENet(nn.Module):
    """A lift, ``layers`` implicit residual blocks over time ``T``, and a readout.

    Subclasses build ``self.blocks`` and define :meth:`lift` and :meth:`readout`;
    everything that walks through depth (regularisers, callbacks) uses
    :meth:`trajectory`.
    """

    blocks: nn.ModuleList
    #: off unless a subclass sets it (one that builds ``blocks`` itself need not know it)
    warm_start_cache: Optional[WarmStartCache] = None

    @staticmethod
    def thetas(theta: Union[float, Sequence[float]], layers: int) -> list[float]:
        """One θ per layer from a scalar or a list of length ``layers``."""
        if isinstance(theta, (int, float)) and not isinstance(theta, bool):
            return [check_unit_interval("theta", theta)] * layers
        theta = list(theta)
        if len(theta) != layers:
            raise ValueError(f"theta must be a number or a list of {layers} numbers (one per layer), "
                             f"got a list of {len(theta)}")
        return [check_unit_interval(f"theta[{i}]", t) for i, t in enumerate(theta)]

    @staticmethod
    def lipschitz_bounds(contraction: Optional[float], thetas: Sequence[float]) -> list[Optional[float]]:
        """Each layer's bound on Lip(F_t) for a contraction factor κ: κ / θ_t (none at θ_t = 0).

        Then θ_t · Lip(F_t) ≤ κ, so each layer's fixed-point map y ↦ c + θ_t F_t(y)
        is a κ-contraction.
        """
        if contraction is None:
            return [None] * len(thetas)
        if isinstance(contraction, bool) or not isinstance(contraction, (int, float)) \
                or not 0 < contraction < 1:
            raise ValueError(f"contraction must be null or a number in (0, 1), got {contraction!r}")
        return [contraction / t if t > 0 else None for t in thetas]

    @staticmethod
    def bounded_init(residuals: Sequence[nn.Module], stationary: bool = False) -> None:
        """``init="bounded"``: each F_t drawn with ``Lip(F_t) = c / layers`` (c = BOUNDED_INIT_LIPSCHITZ).

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

    def lift(self, x: Tensor) -> Tensor:
        """Input to the initial state y(0)."""
        raise NotImplementedError

    def readout(self, y: Tensor) -> Tensor:
        """Final state y(T) to the network's output."""
        raise NotImplementedError

    def trajectory(self, x: Tensor) -> list[Tensor]:
        """Hidden states ``[y(0), y_1, …, y_T]`` (``layers + 1`` tensors).

        With ``warm_start`` on, each implicit layer's solve starts from the
        sample's fixed point of its last pass (see :mod:`irnet.warm_start`).
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
        for block, guess in zip(self.blocks, guesses):
            states.append(block(states[-1], guess=guess))
        cache.store(keys, [y if block.theta > 0 else None for block, y in zip(self.blocks, states[1:])])
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

    def _make_blocks(self, residuals: list[nn.Module], theta, solver, linear_solver, backward,
                     warm_start: bool = False, warm_start_capacity: int = 8192,
                     compile: bool = False):
        thetas = self.thetas(theta, len(residuals))
        NormGroup([F.constraint for F in residuals if getattr(F, "constraint", None) is not None])
        self.blocks = nn.ModuleList(
            ImplicitResidualBlock(F, t, solver, linear_solver, backward)
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
        return {} if self.warm_start_cache is None else {"warm_start": self.warm_start_cache.state_dict()}

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

    Layer t uses ``F_t(y) = h · γ2_t σ(γ1_t y + b_t)`` with ``h = T / layers``.
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
            its previous pass (:mod:`irnet.warm_start`); same tolerance, fewer
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
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        self.layers = check_int("layers", layers, 1)
        self.T = check_positive("T", T)
        self.readout_kind = check_choice("readout", readout, READOUTS)
        dim = 2 * in_features
        if readout == "component" and not 0 <= component <= dim - out_features:
            raise ValueError(f"component must be in [0, {dim - out_features}] to read "
                             f"{out_features} of the {dim} states, got {component}")
        self.component = component
        step = self.T / layers
        self.init = check_choice("init", init, INITS)
        self.contraction = contraction
        bounds = self.lipschitz_bounds(contraction, self.thetas(theta, layers))
        residuals = [MLPResidual(dim, width, step, activation, bound) for bound in bounds]
        if init == "bounded":
            self.bounded_init(residuals, stationary_init)
        elif stationary_init:
            for F in residuals[1:]:
                F.load_state_dict(residuals[0].state_dict())
        self._make_blocks(residuals, theta, solver, linear_solver, backward, warm_start,
                         warm_start_capacity, compile)
        self.head = nn.Linear(dim, out_features) if readout == "linear" else None

    def lift(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (batch, {self.in_features}), got {tuple(x.shape)}")
        return torch.cat([x, x], dim=1)

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
            its previous pass (:mod:`irnet.warm_start`); same tolerance, fewer
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
    ) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, 1)
        if check_int("channels", channels, 1) % in_channels:
            raise ValueError(f"channels must be a multiple of in_channels={in_channels}, got {channels}")
        self.channels = channels
        self.image_size = check_int("image_size", image_size, 1)
        self.layers = check_int("layers", layers, 1)
        self.T = check_positive("T", T)
        step = self.T / layers
        self.init = check_choice("init", init, CONV_INITS)
        self.contraction = contraction
        bounds = self.lipschitz_bounds(contraction, self.thetas(theta, layers))
        residuals = [ConvResidual(channels, hidden_channels, 3, step, activation, bound, image_size)
                     for bound in bounds]
        if init == "bounded":
            self.bounded_init(residuals)
        linear_solver = linear_solver if linear_solver is not None else GMRES()
        self._make_blocks(residuals, theta, solver, linear_solver, backward, warm_start,
                         warm_start_capacity, compile)
        self.head = nn.Linear(channels * image_size**2, check_int("num_classes", num_classes, 2))

    def lift(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (batch, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        return x.repeat(1, self.channels // self.in_channels, 1, 1)

    def readout(self, y: Tensor) -> Tensor:
        return self.head(y.flatten(1))


__all__ = ["ACTIVATIONS", "BOUNDED_INIT_LIPSCHITZ", "ConvODENet", "ConvResidual", "ImplicitODENet", "MLPResidual", "ODENet",
           "make_activation"]
