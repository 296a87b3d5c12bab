"""``reproduce digits_theta``, θ's effect on robustness to noise over step and depth: its grid,
the equal-accuracy state and the paired θ table."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from irnet.reproduce import digits_theta
from irnet.reproduce._runner import fmt, mean_std


def test_grid_varies_the_step_at_10_layers_and_the_depth_at_h_half():
    cells = digits_theta.cells(digits_theta.FULL, Path("logs"))
    assert len(cells) == 3 * 5 * 3
    geometries = {(c["layers"], c["T"] / c["layers"]) for c in cells}
    assert {h for n, h in geometries if n == 10} == {0.25, 0.5, 1.0}
    assert {n for n, h in geometries if h == 0.5} == {5, 10, 20}
    assert {c["theta"] for c in cells} == {0.0, 0.5, 1.0}
    # seed by seed, θ ascending within a geometry: a study cut short has whole comparisons
    assert [c["seed"] for c in cells] == sorted(c["seed"] for c in cells)
    assert [c["theta"] for c in cells[:3]] == [0.0, 0.5, 1.0]
    assert {
        c["epochs"] for c in digits_theta.cells(digits_theta.FULL, Path("logs"), seeds=1, epochs=7)
    } == {7}


def test_first_reached_keeps_the_state_of_the_first_epoch_at_the_target():
    layer, callback = torch.nn.Linear(1, 1), digits_theta.FirstReached(0.95)
    for epoch, (accuracy, sanity) in enumerate(
        [(0.99, True), (0.9, False), (math.nan, False), (0.96, False), (0.97, False)]
    ):
        layer.weight.data.fill_(float(epoch))
        trainer = SimpleNamespace(
            callback_metrics={"val/acc": torch.tensor(accuracy)},
            sanity_checking=sanity,
            current_epoch=epoch,
        )
        callback.on_validation_end(trainer, layer)
    assert callback.epoch == 4 and callback.state["weight"].item() == 3.0


def _run(theta: float, seed: int, equal: float | None, best: float) -> dict:
    tested = {"best": {**{str(s): best for s in (0.0, *digits_theta.NOISE)}, "jacobian": 2.0}}
    if equal is not None:
        tested["equal"] = {str(s): equal for s in (0.0, *digits_theta.NOISE)}
    history = {
        "val_acc": [0.9, 0.96],
        "train_loss": [0.5, 0.2],
        "forward_iterations": [9.0, 8.0],
        "stopped": [2.0] if equal is None else [],
    }
    return {
        "theta": theta,
        "layers": 10,
        "T": 5.0,
        "seed": seed,
        "equal_epoch": 2 if equal is not None else None,
        "best_epoch": 2,
        "epochs_run": 2,
        "tested": tested,
        "history": history,
        "seconds": 30.0,
    }


def test_direction_table_pairs_each_theta_with_theta_0_of_the_same_seed():
    results = [
        _run(0.0, 0, 0.6, 0.5),
        _run(0.0, 1, 0.6, 0.5),
        _run(1.0, 0, 0.7, 0.4),
        _run(1.0, 1, 0.5, 0.45),
        _run(0.0, 2, 0.6, 0.5),
        _run(1.0, 2, None, 0.3),
    ]  # seed 2 at θ = 1 never reached 0.95
    table = digits_theta.summarize(results)
    direction = [
        line
        for line in table.split("Change in test accuracy")[1].splitlines()
        if line.startswith("| 10")
    ]
    equal, best = [cell.strip() for cell in direction[0].strip("| ").split(" | ")][2:]
    assert (
        equal == f"{fmt(*mean_std([0.1, -0.1]), digits=2)} (1/2)"
    )  # seed 2 left out: no equal state
    assert best == f"{fmt(*mean_std([-0.1, -0.05, -0.2]), digits=2)} (0/3)"
    rows = [
        line
        for line in table.split("Change in test accuracy")[0].splitlines()
        if line.startswith("| 10")
    ]
    theta_1 = [cell.strip() for cell in rows[1].strip("| ").split(" | ")]
    assert theta_1[:6] == ["10", "0.5", "1.0", "3", "2, 2, never", "2, 2, 2 (broke)"]
    assert theta_1[6] == fmt(
        *mean_std([0.7, 0.5])
    )  # equal: clean, over the seeds that reached 0.95
    never = digits_theta.summarize([_run(1.0, 0, None, 0.4)])
    assert "| 10 | 0.5 | 1.0 | 1 | never | 2 (broke) | – |" in never


def test_paper_noise_is_half_the_pixel_range_in_standardised_units():
    from sklearn.datasets import load_digits

    assert digits_theta.PAPER_NOISE == pytest.approx(0.5 * 16 / load_digits().data.std(), abs=0.005)
    assert digits_theta.PAPER_NOISE in digits_theta.NOISE


def test_input_jacobian_norm_of_a_linear_map_is_its_frobenius_norm():
    linear = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    assert digits_theta.input_jacobian_norm(linear, x) == pytest.approx(
        float(linear.weight.norm()), rel=1e-6
    )
    assert not x.requires_grad
