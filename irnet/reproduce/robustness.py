"""Robustness on real data: scikit-learn's 8×8 digits, θ = 0 … 1, each with and without R_rnd.

The network is the paper's eq. (11) on the flattened image (a 128-component
state ``(x, x)``), 10 layers over ``T = 5``: a coarse step ``h = 0.5``, where θ
changes the layer map markedly (at ``h = 1`` the θ = 1 network barely learned
in a pilot run, at 5 s an epoch), a linear readout to ten logits, cross-entropy, Adam 1e-3 with mini-batches of
128. R_rnd uses one Gaussian stream of σ = :data:`R_RND_SIGMA`. After training,
the test accuracy is measured clean, under Gaussian input noise (σ in units of
the standardised pixels, whose standard deviation is 1; 1 unit ≈ 6 of the 17
grey levels) and under FGSM and 10-step PGD attacks in the L∞ ball of radius
ε, with adversarial images kept in the valid pixel range.

Since gradient attacks on implicit networks can be fooled by masked gradients,
every network is also attacked with the strong set of
:mod:`irnet.reproduce.robustness_strong` (PGD with restarts, gradient-free SPSA,
PGD under tighter solves, transfer from the explicit network), and the
per-sample worst case over all of them ("strongest") is reported: a
robustness number counts only where it agrees with the strongest attack.
Besides the plain networks, the grid trains two variants at θ in
:data:`VARIANT_THETAS` without R_rnd: ``contraction`` (``ODENet(contraction=``
:data:`CONTRACTION` ``)``) and ``jacobian`` (R_jac of weight :data:`JAC_WEIGHT`).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytorch_lightning as pl
import torch

from irnet.attacks import accuracy_under_attack, accuracy_under_noise
from irnet.datamodules import Digits
from irnet.linear import Neumann
from irnet.module import ImplicitNetModule
from irnet.nets import ODENet
from irnet.regularizers import JacobianRegularizer, PerturbationRegularizer
from irnet.reproduce import robustness_strong as strong
from irnet.reproduce.journal import Journal
from irnet.reproduce.runner import train
from irnet.solvers import FixedPoint

THETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
R_RND_SIGMA = 0.3
R_RND_WEIGHT = 0.01
NOISE = (0.1, 0.3, 0.5, 1.0)
NOISE_REPEATS = 5
EPSILONS = (0.05, 0.1, 0.2, 0.3)
PGD_STEPS = 10
VARIANTS = ("plain", "contraction", "jacobian")
VARIANT_THETAS = (0.5, 1.0)  # at θ = 0 both variants are the plain network
CONTRACTION = 0.9
JAC_WEIGHT = 0.1
FULL = {"layers": 10, "T": 5.0, "epochs": 20, "seeds": 3, "thetas": THETAS, "test_samples": None,
        "variant_thetas": VARIANT_THETAS, "strong": strong.FULL}
TINY = {"layers": 2, "T": 1.0, "epochs": 1, "seeds": 1, "thetas": (0.0, 1.0), "test_samples": 64,
        "variant_thetas": (1.0,), "strong": strong.TINY}


def make_module(layers: int, T: float, theta: float, r_rnd: bool, seed: int,
                variant: str = "plain") -> ImplicitNetModule:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    net = ODENet(in_features=64, out_features=10, layers=layers, T=T, width=100, theta=theta,
                 activation="relu", stationary_init=True, readout="linear",
                 contraction=CONTRACTION if variant == "contraction" else None,
                 solver=FixedPoint(atol=1e-4, max_iter=50), linear_solver=Neumann(rtol=1e-4, max_iter=50))
    regularizer = (PerturbationRegularizer(weight=R_RND_WEIGHT, streams=1, sigma=R_RND_SIGMA, seed=seed)
                   if r_rnd else None)
    r_jac = JacobianRegularizer(weight=JAC_WEIGHT, seed=seed) if variant == "jacobian" else None
    return ImplicitNetModule(net, loss="cross_entropy", lr=1e-3, lr_step=500, lr_gamma=0.7, r_rnd=regularizer,
                             r_jac=r_jac)


def cells(settings: dict, log_dir: Path, seeds: int | None = None, epochs: int | None = None) -> list[dict]:
    """Per seed: the plain grid θ × R_rnd (θ ascending, so each group's θ = 0 cell, the transfer
    source, comes first), then the variants at ``variant_thetas`` without R_rnd.

    Every cell carries the run's id, which names its transfer files (not an earlier run's in
    ``log_dir``): a new one, or that of an unfinished run of the same grid, so that a re-run resumes it.
    """
    unfinished = {result.get("run") for result in Journal.of_study(log_dir).results()}
    for run in sorted(r for r in unfinished if r):
        grid = _grid(settings, log_dir, seeds, epochs, run)
        if Journal.of_study(log_dir).finished(grid):
            return grid
    return _grid(settings, log_dir, seeds, epochs, uuid.uuid4().hex[:12])


def _grid(settings: dict, log_dir: Path, seeds: int | None, epochs: int | None, run: str) -> list[dict]:
    common = {"layers": settings["layers"], "T": settings["T"], "epochs": epochs or settings["epochs"],
              "test_samples": settings["test_samples"], "log_dir": str(log_dir), "run": run,
              "strong": settings["strong"], "has_source": 0.0 in settings["thetas"]}
    grid = []
    for seed in range(seeds or settings["seeds"]):
        grid += [{"theta": theta, "r_rnd": r_rnd, "seed": seed, "variant": "plain", **common}
                 for theta in sorted(settings["thetas"]) for r_rnd in (False, True)]
        grid += [{"theta": theta, "r_rnd": False, "seed": seed, "variant": variant, **common}
                 for variant in VARIANTS[1:] for theta in settings["variant_thetas"]]
    return grid


def cell_name(cell: dict) -> str:
    variant = "" if cell.get("variant", "plain") == "plain" else f"_{cell['variant']}"
    return f"theta{cell['theta']}_rrnd{int(cell['r_rnd'])}_seed{cell['seed']}{variant}"


def run_cell(cell: dict) -> dict:
    """Train one classifier and attack it (runs in a worker process)."""
    pl.seed_everything(cell["seed"], verbose=False)
    module = make_module(cell["layers"], cell["T"], cell["theta"], cell["r_rnd"], cell["seed"], cell["variant"])
    data = Digits(flatten=True, batch_size=128, seed=cell["seed"])
    name = cell_name(cell)
    history = train(module, data, cell["epochs"], Path(cell["log_dir"]), name)
    module.eval()
    data.setup("test")
    x, y = (t[:cell["test_samples"]] for t in data.tensors("test"))
    pixel_range = (float(x.min()), float(x.max()))
    generator = torch.Generator().manual_seed(1000 + cell["seed"])
    noise = accuracy_under_noise(module, x, y, (0.0, *NOISE), repeats=NOISE_REPEATS, generator=generator)
    fgsm = accuracy_under_attack(module, x, y, "fgsm", EPSILONS, clamp=pixel_range)
    pgd = accuracy_under_attack(module, x, y, "pgd", EPSILONS, clamp=pixel_range, steps=PGD_STEPS,
                                generator=generator)
    strongest = strong.evaluate(module, x, y, pixel_range, cell, cell["has_source"])
    return {"history": history, "clean_acc": noise[0.0], "strong_acc": strongest,
            "noise_acc": {str(s): noise[s] for s in NOISE},
            "fgsm_acc": {str(e): a for e, a in fgsm.items()},
            "pgd_acc": {str(e): a for e, a in pgd.items()}}


def summarize(results: list[dict]) -> str:
    """The tables of summary.md (:mod:`irnet.reproduce.robustness_report`)."""
    from irnet.reproduce.robustness_report import summarize as tables  # it reads this module's levels

    return tables(results)


def figures(results: list[dict], out: Path) -> list[Path]:
    """robustness.png, robustness_strong.png, robustness_training.png."""
    from irnet.reproduce.robustness_report import figures as draw

    return draw(results, out)


__all__ = ["CONTRACTION", "JAC_WEIGHT", "VARIANTS", "cell_name", "cells", "figures", "make_module", "run_cell",
           "summarize"]
