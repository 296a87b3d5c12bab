"""A convolutional implicit network over three resolutions: the paper's authors' MNIST architecture.

Their MNIST experiment (code accompanying the paper, ``examples/ex_MNIST``; the
paper reports its noise table, not its network) uses: standardise the pixels, a
7×7 stride-2 convolution to ``c`` channels at 14×14, an ODE block, a 3×3
stride-2 convolution to ``2c`` channels at 7×7, an ODE block, a 4×4 stride-2
convolution to ``4c`` channels at 3×3, an ODE block, average pooling and a
linear classifier. Each ODE block integrates dy/dt = F(y) over ``T`` in
``steps`` θ-method steps, F a same-shape convolution pair.

:class:`StagedConvODENet` builds that network from irnet's blocks
(:class:`~irnet.nets.ConvResidual` in :class:`~irnet.layer.ImplicitResidualBlock`);
what it leaves out of theirs is listed in docs/REPORT.md §4d. Its hidden states
change shape between stages, so it has no single trajectory: the hidden-state
regularisers (R_fp, R_rnd, R_jac) do not apply to it; the solver statistics and
failure diagnosis do (:attr:`blocks` lists every implicit layer).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from irnet._misc import check_choice, check_int, check_positive, check_unit_interval
from irnet.layer import ImplicitResidualBlock
from irnet.linear import GMRES, LinearSolver
from irnet.nets.ensemble import make_ensemble
from irnet.nets.ode_net import ImplicitODENet
from irnet.nets.residual import CONV_INITS, ConvResidual
from irnet.solvers import NonlinearSolver

#: mean and standard deviation of MNIST's training pixels (in [0, 1]), to standardise the inputs
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: (kernel, output side) of the convolution that enters each stage, for 28×28 inputs
STAGE_ENTRIES = ((7, 14), (3, 7), (4, 3))


class Standardize(nn.Module):
    """``(x − mean) / std`` with fixed scalars (in the network, so inputs stay in pixel units)."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = float(mean), check_positive("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class StagedConvODENet(nn.Module):
    """Three stages of implicit convolutional blocks at 14×14, 7×7 and 3×3, for 1×28×28 images.

    Args:
        channels: channels of the first stage (the second has twice, the third four times);
            the authors used 8.
        steps: θ-method steps (implicit layers) per stage; the authors used 2.
        T: integration time per stage (h = T / steps); the authors used 2.
        theta: θ of every implicit layer.
        num_classes: classes (logits out).
        mean, std: the pixel standardisation applied first (default: MNIST's).
        activation: activation inside F.
        contraction: κ in (0, 1), or ``None`` (off): θ · Lip(F) ≤ κ in every layer at every
            evaluation (FFT bounds on the stage's image side), so every fixed-point map contracts.
        init: ``"default"`` (PyTorch's convolution initialisation) or ``"bounded"`` (each F's
            kernels rescaled so that Lip(F) = 1 / steps, biases 0, as
            :class:`~irnet.nets.ConvODENet`).
        solver: forward solver (default ``FixedPoint()``).
        linear_solver: adjoint solver (default ``GMRES()``).
        scheme: the θ-step of every block, ``"linear"`` (the paper's) or ``"one_leg"``
            (the authors' code); docs/schemes.md.
        stability_limits: the spectral window, as in :class:`~irnet.nets.ConvODENet`
            (kernels normalised by their operator norms on the stage's images; per-channel
            scales). Excludes ``contraction``.
        learn_scales: learn the window's per-channel scales (else fixed).
        learn_shift: learn the window's ends (else fixed).
        power_iters: power iterations per optimiser step for the spectral normalisation.
        ensemble: E, the networks trained at once, as in :class:`~irnet.nets.ODENet` (every
            convolution, residual and the classifier become member-wise: grouped convolutions
            and batched products; docs/ensembles.md). Not with ``stability_limits`` for now.
        member_seeds: the members' seeds, as in :class:`~irnet.nets.ODENet`.
    """

    def __init__(
        self,
        channels: int = 8,
        steps: int = 2,
        T: float = 2.0,
        theta: float = 0.5,
        num_classes: int = 10,
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
        activation: str = "relu",
        contraction: Optional[float] = None,
        init: str = "default",
        solver: Optional[NonlinearSolver] = None,
        linear_solver: Optional[LinearSolver] = None,
        scheme: str = "linear",
        stability_limits: Optional[list[float]] = None,
        learn_scales: bool = False,
        learn_shift: bool = False,
        power_iters: int = 1,
        ensemble: int = 1,
        member_seeds: Optional[list[int]] = None,
    ) -> None:
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if check_int("ensemble", ensemble, 1) > 1 and stability_limits:
            raise ValueError(
                "ensemble supports networks without stability_limits for now, got "
                f"stability_limits={stability_limits!r}"
            )
        ImplicitODENet.check_window(contraction, stability_limits)
        self.channels = check_int("channels", channels, 1)
        self.steps = check_int("steps", steps, 1)
        self.T = check_positive("T", T)
        self.theta = check_unit_interval("theta", theta)
        linear_solver = linear_solver if linear_solver is not None else GMRES()
        bound = ImplicitODENet.lipschitz_bounds(contraction, [self.theta])[0]
        self.init = check_choice("init", init, CONV_INITS)
        layers: list[nn.Module] = [Standardize(mean, std)]
        width_in = 1
        for stage, (kernel, side) in enumerate(STAGE_ENTRIES):
            width = channels * 2**stage
            layers.append(nn.Conv2d(width_in, width, kernel, stride=2, padding=(kernel - 1) // 2))
            residuals = [
                ConvResidual(
                    width,
                    width,
                    3,
                    self.T / steps,
                    activation,
                    bound,
                    side,
                    stability_limits=stability_limits,
                    theta=self.theta,
                    learn_scales=learn_scales,
                    learn_shift=learn_shift,
                    power_iters=power_iters,
                )
                for _ in range(steps)
            ]
            if init == "bounded":
                ImplicitODENet.bounded_init(residuals)
            layers += [
                ImplicitResidualBlock(F, self.theta, solver, linear_solver, scheme=scheme)
                for F in residuals
            ]
            width_in = width
        layers += [
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width_in, check_int("num_classes", num_classes, 2)),
        ]
        self.num_classes = num_classes
        self.layers = nn.Sequential(*layers)
        self.members = 1
        make_ensemble(self, config, ensemble, member_seeds)

    @property
    def blocks(self) -> list[ImplicitResidualBlock]:
        """Every implicit layer, first stage first (for solver statistics and failure diagnosis)."""
        return [m for m in self.layers if isinstance(m, ImplicitResidualBlock)]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"x must have shape (batch, 1, 28, 28), got {tuple(x.shape)}")
        # an ensemble's rows: every member's copy of every image, sample-major
        return self.layers(x if self.members == 1 else x.repeat_interleave(self.members, 0))
