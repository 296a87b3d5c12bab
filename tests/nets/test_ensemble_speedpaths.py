"""The member-wise F and head compute on member slabs with the samples last (``columns_of``):
their outputs, their gradients (the adjoint's vector–Jacobian products included) and their second
derivatives are each member's own, to 1e-12 in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from irnet.device_path import forced_path
from irnet.nets.ensemble import rows_of
from irnet.nets.memberwise import MemberwiseLinear, MemberwiseMLP
from irnet.nets.residual import MLPResidual

MEMBERS = 3
DIM, WIDTH = 4, 16


pytestmark = pytest.mark.usefixtures("float64_default")


def residuals(activation: str, lipschitz) -> list[MLPResidual]:
    """One residual per member, each with its own weights and a non-zero bias."""
    out = []
    for seed in range(MEMBERS):
        torch.manual_seed(seed)
        F = MLPResidual(DIM, WIDTH, step=0.7, activation=activation, lipschitz=lipschitz)
        with torch.no_grad():
            F.bias.normal_()
            F.gamma1[:, 0].mul_(1 + seed)  # the members' norms differ: some reach the bound
        out.append(F)
    return out


def rows(batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(batch * MEMBERS, DIM, generator=generator).requires_grad_()


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_columns_put_row_b_e_plus_k_at_member_k_sample_b_and_back():
    y = torch.arange(5 * MEMBERS * DIM, dtype=torch.float64).view(5 * MEMBERS, DIM)
    columns = MemberwiseMLP.columns_of(y, MEMBERS)
    assert columns.shape == (MEMBERS, DIM, 5) and columns.is_contiguous()
    for b in range(5):
        for k in range(MEMBERS):
            assert torch.equal(columns[k, :, b], y[b * MEMBERS + k])
    assert torch.equal(MemberwiseMLP.from_columns(columns), y)


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("path", ["cpu", "accelerator"])
@pytest.mark.parametrize("lipschitz", [None, 4.0, 100.0], ids=["free", "bounded", "roomy"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_memberwise_f_and_its_gradients_are_each_members(activation, lipschitz, batch, path):
    with forced_path(path):
        check_memberwise_f(activation, lipschitz, batch, path)


def check_memberwise_f(activation: str, lipschitz, batch: int, path: str) -> None:
    singles = residuals(activation, lipschitz)
    F = MemberwiseMLP(singles)
    if lipschitz is not None:
        raw = torch.tensor([s.constraint.lipschitz(s.gamma1, s.gamma2) for s in singles])
        # 4: some members reach the bound and some do not; 100: none does
        assert (raw < lipschitz).all() if lipschitz == 100.0 else (raw > lipschitz).any()
        assert (raw < lipschitz).any()
        # with every member inside its bound, the CPU path uses the parameters as they are
        inside = lipschitz == 100.0 and path == "cpu"
        assert (F.weights()[0] is F.gamma1) == inside
    y = rows(batch)
    out = F(y)
    v = torch.randn_like(out)
    grads = torch.autograd.grad(out, [y, F.gamma1, F.bias, F.gamma2], v)
    for k, single in enumerate(singles):
        y_k = rows_of(y.detach(), MEMBERS)[k].clone().requires_grad_()
        out_k = single(y_k)
        close(rows_of(out.detach(), MEMBERS)[k], out_k.detach())
        expected = torch.autograd.grad(
            out_k, [y_k, single.gamma1, single.bias, single.gamma2], rows_of(v, MEMBERS)[k]
        )
        close(rows_of(grads[0], MEMBERS)[k], expected[0])  # the adjoint's product, vᵀ ∂F/∂y
        for got, want in zip(grads[1:], expected[1:]):
            close(got[k], want)
    with torch.no_grad():  # the solvers' path: cached scaled weights, no graph
        close(F(y), out.detach())


def test_second_derivatives_through_the_vector_jacobian_product_are_each_members():
    singles = residuals("tanh", 4.0)  # relu's second derivative is zero almost everywhere
    F = MemberwiseMLP(singles)
    y = rows(6)
    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(8))
    (vjp,) = torch.autograd.grad(F(y), y, v, create_graph=True)
    grads = torch.autograd.grad(vjp.pow(2).sum(), [F.gamma1, F.gamma2, y])
    for k, single in enumerate(singles):
        y_k = rows_of(y.detach(), MEMBERS)[k].clone().requires_grad_()
        (vjp_k,) = torch.autograd.grad(single(y_k), y_k, rows_of(v, MEMBERS)[k], create_graph=True)
        expected = torch.autograd.grad(vjp_k.pow(2).sum(), [single.gamma1, single.gamma2, y_k])
        close(grads[0][k], expected[0])
        close(grads[1][k], expected[1])
        close(rows_of(grads[2], MEMBERS)[k], expected[2])


@pytest.mark.parametrize("batch", [1, 7])
def test_memberwise_head_and_its_gradients_are_each_members(batch):
    heads = []
    for seed in range(MEMBERS):
        torch.manual_seed(seed)
        heads.append(nn.Linear(DIM, 2))
    head = MemberwiseLinear(heads)
    y = rows(batch)
    out = head(y)
    assert out.shape == (batch * MEMBERS, 2)
    v = torch.randn_like(out)
    grads = torch.autograd.grad(out, [y, head.weight, head.bias], v)
    for k, single in enumerate(heads):
        y_k = rows_of(y.detach(), MEMBERS)[k].clone().requires_grad_()
        out_k = single(y_k)
        close(rows_of(out.detach(), MEMBERS)[k], out_k.detach())
        expected = torch.autograd.grad(
            out_k, [y_k, single.weight, single.bias], rows_of(v, MEMBERS)[k]
        )
        close(rows_of(grads[0], MEMBERS)[k], expected[0])
        close(grads[1][k], expected[1])
        close(grads[2][k], expected[2])


def test_a_member_that_leaves_its_bound_is_rescaled_at_once():
    F = MemberwiseMLP(residuals("relu", 100.0))
    assert F.weights()[0] is F.gamma1  # every member inside: the parameters as they are
    with torch.no_grad():
        F.gamma1[1].mul_(1e3)  # an optimiser's in-place step: a new weight version
    gamma1, gamma2 = F.weights()
    assert gamma1 is not F.gamma1
    assert torch.equal(gamma1[0], F.gamma1[0]) and torch.equal(gamma1[2], F.gamma1[2])
    lip = F.step * torch.linalg.matrix_norm(gamma1, 2) * torch.linalg.matrix_norm(gamma2, 2)
    assert lip[1] <= 100.0 * (1 + 1e-9) and F.lipschitz()[1] > 100.0
