"""The authors' Lotka–Volterra example: learning a predator–prey flow with θ-steps.

Set-up as in ``configs/lotka.yaml``: x′ = αx − βxy, y′ = δxy − γy (α = 2/3, β = 4/3, γ = δ = 1)
on [0, 10] with 50 steps (h = 0.2), 16 training initial populations in [0.5, 1.5] × [0.25, 1],
observed every 5 steps or at every step; a :class:`~irnet.nets.FlowNet` with one shared residual
function (the ODE is autonomous), 600 epochs of the mean squared error (Adam, lr 3·10⁻³, ×0.3
after epoch 500, gradients clipped to norm 1) with a curriculum over the horizon: the observations
in the first 5 steps first (5 of them at every step, 1 every 5 steps), all of them after 300
epochs.

Grid: θ ∈ {0, ½, 1} × observed every {5, 1} steps × seeds 0–2. The cells, the measurements, the
table and the figures are the stiff study's (:mod:`irnet.reproduce.stiff`); the figures draw the
phase plane.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from irnet.reproduce import stiff

PROBLEM = "lotka"
FULL = {"thetas": (0.0, 0.5, 1.0), "observe": (5, 1), "seeds": 3, "epochs": 600}
TINY = {"thetas": (0.0, 1.0), "observe": (5,), "seeds": 1, "epochs": 2}

PUBLISHED_DRAWINGS = stiff.PUBLISHED_DRAWINGS
HISTORY_STRIDE = stiff.HISTORY_STRIDE


def cells(
    settings: dict, log_dir: Path, seeds: Optional[int] = None, epochs: Optional[int] = None
) -> list[dict]:
    """Every seed of one (θ, observation spacing) before the next."""
    return [{**cell, "problem": PROBLEM} for cell in stiff.cells(settings, log_dir, seeds, epochs)]


def run_cell(cell: dict) -> dict:
    """Train one network and measure its errors (:func:`irnet.reproduce.stiff.run_cell`)."""
    return stiff.run_cell(cell)


def summarize(results: list[dict]) -> str:
    return stiff.summarize(results)


def figures(results: list[dict], out: Path) -> list[Path]:
    return stiff.figures(results, out)
