"""The four schemes of paper section 2 against the closed forms the paper states (float64), and
the two θ-steps a block can take (linear and one-leg) on linear and nonlinear ODEs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from irnet import ImplicitResidualBlock
from irnet.analysis.stability import (
    SCHEMES,
    THETA_STEPS,
    amplification_matrices,
    amplification_matrix,
    matrix_spectral_radius,
    oscillator_field,
    oscillator_invariant,
    phase_portrait,
    spectral_radius_curve,
    theta_method_matrix,
    theta_orbit,
    theta_stability_function,
    theta_step,
    verlet_matrix,
)
from irnet.solvers import Anderson

H_OMEGA = [0.01, 0.3, 1.0, 1.9, 2.0, 2.5, 7.0]
OMEGA = 50.0


def _eigenvalues(scheme: str, h_omega: float) -> torch.Tensor:
    return torch.linalg.eigvals(amplification_matrix(scheme, h_omega / OMEGA, OMEGA))


def _radius(scheme: str, h: float, omega: float) -> torch.Tensor:
    return matrix_spectral_radius(amplification_matrix(scheme, h, omega))


def _assert_same_set(actual: torch.Tensor, expected: list[complex], tol: float) -> None:
    # Sorting by imaginary part pairs a conjugate pair with its closed form.
    got = sorted(actual.tolist(), key=lambda c: (c.imag, c.real))
    want = sorted(expected, key=lambda c: (c.imag, c.real))
    assert max(abs(g - w) for g, w in zip(got, want)) <= tol, (got, want)


@pytest.mark.parametrize("h_omega", H_OMEGA)
def test_forward_euler_eigenvalues_are_one_plus_minus_i_h_omega(h_omega: float) -> None:
    expected = [1 + 1j * h_omega, 1 - 1j * h_omega]
    _assert_same_set(_eigenvalues("forward_euler", h_omega), expected, 1e-13)


@pytest.mark.parametrize("h_omega", H_OMEGA)
def test_backward_euler_eigenvalues_are_inverse(h_omega: float) -> None:
    expected = [1 / (1 + 1j * h_omega), 1 / (1 - 1j * h_omega)]
    _assert_same_set(_eigenvalues("backward_euler", h_omega), expected, 1e-14)


@pytest.mark.parametrize("h_omega", H_OMEGA)
def test_trapezoidal_eigenvalues_have_modulus_one(h_omega: float) -> None:
    moduli = _eigenvalues("trapezoidal", h_omega).abs()
    assert (moduli - 1).abs().max() <= 1e-14
    # Not the identity: the phase advances by 2·atan(hω/2) per step.
    assert float(_eigenvalues("trapezoidal", h_omega).angle().abs().max()) == pytest.approx(
        2 * math.atan(h_omega / 2), rel=1e-12
    )


@pytest.mark.parametrize("h_omega", H_OMEGA)
def test_verlet_characteristic_polynomial(h_omega: float) -> None:
    # λ² − (2 − h²ω²)λ + 1: trace 2 − h²ω², determinant 1.
    matrix = amplification_matrix("verlet", h_omega / OMEGA, OMEGA)
    assert float(torch.trace(matrix)) == pytest.approx(2 - h_omega**2, rel=1e-13, abs=1e-13)
    assert float(torch.linalg.det(matrix)) == pytest.approx(1.0, abs=1e-12)


def test_verlet_radius_is_one_up_to_two_and_grows_beyond() -> None:
    stable = torch.tensor([0.01, 0.5, 1.0, 1.5, 1.9, 1.99, 2.0], dtype=torch.float64)
    assert (spectral_radius_curve("verlet", stable) - 1).abs().max() <= 1e-12
    beyond = torch.tensor([2.01, 2.5, 3.0, 10.0], dtype=torch.float64)
    s2 = beyond**2
    larger_root = (s2 - 2 + (s2 * (s2 - 4)).sqrt()) / 2
    rho = spectral_radius_curve("verlet", beyond)
    assert torch.allclose(rho, larger_root, rtol=1e-12, atol=0)
    assert bool((rho > 1.1).all())


def test_spectral_radius_curve_matches_closed_forms_and_matrices() -> None:
    h_omega = torch.linspace(0.05, 3, 60, dtype=torch.float64)
    closed = {
        "forward_euler": (1 + h_omega**2).sqrt(),
        "backward_euler": (1 + h_omega**2).rsqrt(),
        "trapezoidal": torch.ones_like(h_omega),
    }
    for scheme, expected in closed.items():
        rho = spectral_radius_curve(scheme, h_omega)
        assert torch.allclose(rho, expected, rtol=1e-13, atol=0), scheme
    # Only hω matters: ω = 50 gives the same radii as ω = 1.
    for scheme in SCHEMES:
        direct = torch.stack([_radius(scheme, x / OMEGA, OMEGA) for x in h_omega.tolist()])
        rho = spectral_radius_curve(scheme, h_omega.tolist())
        assert torch.allclose(rho, direct, rtol=1e-12, atol=0), scheme


def test_amplification_matrix_reuses_theta_and_verlet_matrices() -> None:
    h = 0.02
    for scheme, theta in (("forward_euler", 0.0), ("backward_euler", 1.0), ("trapezoidal", 0.5)):
        expected = theta_method_matrix(h, OMEGA, theta)
        assert torch.equal(amplification_matrix(scheme, h, OMEGA), expected), scheme
    assert torch.equal(amplification_matrix("verlet", h, OMEGA), verlet_matrix(h, OMEGA))
    # The paper's explicit forward Euler update y_n = y − hω²z, z_n = z + hy.
    expected = torch.tensor([[1.0, -h * OMEGA**2], [h, 1.0]], dtype=torch.float64)
    assert torch.equal(amplification_matrix("forward_euler", h, OMEGA), expected)


def test_amplification_matrices_keeps_the_shape() -> None:
    assert amplification_matrices("verlet", 1.0).shape == (2, 2)
    assert amplification_matrices("verlet", [0.5, 1.0, 2.0]).shape == (3, 2, 2)
    assert amplification_matrices("verlet", []).shape == (0, 2, 2)


@pytest.mark.parametrize("theta", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("h_omega", [0.1, 1.0, 2.5])
def test_stability_function_gives_theta_method_eigenvalues(theta: float, h_omega: float) -> None:
    z = torch.tensor([1j * h_omega, -1j * h_omega], dtype=torch.complex128)
    expected = theta_stability_function(z, theta).tolist()
    eigenvalues = torch.linalg.eigvals(theta_method_matrix(h_omega / OMEGA, OMEGA, theta))
    _assert_same_set(eigenvalues, expected, 1e-14)


def test_stability_function_closed_form() -> None:
    # R(z) = (1 + (1−θ)z)/(1 − θz): forward Euler 1 + z, backward Euler 1/(1 − z).
    z = torch.tensor([0.3 - 2j, -1.5 + 0.25j], dtype=torch.complex128)
    assert torch.allclose(theta_stability_function(z, 0.0), 1 + z, rtol=0, atol=1e-15)
    assert torch.allclose(theta_stability_function(z, 1.0), 1 / (1 - z), rtol=0, atol=1e-15)
    # Real input is promoted: (1 + 1.5)/(1 − 1.5) = −5 at θ = ½; a Python number gives complex128.
    r = theta_stability_function(torch.tensor([3.0]), 0.5)
    assert r.dtype == torch.complex128
    assert complex(r[0]) == pytest.approx(-5.0, rel=1e-15)
    assert theta_stability_function(1j, 0.5).dtype == torch.complex128


def _left_half_plane() -> torch.Tensor:
    logs = torch.logspace(-3, 3, 61, dtype=torch.float64)
    radii = torch.cat([torch.zeros(1, dtype=torch.float64), logs])
    re, im = torch.meshgrid(-radii, torch.cat([-radii, radii]), indexing="ij")
    return torch.complex(re, im)


@pytest.mark.parametrize("theta", [0.5, 0.6, 0.75, 1.0])
def test_a_stable_for_theta_at_least_half(theta: float) -> None:
    assert float(theta_stability_function(_left_half_plane(), theta).abs().max()) <= 1 + 1e-15


@pytest.mark.parametrize("theta", [0.0, 0.25, 0.45])
def test_not_a_stable_for_theta_below_half(theta: float) -> None:
    # |R(i)|² = (1 + (1−θ)²)/(1 + θ²) > 1 for θ < ½: the imaginary axis is unstable.
    expected = math.sqrt((1 + (1 - theta) ** 2) / (1 + theta**2))
    assert abs(complex(theta_stability_function(1j, theta))) == pytest.approx(expected, rel=1e-14)
    assert float(theta_stability_function(_left_half_plane(), theta).abs().max()) > 1.01


def test_phase_portrait_iterates_the_matrix() -> None:
    h = 0.5 / OMEGA
    orbit = phase_portrait("forward_euler", h, OMEGA, start=(0.0, 1.0), steps=4)
    assert orbit.shape == (5, 2) and orbit.dtype == torch.float64
    assert orbit[0].tolist() == [0.0, 1.0]
    # One hand-computed step: y = 0 − hω²·1 = −25, z = 1 + h·0 = 1.
    assert orbit[1].tolist() == pytest.approx([-25.0, 1.0], rel=1e-15)
    matrix = amplification_matrix("forward_euler", h, OMEGA)
    expected = torch.linalg.matrix_power(matrix, 4) @ orbit[0]
    assert torch.allclose(orbit[4], expected, rtol=1e-14, atol=0)


def test_phase_portrait_energy_per_scheme() -> None:
    # The exact invariant y²/ω² + z²: trapezoidal keeps it, Euler grows / shrinks it by ρ² per step.
    h_omega, steps = 0.5, 20

    def energy(scheme: str) -> torch.Tensor:
        orbit = phase_portrait(scheme, h_omega / OMEGA, OMEGA, steps=steps)
        return orbit[:, 0] ** 2 / OMEGA**2 + orbit[:, 1] ** 2

    assert (energy("trapezoidal") - 1).abs().max() <= 1e-13
    growth = (1 + h_omega**2) ** steps
    assert float(energy("forward_euler")[-1]) == pytest.approx(growth, rel=1e-12)
    assert float(energy("backward_euler")[-1]) == pytest.approx(1 / growth, rel=1e-12)
    assert float(phase_portrait("verlet", 2.5 / OMEGA, OMEGA, steps=10).abs().max()) > 1e5


# -- the two θ-steps -------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("h_omega", [0.1, 1.0, 2.5])
@pytest.mark.parametrize("step", THETA_STEPS)
def test_both_theta_steps_are_the_theta_method_on_the_oscillator(theta, h_omega, step) -> None:
    # One step of each basis vector gives the step's matrix: the θ-method's, eigenvalues R(±ihω).
    f = oscillator_field(OMEGA, nonlinearity=0.0)
    matrix = theta_step(f, torch.eye(2, dtype=torch.float64), h_omega / OMEGA, theta, step).T
    assert torch.allclose(matrix, theta_method_matrix(h_omega / OMEGA, OMEGA, theta), atol=1e-12)
    z = torch.tensor([1j * h_omega, -1j * h_omega], dtype=torch.complex128)
    _assert_same_set(
        torch.linalg.eigvals(matrix), theta_stability_function(z, theta).tolist(), 1e-12
    )


@pytest.mark.parametrize("step", THETA_STEPS)
@pytest.mark.parametrize("theta", [0.25, 0.5, 1.0])
def test_both_theta_steps_multiply_by_r_on_the_scalar_test_equation(step, theta) -> None:
    # u' = λu, λ = −3, h = 0.2: u₁ = R(hλ) u₀ in both forms.
    u = torch.tensor([[2.0], [-0.5]], dtype=torch.float64)
    got = theta_step(lambda v: -3.0 * v, u, 0.2, theta, step)
    expected = theta_stability_function(-0.6, theta).real * u
    assert torch.allclose(got, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("theta", [0.25, 0.5, 0.75])
def test_theta_steps_solve_their_equations_and_part_on_a_nonlinear_field(theta) -> None:
    f, h = oscillator_field(OMEGA, 1.0), 1.0 / OMEGA
    u = torch.tensor([[0.0, 1.0], [30.0, -0.5]], dtype=torch.float64)
    linear = theta_step(f, u, h, theta, "linear")
    one_leg = theta_step(f, u, h, theta, "one_leg")
    scale = 1 + u.norm(dim=1)
    r_linear = linear - u - h * ((1 - theta) * f(u) + theta * f(linear))
    r_one_leg = one_leg - u - h * f((1 - theta) * u + theta * one_leg)
    assert (r_linear.norm(dim=1) <= 1e-13 * scale).all()
    assert (r_one_leg.norm(dim=1) <= 1e-13 * scale).all()
    assert float((linear - one_leg).abs().max()) > 1e-3


def test_implicit_midpoint_keeps_the_invariant_the_trapezoidal_rule_does_not() -> None:
    # ẏ = −ω²sz, ż = sy, s = 1 + z²: y²/ω² + z² is invariant. The one-leg θ = ½ step keeps it to
    # rounding (Q₁ − Q₀ = 2h m·M f(m) = 0 at the midpoint m), the linear one swings by O(1).
    f = oscillator_field(OMEGA, 1.0)
    q = {
        step: oscillator_invariant(theta_orbit(f, (0.0, 1.0), 1.5 / OMEGA, 0.5, step, 9), OMEGA)
        for step in THETA_STEPS
    }
    assert float((q["one_leg"] - 1).abs().max()) < 1e-12
    assert float((q["linear"] - 1).abs().max()) > 0.5
    # The paper's linear oscillator (s = 1): both keep it.
    f = oscillator_field(OMEGA, 0.0)
    for step in THETA_STEPS:
        orbit = theta_orbit(f, (0.0, 1.0), 1.5 / OMEGA, 0.5, step, 9)
        assert float((oscillator_invariant(orbit, OMEGA) - 1).abs().max()) < 1e-12


@pytest.mark.parametrize("step", THETA_STEPS)
@pytest.mark.parametrize("theta", [0.5, 0.75])
def test_the_block_takes_the_same_theta_step(step, theta) -> None:
    # The block with F = h·f solves the same equation as Newton's method here.
    f, h = oscillator_field(1.0, 1.0), 0.3
    u = torch.tensor([[0.0, 1.0], [0.8, -0.5], [-1.2, 0.3]], dtype=torch.float64)
    block = ImplicitResidualBlock(
        lambda v: h * f(v), theta, Anderson(atol=1e-13, max_iter=200), scheme=step
    )
    assert torch.allclose(block(u), theta_step(f, u, h, theta, step), rtol=0, atol=1e-12)


def test_theta_step_refuses_to_return_an_unsolved_step() -> None:
    with pytest.raises(RuntimeError, match="did not converge"):
        theta_step(
            lambda v: v**3, torch.tensor([[10.0]], dtype=torch.float64), 1.0, 1.0, max_iter=2
        )


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: amplification_matrix("rk4", 0.1, 1.0), "scheme"),
        (lambda: theta_step(lambda v: v, torch.ones(1, 2), 0.1, 0.5, "one-leg"), "scheme"),
        (lambda: theta_step(lambda v: v, torch.ones(2), 0.1, 0.5), "u must be a batch"),
        (lambda: theta_step(lambda v: v, torch.ones(1, 2), 0.0, 0.5), "h"),
        (lambda: theta_step(lambda v: v, torch.ones(1, 2), 0.1, 1.5), "theta"),
        (lambda: theta_orbit(lambda v: v, (1.0, float("nan")), 0.1, 0.5), "start"),
        (lambda: oscillator_field(1.0, -1.0), "nonlinearity"),
        (lambda: amplification_matrix("verlet", 0.0, 1.0), "h"),
        (lambda: amplification_matrix("trapezoidal", 0.1, -1.0), "omega"),
        (lambda: spectral_radius_curve("euler", [1.0]), "scheme"),
        (lambda: spectral_radius_curve("verlet", [1.0, 0.0]), "h_omega"),
        (lambda: spectral_radius_curve("verlet", [1.0, float("nan")]), "h_omega"),
        (lambda: spectral_radius_curve("verlet", [[1.0]]), "h_omega"),
        (lambda: spectral_radius_curve("verlet", "x"), "h_omega"),
        (lambda: theta_stability_function(torch.tensor(1j), 1.5), "theta"),
        (lambda: phase_portrait("verlet", 0.01, start=(1.0, 2.0, 3.0)), "start"),
        (lambda: phase_portrait("verlet", 0.01, start=(1.0, float("inf"))), "start"),
        (lambda: phase_portrait("verlet", 0.01, steps=-1), "steps"),
        (lambda: phase_portrait("leapfrog", 0.01), "scheme"),
    ],
)
def test_invalid_arguments_name_the_argument(call, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()


def test_unknown_scheme_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="forward_euler.*backward_euler.*trapezoidal.*verlet"):
        amplification_matrix("rk4", 0.1, 1.0)


def test_reproduce_run_writes_files_with_consistent_numbers(tmp_path) -> None:
    from irnet.reproduce.stability import run

    out = tmp_path / "stability"
    results = run(out, tiny=True, command="python -m irnet reproduce stability --tiny")
    for name in ("phase_portraits.png", "spectral_radius.png", "theta_regions.png", "one_leg.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    stored = json.loads((out / "results.json").read_text())
    assert stored == results
    for scheme in SCHEMES:
        omega = stored["omega"]
        direct = [float(_radius(scheme, x / omega, omega)) for x in stored["h_omega"]]
        assert stored["spectral_radius"][scheme] == pytest.approx(direct, rel=1e-12)
    assert all(claim["holds"] for claim in stored["claims"]), stored["claims"]
    summary = (out / "summary.md").read_text()
    rows = stored["one_leg"]["rows"]  # one per hω, θ and θ-step; a table row per hω and θ
    assert summary.count("\n| ") == 1 + len(stored["h_omega"]) + 1 + len(rows) // 2
    assert summary.count("max deviation") == len(stored["claims"])
    # The command, the machine and the time taken, as the other studies record them.
    meta = stored["meta"]
    assert meta["command"] == "python -m irnet reproduce stability --tiny"
    assert f"`{meta['command']}`" in summary and meta["machine"] in summary
    assert f"{meta['minutes']:.1f} minutes" in summary and 0 < meta["minutes"] < 5
    # The midpoint keeps the invariant, the trapezoidal rule does not, on the nonlinear oscillator.
    half = {
        r["step"]: r["max_deviation"] for r in rows if r["theta"] == 0.5 and r["h_omega"] == 1.5
    }
    assert half["one_leg"] < 1e-12 < 0.5 < half["linear"]
