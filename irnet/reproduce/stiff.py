"""The authors' stiff example: do implicit steps learn y′ = −20(y − cos t) where explicit ones fail?

Set-up as in ``configs/stiff.yaml``: trajectories of y′ = −20(y − cos t) on [0, 2] with 20 steps
(h = 0.1, hλ = −2: forward Euler's amplification |1 + hλ| = 1, the edge of its stability region),
16 training initial values in [−0.5, 1.5], observed every 10, 4 or 2 steps; a
:class:`~irnet.nets.FlowNet` with one θ-step per data step, each with its own weights (the
right-hand side depends on t), trained with the mean squared error for 500 epochs (Adam, lr 10⁻²).

Grid: θ ∈ {0, ½, 1} × observed every {10, 4, 2} steps × seeds 0–2 (the data are the same for
every seed; the seed draws the network's weights).

Per configuration, on 8 test initial values: the root mean squared error at the observed steps
(what the loss saw), at every step of the grid (including the unobserved ones between
observations) and the largest error, against the exact solution; the training curves; and the
learned against the exact trajectories. The Lotka–Volterra study (:mod:`irnet.reproduce.lotka`)
runs the same machinery on another problem.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pytorch_lightning as pl
import torch

from irnet.datamodules import LotkaVolterra, StiffODE, TrajectoryDataModule
from irnet.linear import Direct
from irnet.module import TrajectoryModule
from irnet.nets import FlowNet
from irnet.reproduce._figures import band, color, grid_figure, save
from irnet.reproduce._runner import fmt, group, markdown_table, mean_std, train
from irnet.solvers import Anderson

PROBLEM = "stiff"
FULL = {"thetas": (0.0, 0.5, 1.0), "observe": (10, 4, 2), "seeds": 3, "epochs": 500}
TINY = {"thetas": (0.0, 1.0), "observe": (10,), "seeds": 1, "epochs": 3}
SAMPLES = (16, 8, 8)  # initial values in the train, val and test splits
DRAWN = 4  # test trajectories kept for the figures
PUBLISHED_DRAWINGS = ("trajectories",)  # kept in results.json: --replot draws from it
HISTORY_STRIDE = 10  # results.json keeps every 10th epoch of the histories (cells.json all)
#: the network and training of each problem (configs/stiff.yaml, configs/lotka.yaml).
#: ``horizon_steps``: the curriculum's first horizon in ODE steps, so that it spans the same time
#: at every observation spacing (counted in observations, 5 of them every 5 steps were 25 steps,
#: longer than the half period the curriculum avoids, and no spacing-5 run learned the flow)
SETUPS = {
    "stiff": {
        "net": {"features": 1, "layers": 20, "T": 2.0, "width": 16, "shared": False},
        "horizon_steps": 1,
        "horizon_fraction": 0.0,
        "lr": 1e-2,
        "lr_step": 10_000,  # constant
        "lr_gamma": 0.7,  # the module's default, never applied
        "gradient_clip_val": None,
    },
    "lotka": {
        "net": {"features": 2, "layers": 50, "T": 10.0, "width": 32, "shared": True},
        "horizon_steps": 5,
        "horizon_fraction": 0.5,  # the curriculum over the first half of the epochs
        "lr": 3e-3,
        "lr_step": 500,
        "lr_gamma": 0.3,
        "gradient_clip_val": 1.0,
    },
}


def make_data(problem: str, observe_every: int) -> TrajectoryDataModule:
    """The problem's data (seed 0: the same for every run), observed every ``observe_every``
    steps."""
    if problem == "stiff":
        return StiffODE(observe_every=observe_every, samples=list(SAMPLES))
    return LotkaVolterra(observe_every=observe_every, samples=list(SAMPLES))


def make_module(
    problem: str,
    theta: float,
    observe_every: int,
    epochs: int,
    eigenvalue_limits: Optional[list[float]] = None,
) -> TrajectoryModule:
    """The network and module of the problem's shipped config, at ``theta`` and
    ``observe_every``, with the spectral window on the learned right-hand side's eigenvalues
    where ``eigenvalue_limits`` are given (:class:`~irnet.nets.FlowNet`)."""
    setup = SETUPS[problem]
    net = FlowNet(
        **setup["net"],
        theta=theta,
        eigenvalue_limits=eigenvalue_limits,
        observe_every=observe_every,
        activation="tanh",
        init="paper",
        solver=Anderson(atol=1e-6, max_iter=50, history=3),
        linear_solver=Direct(),
    )
    return TrajectoryModule(
        net,
        horizon_start=math.ceil(setup["horizon_steps"] / observe_every),
        horizon_epochs=int(setup["horizon_fraction"] * epochs),
        lr=setup["lr"],
        lr_step=setup["lr_step"],
        lr_gamma=setup["lr_gamma"],
    )


def cells(
    settings: dict, log_dir: Path, seeds: Optional[int] = None, epochs: Optional[int] = None
) -> list[dict]:
    """Every seed of one (θ, observation spacing) before the next."""
    return [
        {
            "problem": PROBLEM,
            "theta": theta,
            "observe_every": every,
            "seed": seed,
            "epochs": epochs or settings["epochs"],
            "log_dir": str(log_dir),
        }
        for theta in settings["thetas"]
        for every in settings["observe"]
        for seed in range(seeds or settings["seeds"])
    ]


def run_cell(cell: dict) -> dict:
    """Train one network on its trajectories and measure its errors (runs in a worker process)."""
    module, data, history = train_cell(cell)
    return {"history": history, **evaluate(module, data)}


def train_cell(cell: dict) -> tuple[TrajectoryModule, TrajectoryDataModule, dict]:
    """The cell's trained module, its data and its training history."""
    pl.seed_everything(cell["seed"], verbose=False)
    problem, theta, every = cell["problem"], cell["theta"], cell["observe_every"]
    data = make_data(problem, every)
    module = make_module(problem, theta, every, cell["epochs"], cell.get("eigenvalue_limits"))
    name = f"{problem}_theta{theta}_every{every}_seed{cell['seed']}"
    clip = SETUPS[problem]["gradient_clip_val"]
    history = train(
        module, data, cell["epochs"], Path(cell["log_dir"]), name, gradient_clip_val=clip
    )
    return module, data, history


def evaluate(module: TrajectoryModule, data: TrajectoryDataModule) -> dict:
    """Errors of the learned trajectories from the test initial states against the reference.

    ``rms_observed``: root mean squared error at the observed steps; ``rms_all``: at every step
    1…N; ``max_error``: the largest absolute error at any step; ``error_per_step``: the root mean
    squared error at each step 0…N; ``trajectories``: the first :data:`DRAWN` learned and
    reference trajectories, for the figures.
    """
    module.eval()
    x, _ = data.tensors("test")
    with torch.no_grad():
        learned = module.net.states(x).double()
    exact = data.solve(x.double())
    error = learned - exact
    observed = data.observed_steps()
    per_step = error.pow(2).mean(dim=(0, 2)).sqrt()
    return {
        "rms_observed": float(error[:, observed].pow(2).mean().sqrt()),
        "rms_all": float(error[:, 1:].pow(2).mean().sqrt()),
        "max_error": float(error.abs().max()),
        "error_per_step": per_step.tolist(),
        "trajectories": {
            "t": data.times().tolist(),
            "observed": observed.tolist(),
            "exact": exact[:DRAWN].tolist(),
            "learned": learned[:DRAWN].tolist(),
        },
    }


# -- report ----------------------------------------------------------------------------------------


def summarize(results: list[dict]) -> str:
    header = [
        "θ",
        "observed every",
        "seeds",
        "RMS error, observed steps",
        "RMS error, all steps",
        "max error",
        "final val MSE",
        "forward iterations per step",
        "minutes",
    ]
    rows = []
    for (theta, every), runs in sorted(group(results, ("theta", "observe_every")).items()):
        rows.append(
            [
                theta,
                f"{every} steps",
                len(runs),
                fmt(*mean_std(r["rms_observed"] for r in runs)),
                fmt(*mean_std(r["rms_all"] for r in runs)),
                fmt(*mean_std(r["max_error"] for r in runs)),
                fmt(*mean_std(_last(r["history"]["val_loss"]) for r in runs)),
                _iterations(runs),
                f"{np.mean([r['seconds'] for r in runs]) / 60:.1f}",
            ]
        )
    return (
        f"{markdown_table(header, rows)}\n\n"
        "Errors on the test initial values against the reference solution (the exact one for the "
        "stiff problem, RK4 in float64 for Lotka–Volterra), in the states' units. 'All steps' "
        "includes the steps between observations, which the loss never saw. Forward iterations: "
        "the last epoch's mean per step and sample (0 at θ = 0, an explicit step)."
    )


def _last(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return finite[-1] if finite else float("nan")


def _iterations(runs: list[dict]) -> str:
    values = [_last(r["history"]["forward_iterations"]) for r in runs]
    return "–" if not np.isfinite(values).any() else f"{np.nanmean(values):.2g}"


def figures(results: list[dict], out: Path) -> list[Path]:
    groups = dict(group(results, ("theta", "observe_every")))
    thetas = sorted({t for t, _ in groups})
    spacings = sorted({e for _, e in groups}, reverse=True)
    problem = results[0]["problem"]
    return [
        _trajectories(problem, groups, thetas, spacings, out),
        _errors(problem, groups, thetas, spacings, out),
        _training(problem, groups, thetas, spacings, out),
    ]


def _trajectories(problem: str, groups: dict, thetas: list, spacings: list, out: Path) -> Path:
    """Rows: observation spacing; columns: θ. The lowest seed's learned (dashed) against the
    reference (solid) trajectories; dots at the observed steps."""
    fig, axes = grid_figure(len(spacings), len(thetas), width=3.6, height=3.0)
    for i, every in enumerate(spacings):
        for j, theta in enumerate(thetas):
            ax = axes[i, j]
            runs = sorted(groups.get((theta, every), ()), key=lambda r: r["seed"])
            if not runs:
                ax.axis("off")
                continue
            drawn = runs[0]["trajectories"]
            _draw(ax, problem, drawn)
            ax.set_title(
                f"θ = {theta}, observed every {every}\nseed {runs[0]['seed']}, "
                f"RMS error {runs[0]['rms_all']:.2g}",
                fontsize="small",
            )
    return save(fig, out / f"{problem}_trajectories.png")


def _draw(ax, problem: str, drawn: dict) -> None:
    t, observed = np.array(drawn["t"]), drawn["observed"]
    exact, learned = np.array(drawn["exact"]), np.array(drawn["learned"])
    for k in range(len(exact)):
        c = color(k)
        if problem == "stiff":
            ax.plot(t, exact[k, :, 0], "-", color=c, lw=1.2)
            ax.plot(t, learned[k, :, 0], "--", color=c, lw=1.0)
            ax.plot(t[observed], exact[k, observed, 0], ".", color=c, ms=4)
            ax.set(xlabel="t", ylabel="y")
        else:
            ax.plot(exact[k, :, 0], exact[k, :, 1], "-", color=c, lw=1.2)
            ax.plot(learned[k, :, 0], learned[k, :, 1], "--", color=c, lw=1.0)
            ax.plot(exact[k, observed, 0], exact[k, observed, 1], ".", color=c, ms=3)
            ax.set(xlabel="prey x", ylabel="predators y")
    finite = np.isfinite(learned).all()
    if not finite:
        ax.text(0.5, 0.5, "learned: not finite", transform=ax.transAxes, ha="center")


def _errors(problem: str, groups: dict, thetas: list, spacings: list, out: Path) -> Path:
    """RMS error against time, one panel per observation spacing, one band per θ."""
    fig, axes = grid_figure(1, len(spacings))
    for ax, every in zip(axes[0], spacings):
        for k, theta in enumerate(thetas):
            runs = groups.get((theta, every))
            if runs:
                t = runs[0]["trajectories"]["t"]
                band(ax, [r["error_per_step"] for r in runs], f"θ = {theta}", color(k), x=t)
        ax.set(
            title=f"observed every {every} steps",
            xlabel="t",
            ylabel="RMS error (test)",
            yscale="log",
        )
        ax.legend(fontsize="small")
    return save(fig, out / f"{problem}_errors.png")


def _training(problem: str, groups: dict, thetas: list, spacings: list, out: Path) -> Path:
    fig, axes = grid_figure(1, len(spacings))
    for ax, every in zip(axes[0], spacings):
        for k, theta in enumerate(thetas):
            runs = groups.get((theta, every))
            if runs:
                band(ax, [r["history"]["val_loss"] for r in runs], f"θ = {theta}", color(k))
        ax.set(
            title=f"observed every {every} steps",
            xlabel="epoch",
            ylabel="validation MSE",
            yscale="log",
        )
        ax.legend(fontsize="small")
    return save(fig, out / f"{problem}_training.png")
