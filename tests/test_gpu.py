"""The gradient checks of ``test_layer.py``, repeated on CUDA; skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from irnet import ImplicitResidualBlock
from problems import LINEAR_SOLVERS, SOLVERS, conv_f, ift_gradients, mlp, residual_norm

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
    block = ImplicitResidualBlock(F, 0.5, SOLVERS["anderson"](atol=1e-5),
                                  LINEAR_SOLVERS["gmres"](rtol=1e-5))
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
    block = ImplicitResidualBlock(F, 0.5, SOLVERS["fixed_point"](atol=1e-5, max_iter=200),
                                  LINEAR_SOLVERS[linear](rtol=1e-5, max_iter=200))
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
    block = ImplicitResidualBlock(F, 0.5, SOLVERS["gradient_descent"](atol=1e-5, max_iter=200),
                                  LINEAR_SOLVERS["gmres"](rtol=1e-5))
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
    F = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                            torch.nn.Linear(8, 3)).to(device, torch.float64)
    with torch.no_grad():
        F[3].weight.mul_(0.3 / torch.linalg.matrix_norm(F[3].weight, ord=2)
                         / torch.linalg.matrix_norm(F[0].weight, ord=2))
    kept = []
    F[2].register_forward_hook(lambda m, a, out: kept.append(out.detach() != 0))
    block = ImplicitResidualBlock(F, 0.5, SOLVERS["anderson"](atol=1e-12), LINEAR_SOLVERS["gmres"]())
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
    net = ODENet(1, 1, layers=2, T=1.0, width=8, activation="tanh",
                 solver=FixedPoint(atol=1e-5, max_iter=100), linear_solver=GMRES(rtol=1e-5))
    module = (SGDModule if precision == "16-true" else ImplicitNetModule)(net, loss="l2")
    x = torch.linspace(-1, 1, 16).unsqueeze(1)
    loader = DataLoader(TensorDataset(x, torch.sin(3 * x)), batch_size=8)
    trainer = pl.Trainer(max_steps=4, precision=precision, accelerator="gpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=1)
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 4
    for block in net.blocks:
        assert block.forward_stats.converged.all() and (block.forward_stats.residual <= 1e-5).all()
        assert block.backward_stats.converged.all()
    assert all(torch.isfinite(p).all() for p in net.parameters())
