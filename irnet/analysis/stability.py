"""Linear stability of θ-schemes (paper Fig. 2) and of trained implicit layers.

Three parts:

* The paper's linear stability analysis: the amplification matrix of the
  θ-method and of Verlet for the oscillator ``ẏ = −ω² z, ż = y`` (eq. 6). Its
  spectral radius is ``√(1 + h²ω²)`` for forward Euler (θ = 0, unstable),
  ``1/√(1 + h²ω²)`` for backward Euler (θ = 1) and exactly 1 for the trapezoidal
  rule (θ = ½). :func:`amplification_matrix` names the four schemes of the
  paper (:data:`SCHEMES`); :func:`spectral_radius_curve` gives ρ as a function
  of ``hω``, :func:`phase_portrait` the discrete orbits of Fig. 2 and
  :func:`theta_stability_function` the θ-method's ``R(z)`` on the complex plane.
* The two θ-steps a block can take (:data:`THETA_STEPS`, docs/schemes.md), the linear
  ``u₁ = u₀ + h((1−θ)f(u₀) + θf(u₁))`` and the one-leg ``u₁ = u₀ + h f((1−θ)u₀ + θu₁)``,
  on any ODE ``u' = f(u)`` (:func:`theta_step`, :func:`theta_orbit`, by Newton's method in
  float64). On a linear ``f`` they are one step, with the same ``R(z)``; they part on a
  nonlinear one, such as :func:`oscillator_field` with a state-dependent speed, whose
  invariant ``y²/ω² + z²`` the one-leg step at θ = ½ (the implicit midpoint rule) keeps
  exactly and the linear one (the trapezoidal rule) does not.
* Matrix-free spectra of a layer ``y = x + (1−θ)F(x) + θF(y)``: its
  input–output Jacobian ``∂y/∂x = (I − θJ_F(y))⁻¹(I + (1−θ)J_F(x))`` and the
  Neumann-series operator ``θJ_F(y)`` (for a one-leg layer both at the stage
  ``z = (1−θ)x + θy``), applied by Jacobian–vector products
  (``torch.func.jvp``) and, for the inverse, a GMRES solve. Their spectral
  radii come from :func:`spectral_radius`, an Arnoldi iteration: power
  iteration that keeps its iterates, so that the complex-conjugate eigenvalue
  pairs of these oscillatory Jacobians (where plain power iteration never
  settles) are resolved. With a Krylov dimension of at least the state size the
  answer is exact up to rounding.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from irnet._misc import (
    check_choice,
    check_int,
    check_nonnegative,
    check_positive,
    check_unit_interval,
    sample_dot,
    sample_norm,
)
from irnet.layer import SCHEMES as THETA_STEPS
from irnet.linear import GMRES

Operator = Callable[[Tensor], Tensor]

SCHEMES = ("forward_euler", "backward_euler", "trapezoidal", "verlet")
"""The discretisations of the oscillator compared in the paper's section 2."""

# θ of the schemes that are θ-methods (Verlet is not one).
_THETAS = {"forward_euler": 0.0, "backward_euler": 1.0, "trapezoidal": 0.5}


# -- paper Fig. 2: θ-schemes on the linear oscillator ---------------------------------------


def oscillator_matrix(omega: float) -> Tensor:
    """``A`` of ``(ẏ, ż) = A (y, z)`` for ``ẏ = −ω² z, ż = y`` (float64)."""
    omega = check_positive("omega", omega)
    return torch.tensor([[0.0, -(omega**2)], [1.0, 0.0]], dtype=torch.float64)


def theta_method_matrix(h: float, omega: float, theta: float) -> Tensor:
    """Amplification matrix ``(I − θhA)⁻¹(I + (1−θ)hA)`` of the θ-method on the oscillator.

    One step maps ``(y_{n−1}, z_{n−1})`` to ``(y_n, z_n)``. θ = 0 is forward
    Euler, θ = 1 backward Euler, θ = ½ the trapezoidal scheme.

    Args:
        h: step size (> 0).
        omega: frequency ω (> 0).
        theta: implicitness θ in [0, 1].
    """
    h = check_positive("h", h)
    theta = check_unit_interval("theta", theta)
    a, eye = oscillator_matrix(omega), torch.eye(2, dtype=torch.float64)
    return torch.linalg.solve(eye - theta * h * a, eye + (1 - theta) * h * a)


def verlet_matrix(h: float, omega: float) -> Tensor:
    """Amplification matrix of the Verlet scheme on the oscillator (stable iff ``hω ≤ 2``).

    ``y_{n−½} = y − (hω²/2) z;  z_n = z + h y_{n−½};  y_n = y_{n−½} − (hω²/2) z_n``.
    """
    h = check_positive("h", h)
    w2 = check_positive("omega", omega) ** 2
    half_kick = torch.tensor([[1.0, -h * w2 / 2], [0.0, 1.0]], dtype=torch.float64)
    drift = torch.tensor([[1.0, 0.0], [h, 1.0]], dtype=torch.float64)
    return half_kick @ drift @ half_kick


def matrix_spectral_radius(matrix: Tensor) -> Tensor:
    """``max |λ|`` over the eigenvalues of a square matrix (or of each in a batch)."""
    return torch.linalg.eigvals(matrix).abs().amax(-1)


def amplification_matrix(scheme: str, h: float, omega: float) -> Tensor:
    """``A`` with ``(y_n, z_n) = A (y_{n−1}, z_{n−1})`` for one of :data:`SCHEMES` (float64, 2×2).

    Args:
        scheme: ``"forward_euler"`` (θ = 0), ``"backward_euler"`` (θ = 1),
            ``"trapezoidal"`` (θ = ½) or ``"verlet"``.
        h: step size (> 0).
        omega: frequency ω (> 0).
    """
    scheme = check_choice("scheme", scheme, SCHEMES)
    if scheme == "verlet":
        return verlet_matrix(h, omega)
    return theta_method_matrix(h, omega, _THETAS[scheme])


def amplification_matrices(scheme: str, h_omega: Tensor | Sequence[float] | float) -> Tensor:
    """:func:`amplification_matrix` at each ``hω`` (ω = 1, h = hω), stacked.

    Shape ``(*h_omega.shape, 2, 2)``. The matrices depend on ``h`` and ``ω`` only through ``hω``.

    Args:
        scheme: one of :data:`SCHEMES`.
        h_omega: a number or a 1-D tensor/sequence of finite numbers > 0.
    """
    scheme = check_choice("scheme", scheme, SCHEMES)
    values = _positive_values("h_omega", h_omega)
    matrices = [amplification_matrix(scheme, x, 1.0) for x in values.reshape(-1).tolist()]
    if not matrices:
        return values.new_empty(0, 2, 2)
    return torch.stack(matrices).reshape(*values.shape, 2, 2)


def spectral_radius_curve(scheme: str, h_omega: Tensor | Sequence[float] | float) -> Tensor:
    """ρ(A(hω)) of a scheme at each ``hω`` (float64, the shape of ``h_omega``).

    Closed forms (paper section 2): ``√(1 + h²ω²)`` for forward Euler,
    ``1/√(1 + h²ω²)`` for backward Euler, 1 for the trapezoidal rule, and for
    Verlet 1 while ``hω ≤ 2``, the larger root modulus of
    ``λ² − (2 − h²ω²)λ + 1`` beyond.

    Example:
        >>> spectral_radius_curve("forward_euler", [1.0, 2.0])  # √2, √5
        tensor([1.4142, 2.2361], dtype=torch.float64)
        >>> spectral_radius_curve("backward_euler", [1.0])  # 1/√2
        tensor([0.7071], dtype=torch.float64)
        >>> spectral_radius_curve("trapezoidal", [1.0, 5.0])
        tensor([1., 1.], dtype=torch.float64)
    """
    return matrix_spectral_radius(amplification_matrices(scheme, h_omega))


def theta_stability_function(z: Tensor | complex, theta: float) -> Tensor:
    """The θ-method's stability function ``R(z) = (1 + (1−θ)z) / (1 − θz)``, elementwise.

    One step of the θ-method on ``u' = λu`` multiplies ``u`` by ``R(hλ)``; the
    scheme is stable where ``|R(z)| ≤ 1``. For the oscillator ``z = ±ihω`` and
    ``R(z)`` are the eigenvalues of :func:`theta_method_matrix`. It is the stability
    function of both θ-steps (:data:`THETA_STEPS`): on ``u' = λu`` the one-leg step
    ``u₁ = u₀ + hλ((1−θ)u₀ + θu₁)`` is the linear step ``u₁ = u₀ + h((1−θ)λu₀ + θλu₁)``
    term by term, and so on any linear problem.

    Args:
        z: complex points; a real tensor or a Python number becomes complex128
            (a complex tensor keeps its dtype).
        theta: implicitness θ in [0, 1].

    Example:
        The trapezoidal rule (θ = ½) keeps ``|R| = 1`` on the imaginary axis, where the
        oscillator's eigenvalues lie, and damps a decaying mode: ``R(−1) = ½ / (3/2) = ⅓``.

        >>> round(theta_stability_function(2j, theta=0.5).abs().item(), 12)
        1.0
        >>> round(theta_stability_function(-1.0, theta=0.5).real.item(), 4)
        0.3333
        >>> round(theta_stability_function(1j, theta=1.0).abs().item(), 4)  # backward Euler
        0.7071
    """
    theta = check_unit_interval("theta", theta)
    if not (isinstance(z, Tensor) and z.is_complex()):
        z = torch.as_tensor(z, dtype=torch.complex128)
    return (1 + (1 - theta) * z) / (1 - theta * z)


def phase_portrait(
    scheme: str,
    h: float,
    omega: float = 50.0,
    start: Tensor | Sequence[float] = (0.0, 1.0),
    steps: int = 100,
) -> Tensor:
    """The discrete orbit ``(y_n, z_n) = Aⁿ (y_0, z_0)``, ``n = 0 … steps``, shape ``(steps+1, 2)``.

    The exact orbit through ``(y_0, z_0)`` is the ellipse
    ``y²/ω² + z² = y_0²/ω² + z_0²``; the default start ``(0, 1)`` lies on
    ``y²/ω² + z² = 1``.

    Args:
        scheme: one of :data:`SCHEMES`.
        h: step size (> 0).
        omega: frequency ω (> 0).
        start: the initial point ``(y_0, z_0)``.
        steps: number of steps (>= 0).
    """
    matrix = amplification_matrix(scheme, h, omega)
    state = torch.as_tensor(start, dtype=torch.float64)
    if state.shape != (2,) or not bool(state.isfinite().all()):
        raise ValueError(f"start must be two finite numbers (y_0, z_0), got {start!r}")
    states = [state]
    for _ in range(check_int("steps", steps, 0)):
        states.append(matrix @ states[-1])
    return torch.stack(states)


# -- the two θ-steps on ODEs, linear and nonlinear ------------------------------------------


def oscillator_field(omega: float = 1.0, nonlinearity: float = 1.0) -> Callable[[Tensor], Tensor]:
    """``f`` of ``ẏ = −ω² s z, ż = s y`` with the speed ``s = 1 + nonlinearity · z²``.

    ``nonlinearity = 0`` is the paper's oscillator (eq. 6). For any speed ``s(y, z) > 0``
    the orbits are those of the oscillator, ``y²/ω² + z²`` (:func:`oscillator_invariant`)
    stays constant, only the pace along them changes; a nonlinear ``s`` makes ``f``
    nonlinear, so the two θ-steps part. ``f`` maps states ``(…, 2)`` to ``(…, 2)``.

    Example:
        >>> f = oscillator_field(omega=2.0, nonlinearity=1.0)
        >>> f(torch.tensor([1.0, 1.0]))  # s = 2: (−4·2·1, 2·1)
        tensor([-8.,  2.])
    """
    w2 = check_positive("omega", omega) ** 2
    nonlinearity = check_nonnegative("nonlinearity", nonlinearity)

    def f(u: Tensor) -> Tensor:
        y, z = u[..., 0], u[..., 1]
        s = 1 + nonlinearity * z**2
        return torch.stack([-w2 * s * z, s * y], -1)

    return f


def oscillator_invariant(u: Tensor, omega: float = 1.0) -> Tensor:
    """``y²/ω² + z²`` of states ``(…, 2)``, constant on the orbits of :func:`oscillator_field`."""
    omega = check_positive("omega", omega)
    return u[..., 0] ** 2 / omega**2 + u[..., 1] ** 2


def theta_step(
    f: Callable[[Tensor], Tensor],
    u: Tensor,
    h: float,
    theta: float,
    scheme: str = "linear",
    tol: float = 1e-13,
    max_iter: int = 50,
) -> Tensor:
    """One θ-step of ``u' = f(u)`` from each state of a batch ``u`` (shape ``(batch, n)``).

    ``scheme="linear"`` solves ``u₁ = u₀ + h((1−θ)f(u₀) + θf(u₁))`` (a block's default
    step), ``"one_leg"`` solves ``u₁ = u₀ + h f((1−θ)u₀ + θu₁)``. Newton's method from
    the explicit Euler step, with dense Jacobians of ``f`` (``torch.func.jacrev``, so
    ``f`` must also accept a single state ``(n,)``), until every residual is below
    ``tol · (1 + ‖u₀‖)``: a reference to check implicit layers against, independent of
    irnet's solvers.

    Args:
        f: the vector field, acting on each state separately.
        u: states, ``(batch, n)``; computed in their dtype (use float64).
        h: step size (> 0).
        theta: implicitness θ in [0, 1].
        scheme: one of :data:`THETA_STEPS`.
        tol: relative tolerance of the residual.
        max_iter: the most Newton iterations.

    Raises:
        RuntimeError: Newton's method did not converge (take a smaller ``h``).

    Example:
        On ``u' = −u`` the two steps agree, ``u₁ = R(−h) u₀`` (θ = ½, h = 1: R = ⅓):

        >>> u = torch.tensor([[3.0]], dtype=torch.float64)
        >>> theta_step(lambda v: -v, u, 1.0, 0.5, "one_leg")
        tensor([[1.]], dtype=torch.float64)
    """
    h = check_positive("h", h)
    theta = check_unit_interval("theta", theta)
    scheme = check_choice("scheme", scheme, THETA_STEPS)
    if u.dim() != 2:
        raise ValueError(f"u must be a batch of states (batch, n), got shape {tuple(u.shape)}")
    fu = f(u)
    one_leg = scheme == "one_leg"

    def stage(v: Tensor) -> Tensor:  # where the implicit part evaluates f
        return torch.lerp(u, v, theta) if one_leg else v

    def residual(v: Tensor) -> Tensor:
        if one_leg:
            return v - u - h * f(stage(v))
        return v - u - h * ((1 - theta) * fu + theta * f(v))

    v = u + h * fu
    r = residual(v)
    bound = tol * (1 + sample_norm(u))
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    jacobians = torch.func.vmap(torch.func.jacrev(f))
    for _ in range(check_int("max_iter", max_iter, 1)):
        if bool((sample_norm(r) <= bound).all()):
            return v
        # r'(v) = I − hθ J_f(stage(v)) in both schemes (the stage moves with θv).
        v = v - torch.linalg.solve(eye - h * theta * jacobians(stage(v)), r)
        r = residual(v)
    if bool((sample_norm(r) <= bound).all()):
        return v
    raise RuntimeError(
        f"Newton's method for the {scheme} θ-step (θ = {theta}, h = {h}) did not converge in "
        f"{max_iter} iterations (largest residual {float(sample_norm(r).max()):.3g}); take a "
        "smaller h"
    )


def theta_orbit(
    f: Callable[[Tensor], Tensor],
    start: Tensor | Sequence[float],
    h: float,
    theta: float,
    scheme: str = "linear",
    steps: int = 100,
) -> Tensor:
    """The discrete orbit of ``u' = f(u)`` under :func:`theta_step`, shape ``(steps + 1, n)``.

    Args:
        f: the vector field.
        start: the initial state ``(n,)`` (float64).
        h: step size (> 0).
        theta: implicitness θ in [0, 1].
        scheme: one of :data:`THETA_STEPS`.
        steps: number of steps (>= 0).
    """
    state = torch.as_tensor(start, dtype=torch.float64)
    if state.dim() != 1 or not bool(state.isfinite().all()):
        raise ValueError(f"start must be one state of finite numbers, got {start!r}")
    states = [state[None]]
    for _ in range(check_int("steps", steps, 0)):
        states.append(theta_step(f, states[-1], h, theta, scheme))
    return torch.cat(states)


def _positive_values(name: str, value) -> Tensor:
    """``value`` as a 0-D or 1-D float64 tensor of finite numbers > 0, or a ValueError naming it."""
    try:
        values = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be finite numbers > 0, got {value!r}") from error
    if values.ndim > 1 or not bool(((values > 0) & values.isfinite()).all()):
        raise ValueError(
            f"{name} must be a number or 1-D sequence of finite numbers > 0, got {value!r}"
        )
    return values


# -- spectral radius of a batched linear operator ------------------------------------------


def spectral_radius(
    apply: Operator,
    start: Tensor,
    krylov_dim: int = 20,
) -> Tensor:
    """Per-sample spectral radius of a linear operator by Arnoldi iteration.

    ``apply`` maps a batch of vectors to the batch of each sample's own
    operator applied to its own vector (as a batched Jacobian–vector product
    does). The Krylov space of ``start`` is built with doubly orthogonalised
    Gram–Schmidt; the radius is the largest modulus of the Ritz values (the
    eigenvalues of the Hessenberg matrix). A sample whose Krylov space becomes
    invariant early contributes zero columns, which only add zero eigenvalues,
    so its answer is exact. With ``krylov_dim`` at least the state size the
    result is the exact radius; below it, an estimate of the outermost
    eigenvalue (exact for the dominant one in the limit).

    Args:
        apply: the batched operator ``v ↦ A_i v_i``.
        start: a batch of start vectors (any shape with the batch first),
            non-zero in each sample; random is best.
        krylov_dim: Arnoldi steps (capped at the state size).

    Returns:
        Tensor of shape ``(batch,)``.
    """
    check_int("krylov_dim", krylov_dim, 1)
    shape, batch = start.shape, start.shape[0]
    steps = min(krylov_dim, start[0].numel())
    q = start.flatten(1)
    basis = [q / sample_norm(q).clamp_min(torch.finfo(q.dtype).tiny)[:, None]]
    hessenberg = q.new_zeros(batch, steps + 1, steps)
    for j in range(steps):
        w = apply(basis[j].view(shape)).flatten(1)
        scale = sample_norm(w)
        for _ in range(2):  # a second pass restores orthogonality lost to rounding
            for i in range(j + 1):
                c = sample_dot(w, basis[i])
                hessenberg[:, i, j] += c
                w = w - c[:, None] * basis[i]
        h = sample_norm(w)
        # Breakdown: the space is invariant, later columns must stay zero.
        alive = h > 100 * torch.finfo(q.dtype).eps * scale.clamp_min(torch.finfo(q.dtype).tiny)
        basis.append(
            torch.where(alive[:, None], w / h.clamp_min(torch.finfo(q.dtype).tiny)[:, None], 0)
        )
        hessenberg[:, j + 1, j] = torch.where(alive, h, 0)
    return matrix_spectral_radius(hessenberg[:, :steps, :steps])


# -- Jacobians of an implicit layer ----------------------------------------------------------


def jvp_operator(F: nn.Module | Operator, at: Tensor) -> Operator:
    """``v ↦ J_F(at) v``, batched, by forward-mode AD (no autograd graph is kept)."""

    def apply(v: Tensor) -> Tensor:
        # Forward-mode AD ignores grad mode; no_grad keeps parameters out of graphs. Its first
        # use compiles torch's JVP decompositions with the deprecated torch.jit.script (torch's
        # own warning, nothing for a user to act on).
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.script.*", category=DeprecationWarning
            )
            return torch.func.jvp(F, (at,), (v,))[1]

    return apply


def neumann_operator(F: nn.Module | Operator, y: Tensor, theta: float) -> Operator:
    """``v ↦ θ J_F(y) v``; the Neumann series of the adjoint solve converges iff its radius < 1.

    (The adjoint solve iterates ``θJ_F(y)ᵀ``, which has the same spectrum. For a one-leg
    layer pass its stage ``(1−θ)x + θy`` as ``y``.)
    """
    theta = check_unit_interval("theta", theta)
    jvp = jvp_operator(F, y)
    return lambda v: theta * jvp(v)


class LayerJacobian:
    """``v ↦ ∂y/∂x · v = (I − θJ_F(y))⁻¹ (I + (1−θ)J_F(x)) v`` for a solved layer.

    The right factor is one JVP at the input ``x``; the inverse is a GMRES
    solve of ``(I − θJ_F(y)) w = u`` with JVPs at the output ``y``, which works
    whether or not the Neumann series would converge. θ = 0 needs no solve.
    For a one-leg layer (``scheme="one_leg"``, ``y = x + F((1−θ)x + θy)``) both
    JVPs are at the stage ``z = (1−θ)x + θy``:
    ``∂y/∂x = (I − θJ_F(z))⁻¹ (I + (1−θ)J_F(z))``.

    Args:
        F: the layer's residual function (acting on each sample separately).
        theta: implicitness θ.
        x: the layer's input batch.
        y: the layer's output batch (the solved fixed point).
        tol: relative tolerance of the GMRES solves (default ``1000 · eps`` of the dtype).
        max_iter: the most GMRES steps per solve.
        scheme: the layer's θ-step, one of :data:`THETA_STEPS`.

    Attributes:
        solve_residual: the largest relative residual of any solve so far
            (0 for θ = 0); a large value means the estimate cannot be trusted.
    """

    def __init__(
        self,
        F: nn.Module | Operator,
        theta: float,
        x: Tensor,
        y: Tensor,
        tol: Optional[float] = None,
        max_iter: int = 100,
        scheme: str = "linear",
    ) -> None:
        if x.shape != y.shape:
            raise ValueError(
                f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        self.theta = check_unit_interval("theta", theta)
        if check_choice("scheme", scheme, THETA_STEPS) == "one_leg" and 0 < self.theta < 1:
            stage = torch.lerp(x, y, self.theta)
            self._jvp_x = self._jvp_y = jvp_operator(F, stage)
        else:
            self._jvp_x = jvp_operator(F, x)
            self._jvp_y = jvp_operator(F, y)
        tol = 1000 * torch.finfo(x.dtype).eps if tol is None else check_positive("tol", tol)
        self._gmres = GMRES(
            rtol=tol, max_iter=check_int("max_iter", max_iter, 1), restart=min(max_iter, 50)
        )
        self.solve_residual = 0.0

    def explicit_part(self, v: Tensor) -> Tensor:
        """``(I + (1−θ)J_F(x)) v``."""
        return v + (1 - self.theta) * self._jvp_x(v) if self.theta < 1 else v

    def implicit_matrix(self, w: Tensor) -> Tensor:
        """``(I − θJ_F(y)) w``."""
        return w - self.theta * self._jvp_y(w)

    def __call__(self, v: Tensor) -> Tensor:
        u = self.explicit_part(v)
        if self.theta == 0:
            return u
        # GMRES only calls the operator, so a plain function serves as one.
        w, stats = self._gmres.solve(self.implicit_matrix, u)
        self.solve_residual = max(self.solve_residual, float(stats.residual.max()))
        return w


def layer_spectral_radii(
    F: nn.Module | Operator,
    theta: float,
    x: Tensor,
    y: Tensor,
    krylov_dim: int = 20,
    generator: Optional[torch.Generator] = None,
    scheme: str = "linear",
) -> tuple[Tensor, Tensor]:
    """Per-sample spectral radii of a layer's Jacobian ``∂y/∂x`` and of ``θJ_F(y)``.

    For a one-leg layer (``scheme="one_leg"``) ``J_F`` is taken at the stage
    ``(1−θ)x + θy`` (:class:`LayerJacobian`).

    ``ρ(∂y/∂x) > 1`` means the layer amplifies some perturbation of its input
    (forward instability); ``ρ(θJ_F(y)) ≥ 1`` means the Neumann series of the
    adjoint solve (and, locally, fixed-point iteration) diverges.

    Args:
        F: the residual function.
        theta: implicitness θ.
        x: the layer's input batch.
        y: the layer's output batch.
        krylov_dim: Arnoldi steps (exact when at least the state size).
        generator: random generator for the start vectors (on the CPU); a
            fixed one keeps monitoring from drawing on the training RNG.
        scheme: the layer's θ-step, one of :data:`THETA_STEPS` (a block's ``scheme``).

    Returns:
        ``(rho_layer, rho_neumann)``, each of shape ``(batch,)``.
    """
    jacobian = LayerJacobian(F, theta, x, y, scheme=scheme)
    start = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    rho_layer = spectral_radius(jacobian, start, krylov_dim)
    if theta == 0:
        return rho_layer, torch.zeros_like(rho_layer)
    at = torch.lerp(x, y, theta) if scheme == "one_leg" and theta < 1 else y
    rho_neumann = spectral_radius(neumann_operator(F, at, theta), start, krylov_dim)
    return rho_layer, rho_neumann
