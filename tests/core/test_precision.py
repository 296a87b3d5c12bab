"""Mixed and half precision: the solve and the adjoint run in float32 and reach tol.

Under ``torch.autocast`` the block's input is float32 while F's matmuls would
run in bfloat16 (a residual floor near 2e-4, far above tol 1e-5); a
half-precision model is solved through float32 casts of its parameters. The
references are the same blocks run in float32 without autocast.
"""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers.problems import mlp, residual_norm
from irnet import ImplicitResidualBlock
from irnet.linear import GMRES, Direct, Neumann
from irnet.module import ImplicitNetModule
from irnet.nets import ODENet
from irnet.solvers import Anderson, FixedPoint, GradientDescent, NonlinearCG

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5
SOLVERS = {
    "fixed_point": lambda: FixedPoint(atol=TOL, max_iter=200),
    "anderson": lambda: Anderson(atol=TOL, max_iter=200),
    "gradient_descent": lambda: GradientDescent(atol=TOL, max_iter=200),
    "cg": lambda: NonlinearCG(atol=TOL, max_iter=200),
}
LINEAR = {
    "neumann": lambda: Neumann(rtol=TOL, max_iter=200),
    "gmres": lambda: GMRES(rtol=TOL, max_iter=100),
    "direct": lambda: Direct(rtol=TOL),
}
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def f32_problem(seed: int = 0):
    """A float32 F of width 32 on 8 states and a batch of 64: big enough for bf16 to show."""
    torch.manual_seed(seed)
    return mlp(n=8, width=32, lipschitz=0.9, seed=seed, dtype=torch.float32), torch.randn(64, 8)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_autocast_float32_input_solves_to_tol_like_float32(solver):
    F, x = f32_problem()
    block = ImplicitResidualBlock(F, 0.5, SOLVERS[solver]())
    with torch.no_grad():
        want = block(x)
        with torch.autocast(**BF16):
            y = block(x)
    stats = block.forward_stats
    assert y.dtype == torch.float32 and stats.residual.dtype == torch.float32
    assert stats.converged.all() and (stats.residual <= TOL).all()
    assert (residual_norm(F, x, y, 0.5) <= TOL).all()  # recomputed in float32, autocast off
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize("linear", list(LINEAR))
def test_autocast_gradients_match_float32(linear):
    """Forward under autocast, backward outside (as Lightning does): float32's gradients."""
    F, x = f32_problem()
    x.requires_grad_()
    w = torch.randn_like(x)
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=TOL, max_iter=200), LINEAR[linear]())
    want = torch.autograd.grad((block(x) * w).sum(), [x, *F.parameters()])
    with torch.autocast(**BF16):
        y = block(x)
    got = torch.autograd.grad((y * w).sum(), [x, *F.parameters()])
    assert block.backward_stats.converged.all()
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("linear", ["neumann", "gmres"])
def test_adjoint_under_autocast_reaches_tol(linear):
    """Backward inside autocast: the adjoint solve still runs in float32 and meets tol.

    (PyTorch autocasts the backward of the rest of the graph, so the gradient
    itself is only as good as bfloat16 there.)
    """
    F, x = f32_problem()
    x.requires_grad_()
    w = torch.randn_like(x)
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=TOL, max_iter=200), LINEAR[linear]())
    (want,) = torch.autograd.grad((block(x) * w).sum(), x)
    with torch.autocast(**BF16):
        (got,) = torch.autograd.grad((block(x) * w).sum(), x)
    stats = block.backward_stats
    assert stats.converged.all() and (stats.residual <= TOL).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("solver", ["fixed_point", "gradient_descent"])
def test_half_model_solves_in_float32_and_returns_its_dtype(dtype, solver):
    F32, x32 = f32_problem()
    F32 = F32.to(dtype).float()  # float32 copy of the half weights: the reference
    Fh = copy.deepcopy(F32).to(dtype)
    xh = x32.to(dtype).requires_grad_()
    x_ref = xh.detach().float().requires_grad_()
    w = torch.randn_like(x32)
    block = ImplicitResidualBlock(Fh, 0.5, SOLVERS[solver](), GMRES(rtol=TOL, max_iter=100))
    reference = ImplicitResidualBlock(F32, 0.5, SOLVERS[solver](), GMRES(rtol=TOL, max_iter=100))

    y = block(xh)
    stats = block.forward_stats
    assert y.dtype == dtype and stats.residual.dtype == torch.float32
    assert stats.converged.all() and (stats.residual <= TOL).all()
    y_ref = reference(x_ref)
    torch.testing.assert_close(y, y_ref.to(dtype), rtol=0, atol=0)

    (y.float() * w).sum().backward()
    (y_ref.to(dtype).float() * w).sum().backward()
    assert block.backward_stats.converged.all()
    assert xh.grad.dtype == dtype and all(p.grad.dtype == dtype for p in Fh.parameters())
    torch.testing.assert_close(xh.grad, x_ref.grad.to(dtype), rtol=0, atol=0)
    for p, q in zip(Fh.parameters(), F32.parameters()):
        torch.testing.assert_close(p.grad, q.grad.to(dtype), rtol=2**-7, atol=1e-6)
    assert all(p.dtype == dtype and p.is_leaf for p in Fh.parameters())  # the casts are undone


@pytest.mark.parametrize("solver", ["gradient_descent", "cg"])
def test_half_model_under_inference_mode(solver):
    F, x = f32_problem()
    block = ImplicitResidualBlock(F.to(torch.bfloat16), 0.5, SOLVERS[solver]())
    with torch.no_grad():
        want = block(x.to(torch.bfloat16))
    with torch.inference_mode():
        y = block(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and block.forward_stats.converged.all()
    torch.testing.assert_close(y, want, rtol=0, atol=0)


# -- Lightning precision settings -------------------------------------------------------------


def tiny_fit(precision: str, steps: int = 4, seed: int = 0) -> tuple[ImplicitNetModule, pl.Trainer]:
    """Fit a 2-layer ODENet on 16 points of sin(3x) for ``steps`` steps at ``precision``."""
    torch.manual_seed(seed)
    net = ODENet(
        1,
        1,
        layers=2,
        T=1.0,
        width=8,
        activation="tanh",
        solver=FixedPoint(atol=TOL, max_iter=100),
        linear_solver=GMRES(rtol=TOL, max_iter=50),
    )
    module = ImplicitNetModule(net, loss="l2")
    x = torch.linspace(-1, 1, 16).unsqueeze(1)
    loader = DataLoader(TensorDataset(x, torch.sin(3 * x)), batch_size=8)
    trainer = pl.Trainer(
        max_steps=steps,
        precision=precision,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, loader, loader)
    return module, trainer


def assert_solves_converged(module: ImplicitNetModule) -> None:
    for block in module.net.blocks:
        fwd, bwd = block.forward_stats, block.backward_stats
        assert fwd.residual.dtype in (torch.float32, torch.float64)
        assert fwd.converged.all() and (fwd.residual <= TOL).all()
        assert bwd is not None and bwd.converged.all()


@pytest.fixture(scope="module")
def float32_fit():
    return tiny_fit("32-true")


@pytest.mark.parametrize(
    "precision, dtype",
    [("64-true", torch.float64), ("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)],
)
def test_lightning_precision_fits(precision, dtype, float32_fit):
    module, trainer = tiny_fit(precision)
    assert trainer.global_step == 4
    assert all(p.dtype == dtype for p in module.parameters())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert_solves_converged(module)
    reference, _ = float32_fit
    assert_solves_converged(reference)
    if precision == "bf16-mixed":
        # Lift (cat) and component readout have no autocast op: with every solve and
        # adjoint in float32 the run is the float32 run.
        for p, q in zip(module.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    else:  # close to the float32 run after four steps, at the dtype's precision
        for p, q in zip(module.parameters(), reference.parameters()):
            torch.testing.assert_close(p.float(), q, rtol=0.05, atol=0.05)
