"""Residual functions F: the right-hand sides dy/dt = F(y) that an implicit block solves with."""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from irnet._misc import check_bool, check_choice, check_int, check_positive
from irnet.nets.contraction import ACTIVATION_LIPSCHITZ, LipschitzConstraint, conv_norm
from irnet.nets.spectral_window import make_window

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
            (a = the activation's Lipschitz constant; :mod:`irnet.nets.contraction`).
            The parameters keep their names and raw values.
        stability_limits: if set, ``[min, init, max]``: the spectral window
            (:mod:`irnet.nets.spectral_window`): γ1 and γ2 are spectrally normalised and
            ``F(y) = ½[(b − a)·sigmoid(s) ⊙ γ̂2 σ(γ̂1 y + b₁)/a_σ + (a + b)·y]``, with
            ``[a, b] = R⁻¹([min, max])`` for the θ-step (h no longer enters F). Excludes
            ``lipschitz``.
        theta: θ of the step F is used in (for ``stability_limits`` only).
        learn_scales: learn the window's per-feature scales.
        learn_shift: learn the window's ends (inside [a, b]).
        power_iters: power iterations per weight change for the spectral normalisation.
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
    ):
        super().__init__()
        self.step = check_positive("step", step)
        self.gamma1 = nn.Parameter(
            torch.empty(check_int("width", width, 1), check_int("dim", dim, 1))
        )
        self.bias = nn.Parameter(torch.zeros(width))
        self.gamma2 = nn.Parameter(torch.empty(dim, width))
        self.activation = make_activation(activation)
        self.activation_lipschitz = ACTIVATION_LIPSCHITZ[activation]
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
            self.window.add("gamma1", (dim,))
            self.window.add("gamma2", (width,))
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
        self.warm_up()

    def warm_up(self) -> None:
        """Converge the spectral window's power iterations on the current weights (if any)."""
        if self.window is not None:
            self.window.warm_up(gamma1=self.gamma1, gamma2=self.gamma2)

    @torch.no_grad()
    def bounded_init(self, lipschitz: float) -> None:
        """γ1, γ2 ~ N(0, 1), each scaled to spectral norm ``√(lipschitz / (h·a))``; b = 0.

        Then ``h · a · ‖γ2‖ ‖γ1‖ = lipschitz`` exactly, whatever the draw, and
        F(0) = 0 (σ(0) = 0 for every activation here), so ``‖F(y)‖ ≤ lipschitz · ‖y‖``.
        """
        target = math.sqrt(
            check_positive("lipschitz", lipschitz) / (self.step * self.activation_lipschitz)
        )
        for w in (self.gamma1, self.gamma2):
            nn.init.normal_(w)
            w *= target / torch.linalg.matrix_norm(w, ord=2)
        self.bias.zero_()
        self.warm_up()

    def weights(self) -> tuple[Tensor, Tensor]:
        """(γ1, γ2) as F uses them: rescaled under a Lipschitz bound, else the parameters."""
        if self.constraint is None:
            return self.gamma1, self.gamma2
        return self.constraint(self.gamma1, self.gamma2)

    def forward(self, y: Tensor) -> Tensor:
        if self.window is not None:
            gamma1 = self.window.normalized("gamma1", self.gamma1)
            gamma2 = self.window.normalized("gamma2", self.gamma2)
            hidden = self.activation(Fn.linear(y, gamma1, self.bias))
            return self.window(Fn.linear(hidden, gamma2) / self.activation_lipschitz, y)
        gamma1, gamma2 = self.weights()
        # Fused ``linear`` (addmm): fewer operations per evaluation than matmul + add.
        return self.step * Fn.linear(self.activation(Fn.linear(y, gamma1, self.bias)), gamma2)


class ConvResidual(nn.Module):
    """``F(y) = h · conv(σ(conv(y)))`` with same-shape convolutions, for image states.

    With ``preactivation`` σ is applied before each convolution, as in the authors'
    convolutional right-hand side: ``F(y) = h · conv(σ(conv(σ(y))))``; its Lipschitz bound
    then carries ``a²`` (a = σ's Lipschitz constant).

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
            (:func:`irnet.nets.contraction.conv_norm`).
        image_size: the largest image side (required with ``lipschitz`` and
            ``stability_limits``).
        preactivation: σ before each convolution (default off: today's F).
        stability_limits: if set, ``[min, init, max]``: the spectral window
            (:mod:`irnet.nets.spectral_window`): both kernels normalised by their operator norms
            on ``image_size`` images (power iterations), per-channel scales. Excludes
            ``lipschitz``.
        theta: θ of the step F is used in (for ``stability_limits`` only).
        learn_scales: learn the window's per-channel scales.
        learn_shift: learn the window's ends (inside [a, b]).
        power_iters: power iterations per weight change for the spectral normalisation.
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
        preactivation: bool = False,
        stability_limits: Optional[list[float]] = None,
        theta: float = 1.0,
        learn_scales: bool = False,
        learn_shift: bool = False,
        power_iters: int = 1,
    ):
        super().__init__()
        if check_int("kernel_size", kernel_size, 1) % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the shape, got {kernel_size}")
        self.step = check_positive("step", step)
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(
            check_int("channels", channels, 1),
            check_int("hidden_channels", hidden_channels, 1),
            kernel_size,
            padding=pad,
        )
        self.activation = make_activation(activation)
        self.conv2 = nn.Conv2d(hidden_channels, channels, kernel_size, padding=pad)
        self.preactivation = check_bool("preactivation", preactivation)
        # the Lipschitz constant of σ as it enters F: twice with pre-activation
        self.activation_lipschitz = ACTIVATION_LIPSCHITZ[activation] ** (2 if preactivation else 1)
        self.image_size = None if image_size is None else check_int("image_size", image_size, 1)
        self.constraint = None
        self.window = make_window(
            stability_limits,
            theta,
            (channels, 1, 1),
            learn_scales,
            learn_shift,
            power_iters,
            lipschitz,
        )
        if self.window is not None:
            size = self._size()
            self.window.add("conv1", (channels, size, size), pad)
            self.window.add("conv2", (hidden_channels, size, size), pad)
            self.warm_up()
        if lipschitz is not None:
            if image_size is None:
                raise ValueError(
                    "image_size is required with lipschitz (the norm bound depends on it)"
                )
            self.constraint = LipschitzConstraint(
                check_positive("lipschitz", lipschitz),
                self.step * self.activation_lipschitz,
                partial(conv_norm, size=image_size),
            )

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
        target = math.sqrt(
            check_positive("lipschitz", lipschitz) / (self.step * self.activation_lipschitz)
        )
        for conv in (self.conv1, self.conv2):
            conv.reset_parameters()
            conv.weight *= target / self.norm_bound(conv.weight)
            conv.bias.zero_()
        self.warm_up()

    def warm_up(self) -> None:
        """Converge the spectral window's power iterations on the current kernels (if any)."""
        if self.window is not None:
            self.window.warm_up(conv1=self.conv1.weight, conv2=self.conv2.weight)

    def forward(self, y: Tensor) -> Tensor:
        pre = self.activation if self.preactivation else (lambda v: v)
        if self.constraint is None and self.window is None:
            return self.step * self.conv2(self.activation(self.conv1(pre(y))))
        if max(y.shape[-2:]) > self.image_size:
            raise ValueError(
                f"y's images must be at most {self.image_size} wide and high under the "
                f"{'Lipschitz bound' if self.window is None else 'spectral window'}, "
                f"got {tuple(y.shape[-2:])}"
            )
        if self.window is not None:
            w1 = self.window.normalized("conv1", self.conv1.weight)
            w2 = self.window.normalized("conv2", self.conv2.weight)
        else:
            w1, w2 = self.constraint(self.conv1.weight, self.conv2.weight)
        hidden = self.activation(Fn.conv2d(pre(y), w1, self.conv1.bias, padding=self.conv1.padding))
        out = Fn.conv2d(hidden, w2, self.conv2.bias, padding=self.conv2.padding)
        if self.window is not None:
            return self.window(out / self.activation_lipschitz, y)
        return self.step * out
