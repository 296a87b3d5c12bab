"""The stiff and Lotka–Volterra studies in pieces: their grids, measurements, table and figures."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from irnet.datamodules import StiffODE
from irnet.linear import Direct
from irnet.module import ImplicitNetModule
from irnet.nets import FlowNet
from irnet.reproduce import lotka, stiff, stiff_window
from irnet.solvers import Anderson


def test_the_stiff_grid_is_theta_by_spacing_by_seed():
    cells = stiff.cells(stiff.FULL, Path("logs"))
    assert len(cells) == 3 * 3 * 3
    assert {(c["theta"], c["observe_every"], c["seed"]) for c in cells} == {
        (t, e, s) for t in (0.0, 0.5, 1.0) for e in (10, 4, 2) for s in range(3)
    }
    assert {c["problem"] for c in cells} == {"stiff"} and {c["epochs"] for c in cells} == {500}
    narrowed = stiff.cells(stiff.FULL, Path("logs"), seeds=1, epochs=7)
    assert len(narrowed) == 9 and {c["epochs"] for c in narrowed} == {7}


def test_the_lotka_grid_runs_the_lotka_problem():
    cells = lotka.cells(lotka.FULL, Path("logs"))
    assert len(cells) == 3 * 2 * 3 and {c["problem"] for c in cells} == {"lotka"}
    assert {c["observe_every"] for c in cells} == {5, 1}


@pytest.mark.parametrize("problem, features, layers", [("stiff", 1, 20), ("lotka", 2, 50)])
def test_the_studies_train_the_shipped_configs_networks(problem, features, layers):
    module = stiff.make_module(problem, 1.0, 5, epochs=600)
    net = module.net
    assert (net.features, net.layers, net.observe_every) == (features, layers, 5)
    assert all(block.theta == 1.0 for block in net.blocks)
    assert net.shared == (problem == "lotka")
    assert module.horizon_epochs == (300 if problem == "lotka" else 0)


@pytest.mark.parametrize("study", [stiff, lotka])
def test_the_studies_settings_are_the_shipped_configs(study):
    config = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "configs" / f"{study.PROBLEM}.yaml").read_text()
    )
    model = config["model"]["init_args"]
    module = stiff.make_module(study.PROBLEM, 0.5, 1, epochs=study.FULL["epochs"])
    assert study.FULL["epochs"] == config["trainer"]["max_epochs"]
    assert module.lr == model["lr"]
    assert module.horizon_start == model.get("horizon_start", 1)
    assert module.horizon_epochs == model.get("horizon_epochs", 0)
    gamma = inspect.signature(ImplicitNetModule).parameters["lr_gamma"].default  # 0.7
    assert (module.lr_step, module.lr_gamma) == (model["lr_step"], model.get("lr_gamma", gamma))
    clip = config["trainer"].get("gradient_clip_val")
    assert stiff.SETUPS[study.PROBLEM]["gradient_clip_val"] == clip
    net = model["net"]["init_args"]
    for key in ("features", "layers", "T", "shared", "activation", "init"):
        assert getattr(module.net, key, None) in (net[key], None), key
    assert module.net.blocks[0].F.gamma1.shape[0] == net["width"]


@pytest.mark.parametrize("every, start", [(1, 5), (2, 3), (5, 1), (10, 1)])
def test_the_lotka_curriculum_starts_with_five_steps_at_every_spacing(every, start):
    module = stiff.make_module("lotka", 0.5, every, epochs=600)
    assert module.horizon(50 // every, 0) == start  # observations covering the first 5 steps
    assert module.horizon(50 // every, 300) == 50 // every


class _ExactStates(nn.Module):
    """A network whose states are the exact ones plus ``offset``."""

    def __init__(self, data: StiffODE, offset: float) -> None:
        super().__init__()
        self.data, self.offset = data, offset

    def states(self, x: torch.Tensor) -> torch.Tensor:
        return self.data.solve(x.double()).float() + self.offset


class _Exact(nn.Module):
    """A stand-in for a trained module (``module.net.states``)."""

    def __init__(self, data: StiffODE, offset: float) -> None:
        super().__init__()
        self.net = _ExactStates(data, offset)


def test_evaluate_measures_against_the_exact_solution():
    data = StiffODE(observe_every=10, samples=[4, 2, 6])
    exact = stiff.evaluate(_Exact(data, 0.0), data)
    assert exact["rms_observed"] < 1e-6 and exact["rms_all"] < 1e-6
    off = stiff.evaluate(_Exact(data, 0.25), data)
    assert off["rms_observed"] == pytest.approx(0.25, rel=1e-5)
    assert off["rms_all"] == pytest.approx(0.25, rel=1e-5)
    assert off["max_error"] == pytest.approx(0.25, rel=1e-5)
    assert len(off["error_per_step"]) == 21
    drawn = off["trajectories"]
    assert len(drawn["exact"]) == stiff.DRAWN and drawn["observed"] == [10, 20]


def _fake(problem: str, theta: float, every: int, seed: int, error: float) -> dict:
    data = stiff.make_data(problem, every)
    data.samples = [4, 2, 4]
    result = stiff.evaluate(_Exact(data, error), data)
    history = {"val_loss": [1.0, 0.5, error**2], "forward_iterations": [0.0, 2.0, 3.0]}
    return {
        "problem": problem,
        "theta": theta,
        "observe_every": every,
        "seed": seed,
        "history": history,
        "seconds": 60.0,
        **result,
    }


@pytest.mark.parametrize("problem", ["stiff", "lotka"])
def test_summary_and_figures(problem, tmp_path):
    results = [
        _fake(problem, theta, every, seed, 0.01 * (1 + seed))
        for theta in (0.0, 1.0)
        for every in (10, 2)
        for seed in (0, 1)
    ]
    table = stiff.summarize(results)
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 4  # one per (θ, spacing)
    assert "| 0.0 | 10 steps | 2 | 0.015 ± 0.0071 |" in table
    paths = stiff.figures(results, tmp_path)
    assert [p.name for p in paths] == [
        f"{problem}_trajectories.png",
        f"{problem}_errors.png",
        f"{problem}_training.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in paths)


# -- the stiff study with the authors' window ------------------------------------------------------


def test_the_window_study_is_the_stiff_grid_with_the_authors_limits():
    cells = stiff_window.cells(stiff_window.FULL, Path("logs"))
    assert len(cells) == len(stiff.cells(stiff.FULL, Path("logs"))) == 27
    assert {tuple(c["eigenvalue_limits"]) for c in cells} == {(-25.0, -15.0)}
    module = stiff.make_module("stiff", 0.0, 10, 500, cells[0]["eigenvalue_limits"])
    assert all(F.window is not None for F in module.net.residuals)


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_step_amplification_is_the_theta_steps_factor_for_a_linear_flow(theta):
    """With every F_k(y) = hλy (tanh on a tiny scale is linear), the step gain is
    R(θ, hλ) = (1 + (1 − θ)hλ) / (1 − θhλ) at every step, and the learned eigenvalue λ."""
    torch.manual_seed(0)
    net = FlowNet(
        features=1,
        layers=5,
        T=0.5,
        width=4,
        theta=theta,
        solver=Anderson(atol=1e-12),
        linear_solver=Direct(),  # as the study: θ|hλ| = 2 is beyond a Neumann series
    ).double()
    lam = -20.0
    with torch.no_grad():  # tanh(γ1 y) with tiny γ1 is linear: F(y) = h γ2 γ1 y = hλy
        for F in net.residuals:
            F.gamma1.fill_(1e-4)
            F.gamma2.fill_(lam / (1e-4 * 4))
    x = torch.linspace(-1, 1, 7, dtype=torch.float64).reshape(-1, 1)
    measured = stiff_window.step_amplification(net, x)
    z = 0.1 * lam
    gain = abs((1 + (1 - theta) * z) / (1 - theta * z))
    assert measured["amplification_max"] == pytest.approx(gain, rel=1e-5, abs=1e-6)
    assert measured["amplification_median"] == pytest.approx(gain, rel=1e-5, abs=1e-6)
    assert measured["eigenvalue_median"] == pytest.approx(lam, rel=1e-5)
