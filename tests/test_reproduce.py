"""``python -m irnet reproduce``: helpers, the per-layer probe, and each study end to end at a tiny size."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from irnet.module import ImplicitNetModule, l2_loss
from irnet.nets import ODENet
from irnet.reproduce import ex1
from irnet.reproduce.probe import probe
from irnet.reproduce.runner import group, markdown_table, mean_std
from irnet.solvers import FixedPoint
from irnet.linear import Direct


def test_mean_std_is_the_sample_statistics():
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std().item())
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_group_and_markdown_table():
    results = [{"a": 1, "seed": 0}, {"a": 2, "seed": 0}, {"a": 1, "seed": 1}]
    groups = group(results, ("a",))
    assert [len(v) for v in groups.values()] == [2, 1]
    table = markdown_table(["a", "n"], [[k[0], len(v)] for k, v in groups.items()])
    assert table.splitlines() == ["| a | n |", "|---|---|", "| 1 | 2 |", "| 2 | 1 |"]


def test_seed_screen_keeps_exactly_the_seeds_with_moderate_initial_outputs():
    chosen = ex1.screen_seeds(2, layers=10)
    x = torch.linspace(-5, 5, 51)[:, None]
    for seed in range(chosen[-1] + 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            moderate = bool(ex1.make_net(10, 0.0)(x).abs().max() <= ex1.MAX_INITIAL_OUTPUT)
        assert moderate == (seed in chosen)


def test_probe_gradients_and_iterations_match_an_unrolled_network():
    torch.manual_seed(0)
    kwargs = dict(in_features=1, out_features=1, layers=3, T=1.0, width=8, theta=0.5, activation="tanh")
    implicit = ODENet(**kwargs, solver=FixedPoint(tol=1e-12, max_iter=200), linear_solver=Direct()).double()
    unrolled = ODENet(**kwargs, solver=FixedPoint(tol=1e-12, max_iter=200), backward="unrolled").double()
    unrolled.load_state_dict(implicit.state_dict())
    # No x = 0: there y_0 = 0 is already the fixed point, unrolled mode takes no iteration
    # and its derivative is that of "return y_0" (the identity), not the solution's.
    x = torch.linspace(-1, 1, 6, dtype=torch.float64)[:, None]
    target = torch.sin(3 * x) + 0.5  # away from the outputs: the L2 norm has a kink at zero
    module = ImplicitNetModule(implicit, loss="l2")
    result = probe(module, x, target, l2_loss, krylov_dim=2)

    states = unrolled.trajectory(x)
    grads = torch.autograd.grad(l2_loss(unrolled.readout(states[-1]), target), states[1:])
    expected = [g.norm(dim=1).mean().item() for g in grads]
    assert result["gradient"] == pytest.approx(expected, rel=1e-8)
    assert result["forward_iterations"] == pytest.approx(
        [b.forward_stats.iterations.double().mean().item() for b in implicit.blocks])
    assert all(p.grad is None for p in implicit.parameters())
    # the layer map of a tanh residual with T/3 steps is near the identity: radius near 1, positive
    assert all(0.5 < r < 2.0 for r in result["rho_layer"])
    assert all(r_max >= r for r, r_max in zip(result["rho_layer"], result["rho_layer_max"]))


def _reproduce(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "irnet", "reproduce", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_unknown_study_is_refused_with_the_choices(tmp_path):
    result = _reproduce("ex3", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'ex3'" in result.stderr and "robustness" in result.stderr


def test_ex1_only_options_are_refused_elsewhere(tmp_path):
    result = _reproduce("ex2", "--layers", "3", cwd=tmp_path)
    assert result.returncode == 2 and "--layers and --thetas apply to ex1 only" in result.stderr
    result = _reproduce("ex1", "--replot", cwd=tmp_path)
    assert result.returncode == 2 and "--replot needs a finished run's" in result.stderr
    result = _reproduce("ex1", "--thetas", "1.5", cwd=tmp_path)
    assert result.returncode == 2 and "θ must be in [0, 1], got 1.5" in result.stderr


def test_stability_study_writes_its_report(tmp_path):
    result = _reproduce("stability", "--tiny", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {"phase_portraits.png", "spectral_radius.png", "theta_regions.png", "summary.md",
            "results.json"} <= {p.name for p in (tmp_path / "out").iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("study, cells, figures", [
    ("ex1", 12, 6),
    ("ex2", 4, 3),
    ("robustness", 4, 2),
])
def test_study_runs_end_to_end_at_a_tiny_size(tmp_path, study, cells, figures):
    result = _reproduce(study, "--tiny", "--workers", "1", "--out", "out", "--log-dir", "logs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["cells"]) == cells
    assert saved["meta"]["command"].startswith("python -m irnet reproduce " + study)
    assert all(c["seconds"] > 0 and len(c["history"]["train_loss"]) == c["epochs"] for c in saved["cells"])
    summary = (out / "summary.md").read_text()
    table_rows = [line for line in summary.splitlines() if line.startswith("| ")][1:]  # minus the header
    assert len(table_rows) == cells  # one seed at the tiny size: one row per cell
    pngs = list(out.glob("*.png"))
    assert len(pngs) == figures and all(p.stat().st_size > 10_000 for p in pngs)
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))
    # the figures and table can be redrawn from the saved cells without training
    again = _reproduce(study, "--tiny", "--replot", "--out", "out2", "--log-dir", "logs", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "out2" / "summary.md").read_text().split("|", 1)[1] == summary.split("|", 1)[1]
