"""TF32 inside solves: off for a block's forward solve and its adjoint solve, the user's elsewhere.

cuBLAS matmuls and cuDNN convolutions that round float32 to TF32 leave a residual
floor near 1e-3, so on the accelerator path :class:`~irnet._scope.SolveScope`
switches TF32 off while F is evaluated in a block's forward and during its adjoint
solve, and puts the user's settings back afterwards, also on exceptions. The flags
can be set on a CPU build, so these tests watch them from inside F with the
accelerator path forced (:func:`irnet.device_path.forced_path`); that F really
reaches its tolerance with TF32 on globally is ``tests/core/test_gpu.py``'s to show.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from helpers.problems import mlp
from irnet import ImplicitResidualBlock
from irnet._scope import _NEW_API, FullFloat32
from irnet.device_path import forced_path
from irnet.linear import GMRES, Direct, Neumann
from irnet.solvers import Anderson, FixedPoint

pytestmark = pytest.mark.usefixtures("single_thread")

ON, OFF = (True, True), (False, False)
# (backend, op) pairs of torch ≥ 2.9's fp32_precision settings, parents first.
PAIRS = [("generic", "all"), ("cuda", "all"), ("mkldnn", "all")] + [
    (b, o) for b in ("cuda", "mkldnn") for o in ("matmul", "conv", "rnn")
]


def flags() -> tuple[bool, bool]:
    """The legacy switches a user sets: (matmul TF32, cuDNN TF32)."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _read(getter):
    try:
        return getter()
    except RuntimeError:
        return "raises"  # torch's legacy getters raise when the two APIs were mixed


def snapshot() -> dict:
    """Every TF32-related setting, as torch reports it (a raising getter as ``"raises"``)."""
    state = {
        "matmul": _read(torch.get_float32_matmul_precision),
        "cudnn": _read(lambda: torch.backends.cudnn.allow_tf32),
        "cublas": _read(lambda: torch.backends.cuda.matmul.allow_tf32),
    }
    if _NEW_API:
        state.update({p: torch._C._get_fp32_precision_getter(*p) for p in PAIRS})
    return state


def put_back(state: dict) -> None:
    torch.set_float32_matmul_precision(state["matmul"])
    torch.backends.cudnn.allow_tf32 = state["cudnn"]
    for pair in PAIRS if _NEW_API else []:
        if torch._C._get_fp32_precision_getter(*pair) != state[pair]:
            torch._C._set_fp32_precision_setter(*pair, state[pair])


@pytest.fixture(autouse=True)
def settings_kept():
    """Each test may change the global settings; they are put back, and checked, afterwards."""
    before = snapshot()
    yield
    put_back(before)
    assert snapshot() == before


@pytest.fixture
def tf32_on():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class Watched(nn.Module):
    """F that records ``flags()`` at each call and each time a gradient flows back through it.

    A hook on the output of an evaluation with a graph fires in every vector–Jacobian
    product of the adjoint solve and once more in the ordinary backprop after it.
    """

    def __init__(self, F: nn.Module, fail_at_call: int = 0, fail_at_grad: int = 0) -> None:
        super().__init__()
        self.F = F
        self.calls: list = []
        self.grads: list = []
        self.fail_at_call, self.fail_at_grad = fail_at_call, fail_at_grad

    def forward(self, y):
        self.calls.append(flags())
        if len(self.calls) == self.fail_at_call:
            raise RuntimeError("F fails")
        out = self.F(y)
        if out.requires_grad:
            out.register_hook(self._on_grad)
        return out

    def _on_grad(self, grad):
        self.grads.append(flags())
        if len(self.grads) == self.fail_at_grad:
            raise RuntimeError("backward fails")


def watched_block(linear, **fail) -> tuple[ImplicitResidualBlock, Watched]:
    F = Watched(mlp(n=4, width=16, lipschitz=0.8), **fail)
    return ImplicitResidualBlock(F, 0.5, FixedPoint(atol=1e-10, max_iter=100), linear), F


@pytest.mark.parametrize(
    "linear", [Neumann(rtol=1e-10), GMRES(rtol=1e-10), Direct()], ids=["neumann", "gmres", "direct"]
)
def test_tf32_off_inside_forward_and_adjoint_solves_user_setting_elsewhere(tf32_on, linear):
    block, F = watched_block(linear)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    with forced_path("accelerator"):
        y = block(x)
        assert flags() == ON  # restored after the forward
        assert len(F.calls) >= 4 and set(F.calls) == {OFF}  # F(x), the iterations, F(y*)
        y.square().sum().backward()
    assert flags() == ON
    adjoint, ordinary = F.grads[:-2], F.grads[-2:]
    assert block.backward_stats.converged.all()
    assert len(adjoint) >= 1 and set(adjoint) == {OFF}  # the products of the adjoint solve
    assert ordinary == [ON, ON]  # the backprop through F(y*) and F(x) to x and the parameters


def test_the_cpu_path_reads_and_switches_nothing(tf32_on):
    block, F = watched_block(Neumann(rtol=1e-10))
    with forced_path("cpu"):
        block(torch.randn(8, 4, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert set(F.calls) == {ON} and set(F.grads) == {ON}


def test_settings_restored_when_the_forward_raises(tf32_on):
    block, F = watched_block(Neumann(), fail_at_call=3)
    with forced_path("accelerator"), pytest.raises(RuntimeError, match="F fails"):
        block(torch.randn(8, 4, dtype=torch.float64))
    assert F.calls[-1] == OFF and flags() == ON


def test_settings_restored_when_the_adjoint_solve_raises(tf32_on):
    block, F = watched_block(Neumann(rtol=1e-10), fail_at_grad=2)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    with forced_path("accelerator"):
        y = block(x)
        with pytest.raises(RuntimeError, match="backward fails"):
            y.sum().backward()
    assert F.grads == [OFF, OFF] and flags() == ON


def test_under_autocast_and_with_anderson_too(tf32_on):
    F = Watched(mlp(n=4, width=16, lipschitz=0.8, dtype=torch.float32))
    block = ImplicitResidualBlock(F, 0.5, Anderson(atol=1e-5), GMRES(rtol=1e-5))
    x = torch.randn(8, 4, requires_grad=True)
    with forced_path("accelerator"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    y.sum().backward()
    assert set(F.calls) == {OFF} and set(F.grads[:-2]) == {OFF} and flags() == ON


def test_nested_scopes_restore_once():
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = True
    before = snapshot()
    with FullFloat32():
        inside = snapshot()
        with FullFloat32():
            assert snapshot() == inside
        assert snapshot() == inside
    assert inside["matmul"] == "highest" and inside["cudnn"] is False
    assert snapshot() == before


# -- every way of setting TF32, legacy and new, is put back exactly --------------------------

LEGACY = [
    *(lambda v=v: torch.set_float32_matmul_precision(v) for v in ("highest", "high", "medium")),
    *(lambda v=v: setattr(torch.backends.cuda.matmul, "allow_tf32", v) for v in (True, False)),
    *(lambda v=v: setattr(torch.backends.cudnn, "allow_tf32", v) for v in (True, False)),
]


def _new_api_actions() -> list:
    if not _NEW_API:
        return []
    b = torch.backends
    holders = [b, b.cuda.matmul, b.cudnn, b.cudnn.conv, b.cudnn.rnn]
    return [
        lambda h=h, v=v: setattr(h, "fp32_precision", v) for h in holders for v in ("ieee", "tf32")
    ]


def _inside_is_full_precision(outside: dict) -> None:
    if _NEW_API:
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    if outside["matmul"] != "raises":
        assert torch.get_float32_matmul_precision() == "highest"
    if outside["cudnn"] != "raises":
        assert torch.backends.cudnn.allow_tf32 is False


def test_every_mix_of_settings_is_switched_off_and_put_back():
    """Random sequences of legacy and new-API settings (torch ≥ 2.9 raises on some mixes)."""
    actions = LEGACY + _new_api_actions()
    draw = random.Random(0)
    tried = set()
    for _ in range(300):
        for action in draw.choices(actions, k=draw.randint(1, 4)):
            action()
        outside = snapshot()
        tried.add(tuple(outside.values()))
        with FullFloat32():
            if outside["matmul"] != "highest" or outside["cudnn"] is not False:
                _inside_is_full_precision(outside)
        assert snapshot() == outside
    assert len(tried) >= (20 if _NEW_API else 6)


@pytest.mark.skipif(not _NEW_API, reason="torch < 2.9 has no fp32_precision settings")
def test_new_api_only_user_is_switched_off_and_put_back():
    torch.backends.fp32_precision = "tf32"  # torch's legacy matmul getter now raises
    before = snapshot()
    assert before["matmul"] == "raises"
    F = mlp(n=4, width=16, lipschitz=0.8)
    seen = []
    F.register_forward_pre_hook(
        lambda m, a: seen.append(
            (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        )
    )
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=1e-10), Neumann(rtol=1e-10))
    with forced_path("accelerator"):
        block(torch.randn(8, 4, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert set(seen) == {("ieee", "ieee")} and snapshot() == before
