"""The robustness study: scikit-learn's 8×8 digits, θ = 0 … 1, each with and without R_rnd.

The network is the paper's eq. (11) on the flattened image (a 128-component
state ``(x, x)``), 10 layers over ``T = 5``: a coarse step ``h = 0.5``, where θ
changes the layer map markedly (at ``h = 1`` the θ = 1 network barely learned
in a pilot run, at 5 s an epoch), a linear readout to ten logits, cross-entropy,
Adam 1e-3 with mini-batches of 128. R_rnd uses one Gaussian stream of
σ = :data:`R_RND_SIGMA`. After training, the test accuracy is measured clean,
under Gaussian input noise (σ in units of the standardised pixels, whose standard
deviation is 1; 1 unit ≈ 6 of the 17 grey levels) and under FGSM and 10-step PGD
attacks in the L∞ ball of radius ε, with adversarial images kept in the valid
pixel range.

Since gradient attacks on implicit networks can be fooled by masked gradients,
every network is also attacked with the strong set of
:mod:`irnet.reproduce._robustness_strong` (PGD with restarts, gradient-free SPSA,
PGD under tighter solves, transfer from the explicit network), and the
per-sample worst case over all of them ("strongest") is reported: a
robustness number counts only where it agrees with the strongest attack.
Besides the plain networks, the grid trains two variants at θ in
:data:`VARIANT_THETAS` without R_rnd: ``contraction`` (``ODENet(contraction=``
:data:`CONTRACTION` ``)``) and ``jacobian`` (R_jac of weight :data:`JAC_WEIGHT`).

The report (summary.md's tables, then the figures): a configuration is
``(variant, θ, R_rnd)``; its seeds are summarised as mean ± standard deviation.
Results saved before the variants existed count as ``plain``; results without
strong attacks get empty strong-attack columns.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from irnet.analysis.attacks import accuracy_under_attack, accuracy_under_noise
from irnet.datamodules import Digits
from irnet.linear import Neumann
from irnet.module import ImplicitNetModule
from irnet.nets import ODENet
from irnet.regularizers import JacobianRegularizer, PerturbationRegularizer
from irnet.reproduce import _robustness_strong as strong
from irnet.reproduce._figures import band, color, grid_figure, save
from irnet.reproduce._journal import Journal
from irnet.reproduce._robustness_strong import ATTACKS
from irnet.reproduce._runner import fmt, markdown_table, mean_std, train
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
FULL = {
    "layers": 10,
    "T": 5.0,
    "epochs": 20,
    "seeds": 3,
    "thetas": THETAS,
    "test_samples": None,
    "variant_thetas": VARIANT_THETAS,
    "strong": strong.FULL,
}
TINY = {
    "layers": 2,
    "T": 1.0,
    "epochs": 1,
    "seeds": 1,
    "thetas": (0.0, 1.0),
    "test_samples": 64,
    "variant_thetas": (1.0,),
    "strong": strong.TINY,
}


def make_module(
    layers: int, T: float, theta: float, r_rnd: bool, seed: int, variant: str = "plain"
) -> ImplicitNetModule:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    net = ODENet(
        in_features=64,
        out_features=10,
        layers=layers,
        T=T,
        width=100,
        theta=theta,
        activation="relu",
        stationary_init=True,
        readout="linear",
        contraction=CONTRACTION if variant == "contraction" else None,
        solver=FixedPoint(atol=1e-4, max_iter=50),
        linear_solver=Neumann(rtol=1e-4, max_iter=50),
    )
    regularizer = (
        PerturbationRegularizer(weight=R_RND_WEIGHT, streams=1, sigma=R_RND_SIGMA, seed=seed)
        if r_rnd
        else None
    )
    r_jac = JacobianRegularizer(weight=JAC_WEIGHT, seed=seed) if variant == "jacobian" else None
    return ImplicitNetModule(
        net,
        loss="cross_entropy",
        lr=1e-3,
        lr_step=500,
        lr_gamma=0.7,
        r_rnd=regularizer,
        r_jac=r_jac,
    )


def cells(
    settings: dict, log_dir: Path, seeds: int | None = None, epochs: int | None = None
) -> list[dict]:
    """Per seed: the plain grid θ × R_rnd (θ ascending, so each group's θ = 0 cell, the transfer
    source, comes first), then the variants at ``variant_thetas`` without R_rnd.

    Every cell carries the run's id, which names its transfer files (not an earlier run's in
    ``log_dir``): a new one, or that of an unfinished run of the same grid, so that a re-run
    resumes it.
    """
    unfinished = {result.get("run") for result in Journal.of_study(log_dir).results()}
    for run in sorted(r for r in unfinished if r):
        grid = _grid(settings, log_dir, seeds, epochs, run)
        if Journal.of_study(log_dir).finished(grid):
            return grid
    return _grid(settings, log_dir, seeds, epochs, uuid.uuid4().hex[:12])


def _grid(
    settings: dict, log_dir: Path, seeds: int | None, epochs: int | None, run: str
) -> list[dict]:
    common = {
        "layers": settings["layers"],
        "T": settings["T"],
        "epochs": epochs or settings["epochs"],
        "test_samples": settings["test_samples"],
        "log_dir": str(log_dir),
        "run": run,
        "strong": settings["strong"],
        "has_source": 0.0 in settings["thetas"],
    }
    grid = []
    for seed in range(seeds or settings["seeds"]):
        grid += [
            {"theta": theta, "r_rnd": r_rnd, "seed": seed, "variant": "plain", **common}
            for theta in sorted(settings["thetas"])
            for r_rnd in (False, True)
        ]
        grid += [
            {"theta": theta, "r_rnd": False, "seed": seed, "variant": variant, **common}
            for variant in VARIANTS[1:]
            for theta in settings["variant_thetas"]
        ]
    return grid


def cell_name(cell: dict) -> str:
    variant = "" if cell.get("variant", "plain") == "plain" else f"_{cell['variant']}"
    return f"theta{cell['theta']}_rrnd{int(cell['r_rnd'])}_seed{cell['seed']}{variant}"


def run_cell(cell: dict) -> dict:
    """Train one classifier and attack it (runs in a worker process)."""
    pl.seed_everything(cell["seed"], verbose=False)
    module = make_module(
        cell["layers"], cell["T"], cell["theta"], cell["r_rnd"], cell["seed"], cell["variant"]
    )
    data = Digits(flatten=True, batch_size=128, seed=cell["seed"])
    name = cell_name(cell)
    history = train(module, data, cell["epochs"], Path(cell["log_dir"]), name)
    module.eval()
    data.setup("test")
    x, y = (t[: cell["test_samples"]] for t in data.tensors("test"))
    pixel_range = (float(x.min()), float(x.max()))
    generator = torch.Generator().manual_seed(1000 + cell["seed"])
    noise = accuracy_under_noise(
        module, x, y, (0.0, *NOISE), repeats=NOISE_REPEATS, generator=generator
    )
    fgsm = accuracy_under_attack(module, x, y, "fgsm", EPSILONS, clamp=pixel_range)
    pgd = accuracy_under_attack(
        module, x, y, "pgd", EPSILONS, clamp=pixel_range, steps=PGD_STEPS, generator=generator
    )
    strongest = strong.evaluate(module, x, y, pixel_range, cell, cell["has_source"])
    return {
        "history": history,
        "clean_acc": noise[0.0],
        "strong_acc": strongest,
        "noise_acc": {str(s): noise[s] for s in NOISE},
        "fgsm_acc": {str(e): a for e, a in fgsm.items()},
        "pgd_acc": {str(e): a for e, a in pgd.items()},
    }


# -- report ----------------------------------------------------------------------------------------

EQUAL_CLEAN = 0.01  # configurations within 1 point of clean accuracy are compared
RULE = (
    "A robustness number counts only where the strongest attack agrees with it: *strongest* "
    "counts an image as robust only if it is classified correctly clean and under every attack "
    "of the strong set (FGSM, 10-step PGD, PGD with more steps and restarts, gradient-free SPSA, "
    "PGD under 10× tighter solver tolerances, and PGD with restarts crafted on the explicit "
    "θ = 0 network of the same seed and R_rnd setting; docs/robustness.md). Where FGSM or PGD "
    "lies above it, the gap is gradient masking or a weak attack, not robustness. The strong "
    "attacks run on the first {samples} test images."
)
EQUAL_TEXT = (
    "θ at equal clean accuracy: a more robust network can simply be a less accurate one, so θ is "
    "compared only among configurations whose mean clean accuracy lies within "
    f"{100 * EQUAL_CLEAN:.0f} point of each other. Configurations are sorted by clean accuracy "
    "and grouped greedily (each group spans at most one point, from its most accurate member); "
    "within a group, compare the strongest-attack columns."
)


def key(result: dict) -> tuple:
    return result.get("variant", "plain"), result["theta"], result["r_rnd"]


def configurations(results: list[dict]) -> dict[tuple, list[dict]]:
    """Results by configuration, plain first, then by θ and R_rnd."""
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        groups.setdefault(key(result), []).append(result)
    return dict(sorted(groups.items(), key=lambda item: (VARIANTS.index(item[0][0]), *item[0][1:])))


def training(variant: str, r_rnd: bool) -> str:
    label = {"plain": "", "contraction": f"κ={CONTRACTION}", "jacobian": f"R_jac {JAC_WEIGHT}"}[
        variant
    ]
    return ", ".join(filter(None, [label, f"R_rnd σ={R_RND_SIGMA}" if r_rnd else ""])) or "plain"


def _strong_levels(results: list[dict]) -> list[str]:
    return sorted({eps for r in results for eps in r.get("strong_acc", {})}, key=float)


def strong_value(result: dict, eps: str, attack: str) -> float:
    return result.get("strong_acc", {}).get(eps, {}).get(attack, math.nan)


def _stat(runs: list[dict], value) -> str:
    return fmt(*mean_std(value(r) for r in runs))


def summarize(results: list[dict]) -> str:
    """The tables of summary.md."""
    levels = _strong_levels(results)
    groups = configurations(results)
    header = [
        "θ",
        "training",
        "seeds",
        "clean",
        *[f"noise σ={s}" for s in NOISE],
        *[f"FGSM ε={e}" for e in EPSILONS],
        *[f"PGD ε={e}" for e in EPSILONS],
        *[f"strongest ε={e}" for e in levels],
        "minutes",
    ]
    rows = [
        [
            theta,
            training(variant, r_rnd),
            len(runs),
            _stat(runs, lambda r: r["clean_acc"]),
            *[_stat(runs, lambda r, s=s: r["noise_acc"][str(s)]) for s in NOISE],
            *[_stat(runs, lambda r, e=e: r["fgsm_acc"][str(e)]) for e in EPSILONS],
            *[_stat(runs, lambda r, e=e: r["pgd_acc"][str(e)]) for e in EPSILONS],
            *[_stat(runs, lambda r, e=e: strong_value(r, e, "strongest")) for e in levels],
            f"{np.mean([r['seconds'] for r in runs]) / 60:.1f}",
        ]
        for (variant, theta, r_rnd), runs in groups.items()
    ]
    parts = [markdown_table(header, rows)]
    if levels:
        samples = results[0].get("strong", {}).get("samples", "?")
        parts.append(RULE.format(samples=samples))
        parts += [
            f"Each attack at ε = {eps} (accuracy on the attacked images):\n\n"
            + _attack_table(groups, eps)
            for eps in levels
        ]
        parts += [EQUAL_TEXT, _equal_clean_table(groups, levels)]
    return "\n\n".join(parts)


def _attack_table(groups: dict[tuple, list[dict]], eps: str) -> str:
    names = ["clean", *ATTACKS, "strongest"]
    rows = [
        [
            theta,
            training(variant, r_rnd),
            *[_stat(runs, lambda r, n=n: strong_value(r, eps, n)) for n in names],
        ]
        for (variant, theta, r_rnd), runs in groups.items()
    ]
    return markdown_table(["θ", "training", *names], rows)


def equal_clean_groups(groups: dict[tuple, list[dict]]) -> list[list[tuple]]:
    """Configurations by mean clean accuracy (descending), cut greedily into groups spanning at
    most :data:`EQUAL_CLEAN`."""
    clean = {k: mean_std(r["clean_acc"] for r in runs)[0] for k, runs in groups.items()}
    ordered, clusters = sorted(clean, key=lambda k: -clean[k]), []
    for k in ordered:
        if clusters and clean[clusters[-1][0]] - clean[k] <= EQUAL_CLEAN + 1e-12:
            clusters[-1].append(k)
        else:
            clusters.append([k])
    return clusters


def _equal_clean_table(groups: dict[tuple, list[dict]], levels: list[str]) -> str:
    rows = []
    for number, cluster in enumerate(equal_clean_groups(groups), 1):
        for variant, theta, r_rnd in cluster:
            runs = groups[(variant, theta, r_rnd)]
            rows.append(
                [
                    number,
                    theta,
                    training(variant, r_rnd),
                    _stat(runs, lambda r: r["clean_acc"]),
                    *[_stat(runs, lambda r, e=e: strong_value(r, e, "pgd")) for e in levels],
                    *[_stat(runs, lambda r, e=e: strong_value(r, e, "strongest")) for e in levels],
                ]
            )
    return markdown_table(
        [
            "group",
            "θ",
            "training",
            "clean",
            *[f"PGD ε={e}" for e in levels],
            *[f"strongest ε={e}" for e in levels],
        ],
        rows,
    )


# -- figures ---------------------------------------------------------------------------------------


def figures(results: list[dict], out: Path) -> list[Path]:
    """Accuracy against θ for each perturbation (rows: noise, FGSM, PGD; solid: no R_rnd), the
    strongest attack against θ, and the training curves."""
    plain = [r for r in results if key(r)[0] == "plain"]
    panels = [
        ("noise_acc", NOISE, "Gaussian noise σ"),
        ("fgsm_acc", EPSILONS, "FGSM ε"),
        ("pgd_acc", EPSILONS, "PGD ε"),
    ]
    fig, axes = grid_figure(1, len(panels))
    for ax, (name, levels, title) in zip(axes[0], panels):
        for i, level in enumerate(levels):
            for r_rnd, style in ((False, "-"), (True, "--")):
                label = f"{title.split()[-1]}={level}" + (", R_rnd" if r_rnd else "")
                _against_theta(
                    ax,
                    plain,
                    r_rnd,
                    lambda r, n=name, at=level: r[n][str(at)],
                    label,
                    color(i),
                    style,
                )
        ax.set(xlabel="θ", ylabel="test accuracy", title=title, ylim=(0, 1))
        ax.legend(fontsize="x-small", ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    paths = [save(fig, out / "robustness.png")]
    if _strong_levels(results):
        paths.append(_strongest(results, out))
    return [*paths, _training(results, out)]


def _against_theta(
    ax, results: list[dict], r_rnd: bool, value, label: str, c: str, style: str
) -> None:
    """Mean over seeds against θ with a min–max band (nothing if a θ misses a seed)."""
    by_theta: dict[float, list[dict]] = {}
    for r in results:
        if r["r_rnd"] == r_rnd:
            by_theta.setdefault(r["theta"], []).append(r)
    thetas = sorted(by_theta)
    if not thetas:
        return
    seeds = min(len(runs) for runs in by_theta.values())
    band(
        ax,
        [[value(by_theta[t][s]) for t in thetas] for s in range(seeds)],
        label,
        c,
        style,
        x=thetas,
    )


def _strongest(results: list[dict], out: Path) -> Path:
    """Per strong ε: strongest-attack and 10-step PGD accuracy against θ; variants as markers."""
    levels = _strong_levels(results)
    fig, axes = grid_figure(1, len(levels))
    plain = [r for r in results if key(r)[0] == "plain"]
    for ax, eps in zip(axes[0], levels):
        for i, attack in enumerate(("strongest", "pgd")):
            for r_rnd, style in ((False, "-"), (True, "--")):
                label = ("strongest" if attack == "strongest" else "PGD 10 steps") + (
                    ", R_rnd" if r_rnd else ""
                )
                _against_theta(
                    ax,
                    plain,
                    r_rnd,
                    lambda r, a=attack: strong_value(r, eps, a),
                    label,
                    color(i),
                    style,
                )
        for j, variant in enumerate(VARIANTS[1:]):
            runs = [r for r in results if key(r)[0] == variant]
            for theta in sorted({r["theta"] for r in runs}):
                values = [strong_value(r, eps, "strongest") for r in runs if r["theta"] == theta]
                ax.plot(
                    theta,
                    np.mean(values),
                    "s^"[j],
                    color=color(2 + j),
                    label=f"strongest, {training(variant, False)}"
                    if theta == max(r["theta"] for r in runs)
                    else None,
                )
        ax.set(xlabel="θ", ylabel="test accuracy", title=f"L∞ attacks, ε = {eps}", ylim=(0, 1))
        ax.legend(fontsize="x-small", ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return save(fig, out / "robustness_strong.png")


def _training(results: list[dict], out: Path) -> Path:
    fig, axes = grid_figure(1, 2)
    styles = {
        ("plain", False): "-",
        ("plain", True): "--",
        ("contraction", False): ":",
        ("jacobian", False): "-.",
    }
    for (variant, theta, r_rnd), runs in configurations(results).items():
        style = styles.get((variant, r_rnd), ":")
        label = f"θ={theta}, {training(variant, r_rnd)}"
        c = color(THETAS.index(theta) if theta in THETAS else 9)
        band(axes[0, 0], [r["history"]["val_acc"] for r in runs], label, c, style)
        band(axes[0, 1], [r["history"]["forward_iterations"] for r in runs], label, c, style)
    axes[0, 0].set(xlabel="epoch", ylabel="validation accuracy")
    axes[0, 1].set(xlabel="epoch", ylabel="forward iterations per layer")
    axes[0, 0].legend(fontsize="x-small", ncol=2)
    return save(fig, out / "robustness_training.png")
