"""The gradient checks of ``test_layer.py``, repeated on CUDA; skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers.problems import LINEAR_SOLVERS, SOLVERS, conv_f, ift_gradients, mlp, residual_norm
from irnet import ImplicitResidualBlock
from irnet._scope import FullFloat32
from irnet.linear import GMRES
from irnet.nets import ConvResidual
from irnet.solvers import FixedPoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GRADCHECK = dict(eps=1e-5, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("linear", list(LINEAR_SOLVERS))
def test_gradcheck_on_cuda(solver, linear):
    device = torch.device("cuda")
    F = mlp(n=3, width=5).to(device)
    x = torch.randn(2, 3, dtype=torch.float64, device=device, requires_grad=True)
    block = ImplicitResidualBlock(F, 0.5, SOLVERS[solver](), LINEAR_SOLVERS[linear]())
    y = block(x)
    assert y.device.type == "cuda"
    assert block.forward_stats.iterations.device.type == "cuda"
    assert (residual_norm(F, x, y, 0.5) <= block.solver.atol).all()
    assert torch.autograd.gradcheck(
        lambda x, *params: block(x), (x, *F.parameters()), fast_mode=True, **GRADCHECK
    )
    w = torch.randn_like(x)
    grads = torch.autograd.grad((block(x) * w).sum(), [x, *F.parameters()])
    want_x, want_p = ift_gradients(F, x.detach(), block(x).detach(), 0.5, w)
    torch.testing.assert_close(grads[0], want_x, rtol=1e-9, atol=1e-10)
    for got, want in zip(grads[1:], want_p):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_block_on_cuda_keeps_dtype(dtype):
    device = torch.device("cuda")
    F = conv_f(channels=2, dtype=dtype).to(device)
    x = torch.randn(2, 2, 4, 4, dtype=dtype, device=device, requires_grad=True)
    block = ImplicitResidualBlock(
        F, 0.5, SOLVERS["anderson"](atol=1e-5), LINEAR_SOLVERS["gmres"](rtol=1e-5)
    )
    y = block(x)
    y.square().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype and x.grad.device.type == "cuda"
    assert block.forward_stats.converged.all() and block.backward_stats.converged.all()


# -- precision on CUDA (fp16 autocast is CUDA-only in Lightning) ------------------------------


def _f32_problem(device):
    torch.manual_seed(0)
    F = mlp(n=8, width=32, lipschitz=0.9, dtype=torch.float32).to(device)
    return F, torch.randn(64, 8, device=device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("linear", list(LINEAR_SOLVERS))
def test_autocast_on_cuda_solves_and_differentiates_in_float32(dtype, linear):
    device = torch.device("cuda")
    F, x = _f32_problem(device)
    x.requires_grad_()
    w = torch.randn_like(x)
    block = ImplicitResidualBlock(
        F,
        0.5,
        SOLVERS["fixed_point"](atol=1e-5, max_iter=200),
        LINEAR_SOLVERS[linear](rtol=1e-5, max_iter=200),
    )
    want_y = block(x)
    want = torch.autograd.grad((want_y * w).sum(), [x, *F.parameters()])
    with torch.autocast("cuda", dtype=dtype):
        y = block(x)
    got = torch.autograd.grad((y * w).sum(), [x, *F.parameters()])
    assert y.dtype == torch.float32 and block.forward_stats.converged.all()
    assert (residual_norm(F, x.detach(), y.detach(), 0.5) <= 1e-5).all()
    assert block.backward_stats.converged.all()
    torch.testing.assert_close(y, want_y, rtol=1e-6, atol=1e-6)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_model_on_cuda_solves_in_float32(dtype):
    device = torch.device("cuda")
    F, x = _f32_problem(device)
    F = F.to(dtype)
    xh = x.to(dtype).requires_grad_()
    block = ImplicitResidualBlock(
        F,
        0.5,
        SOLVERS["gradient_descent"](atol=1e-5, max_iter=200),
        LINEAR_SOLVERS["gmres"](rtol=1e-5),
    )
    y = block(xh)
    assert y.dtype == dtype and block.forward_stats.residual.dtype == torch.float32
    assert block.forward_stats.converged.all()
    y.float().square().sum().backward()
    assert block.backward_stats.converged.all()
    assert xh.grad.dtype == dtype and all(p.grad.dtype == dtype for p in F.parameters())
    with torch.inference_mode():
        block(xh)
    assert block.forward_stats.converged.all()


def test_dropout_mask_held_on_cuda():
    device = torch.device("cuda")
    F = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)
    ).to(device, torch.float64)
    with torch.no_grad():
        F[3].weight.mul_(
            0.3
            / torch.linalg.matrix_norm(F[3].weight, ord=2)
            / torch.linalg.matrix_norm(F[0].weight, ord=2)
        )
    kept = []
    F[2].register_forward_hook(lambda m, a, out: kept.append(out.detach() != 0))
    block = ImplicitResidualBlock(
        F, 0.5, SOLVERS["anderson"](atol=1e-12), LINEAR_SOLVERS["gmres"]()
    )
    x = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    block(x).square().sum().backward()
    assert len(kept) >= 3 and all(torch.equal(k, kept[0]) for k in kept)
    assert block.forward_stats.converged.all() and block.backward_stats.converged.all()


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true"])
def test_lightning_precision_fits_on_cuda(precision):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from irnet.linear import GMRES
    from irnet.module import ImplicitNetModule
    from irnet.nets import ODENet
    from irnet.solvers import FixedPoint

    class SGDModule(ImplicitNetModule):
        # Adam's eps (1e-8) is 0 in float16: with true fp16 weights it divides by zero.
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    net = ODENet(
        1,
        1,
        layers=2,
        T=1.0,
        width=8,
        activation="tanh",
        solver=FixedPoint(atol=1e-5, max_iter=100),
        linear_solver=GMRES(rtol=1e-5),
    )
    module = (SGDModule if precision == "16-true" else ImplicitNetModule)(net, loss="l2")
    x = torch.linspace(-1, 1, 16).unsqueeze(1)
    loader = DataLoader(TensorDataset(x, torch.sin(3 * x)), batch_size=8)
    trainer = pl.Trainer(
        max_steps=4,
        precision=precision,
        accelerator="gpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 4
    for block in net.blocks:
        assert block.forward_stats.converged.all() and (block.forward_stats.residual <= 1e-5).all()
        assert block.backward_stats.converged.all()
    assert all(torch.isfinite(p).all() for p in net.parameters())


# -- TF32 (Ampere and later round float32 matmuls and convolutions to TF32 when allowed) ------


@pytest.fixture
def tf32_on():
    """TF32 on for cuBLAS and cuDNN, as with ``torch.set_float32_matmul_precision("high")``."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def _conv_problem():
    """A ConvResidual with Lip(F) ≤ 0.5 (4 channels, 32 hidden, 8×8 images) and a batch of 16."""
    torch.manual_seed(0)
    F = ConvResidual(4, hidden_channels=32, activation="tanh", image_size=8)
    F.bounded_init(0.5)
    with torch.no_grad():
        for conv in (F.conv1, F.conv2):
            conv.bias.normal_(0, 0.1)
    return F.cuda(), torch.randn(16, 4, 8, 8, device="cuda")


def _adjoint(y, into: dict, key):
    """Keep the adjoint solution g that the block's implicit node hands on in backward."""
    y.grad_fn.register_hook(lambda grad_inputs, grad_outputs: into.__setitem__(key, grad_inputs[0]))


def test_conv_block_with_tf32_on_reaches_tol_and_matches_float64(tf32_on):
    """The solve and the adjoint run in full float32; the user's TF32 holds before and after.

    On the CPU the same problem gives a float64 residual of 1e-6 and adjoint and gradient
    errors of 4e-6 to 5e-6 (relative to their largest entry); with TF32's rounding
    emulated in F the forward solve stalls near 8e-5 and its answer's residual is 5.5e-4.
    """
    F, x = _conv_problem()
    F64 = copy.deepcopy(F).double()
    x.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    w = torch.randn_like(x)
    block = ImplicitResidualBlock(
        F, 0.5, FixedPoint(atol=1e-5, max_iter=200), GMRES(rtol=1e-5, max_iter=100)
    )
    reference = ImplicitResidualBlock(
        F64, 0.5, FixedPoint(atol=1e-12, max_iter=500), GMRES(rtol=1e-12, max_iter=200)
    )
    adjoints: dict = {}
    y, y64 = block(x), reference(x64)
    _adjoint(y, adjoints, 32)
    _adjoint(y64, adjoints, 64)
    stats = block.forward_stats
    assert stats.converged.all() and (stats.residual <= 1e-5).all()
    assert (residual_norm(F64, x64.detach(), y.detach().double(), 0.5) <= 2e-5).all()
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=2e-5)

    grads = torch.autograd.grad((y * w).sum(), [x, *F.parameters()])
    want = torch.autograd.grad((y64 * w.double()).sum(), [x64, *F64.parameters()])
    assert block.backward_stats.converged.all()
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    g, g64 = adjoints[32].double(), adjoints[64]
    torch.testing.assert_close(g, g64, rtol=0, atol=5e-5 * g64.abs().max().item())
    # The backprop through F(x) and F(y*) after the adjoint solve is ordinary backprop and
    # follows the user's TF32, as in an explicit network: one TF32 product's error (~1e-3).
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-2 * ref.abs().max().item())


def test_tf32_changes_this_cards_convolutions(tf32_on):
    """Without this the test above shows nothing: here TF32 really does round F's convolutions."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no TF32 before Ampere")
    F, x = _conv_problem()
    with torch.no_grad():
        fast = F(x).double()
        with FullFloat32():
            exact = F(x).double()
        reference = copy.deepcopy(F).double()(x.double())
    assert (fast - reference).abs().max() > 20 * (exact - reference).abs().max()
