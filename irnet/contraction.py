"""Lipschitz bounds on residual functions, enforced at every evaluation (docs/contraction.md).

A residual ``F(y) = h · A2 σ(A1 y + b)`` with linear maps ``A1``, ``A2`` and a
σ of Lipschitz constant ``a`` has ``Lip(F) ≤ h · a · ‖A2‖₂ ‖A1‖₂``.
:class:`LipschitzConstraint` rescales the two weights before each evaluation
so that this product is at most a given bound ``L``: when
``h · a · ‖A2‖ ‖A1‖ > L`` both weights are multiplied by the same factor
``√(L / (h · a · ‖A2‖ ‖A1‖))``, otherwise they are used as they are. Only the
product is constrained, not how it splits between the factors (the split is
free to learn; for ReLU it is a mere rescaling of the hidden units).

The operator norms are exact, not power-iteration estimates (which are lower
bounds of σ_max and so could let the bound slip): the largest singular value
of a matrix (``torch.linalg.matrix_norm(ord=2)``), and for a zero-padded
convolution the largest singular value of its circular extension over all
frequencies of the FFT grid (an upper bound of the padded operator's norm).
A relative margin :data:`MARGIN` below ``L`` absorbs the rounding of those
norms. The raw parameters keep their names, so checkpoints are unchanged.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

#: relative margin kept below the bound, for rounding in the computed norms
MARGIN = 1e-4


def gelu_lipschitz() -> float:
    """sup |GELU'(x)| = Φ(√2) + √2 φ(√2) ≈ 1.1289 (GELU'' = φ(x)(2 − x²) vanishes at √2)."""
    r = math.sqrt(2.0)
    return 0.5 * (1 + math.erf(r / math.sqrt(2.0))) + r * math.exp(-1.0) / math.sqrt(2 * math.pi)


#: Lipschitz constant of each activation of :data:`irnet.nets.ACTIVATIONS`
ACTIVATION_LIPSCHITZ = {"relu": 1.0, "tanh": 1.0, "gelu": gelu_lipschitz()}


def matrix_norm(weight: Tensor) -> Tensor:
    """Exact spectral norm (largest singular value) of a matrix, differentiable."""
    return torch.linalg.matrix_norm(weight, ord=2)


def conv_norm(weight: Tensor, size: int) -> Tensor:
    """Upper bound of the operator norm of a stride-1, zero-padded "same" conv2d on images ≤ ``size``.

    The padded convolution on an n×n image equals crop ∘ circular convolution
    on an N×N grid ∘ zero embedding whenever N ≥ n + k//2; embedding and crop
    have norm 1, and the circular convolution is block-diagonalised by the DFT,
    its norm being the largest singular value of the kernel's transfer matrix
    over the N×N frequencies. Real kernels have conjugate-symmetric transfer
    matrices, so half the frequencies (``rfft2``) suffice.

    Args:
        weight: kernel of shape (out, in, k, k).
        size: the largest image side the bound must hold for.
    """
    grid = size + weight.shape[-1] // 2
    transfer = torch.fft.rfft2(weight, s=(grid, grid))  # (out, in, N, N//2 + 1)
    return torch.linalg.matrix_norm(transfer.permute(2, 3, 0, 1), ord=2).amax()


class LipschitzConstraint(nn.Module):
    """Rescales a residual's two weights so that ``scale · ‖W2‖ ‖W1‖ ≤ bound``.

    It holds no parameters or buffers. In grad mode the factor is computed
    afresh (differentiably) at every call; without grad (the solver's
    iterations) it is cached until a weight changes (new tensor, storage,
    dtype or in-place version), so a solve costs one norm computation.

    Args:
        bound: the largest allowed ``Lip(F)``.
        scale: ``h · a``: the residual's step times its activation's Lipschitz constant.
        norm: the operator norm of one weight (:func:`matrix_norm`, or
            :func:`conv_norm` with the image size bound in).
    """

    def __init__(self, bound: float, scale: float, norm: Callable[[Tensor], Tensor] = matrix_norm) -> None:
        super().__init__()
        if not bound > 0:
            raise ValueError(f"bound must be positive, got {bound!r}")
        self.bound = float(bound)
        self.scale = float(scale)
        self.norm = norm
        self._cache: Optional[tuple[tuple, tuple[Tensor, ...]]] = None

    def lipschitz(self, *weights: Tensor) -> Tensor:
        """The bound ``scale · Π ‖W‖`` on Lip(F) for these (unconstrained) weights."""
        value = torch.ones((), dtype=weights[0].dtype, device=weights[0].device) * self.scale
        for w in weights:
            value = value * self.norm(w)
        return value

    def factor(self, *weights: Tensor) -> Tensor:
        """The per-weight multiplier ``min(1, bound / Lip)^(1/len(weights))``."""
        lip = self.lipschitz(*weights)
        ratio = (self.bound * (1 - MARGIN) / lip.clamp_min(torch.finfo(lip.dtype).tiny)).clamp(max=1.0)
        return ratio ** (1.0 / len(weights))

    def forward(self, *weights: Tensor) -> tuple[Tensor, ...]:
        """The weights, rescaled together if their bound exceeds ``bound``."""
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            s = self.factor(*weights)
            return tuple(w * s for w in weights)
        key = self._key(weights)
        if self._cache is not None and self._same(self._cache[0], key):
            return self._cache[1]
        s = self.factor(*weights)
        out = tuple(w * s for w in weights)
        if not torch.compiler.is_compiling():
            self._cache = (key, out)
        return out

    @staticmethod
    def _key(weights: Sequence[Tensor]) -> tuple:
        return (torch.is_inference_mode_enabled(),) + tuple(
            (w, w._version, w.data_ptr(), w.dtype, w.device) for w in weights)

    @staticmethod
    def _same(old: tuple, new: tuple) -> bool:
        if old[0] != new[0]:
            return False
        return all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(old[1:], new[1:]))

    def extra_repr(self) -> str:
        return f"bound={self.bound:.6g}"


__all__ = ["ACTIVATION_LIPSCHITZ", "LipschitzConstraint", "MARGIN", "conv_norm", "gelu_lipschitz",
           "matrix_norm"]
