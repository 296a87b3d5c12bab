"""Paper section 2, "Linear stability analysis" (Fig. 2), reproduced numerically.

For the oscillator ``ẏ = −ω² z, ż = y`` the four schemes of :data:`irnet.analysis.stability.SCHEMES`
advance ``(y, z)`` by an amplification matrix ``A(hω)``. :func:`run` writes

* ``phase_portraits.png``: the Fig. 2 analogue, discrete orbits for ω = 50 at
  several ``hω`` against the exact ellipse (forward Euler spirals out, backward
  Euler in, trapezoidal and, for ``hω ≤ 2``, Verlet stay on an ellipse);
* ``spectral_radius.png``: ρ(A(hω)) for ``hω ∈ (0, 3]``;
* ``theta_regions.png``: the θ-method's stability regions ``|R(z)| ≤ 1``;
* ``one_leg.png``: the two θ-steps a block can take (docs/schemes.md), the linear
  ``u₁ = u₀ + h((1−θ)f(u₀) + θf(u₁))`` and the one-leg ``u₁ = u₀ + h f((1−θ)u₀ + θu₁)``,
  on the oscillator with a state-dependent speed ``s = 1 + z²``
  (:func:`~irnet.analysis.stability.oscillator_field`). On the linear oscillator they are one
  step (the same matrix, the same ``R(z)``: checked below); on this nonlinear one the one-leg
  step at θ = ½ (implicit midpoint) keeps the invariant ``y²/ω² + z²`` to rounding, the linear
  one (trapezoidal) lets it swing by O(1) at large ``hω``;
* ``results.json`` and ``summary.md``: the command, machine and time taken, a table of ρ,
  a table of the invariant under both θ-steps and, for each closed form the paper states (and
  each of the θ-steps'), the largest deviation of the computed numbers from it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter
from torch import Tensor

from irnet.analysis.stability import (
    SCHEMES,
    THETA_STEPS,
    amplification_matrices,
    oscillator_field,
    oscillator_invariant,
    phase_portrait,
    spectral_radius_curve,
    theta_method_matrix,
    theta_orbit,
    theta_stability_function,
    theta_step,
)
from irnet.reproduce._summary import machine

OMEGA = 50.0  # the paper's Fig. 2
TABLE_H_OMEGA = (0.1, 0.5, 1.0, 2.0, 2.5)
PORTRAIT_H_OMEGA = (0.5, 1.5, 2.5)  # Verlet stable, stable, unstable
THETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TOLERANCE = 1e-12  # a claim "holds" when its deviation is below this
LABELS = {
    "forward_euler": "forward Euler",
    "backward_euler": "backward Euler",
    "trapezoidal": "trapezoidal",
    "verlet": "Verlet",
}
NONLINEARITY = 1.0  # the speed s = 1 + z² of the nonlinear oscillator (s ∈ [1, 2] on the orbit)
STEP_THETAS = (0.5, 0.75)  # θ-steps compared on it (θ < ½ blows up, θ = 1 is one step in both)
STEP_LABELS = {"linear": "linear θ-step", "one_leg": "one-leg θ-step"}


def run(out: Path, tiny: bool = False, command: Optional[str] = None) -> dict:
    """Write the figures, ``results.json`` and ``summary.md`` into ``out``; return the numbers.

    Args:
        out: output folder (created if missing).
        tiny: coarser grids (quicker); all files are still written.
        command: the command line that ran the study, recorded in summary.md and
            results.json (``irnet reproduce stability`` passes its own).

    Returns:
        ``{"meta", "omega", "h_omega", "spectral_radius": {scheme: [ρ per hω]}, "one_leg",
        "claims": [...]}`` where each claim is ``{"claim", "max_deviation", "holds"}``,
        ``meta`` is ``{"command", "machine", "minutes"}`` and ``one_leg`` has one row per
        ``hω``, θ and θ-step: the invariant's final value and largest deviation.
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = 60 if tiny else 300
    h_omega = torch.linspace(0, 3, points + 1, dtype=torch.float64)[1:]  # hω = 0 is not a step
    orbits = _nonlinear_orbits(periods=1 if tiny else 2)
    results = {
        "omega": OMEGA,
        "h_omega": list(TABLE_H_OMEGA),
        "spectral_radius": {s: spectral_radius_curve(s, TABLE_H_OMEGA).tolist() for s in SCHEMES},
        "one_leg": {"nonlinearity": NONLINEARITY, "rows": _invariant_rows(orbits)},
        "claims": _claims(h_omega, 41 if tiny else 201)
        + _step_claims(h_omega[:: 6 if tiny else 15], orbits),
    }
    dpi = 60 if tiny else 110
    _save(_phase_portraits(), out / "phase_portraits.png", dpi)
    _save(_spectral_radius_figure(h_omega), out / "spectral_radius.png", dpi)
    _save(_theta_regions(101 if tiny else 301), out / "theta_regions.png", dpi)
    _save(_one_leg_figure(orbits), out / "one_leg.png", dpi)
    results = {
        "meta": {
            "command": command or "irnet.reproduce.stability.run (from Python)",
            # The study runs in the calling process: one worker with torch's threads.
            "machine": machine(1, torch.get_num_threads()),
            "minutes": (time.perf_counter() - start) / 60,
        },
        **results,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(_summary(results))
    return results


# -- the two θ-steps on the nonlinear oscillator ---------------------------------------------------


def _nonlinear_orbits(periods: int) -> dict[tuple[float, float, str], Tensor]:
    """The orbits from ``(0, 1)`` of every ``(hω, θ, θ-step)`` of the comparison, about
    ``periods`` periods of the linear oscillator long."""
    f = oscillator_field(OMEGA, NONLINEARITY)
    orbits = {}
    for h_omega in PORTRAIT_H_OMEGA:
        steps = math.ceil(periods * 2 * math.pi / h_omega)
        for theta in STEP_THETAS:
            for step in THETA_STEPS:
                orbits[h_omega, theta, step] = theta_orbit(
                    f, (0.0, 1.0), h_omega / OMEGA, theta, step, steps
                )
    return orbits


def _invariant_rows(orbits: dict) -> list[dict]:
    """Per orbit: the invariant ``y²/ω² + z²`` at the end and its largest deviation from 1."""
    rows = []
    for (h_omega, theta, step), orbit in orbits.items():
        q = oscillator_invariant(orbit, OMEGA)
        rows.append(
            {
                "h_omega": h_omega,
                "theta": theta,
                "step": step,
                "steps": len(orbit) - 1,
                "final": float(q[-1]),
                "max_deviation": float((q - 1).abs().max()),
            }
        )
    return rows


def _step_claims(h_omega: Tensor, orbits: dict) -> list[dict]:
    """The θ-steps' claims: one step on the linear oscillator; the midpoint keeps the invariant."""
    linear = oscillator_field(1.0, 0.0)  # ω = 1, h = hω: the matrices depend on hω only
    eye = torch.eye(2, dtype=torch.float64)
    same = 0.0
    for theta in THETAS:
        for x in h_omega.tolist():
            # One step of each basis vector: the rows of the step's matrix, transposed.
            matrix = theta_step(linear, eye, x, theta, "one_leg").T
            same = max(same, _max_abs(matrix - theta_method_matrix(x, 1.0, theta)))
    midpoint = max(
        float((oscillator_invariant(orbit, OMEGA) - 1).abs().max())
        for (_, theta, step), orbit in orbits.items()
        if theta == 0.5 and step == "one_leg"
    )
    checks = {
        "one-leg θ-step on the oscillator = θ-method (same matrix, same R(z)), "
        "θ ∈ {0, ¼, ½, ¾, 1}": same,
        f"one-leg θ-step, θ = ½: y²/ω² + z² kept on the oscillator with speed "
        f"{_speed(NONLINEARITY)}, hω ∈ {{{', '.join(f'{x:g}' for x in PORTRAIT_H_OMEGA)}}}": (
            midpoint
        ),
    }
    return [{"claim": c, "max_deviation": d, "holds": d < TOLERANCE} for c, d in checks.items()]


# -- the paper's claims, checked -------------------------------------------------------------------


def _claims(h_omega: Tensor, grid: int) -> list[dict]:
    """Each statement of section 2 with the largest deviation from it seen over ``h_omega``.

    For an equality the deviation is the largest absolute error; for an
    inequality it is the signed excess (≤ 0: holds, with that margin). A claim
    holds when its deviation is below :data:`TOLERANCE`.
    """
    eig = {s: torch.linalg.eigvals(amplification_matrices(s, h_omega)) for s in SCHEMES}
    rho = {s: e.abs().amax(-1) for s, e in eig.items()}
    verlet = amplification_matrices("verlet", h_omega)
    ihw = 1j * h_omega.to(torch.complex128)
    big = h_omega > 2  # Verlet's unstable range
    s2 = h_omega[big] ** 2
    checks = {
        "forward Euler: λ = 1 ± ihω": _set_distance(eig["forward_euler"], 1 + ihw, 1 - ihw),
        "backward Euler: λ = (1 ± ihω)⁻¹": _set_distance(
            eig["backward_euler"], 1 / (1 + ihw), 1 / (1 - ihw)
        ),
        "forward Euler: ρ = √(1 + h²ω²)": _max_abs(rho["forward_euler"] - (1 + h_omega**2).sqrt()),
        "backward Euler: ρ = 1/√(1 + h²ω²)": _max_abs(
            rho["backward_euler"] - (1 + h_omega**2).rsqrt()
        ),
        "trapezoidal: |λ| = 1": _max_abs(eig["trapezoidal"].abs() - 1),
        "Verlet: characteristic polynomial λ² − (2 − h²ω²)λ + 1 (trace, det)": max(
            _max_abs(verlet.diagonal(dim1=-2, dim2=-1).sum(-1) - (2 - h_omega**2)),
            _max_abs(torch.linalg.det(verlet) - 1),
        ),
        "Verlet: ρ = 1 for hω ≤ 2": _max_abs(rho["verlet"][~big] - 1),
        # The larger root of the characteristic polynomial once its roots turn real.
        "Verlet: ρ = (h²ω² − 2 + √(h²ω²(h²ω² − 4)))/2 for hω > 2": _max_abs(
            rho["verlet"][big] - (s2 - 2 + (s2 * (s2 - 4)).sqrt()) / 2
        ),
        "Verlet: ρ > 1 for hω > 2 (1 − min ρ)": 1 - float(rho["verlet"][big].min()),
        "θ-method: eigenvalues = R(±ihω), θ ∈ {0, ¼, ½, ¾, 1}": max(
            _theta_eigenvalue_deviation(theta, h_omega) for theta in THETAS
        ),
        "θ-method: |R(z)| ≤ 1 on Re z ≤ 0 for θ ∈ {½, ¾, 1} (max |R| − 1)": max(
            float(theta_stability_function(_left_half_plane(grid), t).abs().max()) - 1
            for t in THETAS
            if t >= 0.5
        ),
    }
    return [{"claim": c, "max_deviation": d, "holds": d < TOLERANCE} for c, d in checks.items()]


def _max_abs(error: Tensor) -> float:
    return float(error.abs().max())


def _set_distance(eigenvalues: Tensor, *expected: Tensor) -> float:
    """Largest distance from a computed eigenvalue to the nearest expected one (per row)."""
    targets = torch.stack(expected, -1)
    return float((eigenvalues[..., :, None] - targets[..., None, :]).abs().amin(-1).max())


def _theta_eigenvalue_deviation(theta: float, h_omega: Tensor) -> float:
    """Eigenvalues of :func:`theta_method_matrix` against ``R(±ihω)`` (ω = 1)."""
    matrices = torch.stack([theta_method_matrix(x, 1.0, theta) for x in h_omega.tolist()])
    z = 1j * h_omega.to(torch.complex128)
    eigenvalues = torch.linalg.eigvals(matrices)
    return _set_distance(
        eigenvalues, theta_stability_function(z, theta), theta_stability_function(-z, theta)
    )


def _left_half_plane(n: int) -> Tensor:
    """A log-spaced grid on ``Re z ≤ 0`` (imaginary axis included) out to ``|z| ≈ 1000``."""
    logs = torch.logspace(-3, 3, n, dtype=torch.float64)
    radii = torch.cat([torch.zeros(1, dtype=torch.float64), logs])
    re, im = torch.meshgrid(-radii, torch.cat([-radii, radii]), indexing="ij")
    return torch.complex(re, im)


# -- figures ---------------------------------------------------------------------------------------


def _save(figure: Figure, path: Path, dpi: int) -> None:
    FigureCanvasAgg(figure)  # Agg without pyplot: no global figure registry, no display
    figure.savefig(path, dpi=dpi)


def _phase_portraits() -> Figure:
    """Rows: ``hω``; columns: schemes. Start ``(0, 1)`` on the exact orbit ``y²/ω² + z² = 1``."""
    # Fixed spacing: constrained layout would draw the 12 panels twice.
    figure = Figure(figsize=(3.0 * len(SCHEMES), 2.8 * len(PORTRAIT_H_OMEGA)))
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.92, wspace=0.08, hspace=0.22)
    axes = figure.subplots(
        len(PORTRAIT_H_OMEGA), len(SCHEMES), squeeze=False, sharex=True, sharey=True
    )
    phase = np.linspace(0, 2 * np.pi, 200)
    for row, h_omega in zip(axes, PORTRAIT_H_OMEGA):
        steps = math.ceil(2 * 2 * math.pi / h_omega)  # about two periods
        for ax, scheme in zip(row, SCHEMES):
            orbit = phase_portrait(scheme, h_omega / OMEGA, OMEGA, steps=steps).numpy()
            ax.plot(OMEGA * np.sin(phase), np.cos(phase), "k--", lw=0.8, label="exact")
            ax.plot(orbit[:, 0], orbit[:, 1], "o-", ms=3, lw=1, color="C0", label="scheme")
            # Unstable orbits grow geometrically: clip to a window around the exact ellipse.
            ax.set_xlim(-2.5 * OMEGA, 2.5 * OMEGA)
            ax.set_ylim(-2.5, 2.5)
            ax.set_title(f"{LABELS[scheme]}, hω = {h_omega:g}", fontsize=9)
            ax.set(xlabel="y", ylabel="z")
            ax.label_outer()
    axes[0, 0].legend(fontsize=7, loc="upper right")
    figure.suptitle(f"Discrete orbits of ẏ = −ω²z, ż = y, ω = {OMEGA:g}")
    return figure


def _one_leg_figure(orbits: dict) -> Figure:
    """Rows: ``hω``. Columns: the θ = ½ orbit under each θ-step, and the invariant along every
    orbit of the comparison."""
    figure = Figure(figsize=(3.2 * (len(THETA_STEPS) + 1), 2.8 * len(PORTRAIT_H_OMEGA)))
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.9, wspace=0.3, hspace=0.35)
    axes = figure.subplots(len(PORTRAIT_H_OMEGA), len(THETA_STEPS) + 1, squeeze=False)
    phase = np.linspace(0, 2 * np.pi, 200)
    for row, h_omega in zip(axes, PORTRAIT_H_OMEGA):
        for ax, step in zip(row, THETA_STEPS):
            orbit = orbits[h_omega, 0.5, step].numpy()
            ax.plot(OMEGA * np.sin(phase), np.cos(phase), "k--", lw=0.8, label="exact orbit")
            ax.plot(orbit[:, 0], orbit[:, 1], "o-", ms=3, lw=1, color="C0", label="θ = ½")
            ax.set_xlim(-2.5 * OMEGA, 2.5 * OMEGA)
            ax.set_ylim(-2.5, 2.5)
            ax.set_title(f"{STEP_LABELS[step]}, θ = ½, hω = {h_omega:g}", fontsize=9)
            ax.set(xlabel="y", ylabel="z")
        ax = row[-1]
        for i, step in enumerate(THETA_STEPS):
            for theta, style in zip(STEP_THETAS, ("-", ":")):
                q = oscillator_invariant(orbits[h_omega, theta, step], OMEGA).numpy()
                label = f"{STEP_LABELS[step]}, θ = {theta:g}"
                ax.plot(q, style, lw=1.5, color=f"C{i}", label=label)
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_title(f"y²/ω² + z², hω = {h_omega:g}", fontsize=9)
        ax.set_xlabel("step n")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[0, -1].legend(fontsize=7, loc="center right")
    figure.suptitle(f"Two θ-steps of ẏ = −ω²sz, ż = sy, s = {_speed(NONLINEARITY)}, ω = {OMEGA:g}")
    return figure


def _speed(nonlinearity: float) -> str:
    """The speed ``s`` of :func:`~irnet.analysis.stability.oscillator_field` as text."""
    return "1 + z²" if nonlinearity == 1 else f"1 + {nonlinearity:g}z²"


def _spectral_radius_figure(h_omega: Tensor) -> Figure:
    figure = Figure(figsize=(6, 4), constrained_layout=True)
    ax = figure.subplots()
    styles = {"forward_euler": "-", "backward_euler": "-", "trapezoidal": "--", "verlet": ":"}
    for scheme in SCHEMES:
        rho = spectral_radius_curve(scheme, h_omega)
        ax.plot(h_omega.numpy(), rho.numpy(), styles[scheme], lw=2, label=LABELS[scheme])
    ax.axvline(2.0, color="grey", lw=0.6)  # Verlet's stability limit
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_yscale("log")
    ax.set_yticks([0.3, 0.5, 1, 2, 3, 5])
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("hω")
    ax.set_ylabel("spectral radius ρ(A(hω))")
    ax.legend()
    return figure


def _theta_regions(n: int) -> Figure:
    figure = Figure(figsize=(3.0 * len(THETAS), 3.4))
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.82, wspace=0.08)
    re = np.linspace(-5, 5, n)
    z = torch.complex(*torch.meshgrid(torch.from_numpy(re), torch.from_numpy(re), indexing="xy"))
    for ax, theta in zip(figure.subplots(1, len(THETAS), sharey=True), THETAS):
        # log|R| ≤ 0 is the region; contouring it (not a 0/1 mask) gives a smooth boundary.
        # The clip tames the zero of R and its pole at z = 1/θ.
        log_r = theta_stability_function(z, theta).abs().log().clamp(-10, 10).numpy()
        ax.contourf(re, re, log_r, levels=[-10, 0], colors=["C2"], alpha=0.5)
        ax.contour(re, re, log_r, levels=[0], colors="k", linewidths=0.8)
        ax.axvline(0, color="grey", lw=0.6)  # the oscillator's z = ±ihω lie on this axis
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_aspect("equal")
        ax.set_title(f"θ = {theta:g}")
        ax.set_xlabel("Re z")
        ax.label_outer()
    figure.axes[0].set_ylabel("Im z")
    figure.suptitle("θ-method stability regions |R(z)| ≤ 1 (shaded)")
    return figure


# -- summary ---------------------------------------------------------------------------------------


def _summary(results: dict) -> str:
    meta = results["meta"]
    seconds = 60 * meta["minutes"]
    header = "| hω | " + " | ".join(LABELS[s] for s in SCHEMES) + " |"
    lines = [
        "# Linear stability of the four schemes (paper section 2, Fig. 2)",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['machine']}; {meta['minutes']:.1f} minutes ({seconds:.1f} s).",
        "",
        header,
    ]
    lines.append("|" + "---|" * (len(SCHEMES) + 1))
    for i, h_omega in enumerate(results["h_omega"]):
        cells = (f"{results['spectral_radius'][s][i]:.6g}" for s in SCHEMES)
        lines.append(f"| {h_omega:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Spectral radius ρ(A(hω)).",
        "",
        "## The two θ-steps on a nonlinear oscillator",
        "",
        f"ẏ = −ω²sz, ż = sy with the speed s = {_speed(results['one_leg']['nonlinearity'])} "
        f"(ω = {results['omega']:g}), from (0, 1): its "
        "orbits are the linear oscillator's, y²/ω² + z² = 1. The invariant at the end of the orbit "
        "and its largest deviation from 1 along it:",
        "",
        "| hω | θ | steps | "
        + " | ".join(f"{STEP_LABELS[s]}: end, max dev." for s in THETA_STEPS)
        + " |",
        "|---|---|---|" + "---|" * len(THETA_STEPS),
    ]
    rows = {(r["h_omega"], r["theta"], r["step"]): r for r in results["one_leg"]["rows"]}
    for h_omega, theta in dict.fromkeys((r["h_omega"], r["theta"]) for r in rows.values()):
        cells = [rows[h_omega, theta, s] for s in THETA_STEPS]
        lines.append(
            f"| {h_omega:g} | {theta:g} | {cells[0]['steps']} | "
            + " | ".join(f"{c['final']:.6g}, {c['max_deviation']:.2g}" for c in cells)
            + " |"
        )
    lines += ["", "Claims of the paper (and of the θ-steps), checked numerically:", ""]
    for claim in results["claims"]:
        verdict = "holds" if claim["holds"] else "FAILS"
        lines.append(f"- {claim['claim']}: max deviation {claim['max_deviation']:.2g} ({verdict})")
    return "\n".join(lines) + "\n"
