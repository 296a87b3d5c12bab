"""Residual functions F: the right-hand sides dy/dt = F(y) that an implicit block solves with."""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from irnet._misc import check_choice, check_int, check_positive
from irnet.nets.contraction import ACTIVATION_LIPSCHITZ, LipschitzConstraint, conv_norm

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
    """

    def __init__(
        self,
        dim: int,
        width: int = 100,
        step: float = 1.0,
        activation: str = "relu",
        lipschitz: Optional[float] = None,
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
        target = math.sqrt(
            check_positive("lipschitz", lipschitz) / (self.step * self.activation_lipschitz)
        )
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
            (:func:`irnet.nets.contraction.conv_norm`).
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
        self.conv1 = nn.Conv2d(
            check_int("channels", channels, 1),
            check_int("hidden_channels", hidden_channels, 1),
            kernel_size,
            padding=pad,
        )
        self.activation = make_activation(activation)
        self.conv2 = nn.Conv2d(hidden_channels, channels, kernel_size, padding=pad)
        self.activation_lipschitz = ACTIVATION_LIPSCHITZ[activation]
        self.image_size = None if image_size is None else check_int("image_size", image_size, 1)
        self.constraint = None
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

    def forward(self, y: Tensor) -> Tensor:
        if self.constraint is None:
            return self.step * self.conv2(self.activation(self.conv1(y)))
        if max(y.shape[-2:]) > self.image_size:
            raise ValueError(
                f"y's images must be at most {self.image_size} wide and high under the "
                f"Lipschitz bound, got {tuple(y.shape[-2:])}"
            )
        w1, w2 = self.constraint(self.conv1.weight, self.conv2.weight)
        hidden = self.activation(Fn.conv2d(y, w1, self.conv1.bias, padding=self.conv1.padding))
        return self.step * Fn.conv2d(hidden, w2, self.conv2.bias, padding=self.conv2.padding)
