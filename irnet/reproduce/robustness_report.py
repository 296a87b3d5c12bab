"""summary.md tables and figures of the robustness study (:mod:`irnet.reproduce.robustness`).

A configuration is ``(variant, θ, R_rnd)``; its seeds are summarised as mean ±
standard deviation. Results saved before the variants existed count as
``plain``; results without strong attacks get empty strong-attack columns.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from irnet.reproduce.figures import band, color, grid_figure, save
from irnet.reproduce.robustness import (
    CONTRACTION, EPSILONS, JAC_WEIGHT, NOISE, R_RND_SIGMA, THETAS, VARIANTS,
)
from irnet.reproduce.robustness_strong import ATTACKS
from irnet.reproduce.runner import fmt, markdown_table, mean_std

EQUAL_CLEAN = 0.01  # configurations within 1 point of clean accuracy are compared
RULE = ("A robustness number counts only where the strongest attack agrees with it: *strongest* counts an image "
        "as robust only if it is classified correctly clean and under every attack of the strong set (FGSM, "
        "10-step PGD, PGD with more steps and restarts, gradient-free SPSA, PGD under 10× tighter solver "
        "tolerances, and PGD with restarts crafted on the explicit θ = 0 network of the same seed and R_rnd "
        "setting; docs/robustness.md). Where FGSM or PGD lies above it, the gap is gradient masking or a weak "
        "attack, not robustness. The strong attacks run on the first {samples} test images.")
EQUAL_TEXT = ("θ at equal clean accuracy: a more robust network can simply be a less accurate one, so θ is "
              "compared only among configurations whose mean clean accuracy lies within "
              f"{100 * EQUAL_CLEAN:.0f} point of each other. Configurations are sorted by clean accuracy and "
              "grouped greedily (each group spans at most one point, from its most accurate member); within a "
              "group, compare the strongest-attack columns.")


def key(result: dict) -> tuple:
    return result.get("variant", "plain"), result["theta"], result["r_rnd"]


def configurations(results: list[dict]) -> dict[tuple, list[dict]]:
    """Results by configuration, plain first, then by θ and R_rnd."""
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        groups.setdefault(key(result), []).append(result)
    return dict(sorted(groups.items(), key=lambda item: (VARIANTS.index(item[0][0]), *item[0][1:])))


def training(variant: str, r_rnd: bool) -> str:
    label = {"plain": "", "contraction": f"κ={CONTRACTION}", "jacobian": f"R_jac {JAC_WEIGHT}"}[variant]
    return ", ".join(filter(None, [label, f"R_rnd σ={R_RND_SIGMA}" if r_rnd else ""])) or "plain"


def _strong_levels(results: list[dict]) -> list[str]:
    return sorted({eps for r in results for eps in r.get("strong_acc", {})}, key=float)


def strong_value(result: dict, eps: str, attack: str) -> float:
    return result.get("strong_acc", {}).get(eps, {}).get(attack, math.nan)


def _stat(runs: list[dict], value) -> str:
    return fmt(*mean_std(value(r) for r in runs))


def summarize(results: list[dict]) -> str:
    levels = _strong_levels(results)
    groups = configurations(results)
    header = ["θ", "training", "seeds", "clean", *[f"noise σ={s}" for s in NOISE],
              *[f"FGSM ε={e}" for e in EPSILONS], *[f"PGD ε={e}" for e in EPSILONS],
              *[f"strongest ε={e}" for e in levels], "minutes"]
    rows = [[theta, training(variant, r_rnd), len(runs), _stat(runs, lambda r: r["clean_acc"]),
             *[_stat(runs, lambda r, s=s: r["noise_acc"][str(s)]) for s in NOISE],
             *[_stat(runs, lambda r, e=e: r["fgsm_acc"][str(e)]) for e in EPSILONS],
             *[_stat(runs, lambda r, e=e: r["pgd_acc"][str(e)]) for e in EPSILONS],
             *[_stat(runs, lambda r, e=e: strong_value(r, e, "strongest")) for e in levels],
             f"{np.mean([r['seconds'] for r in runs]) / 60:.1f}"]
            for (variant, theta, r_rnd), runs in groups.items()]
    parts = [markdown_table(header, rows)]
    if levels:
        samples = results[0].get("strong", {}).get("samples", "?")
        parts.append(RULE.format(samples=samples))
        parts += [f"Each attack at ε = {eps} (accuracy on the attacked images):\n\n" + _attack_table(groups, eps)
                  for eps in levels]
        parts += [EQUAL_TEXT, _equal_clean_table(groups, levels)]
    return "\n\n".join(parts)


def _attack_table(groups: dict[tuple, list[dict]], eps: str) -> str:
    names = ["clean", *ATTACKS, "strongest"]
    rows = [[theta, training(variant, r_rnd), *[_stat(runs, lambda r, n=n: strong_value(r, eps, n)) for n in names]]
            for (variant, theta, r_rnd), runs in groups.items()]
    return markdown_table(["θ", "training", *names], rows)


def equal_clean_groups(groups: dict[tuple, list[dict]]) -> list[list[tuple]]:
    """Configurations by mean clean accuracy (descending), cut greedily into groups spanning ≤ EQUAL_CLEAN."""
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
            rows.append([number, theta, training(variant, r_rnd), _stat(runs, lambda r: r["clean_acc"]),
                         *[_stat(runs, lambda r, e=e: strong_value(r, e, "pgd")) for e in levels],
                         *[_stat(runs, lambda r, e=e: strong_value(r, e, "strongest")) for e in levels]])
    return markdown_table(["group", "θ", "training", "clean", *[f"PGD ε={e}" for e in levels],
                           *[f"strongest ε={e}" for e in levels]], rows)


# -- figures ------------------------------------------------------------------------------


def figures(results: list[dict], out: Path) -> list[Path]:
    """Accuracy against θ for each perturbation (rows: noise, FGSM, PGD; solid: no R_rnd), the
    strongest attack against θ, and the training curves."""
    plain = [r for r in results if key(r)[0] == "plain"]
    panels = [("noise_acc", NOISE, "Gaussian noise σ"), ("fgsm_acc", EPSILONS, "FGSM ε"),
              ("pgd_acc", EPSILONS, "PGD ε")]
    fig, axes = grid_figure(1, len(panels))
    for ax, (name, levels, title) in zip(axes[0], panels):
        for i, level in enumerate(levels):
            for r_rnd, style in ((False, "-"), (True, "--")):
                label = f"{title.split()[-1]}={level}" + (", R_rnd" if r_rnd else "")
                _against_theta(ax, plain, r_rnd, lambda r, n=name, l=level: r[n][str(l)], label, color(i), style)
        ax.set(xlabel="θ", ylabel="test accuracy", title=title, ylim=(0, 1))
        ax.legend(fontsize="x-small", ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    paths = [save(fig, out / "robustness.png")]
    if _strong_levels(results):
        paths.append(_strongest(results, out))
    return [*paths, _training(results, out)]


def _against_theta(ax, results: list[dict], r_rnd: bool, value, label: str, c: str, style: str) -> None:
    """Mean over seeds against θ with a min–max band (nothing if a θ misses a seed)."""
    by_theta: dict[float, list[dict]] = {}
    for r in results:
        if r["r_rnd"] == r_rnd:
            by_theta.setdefault(r["theta"], []).append(r)
    thetas = sorted(by_theta)
    if not thetas:
        return
    seeds = min(len(runs) for runs in by_theta.values())
    band(ax, [[value(by_theta[t][s]) for t in thetas] for s in range(seeds)], label, c, style, x=thetas)


def _strongest(results: list[dict], out: Path) -> Path:
    """Per strong ε: strongest-attack and 10-step PGD accuracy against θ; variants as markers."""
    levels = _strong_levels(results)
    fig, axes = grid_figure(1, len(levels))
    plain = [r for r in results if key(r)[0] == "plain"]
    for ax, eps in zip(axes[0], levels):
        for i, attack in enumerate(("strongest", "pgd")):
            for r_rnd, style in ((False, "-"), (True, "--")):
                label = ("strongest" if attack == "strongest" else "PGD 10 steps") + (", R_rnd" if r_rnd else "")
                _against_theta(ax, plain, r_rnd, lambda r, a=attack: strong_value(r, eps, a), label, color(i), style)
        for j, variant in enumerate(VARIANTS[1:]):
            runs = [r for r in results if key(r)[0] == variant]
            for theta in sorted({r["theta"] for r in runs}):
                values = [strong_value(r, eps, "strongest") for r in runs if r["theta"] == theta]
                ax.plot(theta, np.mean(values), "s^"[j], color=color(2 + j),
                        label=f"strongest, {training(variant, False)}" if theta == max(r["theta"] for r in runs)
                        else None)
        ax.set(xlabel="θ", ylabel="test accuracy", title=f"L∞ attacks, ε = {eps}", ylim=(0, 1))
        ax.legend(fontsize="x-small", ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return save(fig, out / "robustness_strong.png")


def _training(results: list[dict], out: Path) -> Path:
    fig, axes = grid_figure(1, 2)
    styles = {("plain", False): "-", ("plain", True): "--", ("contraction", False): ":", ("jacobian", False): "-."}
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


__all__ = ["EQUAL_CLEAN", "configurations", "equal_clean_groups", "figures", "strong_value", "summarize"]
