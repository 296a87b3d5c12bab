"""Example 2 of the paper: two spirals, 100 layers, without and with R_rnd (σ = 0.01, 0.05, 0.1).

Set-up as in ``configs/ex2_spirals.yaml``: 200 points on two spirals, every
other point held out for validation, eq. (11) with 100 layers over T = 10,
θ = 0.5, a linear readout to two logits and cross-entropy. R_rnd (eq. 10) uses
two Gaussian perturbation streams of standard deviation σ, r = 1 and weight
0.01 (larger weights collapse the network to a constant at the paper's
initialisation). Learning rate 1e-3 (1e-2 oscillates around chance level).
After training, the validation accuracy is measured clean and with Gaussian
noise of several sizes added to the inputs (averaged over repeated draws).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from irnet.attacks import accuracy_under_noise
from irnet.datamodules import TwoSpirals
from irnet.linear import Neumann
from irnet.module import ImplicitNetModule
from irnet.nets import ODENet
from irnet.regularizers import PerturbationRegularizer
from irnet.reproduce.figures import band, color, grid_figure, save
from irnet.reproduce.runner import fmt, group, markdown_table, mean_std, train
from irnet.solvers import FixedPoint

SIGMAS = (0.0, 0.01, 0.05, 0.1)  # 0: no R_rnd
R_RND_WEIGHT = 0.01
TEST_NOISE = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
NOISE_REPEATS = 20
FULL = {"layers": 100, "epochs": 250, "seeds": 3}
TINY = {"layers": 3, "epochs": 2, "seeds": 1}
GRID = 80


def make_module(layers: int, sigma: float, seed: int) -> ImplicitNetModule:
    """The spirals classifier; ``sigma = 0`` trains without R_rnd."""
    net = ODENet(in_features=2, out_features=2, layers=layers, T=10.0, width=100, theta=0.5,
                 activation="relu", stationary_init=True, readout="linear",
                 solver=FixedPoint(atol=1e-5, max_iter=50), linear_solver=Neumann(rtol=1e-5, max_iter=50))
    r_rnd = (PerturbationRegularizer(weight=R_RND_WEIGHT, streams=2, sigma=sigma, r=1.0, seed=seed)
             if sigma > 0 else None)
    return ImplicitNetModule(net, loss="cross_entropy", lr=1e-3, lr_step=500, lr_gamma=0.7, r_rnd=r_rnd)


def cells(settings: dict, log_dir: Path, seeds: int | None = None, epochs: int | None = None) -> list[dict]:
    return [{"sigma": sigma, "seed": seed, "layers": settings["layers"],
             "epochs": epochs or settings["epochs"], "log_dir": str(log_dir)}
            for seed in range(seeds or settings["seeds"]) for sigma in SIGMAS]


def run_cell(cell: dict) -> dict:
    """Train one classifier and measure its robustness (runs in a worker process)."""
    pl.seed_everything(cell["seed"], verbose=False)
    module = make_module(cell["layers"], cell["sigma"], cell["seed"])
    data = TwoSpirals(num_points=200)
    name = f"sigma{cell['sigma']}_seed{cell['seed']}"
    history = train(module, data, cell["epochs"], Path(cell["log_dir"]), name)
    module.eval()
    data.setup("fit")
    (x, y), (xv, yv) = data.tensors("train"), data.tensors("val")
    noisy = accuracy_under_noise(module, xv, yv, TEST_NOISE, repeats=NOISE_REPEATS,
                                 generator=torch.Generator().manual_seed(1000 + cell["seed"]))
    return {"history": history, "train_acc": _accuracy(module, x, y),
            "noise_acc": {str(s): a for s, a in noisy.items()}, "decision": decision_grid(module, x)}


def _accuracy(module: ImplicitNetModule, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean())


def decision_grid(module: ImplicitNetModule, x: torch.Tensor) -> dict:
    """P(class 1) on a grid over the data's bounding box, padded (Fig. 9)."""
    low, high = x.min(0).values - 0.5, x.max(0).values + 0.5
    gx, gy = torch.meshgrid(torch.linspace(float(low[0]), float(high[0]), GRID),
                            torch.linspace(float(low[1]), float(high[1]), GRID), indexing="xy")
    with torch.no_grad():
        prob = module(torch.stack([gx.flatten(), gy.flatten()], 1)).softmax(1)[:, 1]
    return {"x": gx.tolist(), "y": gy.tolist(), "p": prob.view(GRID, GRID).tolist()}


# -- report -------------------------------------------------------------------------------


def summarize(results: list[dict]) -> str:
    header = ["R_rnd σ", "seeds", "train acc", *[f"val acc, noise σ={s}" for s in TEST_NOISE], "minutes"]
    rows = []
    for (sigma,), runs in sorted(group(results, ("sigma",)).items()):
        rows.append([sigma if sigma else "none", len(runs), fmt(*mean_std(r["train_acc"] for r in runs)),
                     *[fmt(*mean_std(r["noise_acc"][str(s)] for r in runs)) for s in TEST_NOISE],
                     f"{np.mean([r['seconds'] for r in runs]) / 60:.1f}"])
    return markdown_table(header, rows)


def figures(results: list[dict], out: Path) -> list[Path]:
    groups = sorted(group(results, ("sigma",)).items())
    return [_decisions(groups, out), _noise_curves(groups, out), _training(groups, out)]


def _label(sigma: float) -> str:
    return f"R_rnd σ={sigma}" if sigma else "no R_rnd"


def _decisions(groups: list, out: Path) -> Path:
    data = TwoSpirals(num_points=200)
    data.setup("fit")
    (x, y), (xv, yv) = data.tensors("train"), data.tensors("val")
    fig, axes = grid_figure(1, len(groups), width=3.6, height=3.4)
    for ax, ((sigma,), runs) in zip(axes[0], groups):
        grid = runs[0]["decision"]
        ax.contourf(grid["x"], grid["y"], grid["p"], levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.6)
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="RdBu_r", s=10, edgecolors="k", linewidths=0.3)
        ax.scatter(xv[:, 0], xv[:, 1], c=yv, cmap="RdBu_r", s=10, marker="^", edgecolors="k", linewidths=0.3)
        ax.set(title=f"{_label(sigma)} (seed {runs[0]['seed']})", xticks=[], yticks=[])
    return save(fig, out / "ex2_decision.png")


def _noise_curves(groups: list, out: Path) -> Path:
    fig, axes = grid_figure(1, 1, width=5, height=3.6)
    for i, ((sigma,), runs) in enumerate(groups):
        band(axes[0, 0], [[r["noise_acc"][str(s)] for s in TEST_NOISE] for r in runs], _label(sigma),
             color(i), x=TEST_NOISE)
    axes[0, 0].set(xlabel="σ of Gaussian noise on the validation inputs", ylabel="validation accuracy")
    axes[0, 0].legend(fontsize="small")
    return save(fig, out / "ex2_noise.png")


def _training(groups: list, out: Path) -> Path:
    fig, axes = grid_figure(1, 2)
    for i, ((sigma,), runs) in enumerate(groups):
        band(axes[0, 0], [r["history"]["train_loss"] for r in runs], _label(sigma), color(i))
        band(axes[0, 1], [r["history"]["val_acc"] for r in runs], _label(sigma), color(i))
    axes[0, 0].set(xlabel="epoch", ylabel="train loss (cross-entropy)", yscale="log")
    axes[0, 1].set(xlabel="epoch", ylabel="validation accuracy")
    axes[0, 1].legend(fontsize="small")
    return save(fig, out / "ex2_training.png")


__all__ = ["cells", "figures", "make_module", "run_cell", "summarize"]
