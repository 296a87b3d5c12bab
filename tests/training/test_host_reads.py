"""The accelerator path, run and counted on the CPU: host reads per training step, F evaluations
per block, and the same training as the CPU path.

On a GPU every host read waits for the device. ``forced_path("accelerator")`` (what
``IRNET_DEVICE_PATH=accelerator`` does) runs the accelerator path here, and
:class:`helpers.sync.HostReads` counts, during one training step of each shipped config (its own
callbacks included), every call that would be a host read there. The host-read budget of the
accelerator path: at most one read per solve (forward or adjoint) plus 10 for the rest of the step;
with fixed-count solves at most 10, whatever the depth.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from helpers.problems import mlp
from helpers.sync import HostReads, SolveCounter
from irnet import ImplicitResidualBlock
from irnet.device_path import forced_path
from irnet.linear import Neumann
from irnet.solvers import Anderson, FixedPoint
from irnet.stats import flush_failure_warnings

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OTHER_READS = 10  # per step: the loss and finiteness checks, logging, metrics
FIXED_COUNT = [
    "--model.net.init_args.solver",
    "irnet.solvers.FixedPoint",
    "--model.net.init_args.solver.init_args.fixed_count",
    "true",
    "--model.net.init_args.solver.init_args.max_iter",
    "4",
]


class _CountOneStep(pl.Callback):
    """Counts host reads and solves from the start to the end of training step ``step``."""

    def __init__(self, reads: HostReads, solves: SolveCounter, step: int) -> None:
        self.reads, self.solves, self.step = reads, solves, step
        self._counting = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self._counting = self.reads.counting()
            self._counting.__enter__()
            self.solves.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counting is not None:
            flush_failure_warnings()  # the module's own flush comes after this hook: count it here
            self._counting.__exit__(None, None, None)
            self._counting = None
            self.solves.active = False


def count_step(config: str, extra: list[str], tmp_path: Path) -> tuple[HostReads, int]:
    """Host reads and solves of training step 5 of ``config`` on the accelerator path.

    By step 5 each block remembers its counts.
    """
    from irnet.cli import main as cli_main

    reads, solves = HostReads(), SolveCounter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Lightning's tips
            cli = cli_main(
                [
                    "--config",
                    str(CONFIGS / f"{config}.yaml"),
                    "--trainer.logger",
                    "false",
                    "--trainer.default_root_dir",
                    str(tmp_path),
                    "--trainer.max_steps",
                    "6",
                    "--trainer.limit_val_batches",
                    "0",
                    "--trainer.enable_model_summary",
                    "false",
                    *extra,
                ],
                run=False,
            )
            cli.trainer.callbacks.append(_CountOneStep(reads, solves, step=5))
            with forced_path("accelerator"), reads.patched():
                cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        solves.close()
    return reads, solves.count


@pytest.mark.parametrize(
    "config", ["ex1_sine", "ex1_sine_100", "ex2_spirals", "digits", "stiff", "lotka"]
)
def test_a_training_step_reads_at_most_once_per_solve(config, tmp_path):
    reads, solves = count_step(config, [], tmp_path)
    print(f"{config}: {solves} solves, {reads.report()}")
    assert solves > 0
    assert reads.count <= solves + OTHER_READS, reads.report()


def test_fixed_count_solves_read_nothing_whatever_the_depth(tmp_path):
    reads, solves = count_step("ex2_spirals", FIXED_COUNT, tmp_path)
    print(f"ex2_spirals, fixed count: {solves} solves, {reads.report()}")
    assert solves >= 200  # 100 layers, the main pass and R_rnd's perturbed pass
    assert reads.count <= OTHER_READS, reads.report()


class _CountedF(nn.Module):
    """Wraps F and counts its evaluations."""

    def __init__(self, F: nn.Module) -> None:
        super().__init__()
        self.F, self.calls = F, 0

    def forward(self, y):
        self.calls += 1
        return self.F(y)


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_a_fixed_count_block_evaluates_F_k_plus_2_times(path, theta):
    # F(x) (not needed at θ = 1), one per iteration, and F(y*) with its graph, which also measures
    # the answer's residual: no evaluation of F(y*) without a graph before it.
    k = 6
    F = _CountedF(mlp(n=3, width=8, lipschitz=0.5))
    block = ImplicitResidualBlock(
        F, theta, FixedPoint(atol=1e-4, max_iter=k, fixed_count=True), Neumann()
    )
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with forced_path(path):
        block(x)  # the first call checks F's output shape once
        F.calls = 0
        block(x).square().sum().backward()
    assert F.calls == k + (2 if theta < 1 else 1)
    want = (block.forward_stats.residual, block.forward_stats.converged)
    with (
        torch.no_grad()
    ):  # without a graph the solve measures its answer itself: the same statistics
        y = block(x)
    torch.testing.assert_close(block.forward_stats.residual, want[0], rtol=1e-12, atol=1e-15)
    assert torch.equal(block.forward_stats.converged, want[1])
    r = y - x - (1 - theta) * F.F(x) - theta * F.F(y)
    torch.testing.assert_close(want[0], r.norm(dim=1), rtol=1e-10, atol=1e-15)


def _train(path: str, steps: int = 6) -> tuple[list[float], list[torch.Tensor], list[int]]:
    from irnet.module import ImplicitNetModule
    from irnet.nets import ODENet

    torch.manual_seed(0)
    net = ODENet(
        2,
        2,
        layers=3,
        T=3.0,
        width=16,
        theta=0.5,
        readout="linear",
        warm_start=True,
        contraction=0.9,
        init="bounded",
        solver=Anderson(atol=1e-9, max_iter=60, history=3),
        linear_solver=Neumann(rtol=1e-9, max_iter=200),
    ).double()
    module = ImplicitNetModule(net, loss="cross_entropy", lr=1e-2)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    x = torch.randn(32, 2, dtype=torch.float64)
    target = (x[:, 0] * x[:, 1] > 0).long()
    calls = [0]
    for block in net.blocks:
        block.F.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    losses, evaluations = [], []
    with forced_path(path):
        for _ in range(steps):
            calls[0] = 0
            optimizer.zero_grad()
            loss = module.compute_loss(module(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            evaluations.append(calls[0])
    return losses, [p.detach().clone() for p in module.parameters()], evaluations


def test_training_on_the_accelerator_path_matches_the_cpu_path():
    # The same per-sample answers by construction (frozen at the first iterate within tolerance),
    # whatever the path's schedule of looks; only round-off of the replayed bookkeeping may differ.
    cpu_losses, cpu_params, cpu_evaluations = _train("cpu")
    accelerator_losses, accelerator_params, accelerator_evaluations = _train("accelerator")
    assert cpu_losses == pytest.approx(accelerator_losses, rel=1e-12, abs=1e-14)
    for a, b in zip(cpu_params, accelerator_params):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # No overshoot: once each block remembers its last count, a step's solves take at most one
    # evaluation of F more than the CPU path's, each (3 forward solves a step here).
    print(
        "F evaluations per step, CPU path:",
        cpu_evaluations,
        "accelerator path:",
        accelerator_evaluations,
    )
    for cpu, accelerator in zip(cpu_evaluations[1:], accelerator_evaluations[1:]):
        assert cpu <= accelerator <= cpu + 3


def test_a_solve_that_keeps_running_out_reads_once_in_a_while_and_finds_convergence_again():
    # F(y) = a·y with θa = 1.5 (expansive): FixedPoint never converges and runs to max_iter on
    # both paths. On the accelerator path the block then runs blind (no read), looking once every
    # LOOK_EVERY_WHEN_RAN_OUT solves; once the map contracts again, that look finds it.
    from irnet._iterate import LOOK_EVERY_WHEN_RAN_OUT

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = 3.0

        def forward(self, y):
            return self.a * y

    F = Scale()
    block = ImplicitResidualBlock(F, 0.5, FixedPoint(atol=1e-8, max_iter=20))
    x = torch.randn(4, 3, dtype=torch.float64)
    reads = HostReads()
    with forced_path("accelerator"), reads.patched(), pytest.warns(Warning):
        counts = []
        with reads.counting():
            for _ in range(2 * LOOK_EVERY_WHEN_RAN_OUT):
                block(x)
                counts.append(block.forward_stats.iterations)
        assert all((c == 20).all() for c in counts)
        # the first solve looks every few iterations (3 looks), then blind, one look in 8 solves
        assert reads.count <= 3 + 2, reads.report()
        F.a = 0.2
        for _ in range(LOOK_EVERY_WHEN_RAN_OUT + 1):
            block(x)
        assert block.forward_stats.converged.all() and block.forward_stats.iterations.max() < 20
        flush_failure_warnings()


def test_a_chain_whose_first_solver_solves_every_sample_reads_once():
    # The first link's last look reads, with "done", whether every sample met the tolerance (which
    # the links share): the chain stops without a read of its own.
    from irnet.solvers import Broyden, Fallback

    F = mlp(n=3, width=8, lipschitz=0.5)
    block = ImplicitResidualBlock(F, 0.5, Fallback([Anderson(atol=1e-9), Broyden(atol=1e-9)]))
    x = torch.randn(5, 3, dtype=torch.float64)
    reads = HostReads()
    with forced_path("accelerator"), reads.patched(), torch.no_grad():
        block(x)  # the first solve finds its counts
        with reads.counting():
            y = block(x)
    assert reads.count == 1, reads.report()
    assert (block.forward_stats.method == 0).all() and block.forward_stats.converged.all()
    with forced_path("cpu"), torch.no_grad():
        torch.testing.assert_close(block(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("path, svds_per_step", [("cpu", 2 * 6), ("accelerator", 2)])
def test_the_contraction_bound_makes_one_batched_svd_per_weight_shape_on_the_accelerator_path(
    kind, path, svds_per_step, monkeypatch
):
    # torch.linalg.svd waits for the host on CUDA (it checks its error flag): the accelerator path
    # computes every layer's norms of a step in one SVD per weight shape, the CPU path one per
    # weight.
    from irnet.nets import ConvODENet, ODENet

    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(
        torch.linalg, "svd", lambda *a, **k: calls.append(a[0].shape) or svd(*a, **k)
    )
    if kind == "mlp":
        net = ODENet(
            2, 2, layers=6, T=6.0, width=16, readout="linear", contraction=0.9, init="bounded"
        )
        x = torch.randn(8, 2, dtype=torch.float64)
    else:
        net = ConvODENet(
            1, 6, num_classes=3, channels=2, hidden_channels=4, layers=6, contraction=0.9
        )
        x = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    net = net.double()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    with forced_path(path):
        for step in range(3):
            calls.clear()
            optimizer.zero_grad()
            net(x).square().sum().backward()
            optimizer.step()
            if step > 0:  # the first step meets each layer's weights one at a time
                assert len(calls) == svds_per_step, calls


ENSEMBLE = ["--model.net.init_args.ensemble", "4"]


@pytest.mark.parametrize("config", ["ex1_sine", "ex2_spirals"])
def test_an_ensemble_step_reads_no_more_than_one_networks(config, tmp_path):
    """Four members in one step (their callbacks included): the single network's reads, no more."""
    single, single_solves = count_step(config, FIXED_COUNT, tmp_path / "single")
    members, member_solves = count_step(config, [*FIXED_COUNT, *ENSEMBLE], tmp_path / "ensemble")
    print(f"{config}: one network {single.report()}; four members {members.report()}")
    assert member_solves == single_solves > 0
    assert members.count <= single.count, members.report()
