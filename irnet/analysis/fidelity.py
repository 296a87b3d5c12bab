"""What a cheap gradient costs: its cosine similarity to the exact implicit gradient.

A network trained with :class:`~irnet.linear.JacobianFree` or
:class:`~irnet.linear.Phantom` adjoints follows an approximate gradient. On a
probe batch, :func:`gradient_cosine` computes the parameter gradient twice, with
the blocks' own adjoint solvers and with a tight exact one, and returns the
cosine of the angle between them (1: same direction; ≤ 0: no longer a descent
direction). The blocks' statistics are left as they were.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from irnet.linear import GMRES, LinearSolver
from irnet.stats import preserved_stats


def tight_gmres(dtype: torch.dtype) -> GMRES:
    """GMRES to a relative residual near ``dtype``'s rounding (1e-8 in float64, 1e-6 in float32)."""
    return GMRES(rtol=max(1e-8, 10 * torch.finfo(dtype).eps), max_iter=500, restart=50)


@contextmanager
def linear_solvers_replaced(blocks: Sequence[nn.Module], solver: LinearSolver) -> Iterator[None]:
    """Every block's ``linear_solver`` is ``solver`` inside the context."""
    saved = [b.linear_solver for b in blocks]
    try:
        for b in blocks:
            b.linear_solver = solver
        yield
    finally:
        for b, s in zip(blocks, saved):
            b.linear_solver = s


def gradient_cosine(
    net: nn.Module,
    loss: Callable[[], Tensor],
    reference: Optional[LinearSolver] = None,
) -> Tensor:
    """Cosine similarity between the configured and the exact parameter gradient of ``loss()``.

    Args:
        net: a network with ``blocks`` (e.g. :class:`~irnet.nets.ODENet`).
        loss: closure that runs the network on the probe batch and returns a scalar.
        reference: the exact adjoint solver; default :func:`tight_gmres` in the
            parameters' dtype (exact at any state size).

    Returns:
        0-d tensor in [-1, 1].
    """
    blocks = list(net.blocks)
    params = [p for p in net.parameters() if p.requires_grad]
    if reference is None:
        reference = tight_gmres(params[0].dtype if params else torch.get_default_dtype())
    # Lightning validates under inference mode; gradients need it off, on fresh tensors.
    with torch.inference_mode(False), torch.enable_grad(), preserved_stats(blocks):
        approximate = _flat_grad(loss(), params)
        with linear_solvers_replaced(blocks, reference):
            exact = _flat_grad(loss(), params)
    denominator = (approximate.norm() * exact.norm()).clamp_min(torch.finfo(exact.dtype).tiny)
    return (approximate @ exact) / denominator


def _flat_grad(value: Tensor, params: list[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]
    )
