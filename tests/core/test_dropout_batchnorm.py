"""Dropout and BatchNorm inside F: one held dropout mask per forward, BatchNorm in training refused.

The references fix the mask by hand: ``F_m(y) = W₂ (σ(W₁y + b₁) ⊙ m) + b₂`` with the
mask ``m`` redrawn from the same seed, solved by a dense Newton iteration in
float64 and differentiated by the dense implicit-function-theorem formulas of
``problems.ift_gradients``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from helpers.problems import DTYPE, ift_gradients, mlp, residual_norm
from irnet import ImplicitResidualBlock
from irnet.linear import GMRES, Direct, Neumann
from irnet.solvers import Anderson, FixedPoint, GradientDescent, NonlinearCG

pytestmark = pytest.mark.usefixtures("single_thread")

P = 0.3
N, WIDTH, BATCH = 3, 8, 5
TOL = 1e-12

COMBOS = {
    "fixed_point-neumann": (
        lambda: FixedPoint(atol=TOL, max_iter=500),
        lambda: Neumann(rtol=TOL, max_iter=500),
    ),
    "anderson-gmres": (
        lambda: Anderson(atol=TOL, max_iter=500),
        lambda: GMRES(rtol=TOL, max_iter=100),
    ),
    "gradient_descent-direct": (
        lambda: GradientDescent(atol=TOL, max_iter=500),
        lambda: Direct(rtol=TOL),
    ),
    "cg-neumann": (
        lambda: NonlinearCG(atol=TOL, max_iter=500),
        lambda: Neumann(rtol=TOL, max_iter=500),
    ),
}


class MaskedMLP(nn.Module):
    """``second(σ(first(y)) ⊙ mask)``: the F of a dropout MLP with its mask fixed by hand."""

    def __init__(self, first: nn.Linear, second: nn.Linear, mask: Tensor) -> None:
        super().__init__()
        self.first, self.second, self.mask = first, second, mask

    def forward(self, y: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(y)) * self.mask)


def dropout_mlp(p: float = P) -> nn.Sequential:
    """``Linear → Tanh → Dropout(p) → Linear`` with ``‖W₂‖‖W₁‖ = 0.6``.

    A contraction even after dropout's scaling by 1/(1−p).
    """
    base = mlp(n=N, width=WIDTH, lipschitz=0.6)
    return nn.Sequential(base[0], nn.Tanh(), nn.Dropout(p), base[2])


def mask_after_seed(seed: int, p: float = P, batch: int = BATCH) -> Tensor:
    """The dropout mask (scaled by 1/(1−p)) drawn first after ``manual_seed(seed)``."""
    torch.manual_seed(seed)
    return nn.functional.dropout(torch.ones(batch, WIDTH, dtype=DTYPE), p, training=True)


def newton_solution(F: nn.Module, x: Tensor, theta: float) -> Tensor:
    """Solve ``y = x + (1−θ)F(x) + θF(y)`` per sample by Newton's method with dense Jacobians."""
    with torch.no_grad():
        c = x + (1 - theta) * F(x)
    y = c.clone()
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    for _ in range(30):
        with torch.no_grad():
            r = y - c - theta * F(y)
        if r.abs().max() < 1e-15:
            break
        steps = []
        for i in range(x.shape[0]):
            J = _row_jacobian(F, y, i)
            steps.append(torch.linalg.solve(eye - theta * J, r[i]))
        y = y - torch.stack(steps)
    return y


def _row_jacobian(F: nn.Module, y: Tensor, i: int) -> Tensor:
    """∂F(y)_i/∂y_i for a batch-dependent mask: evaluate the whole batch, vary only row i."""

    def f(v: Tensor) -> Tensor:
        batch = y.detach().clone()
        batch[i] = v
        return F(batch)[i]

    return torch.autograd.functional.jacobian(f, y[i].detach())


def masked_ift_gradients(F: MaskedMLP, x: Tensor, y: Tensor, theta: float, w: Tensor):
    """Dense IFT gradients of ``Σ w·y`` for a per-row mask (``ift_gradients`` row by row)."""
    gx, gp = [], None
    for i in range(x.shape[0]):
        Fi = MaskedMLP(F.first, F.second, F.mask[i : i + 1])
        gxi, gpi = ift_gradients(Fi, x[i : i + 1], y[i : i + 1], theta, w[i : i + 1])
        gx.append(gxi)
        gp = gpi if gp is None else [a + b for a, b in zip(gp, gpi)]
    return torch.cat(gx), gp


def recorded_masks(dropout: nn.Module) -> tuple[list[Tensor], object]:
    """Record which units every call of ``dropout`` kept (its inputs, tanh values, are ≠ 0)."""
    masks: list[Tensor] = []

    def hook(module, args, output):
        assert (args[0] != 0).all()
        masks.append(output.detach() != 0)

    return masks, dropout.register_forward_hook(hook)


def assert_held_mask_matches_dense_reference(
    F: nn.Sequential, block: ImplicitResidualBlock, theta: float, min_calls: int
) -> None:
    """One forward + backward of ``block`` (F = :func:`dropout_mlp`): every call of F (at least
    ``min_calls``) saw the one mask drawn after ``manual_seed(7)``, and the answer and gradients
    equal the dense float64 references for that mask."""
    x = torch.randn(BATCH, N, dtype=DTYPE, requires_grad=True)
    w = torch.randn(BATCH, N, dtype=DTYPE)
    masks, handle = recorded_masks(F[2])
    torch.manual_seed(7)
    y = block(x)
    grads = torch.autograd.grad((y * w).sum(), [x, *F.parameters()])
    handle.remove()

    mask = mask_after_seed(7)
    assert len(masks) >= min_calls and all(
        torch.equal(m, mask != 0) for m in masks
    )  # every call, one mask
    assert block.forward_stats.converged.all()
    Fm = MaskedMLP(F[0], F[3], mask)
    want_y = newton_solution(Fm, x.detach(), theta)
    torch.testing.assert_close(y.detach(), want_y, rtol=1e-10, atol=1e-10)
    want_x, want_p = masked_ift_gradients(Fm, x.detach(), want_y, theta, w)
    torch.testing.assert_close(grads[0], want_x, rtol=1e-8, atol=1e-10)
    for got, want in zip(grads[1:], want_p):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_held_mask_matches_dense_reference(combo, theta):
    solver, linear = COMBOS[combo]
    F = dropout_mlp()
    assert_held_mask_matches_dense_reference(
        F, ImplicitResidualBlock(F, theta, solver(), linear()), theta, min_calls=3
    )


def test_two_forwards_before_one_backward_keep_their_own_masks():
    """Like R_rnd's perturbed passes: each forward's adjoint uses that forward's mask."""
    theta = 0.5
    F = dropout_mlp()
    block = ImplicitResidualBlock(
        F, theta, FixedPoint(atol=TOL, max_iter=500), GMRES(rtol=TOL, max_iter=100)
    )
    x1 = torch.randn(BATCH, N, dtype=DTYPE, requires_grad=True)
    x2 = torch.randn(BATCH, N, dtype=DTYPE, requires_grad=True)
    w1, w2 = torch.randn(BATCH, N, dtype=DTYPE), torch.randn(BATCH, N, dtype=DTYPE)
    torch.manual_seed(1)
    y1 = block(x1)
    torch.manual_seed(2)
    y2 = block(x2)
    grads = torch.autograd.grad((y1 * w1).sum() + (y2 * w2).sum(), [x1, x2, *F.parameters()])

    m1, m2 = mask_after_seed(1), mask_after_seed(2)
    assert not torch.equal(m1, m2)
    F1, F2 = MaskedMLP(F[0], F[3], m1), MaskedMLP(F[0], F[3], m2)
    want1, want2 = newton_solution(F1, x1.detach(), theta), newton_solution(F2, x2.detach(), theta)
    torch.testing.assert_close(y1.detach(), want1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y2.detach(), want2, rtol=1e-10, atol=1e-10)
    gx1, gp1 = masked_ift_gradients(F1, x1.detach(), want1, theta, w1)
    gx2, gp2 = masked_ift_gradients(F2, x2.detach(), want2, theta, w2)
    torch.testing.assert_close(grads[0], gx1, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grads[1], gx2, rtol=1e-8, atol=1e-10)
    for got, a, b in zip(grads[2:], gp1, gp2):
        torch.testing.assert_close(got, a + b, rtol=1e-8, atol=1e-10)


def test_unrolled_backward_holds_the_mask():
    theta = 0.5
    F = dropout_mlp()
    block = ImplicitResidualBlock(F, theta, FixedPoint(atol=TOL, max_iter=500), backward="unrolled")
    x = torch.randn(BATCH, N, dtype=DTYPE)
    torch.manual_seed(3)
    y = block(x)
    want = newton_solution(MaskedMLP(F[0], F[3], mask_after_seed(3)), x, theta)
    torch.testing.assert_close(y.detach(), want, rtol=1e-10, atol=1e-10)


def test_generator_advances_as_after_one_call_of_F():
    """The solve's many evaluations draw like one: the random stream after a forward is fixed."""
    F = dropout_mlp()
    x = torch.randn(BATCH, N, dtype=DTYPE)
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=TOL, max_iter=500))
    torch.manual_seed(4)
    with torch.no_grad():
        F(x)
    want = torch.rand(3)
    torch.manual_seed(4)
    with torch.no_grad():
        block(x)
    assert block.forward_stats.iterations.min() > 2
    torch.testing.assert_close(torch.rand(3), want, rtol=0, atol=0)


def test_eval_mode_dropout_is_identity():
    F = dropout_mlp()
    x = torch.randn(BATCH, N, dtype=DTYPE)
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=TOL, max_iter=500)).eval()
    plain = nn.Sequential(F[0], nn.Tanh(), F[3])
    with torch.no_grad():
        y = block(x)
    torch.testing.assert_close(y, newton_solution(plain, x, 0.5), rtol=1e-10, atol=1e-10)


def test_channel_dropout_in_conv_F_is_held():
    """Dropout2d (one draw per channel) in a convolutional F: every call sees the same mask."""
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)
    with torch.no_grad():
        conv2.weight.mul_(0.3)
    F = nn.Sequential(conv1, nn.Tanh(), nn.Dropout2d(0.5), conv2).to(DTYPE)
    masks, handle = recorded_masks(F[2])
    block = ImplicitResidualBlock(F, 0.5, Anderson(atol=1e-10, max_iter=200), GMRES(rtol=1e-10))
    x = torch.randn(3, 2, 5, 5, dtype=DTYPE, requires_grad=True)
    y = block(x)
    y.square().sum().backward()
    handle.remove()
    assert len(masks) >= 3 and all(torch.equal(m, masks[0]) for m in masks)
    assert block.forward_stats.converged.all() and block.backward_stats.converged.all()
    keep = masks[0][:, :, :1, :1]  # one draw per (sample, channel)
    assert torch.equal(masks[0], keep.expand_as(masks[0])) and not keep.all() and keep.any()
    # With the recorded mask written into F by hand, the block's output is a fixed point.
    masked = lambda y: conv2(torch.tanh(conv1(y)) * (2.0 * keep))  # noqa: E731
    assert (residual_norm(masked, x.detach(), y.detach(), 0.5) <= 1e-10).all()


# -- BatchNorm and per-sample norms ----------------------------------------------------------


@pytest.mark.parametrize(
    "norm",
    [nn.BatchNorm1d(6), nn.SyncBatchNorm(6), nn.LazyBatchNorm1d()],
    ids=["batchnorm1d", "syncbatchnorm", "lazy"],
)
def test_batchnorm_in_training_mode_is_refused_at_construction(norm):
    F = nn.Sequential(nn.Linear(3, 6), norm, nn.Tanh(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"F\.1 is a \w*BatchNorm\w* .*batch statistics"):
        ImplicitResidualBlock(F)


def test_batchnorm_without_running_stats_is_refused_in_eval_mode():
    norm = nn.BatchNorm1d(6, track_running_stats=False)
    F = nn.Sequential(nn.Linear(3, 6), norm, nn.Linear(6, 3))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        ImplicitResidualBlock(F.eval())


def test_batchnorm_with_running_stats_in_eval_mode_is_a_fixed_affine_map():
    """Accepted in eval mode, solved like F with the affine map written out; refused in training."""
    lin1, lin2 = mlp(n=N, width=WIDTH, lipschitz=0.5)[0], mlp(n=N, width=WIDTH, lipschitz=0.5)[2]
    bn = nn.BatchNorm1d(WIDTH).to(DTYPE)
    with torch.no_grad():
        bn.running_mean.copy_(0.1 * torch.randn(WIDTH, dtype=DTYPE))
        bn.running_var.copy_(1 + torch.rand(WIDTH, dtype=DTYPE))
        bn.weight.copy_(0.5 + torch.rand(WIDTH, dtype=DTYPE))
    F = nn.Sequential(lin1, bn, nn.Tanh(), lin2).eval()
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=TOL, max_iter=500))
    x = torch.randn(BATCH, N, dtype=DTYPE)

    def affine(y: Tensor) -> Tensor:
        z = (lin1(y) - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        return lin2(torch.tanh(z))

    with torch.no_grad():
        y = block(x)
        assert (residual_norm(affine, x, y, 0.5) <= 1e-11).all()
    block.train()
    with pytest.raises(ValueError, match=r"F\.1 is a BatchNorm1d"):
        block(x)


@pytest.mark.parametrize("norm", ["group", "layer", "instance"])
def test_per_sample_norms_are_accepted_and_samples_stay_independent(norm):
    make = {
        "group": lambda: nn.GroupNorm(2, 4),
        "layer": lambda: nn.LayerNorm([4, 5, 5]),
        "instance": lambda: nn.InstanceNorm2d(4, affine=True),
    }[norm]
    conv1, conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)
    with torch.no_grad():
        conv2.weight.mul_(0.2)
    F = nn.Sequential(conv1, make(), nn.Tanh(), conv2).to(DTYPE)
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=1e-11, max_iter=300))
    x = torch.randn(3, 2, 5, 5, dtype=DTYPE)
    with torch.no_grad():
        y = block(x)
        alone = block(x[1:2])
    assert block.forward_stats.converged.all()
    torch.testing.assert_close(y[1:2], alone, rtol=1e-9, atol=1e-10)


def test_hooks_are_removed_and_a_failed_backward_leaves_nothing_behind():
    """A backward raising in the adjoint node skips its post hook; the next forward cleans up."""
    F = dropout_mlp()
    x = torch.randn(BATCH, N, dtype=DTYPE, requires_grad=True)
    failing = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=TOL, max_iter=500), Direct(max_size=2))
    with pytest.raises(ValueError, match="max_size"):
        failing(x).sum().backward()
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=TOL, max_iter=500), Direct())
    torch.manual_seed(5)
    y = block(x)
    y.sum().backward()
    assert not F._forward_pre_hooks and not F._forward_hooks
    assert all(type(p) is nn.Parameter for p in F.parameters())
    want = newton_solution(MaskedMLP(F[0], F[3], mask_after_seed(5)), x.detach(), 0.5)
    torch.testing.assert_close(y.detach(), want, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # F called directly again: an ordinary dropout layer (a fresh mask)
        torch.manual_seed(6)
        F(x)
        assert not F._forward_pre_hooks
