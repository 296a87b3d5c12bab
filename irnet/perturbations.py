"""Input perturbations for the stochastic regulariser R_rnd (paper eq. 10).

A :class:`Perturbation` maps a batch to a perturbed copy of it, drawing its
randomness from a ``torch.Generator`` it is handed, so the caller (the
regulariser, or a callback that owns the perturbation streams) decides how the
noise is seeded: the same seed gives the same noise on any device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from irnet._misc import ArgsRepr, check_positive


class Perturbation(ArgsRepr):
    """Base class: a random perturbation of a batch of inputs.

    Subclasses implement :meth:`noise`; :meth:`__call__` adds it to the input.
    Override :meth:`__call__` instead for perturbations that are not additive
    (masking, rotations, ...).
    """

    def noise(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Additive noise with the shape, dtype and device of ``x``."""
        raise NotImplementedError

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """A perturbed copy of ``x`` (``x`` itself is not modified)."""
        return x + self.noise(x, generator)


class GaussianPerturbation(Perturbation):
    """``x + σ ε`` with ``ε ~ N(0, I)`` (the perturbations of the paper's Example 2).

    Args:
        sigma: standard deviation σ > 0.

    Example:
        >>> perturb = GaussianPerturbation(sigma=0.1)
        >>> perturb
        GaussianPerturbation(sigma=0.1)
        >>> x = torch.zeros(1000, 2)
        >>> noisy = perturb(x, torch.Generator().manual_seed(0))
        >>> round(noisy.std().item(), 2)
        0.1
        >>> torch.equal(noisy, perturb(x, torch.Generator().manual_seed(0)))  # same seed
        True
    """

    def __init__(self, sigma: float = 0.05) -> None:
        self.sigma = check_positive("sigma", sigma)

    def noise(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        # Draw where the generator lives (CPU by default) so that a seed gives the
        # same noise on every device, then move it next to x.
        device = generator.device if generator is not None else x.device
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
        return self.sigma * eps.to(x.device)
