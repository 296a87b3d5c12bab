"""Does a larger θ make a digits classifier more robust to noise, at equal clean accuracy, for
any step or depth?

The paper's authors report, on 1 000 MNIST images with their
own code, test accuracy under Gaussian noise σ = 0.5 (pixels in [0, 1]) rising
from 63.2 % at θ = 0 to 75.4 % at θ = 1. docs/REPORT.md §4 found the reverse on
scikit-learn's 8×8 digits, with one step (h = 0.5), one depth (10 layers) and
20 epochs. This study varies what §4 held fixed:

* the step h = T / layers ∈ {0.25, 0.5, 1} at 10 layers, and the depth
  ∈ {5, 10, 20} at h = 0.5 (:data:`GEOMETRIES`), θ ∈ {0, ½, 1}, seeds 0–2;
* training length: each run trains until its validation loss has not improved
  for :data:`PATIENCE` epochs, at most :data:`EPOCHS` (§4: 20 epochs);
* clean accuracy is held equal: every network is evaluated with the weights of
  the first epoch whose validation accuracy reached :data:`EQUAL_ACC` ("at
  equal clean accuracy"), and again with those of its smallest validation loss
  ("best").

The network and training are §4's (:func:`irnet.reproduce.robustness.make_module`,
no R_rnd). Test accuracy (270 images) is measured clean and under Gaussian
noise of σ ∈ :data:`NOISE` in standardised pixel units (the pixels' standard
deviation is 6.0 grey levels of 16): σ = 1.33 is the paper's σ = 0.5 of the
pixel range (8 grey levels). Beside it, the mean Frobenius norm of the logits'
Jacobian with respect to the input: the first-order amplification of noise,
to see why accuracy under noise moves with θ.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping

from irnet.analysis.attacks import accuracy_under_noise
from irnet.datamodules import Digits
from irnet.reproduce._figures import band, color, grid_figure, save
from irnet.reproduce._logged import as_logged
from irnet.reproduce._runner import (
    fmt,
    fmt_finite,
    group,
    markdown_table,
    mean_std,
    paired_change,
    train,
)
from irnet.reproduce.ex2 import BestWeights
from irnet.reproduce.robustness import make_module

THETAS = (0.0, 0.5, 1.0)
GEOMETRIES = (
    (10, 2.5),
    (10, 5.0),
    (10, 10.0),
    (5, 2.5),
    (20, 10.0),
)  # (layers, T): h 0.25, 0.5, 1; depth 5, 20
EQUAL_ACC = 0.95
EPOCHS = 100
PATIENCE = 15
NOISE = (0.5, 1.0, 1.33, 2.0)
PAPER_NOISE = 1.33  # σ = 0.5 of the pixel range [0, 16]: 8 grey levels / 6.0
NOISE_REPEATS = 10
STATES = ("equal", "best")
FULL = {
    "thetas": THETAS,
    "geometries": GEOMETRIES,
    "epochs": EPOCHS,
    "patience": PATIENCE,
    "seeds": 3,
    "test_samples": None,
}
TINY = {
    "thetas": (0.0, 1.0),
    "geometries": ((2, 1.0),),
    "epochs": 2,
    "patience": PATIENCE,
    "seeds": 1,
    "test_samples": 64,
}


def cells(
    settings: dict, log_dir: Path, seeds: int | None = None, epochs: int | None = None
) -> list[dict]:
    """Seed by seed, geometry by geometry, θ ascending: a study cut short has whole θ
    comparisons."""
    return [
        {
            "theta": theta,
            "layers": layers,
            "T": T,
            "seed": seed,
            "epochs": epochs or settings["epochs"],
            "patience": settings["patience"],
            "test_samples": settings["test_samples"],
            "log_dir": str(log_dir),
        }
        for seed in range(seeds or settings["seeds"])
        for layers, T in settings["geometries"]
        for theta in settings["thetas"]
    ]


class FirstReached(Callback):
    """Keeps a copy of the module's state at the first validation where ``monitor`` ≥ ``target``."""

    def __init__(self, target: float, monitor: str = "val/acc") -> None:
        self.target, self.monitor, self.epoch, self.state = target, monitor, None, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = float(trainer.callback_metrics.get(self.monitor, math.nan))
        if (
            self.state is None
            and not trainer.sanity_checking
            and as_logged(value) >= as_logged(self.target)
        ):
            self.epoch, self.state = (
                trainer.current_epoch + 1,
                copy.deepcopy(pl_module.state_dict()),
            )


def run_cell(cell: dict) -> dict:
    """Train one classifier until its validation loss stalls; test it at equal clean accuracy and
    at its best."""
    pl.seed_everything(cell["seed"], verbose=False)
    module = make_module(cell["layers"], cell["T"], cell["theta"], False, cell["seed"])
    data = Digits(flatten=True, batch_size=128, seed=cell["seed"])
    best, equal = BestWeights(), FirstReached(EQUAL_ACC)
    stop = EarlyStopping("val/loss", patience=cell["patience"], mode="min")
    name = f"theta{cell['theta']}_layers{cell['layers']}_T{cell['T']}_seed{cell['seed']}"
    history = train(
        module, data, cell["epochs"], Path(cell["log_dir"]), name, callbacks=(stop, best, equal)
    )
    epochs_run = sum(not math.isnan(v) for v in history["train_loss"])
    data.setup("test")
    x, y = (t[: cell["test_samples"]] for t in data.tensors("test"))
    tested = {}
    for state_name, callback in zip(STATES, (equal, best)):
        if callback.state is not None:
            module.load_state_dict(callback.state)
            tested[state_name] = _test(module, x, y, cell["seed"])
    return {
        "history": history,
        "epochs_run": epochs_run,
        "equal_epoch": equal.epoch,
        "best_epoch": best.epoch,
        "tested": tested,
    }


def _test(module: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict:
    module.eval()
    noisy = accuracy_under_noise(
        module,
        x,
        y,
        (0.0, *NOISE),
        repeats=NOISE_REPEATS,
        generator=torch.Generator().manual_seed(1000 + seed),
    )
    return {
        **{str(sigma): accuracy for sigma, accuracy in noisy.items()},
        "jacobian": input_jacobian_norm(module, x),
    }


def input_jacobian_norm(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean over ``x`` of ‖∂logits/∂x‖_F: how much the trained network amplifies a small input
    perturbation (the first-order reason for its accuracy under noise)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        rows = [
            torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k + 1 < logits.shape[1])[0]
            for k in range(logits.shape[1])
        ]  # samples are independent: row k of each one's Jacobian
    return float(torch.stack(rows, 1).flatten(1).norm(dim=1).mean())


# -- report ----------------------------------------------------------------------------------------


def _h(result: dict) -> float:
    return result["T"] / result["layers"]


def _accuracy(result: dict, state: str, sigma: float) -> float:
    return result["tested"].get(state, {}).get(str(sigma), math.nan)


def summarize(results: list[dict]) -> str:
    header = [
        "layers",
        "h",
        "θ",
        "seeds",
        f"epoch val acc ≥ {EQUAL_ACC}, per seed",
        "epochs run",
        *[
            f"{state}: {level}"
            for state in STATES
            for level in ("clean", *[f"σ={s}" for s in NOISE])
        ],
        *[f"{state}: ‖∂f/∂x‖_F" for state in STATES],
        "forward iterations, last epoch",
        "minutes",
    ]
    rows = [_row(runs) for _, runs in sorted(group(results, ("layers", "T", "theta")).items())]
    return "\n\n".join([markdown_table(header, rows), _direction(results), _protocol()])


def _row(runs: list[dict]) -> list:
    runs = sorted(runs, key=lambda r: r["seed"])
    first = runs[0]
    cells = [
        first["layers"],
        f"{_h(first):g}",
        first["theta"],
        len(runs),
        ", ".join(str(r["equal_epoch"] or "never") for r in runs),
        ", ".join(
            f"{r['epochs_run']}{' (broke)' if r['history']['stopped'] else ''}" for r in runs
        ),
    ]
    cells += [
        fmt_finite(_accuracy(r, state, s) for r in runs) for state in STATES for s in (0.0, *NOISE)
    ]
    cells += [fmt_finite(_accuracy(r, state, "jacobian") for r in runs) for state in STATES]
    last = [_last(r["history"]["forward_iterations"]) for r in runs]
    return cells + [fmt(*mean_std(last)), f"{np.mean([r['seconds'] for r in runs]) / 60:.1f}"]


def _finite(values) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _last(values: list[float]) -> float:
    finite = _finite(values)
    return finite[-1] if finite else math.nan


def _direction(results: list[dict]) -> str:
    """Per geometry: accuracy under the paper's noise at θ minus at θ = 0, paired by seed."""
    header = [
        "layers",
        "h",
        *[f"{state}: θ={t:g} − θ=0 (seeds up)" for state in STATES for t in _thetas(results)[1:]],
    ]
    rows = []
    for (layers, T), runs in sorted(group(results, ("layers", "T")).items()):
        row = [layers, f"{T / layers:g}"]
        for state in STATES:
            row += [_paired(runs, state, theta) for theta in _thetas(results)[1:]]
        rows.append(row)
    return (
        f"Change in test accuracy under noise σ = {PAPER_NOISE} (the paper's σ = 0.5 of the pixel "
        "range) from θ = 0, paired by seed: mean ± standard deviation, and how many seeds rose."
        "\n\n" + markdown_table(header, rows)
    )


def _thetas(results: list[dict]) -> list[float]:
    return sorted({r["theta"] for r in results})


def _paired(runs: list[dict], state: str, theta: float) -> str:
    by_seed = {(r["theta"], r["seed"]): _accuracy(r, state, PAPER_NOISE) for r in runs}
    deltas = [
        value - by_seed[(0.0, seed)]
        for (t, seed), value in by_seed.items()
        if t == theta and (0.0, seed) in by_seed
    ]
    deltas = _finite(deltas)
    return paired_change(deltas) if deltas else "–"


def _protocol() -> str:
    return (
        f"'equal' is each network with the weights of the first epoch whose validation accuracy "
        f"reached {EQUAL_ACC} (every network then has nearly the same clean accuracy; 'never': the "
        f"run did not reach it, and is left out of the 'equal' columns); 'best' with the weights "
        f"of its smallest validation loss; '(broke)': training stopped as broken (solves that kept "
        f"failing, or non-finite numbers) in that epoch. Runs trained until the validation loss "
        f"had not improved for {PATIENCE} epochs (at most {EPOCHS}). Noise σ in standardised pixel "
        f"units ({NOISE_REPEATS} draws per test image); σ = {PAPER_NOISE} is the paper's σ = 0.5 "
        f"of the pixel range. ‖∂f/∂x‖_F: the Frobenius norm of the logits' Jacobian with respect "
        f"to the input, mean over the test images."
    )


def figures(results: list[dict], out: Path) -> list[Path]:
    """digits_theta.png: accuracy under the paper's noise against θ per geometry, at equal clean
    accuracy and at the best epoch; digits_theta_training.png: validation accuracy over
    training."""
    return [_direction_figure(results, out), _training_figure(results, out)]


def _direction_figure(results: list[dict], out: Path) -> Path:
    fig, axes = grid_figure(1, len(STATES), width=4.6, height=3.6)
    thetas = _thetas(results)
    for ax, state in zip(axes[0], STATES):
        for i, ((layers, T), runs) in enumerate(sorted(group(results, ("layers", "T")).items())):
            per_seed = [
                [_seed_accuracy(runs, theta, seed, state) for theta in thetas]
                for seed in sorted({r["seed"] for r in runs})
            ]
            band(ax, per_seed, f"{layers} layers, h={T / layers:g}", color(i), x=thetas)
        ax.set(
            title=f"{state}: test accuracy, noise σ={PAPER_NOISE}",
            xlabel="θ",
            ylabel="test accuracy",
        )
        ax.legend(fontsize="small")
    return save(fig, out / "digits_theta.png")


def _seed_accuracy(runs: list[dict], theta: float, seed: int, state: str) -> float:
    match = [r for r in runs if r["theta"] == theta and r["seed"] == seed]
    return _accuracy(match[0], state, PAPER_NOISE) if match else math.nan


def _training_figure(results: list[dict], out: Path) -> Path:
    geometries = sorted(group(results, ("layers", "T")).items())
    fig, axes = grid_figure(1, len(geometries), width=3.6, height=3.2)
    for ax, ((layers, T), runs) in zip(axes[0], geometries):
        for i, (theta, theta_runs) in enumerate(sorted(group(runs, ("theta",)).items())):
            band(ax, [r["history"]["val_acc"] for r in theta_runs], f"θ={theta[0]:g}", color(i))
        ax.axhline(EQUAL_ACC, color="grey", lw=0.6, ls=":")
        ax.set(
            title=f"{layers} layers, h={T / layers:g}",
            xlabel="epoch",
            ylabel="validation accuracy",
            ylim=(0.5, 1.0),
        )
        ax.legend(fontsize="small")
    return save(fig, out / "digits_theta_training.png")
