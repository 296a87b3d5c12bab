"""Composite figures of the studies: curves over epochs or layers, one line per configuration.

Each line is the mean over seeds with a band from the smallest to the largest
seed, so a reader sees both the trend and the spread.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def band(
    ax: Axes,
    runs: Sequence[Sequence[float]],
    label: str,
    color: str,
    style: str = "-",
    x: Optional[Sequence[float]] = None,
) -> None:
    """Mean of ``runs`` (one sequence per seed) as a line, their min–max as a shaded band."""
    length = min(len(r) for r in runs)
    values = np.array([list(r)[:length] for r in runs], dtype=float)
    x = np.arange(1, length + 1) if x is None else np.asarray(x)[:length]
    with warnings.catch_warnings():  # all-NaN columns (a metric that does not apply) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    measured = ~np.isnan(mean)  # a series recorded every few epochs (lean runs) draws as a line
    if not measured.any():
        return
    x, mean, low, high = x[measured], mean[measured], low[measured], high[measured]
    ax.plot(x, mean, style, color=color, lw=1.3, label=label)
    ax.fill_between(x, low, high, color=color, alpha=0.15, lw=0)


def grid_figure(
    rows: int, cols: int, width: float = 4.2, height: float = 3.2
) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure with a ``rows × cols`` array of axes."""
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG (120 dpi) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def color(index: int) -> str:
    """The ``index``-th colour of matplotlib's default cycle."""
    return f"C{index % 10}"
