"""Layer-by-layer diagnostics of a trained implicit network on one batch.

One forward and backward pass gives, per layer t: the mean forward (fixed
point) iterations, the mean adjoint-solve depth (Neumann terms or GMRES
steps), the gradient magnitude ``‖∂L/∂y_t‖`` (mean over samples of per-sample
norms) and the spectral radii of ``∂y_t/∂y_{t−1}`` (does the layer amplify
perturbations?) and of ``θ ∂F_t/∂y`` (does the fixed-point / Neumann iteration
contract?) from :func:`irnet.analysis.stability.layer_spectral_radii`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from irnet._misc import sample_norm
from irnet.analysis.stability import layer_spectral_radii


def _mean_iterations(stats) -> float:
    return float(stats.iterations.float().mean()) if stats is not None else 0.0


def probe(
    module: torch.nn.Module,
    x: Tensor,
    target: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    krylov_dim: int = 20,
    max_samples: int = 32,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per-layer lists ``forward_iterations``, ``backward_iterations``, ``gradient``,
    ``rho_layer`` / ``rho_neumann`` (mean over up to ``max_samples`` samples) and
    ``rho_layer_max`` / ``rho_neumann_max`` (their maxima).

    ``module`` needs ``trajectory`` and ``readout`` and a ``net`` with ``blocks``
    (an :class:`~irnet.module.ImplicitNetModule` has them). Parameter gradients
    are cleared afterwards.
    """
    blocks = list(module.net.blocks)
    with torch.enable_grad():
        states = module.trajectory(x)
        for state in states[1:]:  # y_0 is the lifted input: no graph before it
            state.retain_grad()
        loss_fn(module.readout(states[-1]), target).backward()
    module.zero_grad(set_to_none=True)
    result: dict[str, list[float]] = {
        "forward_iterations": [_mean_iterations(b.forward_stats) for b in blocks],
        "backward_iterations": [_mean_iterations(b.backward_stats) for b in blocks],
        "gradient": [
            float(sample_norm(s.grad).mean()) if s.grad is not None else 0.0 for s in states[1:]
        ],
    }
    generator = torch.Generator().manual_seed(seed)
    radii = {"rho_layer": [], "rho_layer_max": [], "rho_neumann": [], "rho_neumann_max": []}
    for t, block in enumerate(blocks):
        rho_layer, rho_neumann = layer_spectral_radii(
            block.F,
            block.theta,
            states[t][:max_samples].detach(),
            states[t + 1][:max_samples].detach(),
            krylov_dim,
            generator,
            scheme=block.scheme,
        )
        for name, rho in (("rho_layer", rho_layer), ("rho_neumann", rho_neumann)):
            radii[name].append(float(rho.mean()))
            radii[name + "_max"].append(float(rho.max()))
    return {**result, **radii}
