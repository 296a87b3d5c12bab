"""Example 1 of the paper: fit f(x) = sin(x) + 0.1 cos(19x) with 10 and 100 layers, θ = 0 … 1.

The paper's set-up (section 3): eq. (11) with T = 10, width 100, ReLU, the
stationary normalised initialisation, 51 training points, the L2 loss, Adam
with learning rate 1e-2 × 0.7 every 500 epochs, TOL = 1e-5 and at most 50
fixed-point iterations. The default grid, at the paper's budget:
θ ∈ {0, ¼, ½, ¾, 1} × {10, 100} layers, 3 000 epochs, seeds 0–4 (unscreened),
each θ > 0 in three variants (:data:`VARIANTS`):

* ``paper``: the paper's settings (no R_fp, no contraction);
* ``rfp``: plus R_fp (eq. 9, weight 0.1, p = 1);
* ``contraction``: ``ODENet(contraction=0.9)`` (docs/contraction.md), no R_fp.

θ = 0 (the explicit ResNet) is trained once, as ``paper``: the variants coincide
there (contraction leaves θ = 0 layers alone, and R_fp is zero on them).

Deviations from the paper, each for a reason:

* every cell uses ``init="bounded"``: the paper's initialisation grows like
  ``exp(λT)`` and some seeds start with outputs of 1e3–1e9, so five unscreened
  seeds need an initialisation with a proven bound (docs/contraction.md). One
  rule for every cell keeps the variants comparable; screening seeds, or
  switching initialisation only where the paper's explodes, would not;
* the solvers are the fast ones of configs/ex1_sine.yaml, at the paper's
  tolerance 1e-5: fixed-point iteration from the explicit step (at most 50
  iterations as in the paper, 120 with contraction, the bound at κ = 0.9) and
  the adjoint solved exactly (:class:`~irnet.linear.Direct`) instead of by a
  Neumann series.

A run that the module stops as broken (:class:`irnet.failure.TrainingFailure`)
is a result: NaN losses, and a "stopped" count in the table.

The seeds of one (depth, θ, variant) train as one ensemble (:func:`ensembles`; ``--no-ensemble``
trains each in a cell of its own): member k is the network its seed's own cell builds and trains
exactly as that cell would (docs/ensembles.md), and is then measured on its own, so
``results.json`` holds the same entry per seed either way (its ``seconds`` the ensemble's
shared out, ``ensemble_seconds`` the whole).

Wall time of the full grid (``python -m irnet reproduce ex1``: 130 cells of 3 000
epochs) on 2 CPU cores, one worker process per core, estimated from the at-budget runs
(:data:`EPOCH_SECONDS`; docs/REPORT.md §2c): about 9 h (17 core-hours: 4 for the 65
ten-layer cells and 13 for the 65 hundred-layer ones, of which all but the contraction
cells were measured). A killed run resumes from its journal (rerun the command).
summary.md gives the estimate for the grid run and the measured time.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pytorch_lightning as pl
import torch

from irnet._misc import check_choice
from irnet.datamodules import SineRegression
from irnet.linear import Direct
from irnet.module import ImplicitNetModule, l2_loss
from irnet.nets import ODENet
from irnet.nets.ensemble import member_state_dict
from irnet.regularizers import FixedPointRegularizer
from irnet.reproduce._figures import band, color, grid_figure, save
from irnet.reproduce._journal import Journal, cell_key
from irnet.reproduce._probe import probe
from irnet.reproduce._runner import LEAN_EVERY, fmt, group, markdown_table, mean_std, train
from irnet.solvers import FixedPoint

THETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
VARIANTS = ("paper", "rfp", "contraction")
R_FP_WEIGHT = 0.1
CONTRACTION = 0.9
INIT = "bounded"
MAX_ITER = {
    "paper": 50,
    "rfp": 50,
    "contraction": 120,
}  # 120 >= 110, the κ = 0.9 bound for |r0| <= 1
FULL = {"depths": (10, 100), "epochs": {10: 3000, 100: 3000}, "seeds": 5}
TINY = {"depths": (2, 4), "epochs": {2: 2, 4: 2}, "seeds": 1, "thetas": (0.0, 0.5, 1.0)}
TRAJECTORY_INPUTS = 15
HISTORY_STRIDE = (
    LEAN_EVERY  # results.json keeps the validated epochs' history (cells.json keeps all)
)
VIRIDIS = matplotlib.colormaps["viridis"]
STYLES = {"paper": "--", "rfp": "-", "contraction": ":"}

# Seconds per epoch of one cell (training, validation every 10th epoch, Lightning included; lean
# history): the mean over the 3 000-epoch cells of docs/reproduce/ex1_budget (10 layers, AMD EPYC)
# and ex1_budget_100 (100 layers, Intel Xeon), one torch thread per worker, 2 workers on 2 cores.
# Not measured at 100 layers: contraction, taken as rfp's times 0.92 (their ratio in an earlier
# 100-layer timing, 0.95 against 1.03 s an epoch). :func:`estimated_seconds` interpolates
# linearly in the depth.
EPOCH_SECONDS = {
    "explicit": {10: 0.026, 100: 0.091},
    "paper": {10: 0.058, 100: 0.226},
    "rfp": {10: 0.094, 100: 0.282},
    "contraction": {10: 0.084, 100: 0.26},
}


def make_net(layers: int, theta: float, variant: str = "paper", **ensemble) -> ODENet:
    """The paper's Example 1 network (readout ``y(T)[1]``) in one of :data:`VARIANTS`;
    ``ensemble=E, member_seeds=[…]`` makes it E seeds' networks trained as one."""
    check_choice("variant", variant, VARIANTS)
    contraction = CONTRACTION if variant == "contraction" else None
    return ODENet(
        in_features=1,
        out_features=1,
        layers=layers,
        T=10.0,
        width=100,
        theta=theta,
        activation="relu",
        stationary_init=True,
        readout="component",
        component=1,
        init=INIT,
        contraction=contraction,
        solver=FixedPoint(atol=1e-5, max_iter=MAX_ITER[variant]),
        linear_solver=Direct(rtol=1e-5),
        **ensemble,
    )


def variants_at(theta: float) -> tuple[str, ...]:
    """The variants trained at ``theta``: one at θ = 0, where they all train the same network."""
    return ("paper",) if theta == 0 else VARIANTS


def cells(
    settings: dict, log_dir: Path, seeds: int | None = None, epochs: int | None = None
) -> list[dict]:
    """Every (depth, θ, variant) for seeds 0 … seeds − 1; the deepest first (the longest cells start
    first, so the workers finish together).

    ``settings`` may narrow the grid with ``thetas`` (``--thetas``), ``depths`` (``--layers``) and
    ``variants`` (``--variants``, the variants at θ > 0).
    """
    depths, thetas, variants = (
        settings["depths"],
        settings.get("thetas", THETAS),
        settings.get("variants", VARIANTS),
    )
    return [
        {
            "layers": layers,
            "theta": theta,
            "variant": variant,
            "seed": seed,
            "r_fp": R_FP_WEIGHT if variant == "rfp" else 0.0,
            "contraction": CONTRACTION if variant == "contraction" and theta > 0 else None,
            "init": INIT,
            "epochs": epochs or settings["epochs"][layers],
            "log_dir": str(log_dir),
        }
        for layers in sorted(depths, reverse=True)
        for seed in range(seeds or settings["seeds"])
        for theta in thetas
        for variant in variants_at(theta)
        if theta == 0 or variant in variants
    ]


def upgraded(cell: dict) -> dict:
    """A cell saved before the variants existed (R_fp on or off, the paper's init), as today's."""
    if "variant" in cell:
        return cell
    return {
        **cell,
        "variant": "rfp" if cell.get("r_fp") else "paper",
        "contraction": None,
        "init": cell.get("init", "paper"),
    }


def cell_name(cell: dict) -> str:
    return f"L{cell['layers']}_theta{cell['theta']}_{cell['variant']}_seed{cell['seed']}"


def make_module(cell: dict, net: ODENet) -> ImplicitNetModule:
    """The training module of ``cell`` around ``net``: L2 loss, Adam, R_fp if the cell has it."""
    r_fp = FixedPointRegularizer(weight=cell["r_fp"], p=1.0) if cell["r_fp"] else None
    return ImplicitNetModule(net, loss="l2", lr=1e-2, lr_step=500, lr_gamma=0.7, r_fp=r_fp)


def run_cell(cell: dict) -> dict:
    """Train one network and measure it (runs in a worker process); an ensemble's cell
    (:func:`ensembles`) goes to :func:`run_ensemble_cell`."""
    if "seeds" in cell:
        return run_ensemble_cell(cell)
    pl.seed_everything(cell["seed"], verbose=False)
    module = make_module(cell, make_net(cell["layers"], cell["theta"], cell["variant"]))
    data = SineRegression(num_points=51)
    history = train(module, data, cell["epochs"], Path(cell["log_dir"]), cell_name(cell), lean=True)
    if history["stopped"]:
        return {"history": history, **stopped_result(cell["layers"])}
    return {"history": history, **evaluate(module, data)}


def run_ensemble_cell(cell: dict) -> dict:
    """Train the seeds ``cell["seeds"]`` as one ensemble, then measure each member on its own as
    a plain network (runs in a worker process).

    Returns ``{"members": [...]}``: per seed, its own cell's settings and the result
    :func:`run_cell` gives that cell (a member stopped as broken gets :func:`stopped_result`).
    """
    seeds = list(cell["seeds"])
    net = make_net(
        cell["layers"], cell["theta"], cell["variant"], ensemble=len(seeds), member_seeds=seeds
    )
    module = make_module(cell, net)
    data = SineRegression(num_points=51)
    name = f"L{cell['layers']}_theta{cell['theta']}_{cell['variant']}_seeds{seeds[0]}-{seeds[-1]}"
    history = train(module, data, cell["epochs"], Path(cell["log_dir"]), name, lean=True)
    state, live = module.state_dict(), list(module.member_ids)
    members = []
    for k, (own_cell, own_history) in enumerate(zip(cell["cells"], history["members"])):
        if own_history["stopped"] or k not in live:
            measured = stopped_result(cell["layers"])
        else:
            measured = evaluate(member_module(own_cell, state, live.index(k), len(live)), data)
        members.append({**own_cell, "history": own_history, **measured})
    return {"members": members}


def member_module(cell: dict, state: dict, position: int, live: int) -> ImplicitNetModule:
    """The plain module of ``cell`` holding the ensemble member at ``position`` (of ``live``)."""
    module = make_module(cell, make_net(cell["layers"], cell["theta"], cell["variant"]))
    module.load_state_dict(member_state_dict(state, position, live, prefix="net."))
    return module


# -- seeds as ensembles ----------------------------------------------------------------------------


def ensemble_cells(cell_list: list[dict]) -> list[dict]:
    """``cell_list`` with the cells that differ only by seed joined into one ensemble cell each
    (``seeds``, and the seeds' own ``cells``); a seed alone stays a cell of its own. The longest
    first (:func:`estimated_seconds`, the deepest first), so that the workers finish together."""
    groups: dict[str, list[dict]] = {}
    for cell in cell_list:
        groups.setdefault(cell_key({k: v for k, v in cell.items() if k != "seed"}), []).append(cell)
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.append(members[0])
            continue
        common = {k: v for k, v in members[0].items() if k != "seed"}
        out.append({**common, "seeds": [c["seed"] for c in members], "cells": members})
    return sorted(out, key=lambda c: -_cell_seconds(c))


def _cell_seconds(cell: dict) -> float:
    return estimated_seconds(cell["layers"], cell["theta"], cell["variant"], cell["epochs"])


def ensembles(cell_list: list[dict], journal: Journal) -> "EnsemblePlan":
    """The study's run with the seeds as ensembles (``reproduce`` without ``--no-ensemble``):
    every (depth, θ, variant) trains its seeds as one network. Exact for every cell of this
    study (ODENet with the MLP right-hand side, no spectral window: docs/ensembles.md)."""
    return EnsemblePlan(cell_list, journal, ensemble_cells)


class EnsemblePlan:
    """A study's per-seed cells run as ensemble cells, recorded and returned per seed.

    The journal keeps one entry per seed, as without ensembles: only the seeds not yet in it
    are grouped (:attr:`cells`), so a resumed run trains just what is missing, and a run with
    ``--no-ensemble`` resumes the same journal. :attr:`journal` records each member of a
    finished ensemble under its own seed's cell; :meth:`results` gives one result per seed, in
    the order of the per-seed cells.

    Args:
        cell_list: the study's cells, one per configuration × seed.
        journal: the study's journal.
        join: joins the missing cells into ensemble cells (each with ``cells``, its seeds'
            cells; a cell without ``cells`` runs as it is).
    """

    def __init__(self, cell_list: list[dict], journal: Journal, join) -> None:
        self.per_seed, self._journal = list(cell_list), journal
        done = journal.finished(self.per_seed)
        self.cells = join([c for c in self.per_seed if cell_key(c) not in done])
        self.journal = _MemberJournal(journal)

    @property
    def sizes(self) -> list[int]:
        """The size of every ensemble trained (for the run's record)."""
        return [len(c["cells"]) for c in self.cells if "cells" in c]

    def results(self, results: list[dict]) -> list[dict]:
        """One result per seed's cell, in the study's order (``results`` are :attr:`cells`')."""
        by_key = self._journal.finished(self.per_seed)
        for cell, result in zip(self.cells, results):
            by_key.update((cell_key(c), r) for c, r in member_results(cell, result))
        return [by_key[cell_key(c)] for c in self.per_seed]


def member_results(cell: dict, result: dict) -> list[tuple[dict, dict]]:
    """``(seed's cell, its result)`` of a finished cell: itself, or each member of an ensemble
    with the ensemble's wall time shared out equally (``ensemble_seconds`` keeps the whole)."""
    if "cells" not in cell:
        return [(cell, result)]
    seconds = result["seconds"]
    return [
        (c, {**r, "seconds": seconds / len(cell["cells"]), "ensemble_seconds": seconds})
        for c, r in zip(cell["cells"], result["members"])
    ]


class _MemberJournal:
    """The study's :class:`~irnet.reproduce._journal.Journal` seen through ensemble cells: each
    finished ensemble is recorded seed by seed."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def finished(self, cells: list[dict]) -> dict[str, dict]:
        """The seeds' cells among ``cells`` already recorded. An ensemble cell never is: it is
        made of the seeds missing from the journal (:class:`EnsemblePlan`)."""
        return self.journal.finished(cell for cell in cells if "cells" not in cell)

    def record(self, cell: dict, result: dict) -> None:
        for own_cell, own_result in member_results(cell, result):
            self.journal.record(own_cell, own_result)


PER_LAYER_KEYS = (
    "forward_iterations",
    "backward_iterations",
    "gradient",
    "rho_layer",
    "rho_layer_max",
    "rho_neumann",
    "rho_neumann_max",
)


def stopped_result(layers: int) -> dict:
    """A run stopped as broken (irnet.failure.TrainingFailure) has no trained network to measure:
    NaN losses and per-layer numbers, and nothing to draw."""
    return {
        "train_loss": math.nan,
        "val_loss": math.nan,
        "per_layer": {key: [math.nan] * layers for key in PER_LAYER_KEYS},
    }


def evaluate(module: ImplicitNetModule, data: SineRegression) -> dict:
    """Final losses, per-layer diagnostics, and what the figures draw."""
    module.eval()
    data.setup("fit")
    (x, y), (xv, yv) = data.tensors("train"), data.tensors("val")
    with torch.no_grad():
        losses = {
            "train_loss": float(l2_loss(module(x), y)),
            "val_loss": float(l2_loss(module(xv), yv)),
        }
        grid = torch.linspace(data.low, data.high, 500)[:, None]
        inputs = torch.linspace(data.low, data.high, TRAJECTORY_INPUTS)[:, None]
        states = torch.stack(module.trajectory(inputs))  # (layers + 1, inputs, 2)
        drawn = {
            "grid_output": module(grid)[:, 0].tolist(),
            "trajectories": states.tolist(),
            "field": vector_field(module.net, states, len(module.net.blocks) // 2),
        }
    layers = probe(module, x, y, l2_loss, krylov_dim=2, max_samples=x.shape[0])
    return {**losses, "per_layer": layers, **drawn}


def vector_field(net: ODENet, states: torch.Tensor, layer: int, size: int = 12) -> dict:
    """``F_layer`` on a grid around the states entering that layer (Fig. 7)."""
    points = states[layer]
    low, high = points.min(0).values, points.max(0).values
    pad = 0.15 * (high - low).clamp_min(1e-3)
    axes = [torch.linspace(float(low[i] - pad[i]), float(high[i] + pad[i]), size) for i in range(2)]
    gx, gy = torch.meshgrid(*axes, indexing="xy")
    field = net.blocks[layer].F(torch.stack([gx.flatten(), gy.flatten()], 1))
    return {
        "layer": layer,
        "x": gx.tolist(),
        "y": gy.tolist(),
        "u": field[:, 0].view(size, size).tolist(),
        "v": field[:, 1].view(size, size).tolist(),
        "points": points.tolist(),
    }


# -- report ----------------------------------------------------------------------------------------

CONFIG = ("layers", "theta", "variant")


def estimated_seconds(layers: int, theta: float, variant: str, epochs: int) -> float:
    """One cell's wall time from :data:`EPOCH_SECONDS`, linear in depth through the two measured."""
    measured = EPOCH_SECONDS["explicit" if theta == 0 else variant]
    (d0, s0), (d1, s1) = sorted(measured.items())
    return epochs * (s0 + (s1 - s0) * (layers - d0) / (d1 - d0))


def wall_time(results: list[dict], cores: int = 2) -> str:
    """The grid's wall time on ``cores`` cores (one worker each) estimated from
    :data:`EPOCH_SECONDS`, and the CPU time its cells measured (the run's wall time is in the
    summary's header)."""
    estimate = sum(
        estimated_seconds(r["layers"], r["theta"], r["variant"], r["epochs"]) for r in results
    )
    return (
        f"Wall time: estimated {_duration(estimate / cores)} on {cores} cores, one worker "
        f"process per core ({_duration(estimate)} on one; from timed epochs, ex1.EPOCH_SECONDS); "
        f"measured: "
        f"{_duration(sum(r['seconds'] for r in results))} of cell time on one core, "
        f"and the run's wall time above."
    )


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def summarize(results: list[dict]) -> str:
    """The settings, the wall time, and the table: one row per (depth, θ, variant), mean ± std over
    seeds."""
    header = [
        "layers",
        "θ",
        "variant",
        "seeds",
        "stopped",
        "train loss",
        "val loss",
        "fwd iters",
        "bwd depth",
        "‖∂L/∂y_1‖",
        "‖∂L/∂y_T‖",
        "max_t ρ(∂y_t/∂y_t−1)",
        "max_t ρ(θ∂F/∂y)",
        "minutes",
    ]
    rows = []
    for (layers, theta, variant), runs in sorted(
        group(results, CONFIG).items(), key=lambda g: _order(g[0])
    ):

        def stat(f):
            return fmt(*mean_std(f(r) for r in runs))

        rows.append(
            [
                layers,
                theta,
                variant,
                len(runs),
                sum(bool(r["history"]["stopped"]) for r in runs),
                stat(lambda r: r["train_loss"]),
                stat(lambda r: r["val_loss"]),
                stat(lambda r: np.mean(r["per_layer"]["forward_iterations"])),
                stat(lambda r: np.mean(r["per_layer"]["backward_iterations"])),
                stat(lambda r: r["per_layer"]["gradient"][0]),
                stat(lambda r: r["per_layer"]["gradient"][-1]),
                stat(lambda r: max(r["per_layer"]["rho_layer"])),
                stat(lambda r: max(r["per_layer"]["rho_neumann"])),
                f"{np.mean([r['seconds'] for r in runs]) / 60:.1f}",
            ]
        )
    seeds = sorted({r["seed"] for r in results})
    notes = (
        f"Variants: `paper` = the paper's settings (no R_fp, no contraction); `rfp` = R_fp "
        f"weight {R_FP_WEIGHT}, p = 1; `contraction` = ODENet(contraction={CONTRACTION}), no R_fp. "
        "θ = 0 is trained once (as `paper`): the variants coincide there. Every cell uses "
        f'init="{INIT}" (the paper\'s initialisation explodes for some seeds at T = 10); seeds '
        f'{seeds}, unscreened. "stopped": runs stopped as broken (irnet.failure.TrainingFailure; '
        f"their numbers are NaN).\n\n{wall_time(results)}"
    )
    return "\n\n".join(
        [notes, markdown_table(header, rows), training_table(results), seed_table(results)]
    )


def seed_table(results: list[dict]) -> str:
    """Final training / validation loss of every run, by seed (rankings need seeds apart)."""
    seeds = sorted({r["seed"] for r in results})
    rows = []
    for (layers, theta, variant), runs in sorted(
        group(results, CONFIG).items(), key=lambda g: _order(g[0])
    ):
        by_seed = {r["seed"]: _final_losses(r) for r in runs}
        rows.append([layers, theta, variant, *(by_seed.get(seed, "–") for seed in seeds)])
    return (
        "Per seed: final training / validation loss (or the epoch a broken run was stopped in).\n\n"
        + markdown_table(["layers", "θ", "variant", *(f"seed {seed}" for seed in seeds)], rows)
    )


def training_table(results: list[dict]) -> str:
    """Over training (Fig. 5 and the fit): forward iterations per layer early, at their peak and
    at the end, and the lowest validation loss with its epoch, mean ± std over seeds."""
    header = [
        "layers",
        "θ",
        "variant",
        "fwd iters, first 5 %",
        "peak (epoch)",
        "fwd iters, last 5 %",
        "lowest val loss (epoch)",
        "val loss at the end",
    ]
    rows = []
    for (layers, theta, variant), runs in sorted(
        group(results, CONFIG).items(), key=lambda g: _order(g[0])
    ):
        phases = [iteration_phases(r["history"]["forward_iterations"]) for r in runs]
        lowest = [lowest_val(r["history"]["val_loss"]) for r in runs]

        def stat(values, digits=3):
            return fmt(*mean_std(values), digits)

        rows.append(
            [
                layers,
                theta,
                variant,
                stat([p[0] for p in phases]),
                f"{stat([p[1] for p in phases])} ({stat([p[2] for p in phases], 4)})",
                stat([p[3] for p in phases]),
                f"{stat([v for v, _ in lowest])} ({stat([e for _, e in lowest], 4)})",
                stat([r["val_loss"] for r in runs]),
            ]
        )
    return (
        "Over training: forward iterations per layer (the mean over the layers and the epochs of "
        "the first and last 5 % of training, and the highest epoch value with its epoch) and the "
        "lowest validation loss seen (validation every few epochs) against the final one.\n\n"
        + markdown_table(header, rows)
    )


def _final_losses(result: dict) -> str:
    stopped = result["history"]["stopped"]
    if stopped:
        return f"stopped (epoch {int(stopped[0]) + 1})"
    return f"{result['train_loss']:.3g} / {result['val_loss']:.3g}"


def iteration_phases(iterations: list[float]) -> tuple[float, float, float, float]:
    """``(early mean, peak, epoch of the peak, late mean)`` of one run's per-epoch iterations."""
    values = np.asarray(iterations, dtype=float)
    if not np.isfinite(values).any():
        return (math.nan,) * 4
    tail = max(1, len(values) // 20)
    peak = int(np.nanargmax(values))
    return (
        float(np.nanmean(values[:tail])),
        float(values[peak]),
        peak + 1,
        float(np.nanmean(values[-tail:])),
    )


def lowest_val(val_loss: list[float]) -> tuple[float, float]:
    """The lowest validation loss recorded and its epoch (NaN, NaN if none)."""
    values = np.asarray(val_loss, dtype=float)
    if not np.isfinite(values).any():
        return math.nan, math.nan
    best = int(np.nanargmin(values))
    return float(values[best]), best + 1


def _order(config: tuple) -> tuple:
    """Sort key of a ``(layers, θ, variant)`` configuration: depth, θ, :data:`VARIANTS` order."""
    layers, theta, variant = config
    return layers, theta, VARIANTS.index(variant)


def variants_drawn(groups: dict) -> list[str]:
    """The variants with a cell at θ > 0 (else just ``paper``), in :data:`VARIANTS` order."""
    present = {variant for (_, theta, variant) in groups if theta > 0} or {"paper"}
    return [v for v in VARIANTS if v in present]


def figures(results: list[dict], out: Path) -> list[Path]:
    """Figs. 4–8 of the paper, from this run: one row of panels per variant (and per quantity)."""
    groups = group(results, CONFIG)
    depths = sorted({r["layers"] for r in results})
    return [
        _curves(groups, depths, out, "ex1_losses.png", ("train_loss", "val_loss"), log=True),
        _curves(
            groups, depths, out, "ex1_iterations.png", ("forward_iterations", "backward_iterations")
        ),
        _curves(
            groups, depths, out, "ex1_gradients.png", ("gradient_mean", "gradient_first"), log=True
        ),
        _layer_curves(groups, depths, out),
        *[_fits(groups, layers, out) for layers in depths],
    ]


def _lines(groups: dict, layers: int, variant: str):
    """(label, colour, style, runs) of every θ of ``variant`` with ``layers`` layers, and θ = 0
    (trained once, as ``paper``) in every variant's panels as the explicit reference."""
    for (depth, theta, v), runs in sorted(groups.items(), key=lambda item: item[0][:2]):
        if depth == layers and (v == variant or theta == 0):
            yield (
                f"θ={theta}" + (" (explicit)" if theta == 0 else ""),
                theta_color(theta),
                STYLES[v],
                runs,
            )


def theta_color(theta: float) -> str:
    """One colour per θ in all figures (θ outside the default grid take the colours after)."""
    return color(THETAS.index(theta) if theta in THETAS else len(THETAS) + int(theta * 100) % 5)


def _curves(
    groups: dict, depths: list[int], out: Path, name: str, keys: tuple, log: bool = False
) -> Path:
    """Histories over epochs: one row per (key, variant), one column per depth."""
    return _panels(groups, depths, out / name, keys, "history", "epoch", "{} layers", log)


def _layer_curves(groups: dict, depths: list[int], out: Path) -> Path:
    """After training, against depth: gradient norms and the two spectral radii."""
    return _panels(
        groups,
        depths,
        out / "ex1_layers.png",
        ("gradient", "rho_layer", "rho_neumann"),
        "per_layer",
        "layer t",
        "{} layers, after training",
        log=True,
    )


def _panels(
    groups: dict,
    depths: list[int],
    path: Path,
    keys: tuple,
    source: str,
    xlabel: str,
    title: str,
    log: bool,
) -> Path:
    variants = variants_drawn(groups)
    fig, axes = grid_figure(len(keys) * len(variants), len(depths))
    for row, (key, variant) in enumerate((k, v) for k in keys for v in variants):
        for col, layers in enumerate(depths):
            ax = axes[row, col]
            for label, c, style, runs in _lines(groups, layers, variant):
                band(ax, [r[source][key] for r in runs], label, c, style)
            ax.set(
                title=f"{title.format(layers)}: {variant}",
                xlabel=xlabel,
                ylabel=key.replace("_", " "),
            )
            if log:
                ax.set_yscale("log")
            if key == "rho_layer":
                ax.axhline(1.0, color="k", lw=0.6)
            ax.legend(fontsize="x-small")
    return save(fig, path)


def _fits(groups: dict, layers: int, out: Path) -> Path:
    """One row per (θ, variant): output vs target, trajectories, mid-layer field (first seed)."""
    configs = [(t, v) for (depth, t, v) in sorted(groups, key=_order) if depth == layers]
    fig, axes = grid_figure(len(configs), 3, width=3.6, height=3.0)
    target_x = np.linspace(-5, 5, 500)
    target_y = np.sin(target_x) + 0.1 * np.cos(19 * target_x)
    for row, (theta, variant) in enumerate(configs):
        drawn = [r for r in groups[(layers, theta, variant)] if "grid_output" in r]
        if (
            not drawn
        ):  # every seed stopped as broken, or resumed from a results.json (no grids kept)
            axes[row, 0].set_title(
                f"θ={theta}, {variant}: no fit kept (runs stopped, see the table,\n"
                "or resumed from a published results.json)"
            )
            continue
        run = drawn[0]
        ax = axes[row, 0]
        ax.plot(target_x, target_y, color="0.6", lw=2)
        ax.plot(target_x, run["grid_output"], color="C0", lw=1)
        ax.set(title=f"θ={theta}, {variant}: output (seed {run['seed']})", ylim=(-2, 2))
        states = np.array(run["trajectories"])
        ax = axes[row, 1]
        for i in range(states.shape[1]):
            ax.plot(
                states[:, i, 0], states[:, i, 1], lw=0.8, color=VIRIDIS(i / (states.shape[1] - 1))
            )
        ax.set(title="trajectories y_0 → y_T", xlabel="y[0]", ylabel="y[1]")
        field = run["field"]
        ax = axes[row, 2]
        ax.quiver(field["x"], field["y"], field["u"], field["v"], color="0.4")
        points = np.array(field["points"])
        ax.scatter(points[:, 0], points[:, 1], s=8, color="C3")
        ax.set(title=f"F at layer {field['layer'] + 1}", xlabel="y[0]", ylabel="y[1]")
    return save(fig, out / f"ex1_fits_{layers}.png")
