"""Figures of the paper as pure functions: arrays in, a matplotlib Figure out.

Fig. 5 (iterations per layer) and Fig. 6 (gradient norms across depth) are
:func:`plot_layer_curves`; Figs. 7–8 are :func:`plot_regression`,
:func:`plot_trajectories` and :func:`plot_vector_fields`; Fig. 9 is
:func:`plot_decision_regions`; how input perturbations grow or damp across
depth (what R_rnd, eq. 10, penalises) is :func:`plot_perturbation_growth`.
Nothing here touches a network or a trainer, so the callbacks stay thin and
the figures are testable on their own. Figures are built without pyplot (no
global figure registry to leak), on the Agg backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

ArrayLike = np.ndarray


def _array(name: str, value, ndim: int) -> np.ndarray:
    """``value`` as a float array with ``ndim`` dimensions, or a ValueError naming it."""
    array = np.asarray(value, dtype=float)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    return array


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have the same length, got {lengths}")


def plot_regression(
    x_grid: ArrayLike,
    y_grid: ArrayLike,
    x_train: ArrayLike,
    y_train: ArrayLike,
    x_target: Optional[ArrayLike] = None,
    y_target: Optional[ArrayLike] = None,
    title: str = "",
) -> Figure:
    """Network output against the target and the training points (1-D regression).

    Args:
        x_grid: inputs where the network was evaluated, shape ``(G,)``.
        y_grid: network outputs there, ``(G,)``.
        x_train: training inputs ``(N,)``.
        y_train: training targets ``(N,)``.
        x_target: inputs of the target curve, ``(M,)``: a fine grid where the
            target function is known, else e.g. the validation inputs.
        y_target: the target values ``(M,)``; drawn sorted by ``x_target``.
        title: the axes' title.
    """
    x_grid, y_grid = _array("x_grid", x_grid, 1), _array("y_grid", y_grid, 1)
    x_train, y_train = _array("x_train", x_train, 1), _array("y_train", y_train, 1)
    _same_length(x_grid=x_grid, y_grid=y_grid)
    _same_length(x_train=x_train, y_train=y_train)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    if x_target is not None and y_target is not None:
        x_target, y_target = _array("x_target", x_target, 1), _array("y_target", y_target, 1)
        _same_length(x_target=x_target, y_target=y_target)
        order = np.argsort(x_target)
        ax.plot(x_target[order], y_target[order], color="0.6", lw=2, label="target")
    ax.plot(x_grid, y_grid, color="C0", lw=1.5, label="network")
    ax.scatter(x_train, y_train, s=12, color="C3", zorder=3, label="training points")
    ax.set(xlabel="x", ylabel="output", title=title)
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_trajectories(
    states: ArrayLike,
    colors: Optional[ArrayLike] = None,
    title: str = "",
    color_label: str = "",
) -> Figure:
    """Hidden-state trajectories ``y_0 → y_1 → … → y_T`` in the plane (Figs. 7–8).

    Args:
        states: shape ``(T+1, N, 2)``: the first two state components of N
            samples at every depth (project higher-dimensional states first).
        colors: one value per sample (input value, class label) for the colour map.
        title: the axes' title.
        color_label: label of the colour bar.
    """
    states = _array("states", states, 3)
    if states.shape[2] != 2:
        raise ValueError(f"states must have shape (T+1, N, 2), got {states.shape}")
    n = states.shape[1]
    values = np.arange(n, dtype=float) if colors is None else _array("colors", colors, 1)
    _same_length(colors=values, samples=states[0])
    span = np.ptp(values) or 1.0
    cmap = matplotlib.colormaps["viridis"]
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    for i in range(n):
        color = cmap((values[i] - values.min()) / span)
        ax.plot(states[:, i, 0], states[:, i, 1], color=color, lw=0.8, alpha=0.8)
    ax.scatter(
        states[0, :, 0], states[0, :, 1], c=values, cmap=cmap, marker="o", s=10, label="$y_0$"
    )
    last = ax.scatter(
        states[-1, :, 0], states[-1, :, 1], c=values, cmap=cmap, marker="x", s=18, label="$y_T$"
    )
    fig.colorbar(last, ax=ax, label=color_label)
    ax.set(xlabel="$y[0]$", ylabel="$y[1]$", title=title)
    ax.legend(loc="best", fontsize="small")
    return fig


@dataclass
class VectorField:
    """One panel of :func:`plot_vector_fields`: ``F_t`` on a grid and the states it acts on.

    Attributes:
        grid_x: grid abscissae, shape ``(G, G)``.
        grid_y: grid ordinates ``(G, G)``.
        u: first component of the field on the grid ``(G, G)``.
        v: second component ``(G, G)``.
        points: states ``(N, 2)`` drawn over the field (e.g. ``y_{t−1}``), or None.
        title: the panel's title.
    """

    grid_x: ArrayLike
    grid_y: ArrayLike
    u: ArrayLike
    v: ArrayLike
    points: Optional[ArrayLike] = None
    title: str = ""


def plot_vector_fields(fields: Sequence[VectorField]) -> Figure:
    """A row of vector fields ``F_t(y)`` with the states they move (Fig. 7)."""
    if len(fields) == 0:
        raise ValueError("fields must hold at least one VectorField")
    fig = Figure(figsize=(4 * len(fields), 4), layout="constrained")
    for k, field in enumerate(fields):
        arrays = [_array(name, getattr(field, name), 2) for name in ("grid_x", "grid_y", "u", "v")]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(
                f"fields[{k}]: grid_x, grid_y, u, v must share one shape, "
                f"got {[a.shape for a in arrays]}"
            )
        ax = fig.add_subplot(1, len(fields), k + 1)
        ax.quiver(*arrays, np.hypot(arrays[2], arrays[3]), cmap="coolwarm", angles="xy")
        if field.points is not None:
            points = _array(f"fields[{k}].points", field.points, 2)
            ax.scatter(points[:, 0], points[:, 1], s=6, color="k", zorder=3)
        ax.set(xlabel="$y[0]$", ylabel="$y[1]$", title=field.title)
    return fig


def plot_decision_regions(
    grid_x: ArrayLike,
    grid_y: ArrayLike,
    predicted: ArrayLike,
    points: ArrayLike,
    labels: ArrayLike,
    title: str = "",
) -> Figure:
    """Predicted class on a grid over the data's bounding box, with the data (Fig. 9).

    Args:
        grid_x: grid abscissae ``(G, G)``.
        grid_y: grid ordinates ``(G, G)``.
        predicted: predicted class index at each grid point ``(G, G)``.
        points: the data's inputs ``(N, 2)``.
        labels: the data's class indices ``(N,)``.
        title: the axes' title.
    """
    grid_x, grid_y = _array("grid_x", grid_x, 2), _array("grid_y", grid_y, 2)
    predicted = _array("predicted", predicted, 2)
    if not grid_x.shape == grid_y.shape == predicted.shape:
        raise ValueError(
            f"grid_x, grid_y and predicted must share one shape, got "
            f"{grid_x.shape}, {grid_y.shape}, {predicted.shape}"
        )
    points, labels = _array("points", points, 2), _array("labels", labels, 1)
    _same_length(points=points, labels=labels)
    classes = int(max(predicted.max(), labels.max())) + 1
    levels = np.arange(classes + 1) - 0.5
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.contourf(grid_x, grid_y, predicted, levels=levels, cmap="coolwarm", alpha=0.35)
    ax.scatter(
        points[:, 0],
        points[:, 1],
        c=labels,
        cmap="coolwarm",
        vmin=0,
        vmax=max(classes - 1, 1),
        s=14,
        edgecolors="k",
        linewidths=0.4,
    )
    ax.set(xlabel="$x[0]$", ylabel="$x[1]$", title=title)
    return fig


def plot_layer_curves(
    curves: Mapping[str, ArrayLike],
    ylabel: str,
    title: str = "",
    log_scale: bool = True,
) -> Figure:
    """Quantities against layer index 1…T: gradient norms (Fig. 6), iterations (Fig. 5).

    Non-finite entries (a layer without data) are left out of their curve; on a
    log scale so are non-positive ones.

    Args:
        curves: label → values per layer, each of shape ``(T,)``.
        ylabel: the y-axis label.
        title: the axes' title.
        log_scale: logarithmic y-axis (vanishing/exploding gradients show as slopes).
    """
    if len(curves) == 0:
        raise ValueError("curves must hold at least one curve")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    plotted = 0
    for label, values in curves.items():
        values = _array(f"curves[{label!r}]", values, 1)
        layers = np.arange(1, len(values) + 1)
        keep = np.isfinite(values) & ((values > 0) if log_scale else True)
        ax.plot(layers[keep], values[keep], marker="o", ms=3, label=label)
        plotted += int(keep.sum())
    if log_scale and plotted:  # a log axis with nothing positive on it only warns
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer t", ylabel=ylabel, title=title)
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_perturbation_growth(distances: ArrayLike, title: str = "") -> Figure:
    """Distance between clean and perturbed hidden states against depth t = 0…T, log scale.

    The dotted horizontal line is the input perturbation ``‖y_0 − ỹ_0‖``: where
    the curve runs above it, the network has amplified the perturbation; below,
    damped it. Non-finite and non-positive entries are left out.

    Args:
        distances: mean ``‖y_t − ỹ_t‖`` for t = 0…T, shape ``(T+1,)``.
        title: the axes' title.
    """
    distances = _array("distances", distances, 1)
    if len(distances) == 0:
        raise ValueError("distances must hold at least one value (depth t = 0)")
    depth = np.arange(len(distances))
    keep = np.isfinite(distances) & (distances > 0)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(depth[keep], distances[keep], marker="o", ms=3, label=r"mean $\|y_t - \tilde y_t\|$")
    if keep[0]:
        ax.axhline(distances[0], color="0.5", ls=":", lw=1, label=r"input, $t = 0$")
    if keep.any():  # a log axis with nothing positive on it only warns
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="depth t", ylabel="distance to the clean state", title=title)
    ax.legend(loc="best", fontsize="small")
    return fig
