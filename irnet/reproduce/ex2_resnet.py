"""Example 2's "original ResNet": the explicit network (θ = 0) on the spirals at the paper's budget.

The paper compares its R_rnd networks with "the original ResNet" (Fig. 9), but the at-budget
study (:mod:`irnet.reproduce.ex2`, docs/REPORT.md §3b) trains θ = ½ only. This study trains
the same classifier with θ = 0 (every layer y_t = y_{t−1} + F_t(y_{t−1}): no solves), with the
same set-up, stopping rule and evaluation: without R_rnd, and with the shipped R_rnd (σ = 0.01,
weight 0.01) to see what the regulariser does to the explicit network. 5 seeds (0–4) each, the
seeds of the θ = ½ study, so runs pair by seed across the two studies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from irnet.reproduce import ex2

THETA = 0.0
FULL = {**ex2.FULL, "sigmas": (0.01,), "weights": (ex2.SHIPPED_WEIGHT,)}
TINY = {**ex2.TINY, "sigmas": (0.01,), "weights": (ex2.SHIPPED_WEIGHT,)}
PUBLISHED_DRAWINGS = ex2.PUBLISHED_DRAWINGS


def cells(
    settings: dict, log_dir: Path, seeds: Optional[int] = None, epochs: Optional[int] = None
) -> list[dict]:
    """ex2's cells (no R_rnd first, every seed), at θ = 0."""
    return [{**cell, "theta": THETA} for cell in ex2.cells(settings, log_dir, seeds, epochs)]


def run_cell(cell: dict) -> dict:
    """Train one explicit classifier to convergence (:func:`irnet.reproduce.ex2.run_cell`)."""
    return ex2.run_cell(cell)


def upgraded(result: dict) -> dict:
    return ex2.upgraded(result)


def summarize(results: list[dict]) -> str:
    return f"Every network here is explicit (θ = 0).\n\n{ex2.summarize(results)}"


def figures(results: list[dict], out: Path) -> list[Path]:
    return ex2.figures(results, out)
