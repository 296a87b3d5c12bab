"""The pure plotting functions: what they draw, that they save as PNG, and their argument checks."""

from __future__ import annotations

import io
import warnings

import matplotlib
import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.quiver import Quiver

from irnet.analysis.plotting import (
    VectorField,
    plot_decision_regions,
    plot_layer_curves,
    plot_regression,
    plot_trajectories,
    plot_vector_fields,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def assert_png(fig) -> None:
    data = png_bytes(fig)
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000  # a drawn figure, not an empty canvas


def test_backend_is_agg() -> None:
    assert matplotlib.get_backend().lower() == "agg"


def test_regression_draws_network_target_and_points() -> None:
    x_grid = np.linspace(-5, 5, 50)
    x_train = np.linspace(-5, 5, 11)
    x_target = np.array([3.0, -3.0, 0.0])  # unsorted: drawn sorted
    fig = plot_regression(
        x_grid, np.sin(x_grid), x_train, np.sin(x_train), x_target, np.sin(x_target), "t"
    )
    ax = fig.axes[0]
    target, network = ax.lines
    assert target.get_xdata().tolist() == [-3.0, 0.0, 3.0]
    assert np.allclose(network.get_ydata(), np.sin(x_grid))
    (points,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert np.allclose(points.get_offsets(), np.c_[x_train, np.sin(x_train)])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "target",
        "network",
        "training points",
    ]
    assert_png(fig)


def test_trajectories_draw_one_path_per_sample() -> None:
    t = np.linspace(0, 1, 6)[:, None]
    states = np.stack(
        [np.cos(3 * t + np.arange(4)), np.sin(3 * t + np.arange(4))], axis=2
    )  # (6, 4, 2)
    fig = plot_trajectories(states, colors=np.arange(4.0), title="paths", color_label="x")
    ax, colorbar = fig.axes
    assert len(ax.lines) == 4
    for i, line in enumerate(ax.lines):
        assert np.allclose(line.get_xydata(), states[:, i])
    assert colorbar.get_ylabel() == "x"
    assert_png(fig)


def test_vector_fields_draw_one_quiver_per_panel() -> None:
    gx, gy = np.meshgrid(np.linspace(-1, 1, 5), np.linspace(-1, 1, 5))
    panels = [
        VectorField(gx, gy, -gy, gx, np.zeros((3, 2)), "F_1"),
        VectorField(gx, gy, gx, gy, None, "F_2"),
    ]
    fig = plot_vector_fields(panels)
    assert [ax.get_title() for ax in fig.axes] == ["F_1", "F_2"]
    quiver = next(c for c in fig.axes[0].collections if isinstance(c, Quiver))
    assert np.allclose(quiver.U, (-gy).ravel()) and np.allclose(quiver.V, gx.ravel())
    assert_png(fig)


def test_decision_regions_draw_classes_and_data() -> None:
    gx, gy = np.meshgrid(np.linspace(-1, 1, 30), np.linspace(-1, 1, 30))
    predicted = (gx + gy > 0).astype(int)
    points = np.array([[0.5, 0.5], [-0.5, -0.5], [0.2, -0.9]])
    fig = plot_decision_regions(gx, gy, predicted, points, np.array([1, 0, 0]), "decision")
    ax = fig.axes[0]
    scatter = next(c for c in ax.collections if isinstance(c, PathCollection))
    assert np.allclose(scatter.get_offsets(), points)
    assert scatter.get_array().tolist() == [1, 0, 0]
    assert_png(fig)


def test_layer_curves_skip_missing_layers_on_a_log_scale() -> None:
    state = np.array([1e-3, 1e-2, np.nan, 1.0])
    fig = plot_layer_curves(
        {"state": state, "params": np.array([0.0, 2.0, 3.0, 4.0])}, ylabel="norm"
    )
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.lines[0].get_xdata().tolist() == [1, 2, 4]  # layers are numbered from 1; NaN left out
    assert ax.lines[1].get_xdata().tolist() == [2, 3, 4]  # zero cannot sit on a log axis
    assert_png(fig)


def test_layer_curves_without_positive_values_stay_linear_and_quiet() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_layer_curves({"iterations": np.zeros(3)}, ylabel="iterations")
        png_bytes(fig)
    assert fig.axes[0].get_yscale() == "linear"


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (
            lambda: plot_regression(np.zeros(3), np.zeros(4), np.zeros(2), np.zeros(2)),
            "same length",
        ),
        (
            lambda: plot_regression(np.zeros((3, 1)), np.zeros(3), np.zeros(2), np.zeros(2)),
            "x_grid",
        ),
        (lambda: plot_trajectories(np.zeros((3, 4, 3))), "states"),
        (lambda: plot_trajectories(np.zeros((3, 4, 2)), colors=np.zeros(5)), "same length"),
        (lambda: plot_vector_fields([]), "fields"),
        (
            lambda: plot_vector_fields(
                [
                    VectorField(
                        np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((3, 3)), np.zeros((2, 2))
                    )
                ]
            ),
            "share one shape",
        ),
        (
            lambda: plot_decision_regions(
                np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 3)), np.zeros((1, 2)), np.zeros(1)
            ),
            "share one shape",
        ),
        (lambda: plot_layer_curves({}, ylabel="y"), "curves"),
    ],
)
def test_invalid_arguments_are_named(call, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()
