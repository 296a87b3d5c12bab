"""The stiff example as the authors ran it: the learned right-hand side kept stiff by their window.

:mod:`irnet.reproduce.stiff` lets each step learn any F_k, and an explicit step then learns the
exact one-step map directly, so stability never enters. The authors' ``ex_stiff`` instead keeps
the eigenvalues of the learned ∂f/∂y in [−25, −15] (their ``eiglims``, a fixed window around the
true λ = −20; :class:`~irnet.nets.FlowNet`'s ``eigenvalue_limits``), so that every network must
learn a right-hand side as stiff as the true one. That is the setting of the claim "implicit
steps learn stiff dynamics where explicit ones are unstable at large steps": at h = 0.1 the
explicit step's amplification 1 + hλ lies in [−1.5, −0.5] (unstable for λ < −20), the
trapezoidal rule's in [−0.11, 0.14] and backward Euler's in [0.29, 0.40]; the exact flow decays
by e^{−2} = 0.135 per step.

Grid and training as the stiff study (θ ∈ {0, ½, 1} × observed every {10, 4, 2} steps × seeds
0–2, 500 epochs). Besides the errors, each run measures the learned steps' amplification
|∂y_k/∂y_{k−1}| along the test trajectories (the linearised growth of a perturbation per step)
and the learned eigenvalue ∂f/∂y = ∂F_k/∂y / h at the states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from irnet.reproduce import stiff
from irnet.reproduce._runner import fmt, group, markdown_table, mean_std

PROBLEM = "stiff"
#: the authors' ``eiglims`` for ex_stiff: a fixed window (no learned scales or shifts) on ∂f/∂y
EIGENVALUE_LIMITS = (-25.0, -15.0)
FULL = stiff.FULL
TINY = stiff.TINY
PUBLISHED_DRAWINGS = stiff.PUBLISHED_DRAWINGS
HISTORY_STRIDE = stiff.HISTORY_STRIDE
EXACT_DECAY = float(np.exp(-2.0))  # the exact flow's factor over one step (hλ = −2)


def cells(
    settings: dict, log_dir: Path, seeds: Optional[int] = None, epochs: Optional[int] = None
) -> list[dict]:
    """The stiff study's cells, each with the window on."""
    return [
        {**cell, "eigenvalue_limits": list(EIGENVALUE_LIMITS)}
        for cell in stiff.cells(settings, log_dir, seeds, epochs)
    ]


def run_cell(cell: dict) -> dict:
    """Train and measure as the stiff study, then the learned steps' amplification."""
    module, data, history = stiff.train_cell(cell)
    errors = stiff.evaluate(module, data)
    x, _ = data.tensors("test")
    return {"history": history, **errors, **step_amplification(module.net, x)}


def step_amplification(net: torch.nn.Module, x: torch.Tensor) -> dict:
    """Per step k along the trajectories from ``x``: ``|∂y_k/∂y_{k−1}|`` through the solved step
    (its implicit derivative) and the learned eigenvalue ``∂F_k/∂y (y_k) / h``, for a scalar
    state. Returns their largest and median values and the median learned eigenvalue."""
    if net.features != 1:
        raise ValueError(f"step_amplification needs a scalar state, got {net.features} features")
    net.eval()
    with torch.no_grad():
        states = net.states(x)
    gains, eigenvalues = [], []
    for k, block in enumerate(net.blocks):
        y_prev = states[:, k].detach().requires_grad_()
        (gain,) = torch.autograd.grad(block(y_prev).sum(), y_prev)
        y_k = states[:, k + 1].detach().requires_grad_()
        (slope,) = torch.autograd.grad(block.F(y_k).sum(), y_k)
        gains.append(gain.abs().flatten())
        eigenvalues.append(slope.flatten() / net.step)
    gains, eigenvalues = torch.cat(gains), torch.cat(eigenvalues)
    return {
        "amplification_max": float(gains.max()),
        "amplification_median": float(gains.median()),
        "eigenvalue_median": float(eigenvalues.median()),
        "eigenvalue_range": [float(eigenvalues.min()), float(eigenvalues.max())],
    }


def summarize(results: list[dict]) -> str:
    header = [
        "θ",
        "observed every",
        "learned λ, median",
        "step gain, median",
        "step gain, max",
        "runs with a growing step (gain > 1)",
    ]
    rows = []
    for (theta, every), runs in sorted(group(results, ("theta", "observe_every")).items()):
        rows.append(
            [
                theta,
                f"{every} steps",
                fmt(*mean_std(r["eigenvalue_median"] for r in runs)),
                fmt(*mean_std(r["amplification_median"] for r in runs)),
                fmt(*mean_std(r["amplification_max"] for r in runs)),
                f"{sum(r['amplification_max'] > 1 for r in runs)}/{len(runs)}",
            ]
        )
    return (
        f"{stiff.summarize(results)}\n\n"
        f"The learned steps, with the eigenvalues of ∂f/∂y kept in {list(EIGENVALUE_LIMITS)} "
        f"(the true λ = −20; the exact flow's factor per step is e^(−2) = {EXACT_DECAY:.3f}):\n\n"
        f"{markdown_table(header, rows)}\n\n"
        "Measured on the test trajectories, at every step and test initial value: the step gain "
        "|∂y_k/∂y_{k−1}| through the solved step (how much a perturbation grows in one step), "
        "and ∂F_k/∂y / h at the "
        "step's state (the learned eigenvalue). Mean ± standard deviation over seeds."
    )


def figures(results: list[dict], out: Path) -> list[Path]:
    return stiff.figures(results, out)
