"""Fallback: a batch of contracting and non-contracting samples, hand-offs checked against each
solver run alone, divergence restarts, statistics, gradients, the monitoring tags and a YAML fit.

The table-driven tests of test_solvers.py and test_layer.py run a Fallback chain
too (``"fallback"`` in ``problems.SOLVERS``).
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from helpers.callbacks import TinyModule, fit, loader, sine_data
from helpers.expansive import expansive_tanh, spectral_radius
from helpers.problems import DTYPE, ift_gradients, mlp, residual_norm, sample_jacobian
from helpers.training import QUIET, scalars
from irnet import ImplicitResidualBlock
from irnet.callbacks import SolverStatistics
from irnet.cli import main
from irnet.linear import GMRES, Direct
from irnet.nets import ODENet
from irnet.solvers import (
    Anderson,
    Broyden,
    Fallback,
    FixedPoint,
    FixedPointProblem,
    GradientDescent,
    NonlinearSolver,
)
from irnet.stats import SolverStats

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-10
# Per-sample gains g of F(y) = g·G(y): 0.2 and 0.3 contract (FixedPoint solves them), 0.6 is
# slow (Anderson takes over), 0.9–4.0 need Broyden (Anderson's 15 steps fall short); the
# map expands (ρ(∂g(y)/∂y) > 1) at the answers for the gains ≥ 1.5.
GAINS = [0.2, 0.3, 0.6, 0.9, 1.5, 2.0, 3.0, 4.0]
EXPECTED_METHOD = [0, 0, 1, 2, 2, 2, 2, 2]


class Gain(nn.Module):
    """``F(y) = (g · G(y'), 0)`` for ``y = (y', g)``: the last coordinate carries a per-sample gain.

    At θ = 1 the gain stays ``g = c_n`` during the solve (its row of F is 0), so one
    batch holds contracting and expanding samples of one F.
    """

    def __init__(self, G: nn.Module) -> None:
        super().__init__()
        self.G = G

    def forward(self, y: Tensor) -> Tensor:
        g = y[:, -1:]
        return torch.cat([g * self.G(y[:, :-1]), torch.zeros_like(g)], 1)


def gain_problem(gains=GAINS, seed: int = 0) -> tuple[Gain, Tensor]:
    F = Gain(expansive_tanh(n=6, radius=1.0, seed=0))
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat(
        [
            torch.randn(len(gains), 6, dtype=DTYPE, generator=gen),
            torch.tensor(gains, dtype=DTYPE)[:, None],
        ],
        1,
    )
    return F, x


def chain() -> list[NonlinearSolver]:
    return [
        FixedPoint(atol=ATOL, max_iter=30),
        Anderson(atol=ATOL, max_iter=15),
        Broyden(atol=ATOL, max_iter=100),
    ]


def test_mixed_batch_each_sample_finished_by_the_right_solver():
    F, x = gain_problem()
    problem = FixedPointProblem(F, x, 1.0)
    solvers = chain()
    with torch.no_grad():
        y, stats = Fallback(solvers).solve(problem, x)
    assert stats.converged.all() and not stats.diverged.any()
    assert (residual_norm(F, x, y, 1.0) <= ATOL).all()  # checked from scratch, θ = 1: c = x
    assert stats.method.tolist() == EXPECTED_METHOD
    # Non-contracting: the map's Jacobian at the answer has spectral radius above 1.
    for i, gain in enumerate(GAINS):
        radius = spectral_radius(sample_jacobian(F, y[i]))
        assert (radius > 1.05) == (gain >= 1.5), (gain, radius)

    # Hand-off by hand: each solver alone on the batch, the next one from the previous
    # one's answer (no sample diverges here); sample i is solved by method m iff the
    # earlier solvers left it above atol and solver m brings it within.
    start = x
    solved = torch.zeros(len(x), dtype=torch.bool)
    total = torch.zeros(len(x), dtype=torch.long)
    for m, solver in enumerate(solvers):
        with torch.no_grad():
            alone_y, alone = solver.solve(problem, start)
        assert not alone.diverged.any()
        here = ~solved & alone.converged
        assert (stats.method[here] == m).all()
        total += torch.where(solved, 0, alone.iterations)
        # Each sample finished here equals what this solver gives alone from that start,
        # on that sample alone (a batch of one).
        for i in here.nonzero().flatten().tolist():
            single = FixedPointProblem(F, x[i : i + 1], 1.0)
            with torch.no_grad():
                yi, si = solver.solve(single, start[i : i + 1])
            assert si.iterations.item() == alone.iterations[i]
            # Equal up to rounding (a 1-row and an 8-row product may sum in another order).
            torch.testing.assert_close(y[i], yi[0], rtol=1e-13, atol=1e-13)
        solved |= here
        start = alone_y
    assert solved.all()
    assert torch.equal(stats.iterations, total)  # summed over the solvers each sample went through


class Recording(Broyden):
    """A Broyden that keeps the starts it is handed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._starts: list[Tensor] = []

    def solve(self, problem, y0):
        self._starts.append(y0.clone())
        return super().solve(problem, y0)


class ElementwiseGain(nn.Module):
    """``F(y) = (g · y', 0)`` for ``y = (y', g)``; at θ = 1 the root is ``y' = c'/(1 − g)``."""

    def forward(self, y: Tensor) -> Tensor:
        g = y[:, -1:]
        return torch.cat([g * y[:, :-1], torch.zeros_like(g)], 1)


def test_stalled_samples_continue_from_their_best_iterate_diverged_from_the_start():
    # g = −0.5: FixedPoint solves it. g = 0.99: FixedPoint is slow and stalls (best
    # iterate ≠ start). g = 30: its iterates grow 30× a step and overflow → diverged.
    x = torch.tensor([[1.0, -2.0, -0.5], [0.5, 1.5, 0.99], [2.0, 1.0, 30.0]], dtype=DTYPE)
    problem = FixedPointProblem(ElementwiseGain(), x, 1.0)
    first, second = FixedPoint(atol=ATOL, max_iter=300), Recording(atol=ATOL, max_iter=50)
    with torch.no_grad():
        first_y, first_stats = first.solve(problem, x)
        y, stats = Fallback([first, second]).solve(problem, x)
    assert first_stats.converged.tolist() == [True, False, False]
    assert first_stats.diverged.tolist() == [False, False, True]
    (start,) = second._starts
    assert torch.equal(start[:2], first_y[:2])  # solved and stalled: where FixedPoint left them
    assert not torch.equal(start[1], x[1])
    assert torch.equal(start[2], x[2])  # diverged: back to the solve's start
    g = x[:, -1:]
    exact = torch.cat([x[:, :-1] / (1 - g), g], 1)
    torch.testing.assert_close(y, exact, rtol=0, atol=1e-9)
    assert stats.converged.all() and not stats.diverged.any()
    assert stats.method.tolist() == [0, 1, 1]
    assert stats.iterations[0] == first_stats.iterations[0]
    assert (stats.iterations[1:] > first_stats.iterations[1:]).all()


def test_a_nan_residual_of_an_earlier_link_gives_way_to_a_later_links_answer():
    # A fixed-count FixedPoint keeps no best iterate: with g = 1e10 its iterates overflow to
    # inf and the answer's residual is inf − inf = NaN (g = −1e12 alternates in sign: inf).
    # NaN fails every comparison, so "the later link's residual is lower" alone would keep
    # the NaN answer; Broyden, restarted from x, solves both.
    x = torch.tensor([[1.0, -2.0, -0.5], [2.0, 1.0, 1e10], [0.5, 1.5, -1e12]], dtype=DTYPE)
    F = ElementwiseGain()
    problem = FixedPointProblem(F, x, 1.0)
    first = FixedPoint(atol=ATOL, max_iter=40, fixed_count=True)
    second = Broyden(atol=ATOL, max_iter=50)
    with torch.no_grad():
        _, first_stats = first.solve(problem, x)
        y, stats = Fallback([first, second]).solve(problem, x)
    assert torch.isnan(first_stats.residual[1]) and torch.isinf(first_stats.residual[2])
    assert first_stats.diverged.tolist() == [False, True, True]
    assert torch.isfinite(y).all() and torch.isfinite(stats.residual).all()
    assert (residual_norm(F, x, y, 1.0) <= ATOL).all()  # from scratch, θ = 1: c = x
    assert stats.converged.all() and not stats.diverged.any()
    assert stats.method.tolist() == [0, 1, 1]
    g = x[:, -1:]
    torch.testing.assert_close(y, torch.cat([x[:, :-1] / (1 - g), g], 1), rtol=1e-9, atol=0)


def test_unsolved_sample_keeps_the_best_iterate_and_is_flagged():
    # g = 3 expands: neither 5 fixed-point steps nor one Broyden step (from H = I, a
    # fixed-point step) solves it. The answer is the lower-residual iterate of the two
    # solvers, the last solver is reported, the iterations add up.
    F = ElementwiseGain()
    x = torch.tensor([[1.0, -2.0, -0.5], [0.5, 1.5, 3.0]], dtype=DTYPE)
    problem = FixedPointProblem(F, x, 1.0)
    solvers = [FixedPoint(atol=ATOL, max_iter=5), Broyden(atol=ATOL, max_iter=1)]
    with torch.no_grad():
        y, stats = Fallback(solvers).solve(problem, x)
        y1, s1 = solvers[0].solve(problem, x)
        y2, s2 = solvers[1].solve(problem, y1)
    assert not stats.converged.any() and not stats.diverged.any()
    assert stats.method.tolist() == [1, 1]
    assert stats.iterations.tolist() == [6, 6]
    better = (s2.residual < s1.residual)[:, None]
    torch.testing.assert_close(y, torch.where(better, y2, y1), rtol=0, atol=0)
    torch.testing.assert_close(stats.residual, residual_norm(F, x, y, 1.0), rtol=0, atol=1e-14)


def test_per_sample_independence():
    F, x = gain_problem()
    block = ImplicitResidualBlock(F, 1.0, Fallback(chain()))
    with torch.no_grad():
        both = block(x)
        stats = block.forward_stats
        for i in range(len(x)):
            alone = block(x[i : i + 1])
            assert block.forward_stats.method.item() == stats.method[i]
            assert block.forward_stats.iterations.item() == stats.iterations[i]
            torch.testing.assert_close(alone[0], both[i], rtol=1e-13, atol=1e-13)


def test_a_single_solver_chain_is_that_solver():
    F, x = gain_problem()
    problem = FixedPointProblem(F, x, 1.0)
    with torch.no_grad():
        want, want_stats = Broyden(atol=ATOL, max_iter=100).solve(problem, x)
        got, stats = Fallback([Broyden(atol=ATOL, max_iter=100)]).solve(problem, x)
    assert torch.equal(got, want)
    assert torch.equal(stats.iterations, want_stats.iterations)
    assert stats.method.tolist() == [0] * len(x)
    assert want_stats.method is None  # single solvers leave it unset


def test_inference_mode_with_a_gradient_solver_in_the_chain():
    # GradientDescent leaves inference mode itself; the chain's answer is the same bits.
    F = mlp(n=3, width=6, lipschitz=0.8)
    x = torch.randn(3, 3, dtype=DTYPE)
    solvers = [FixedPoint(atol=ATOL, max_iter=3), GradientDescent(atol=ATOL, max_iter=200)]
    block = ImplicitResidualBlock(F, 1.0, Fallback(solvers))
    with torch.no_grad():
        want = block(x)
    want_stats = block.forward_stats
    with torch.inference_mode():
        got = block(x.clone())
    assert want_stats.converged.all() and want_stats.method.tolist() == [1, 1, 1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(block.forward_stats.iterations, want_stats.iterations)


@pytest.mark.parametrize("linear", ["gmres", "direct"])
def test_gradients_match_the_dense_reference(linear):
    F, x = gain_problem()
    x.requires_grad_()
    w = torch.randn(x.shape, dtype=DTYPE)
    tight = [
        FixedPoint(atol=1e-12, max_iter=30),
        Anderson(atol=1e-12, max_iter=15),
        Broyden(atol=1e-12, max_iter=200),
    ]
    adjoint = GMRES(rtol=1e-12, max_iter=50) if linear == "gmres" else Direct(rtol=1e-12)
    block = ImplicitResidualBlock(F, 1.0, Fallback(tight), adjoint)
    y = block(x)
    assert block.forward_stats.converged.all()
    assert set(block.forward_stats.method.tolist()) == {0, 1, 2}
    grads = torch.autograd.grad((y * w).sum(), [x, *F.parameters()])
    assert block.backward_stats.converged.all()
    ref_x, ref_params = ift_gradients(F, x.detach(), y.detach(), 1.0, w)
    torch.testing.assert_close(grads[0], ref_x, rtol=1e-8, atol=1e-9)
    for got, want in zip(grads[1:], ref_params):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_held_dropout_mask_through_the_hand_off():
    # Every solver of the chain runs on the whole batch under the block's one dropout
    # mask; answer and gradients match test_dropout_batchnorm's dense masked reference.
    from test_dropout_batchnorm import assert_held_mask_matches_dense_reference, dropout_mlp

    F = dropout_mlp()
    solvers = [FixedPoint(atol=1e-12, max_iter=5), Broyden(atol=1e-12, max_iter=200)]
    block = ImplicitResidualBlock(F, 1.0, Fallback(solvers), Direct(rtol=1e-12))
    assert_held_mask_matches_dense_reference(F, block, 1.0, min_calls=11)
    assert (block.forward_stats.method == 1).all()  # all handed on to Broyden


# -- arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solvers",
    [
        [],
        (),
        FixedPoint(),
        None,
        "FixedPoint",
        [FixedPoint(), "Anderson"],
        [Fallback([FixedPoint()])],
        [FixedPoint(atol=1e-5), Broyden(atol=1e-6)],
    ],
)
def test_rejects_bad_solvers(solvers):
    with pytest.raises(ValueError, match=r"\bsolvers\b"):
        Fallback(solvers)


def test_tolerance_budget_names_and_repr():
    solver = Fallback(
        [
            FixedPoint(atol=1e-6, max_iter=20),
            Anderson(atol=1e-6, max_iter=30),
            Anderson(atol=1e-6, history=3),
        ]
    )
    assert solver.atol == 1e-6 and solver.max_iter == 20 + 30 + 50
    assert solver.method_names == ["FixedPoint", "Anderson_1", "Anderson_2"]
    want = "Fallback(solvers=[FixedPoint(atol=1e-06, max_iter=20, fixed_count=False), Anderson("
    assert repr(solver).startswith(want)


def test_solver_stats_method_is_optional():
    stats = SolverStats(
        torch.zeros(2, dtype=torch.long),
        torch.zeros(2),
        torch.ones(2, dtype=torch.bool),
        torch.zeros(2, dtype=torch.bool),
    )
    assert stats.method is None
    assert SolverStats.trivial(3, torch.device("cpu"), DTYPE).method is None
    assert set(stats.summary()) == {
        "iterations_mean",
        "iterations_max",
        "residual_mean",
        "residual_max",
        "not_converged",
        "diverged",
    }


# -- monitoring ---------------------------------------------------------------------------------


class MethodCheck(pl.Callback):
    """After SolverStatistics: the logged step fractions against the blocks' own ``method``."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        methods = torch.cat([b.forward_stats.method for b in module.net.blocks])
        want = {
            name: float((methods == i).float().mean())
            for i, name in enumerate(module.net.blocks[0].solver.method_names)
        }
        metrics = trainer.callback_metrics
        got = {name: float(metrics[f"solver/finished_by/{name}_step"]) for name in want}
        self.steps.append(want)
        assert got == pytest.approx(want, abs=1e-7), (got, want)


def test_solver_statistics_logs_the_fraction_each_method_finished(tmp_path):
    torch.manual_seed(0)
    # 6 fixed-point steps solve some samples of this net, not all (6–15 needed).
    solver = Fallback([FixedPoint(atol=1e-6, max_iter=6), Anderson(atol=1e-6, max_iter=50)])
    net = ODENet(
        1,
        1,
        layers=2,
        T=2.0,
        width=16,
        theta=1.0,
        activation="tanh",
        solver=solver,
        linear_solver=GMRES(rtol=1e-6),
    )
    check = MethodCheck()
    fit(
        TinyModule(net),
        [SolverStatistics(), check],
        tmp_path,
        loader(*sine_data(), batch_size=17),
        epochs=2,
    )
    assert len(check.steps) == 6
    fractions = [s["Anderson"] for s in check.steps]
    assert 0 < max(fractions) and min(fractions) < 1, fractions  # both methods finished samples
    logged = scalars(tmp_path / "tb" / "version_0")
    for name in ("FixedPoint", "Anderson"):
        epochs = [v for _, v in logged[f"solver/finished_by/{name}_epoch"]]
        # Batches of 17: the epoch value is the plain mean of its three steps' fractions.
        want = [sum(s[name] for s in check.steps[3 * e : 3 * e + 3]) / 3 for e in range(2)]
        assert epochs == pytest.approx(want, abs=1e-6)
    assert "val_solver/finished_by/Anderson" not in logged  # no validation loader here


FALLBACK_YAML = """\
trainer:
  max_epochs: 2
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  callbacks:
    - class_path: irnet.callbacks.SolverStatistics
      init_args: {per_layer: false, histograms: false}
model:
  class_path: irnet.module.ImplicitNetModule
  init_args:
    net:
      class_path: irnet.nets.ODENet
      init_args:
        in_features: 1
        out_features: 1
        layers: 2
        T: 4.0
        width: 8
        theta: 1.0
        activation: tanh
        solver:
          class_path: irnet.solvers.Fallback
          init_args:
            solvers:
              - class_path: irnet.solvers.FixedPoint
                init_args: {atol: 1.0e-5, max_iter: 2}
              - class_path: irnet.solvers.Anderson
                init_args: {atol: 1.0e-5, max_iter: 20}
              - class_path: irnet.solvers.Broyden
                init_args: {atol: 1.0e-5, max_iter: 50, memory: 10}
        linear_solver:
          class_path: irnet.linear.GMRES
          init_args: {rtol: 1.0e-5}
    loss: l2
    lr: 0.01
data:
  class_path: irnet.datamodules.SineRegression
  init_args:
    num_points: 51
"""


def test_fallback_from_a_yaml_config_fits_and_logs_the_finishing_method(tmp_path, monkeypatch):
    config = tmp_path / "fallback.yaml"
    config.write_text(FALLBACK_YAML)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["irnet"])
    cli = main(args=["fit", "--config", str(config), *QUIET])
    solver = cli.model.net.blocks[0].solver
    assert isinstance(solver, Fallback)
    assert [type(s) for s in solver.solvers] == [FixedPoint, Anderson, Broyden]
    assert solver.solvers[2].memory == 10 and solver.max_iter == 72
    runs = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert runs, "no TensorBoard events"
    logged = scalars(runs[0].parent)
    per_epoch = [
        [v for _, v in logged[f"solver/finished_by/{name}_epoch"]] for name in solver.method_names
    ]
    assert all(len(series) == 2 for series in per_epoch)
    for epoch in range(2):  # the fractions of one epoch add up to 1
        assert sum(series[epoch] for series in per_epoch) == pytest.approx(1.0, abs=1e-6)
    assert f"val_solver/finished_by/{solver.method_names[0]}" in logged
    # The chain comes back from the checkpoint's hyperparameters.
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    reloaded = type(cli.model).load_from_checkpoint(last).net.blocks[0].solver
    assert repr(reloaded) == repr(solver)
