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
    assert (residual_norm(F, x, y, 0.5) <= block.solver.tol).all()
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
    block = ImplicitResidualBlock(F, 0.5, SOLVERS["anderson"](tol=1e-5),
                                  LINEAR_SOLVERS["gmres"](tol=1e-5))
    y = block(x)
    y.square().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype and x.grad.device.type == "cuda"
    assert block.forward_stats.converged.all() and block.backward_stats.converged.all()
