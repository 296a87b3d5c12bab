"""Training an ensemble with the LightningModule: every member's losses and weights are those of
its own run (the shipped configs' settings, every regulariser, the command line's seeds), and
each member is logged with the members' mean and spread."""

from __future__ import annotations

import sys

import pytest
import pytorch_lightning as pl
import torch

from helpers.training import CONFIGS, QUIET, tiny_net_overrides
from irnet.cli import main
from irnet.datamodules import SineRegression, TwoSpirals
from irnet.linear import Direct
from irnet.module import ImplicitNetModule
from irnet.nets import ODENet
from irnet.nets.ensemble import rows_of
from irnet.regularizers import (
    DivergenceRegularizer,
    FixedPointRegularizer,
    JacobianRegularizer,
    MagnitudeRegularizer,
    PerturbationRegularizer,
    ResidualRegularizer,
    TotalVariationRegularizer,
)
from irnet.solvers import Anderson, FixedPoint

SEEDS = [3, 4, 5]


class MemberLosses(pl.Callback):
    """Each epoch's training losses: ``[{member: loss}]`` (one network: member 0)."""

    def __init__(self) -> None:
        self.epochs: list[dict[int, float]] = []

    def on_train_epoch_end(self, trainer, module) -> None:
        logged = trainer.callback_metrics
        if module.members == 1:
            self.epochs.append({0: float(logged["train/loss"])})
        else:
            self.epochs.append(
                {k: float(logged[f"train/loss/member_{k}"]) for k in range(module.members)}
            )


def fit(net_kwargs, module_kwargs, data, seeds, steps=20, clip=None, ensemble=True):
    """``steps`` full-batch epochs in float64; the module and each epoch's member losses."""
    torch.manual_seed(seeds[0])
    extra = {"ensemble": len(seeds), "member_seeds": seeds} if ensemble else {}
    module = ImplicitNetModule(ODENet(**net_kwargs, **extra), **module_kwargs())
    losses = MemberLosses()
    trainer = pl.Trainer(
        max_epochs=steps,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=clip,
        callbacks=[losses],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data())
    return module, losses.epochs


def assert_members_are_their_own_runs(net_kwargs, module_kwargs, data, clip=None, steps=20):
    together, together_losses = fit(net_kwargs, module_kwargs, data, SEEDS, steps, clip)
    for k, seed in enumerate(SEEDS):
        alone, losses = fit(net_kwargs, module_kwargs, data, [seed], steps, clip, ensemble=False)
        assert [e[k] for e in together_losses] == pytest.approx([e[0] for e in losses], abs=1e-6)
        for (name, p), q in zip(together.net.named_parameters(), alone.net.parameters()):
            torch.testing.assert_close(p[k], q, rtol=0, atol=1e-6, msg=name)
    assert together_losses[-1][0] < together_losses[0][0]  # it trained


CLASSIFIER = dict(  # a small spirals network
    in_features=2,
    out_features=2,
    layers=3,
    T=3.0,
    width=8,
    readout="linear",
    init="bounded",
    contraction=0.8,
    linear_solver=Direct(),
)
EX1 = dict(  # configs/ex1_sine.yaml's network
    in_features=1,
    out_features=1,
    layers=10,
    T=10.0,
    width=100,
    theta=0.5,
    readout="component",
    component=1,
    init="bounded",
    contraction=0.9,
)


@pytest.mark.slow
def test_ex1_sine_settings_members_train_as_their_own_runs():
    assert_members_are_their_own_runs(
        {**EX1, "solver": FixedPoint(atol=1e-5, max_iter=120), "linear_solver": Direct()},
        lambda: dict(loss="l2", lr=0.01),
        lambda: SineRegression(num_points=51),
    )


@pytest.mark.slow
def test_ex2_spirals_settings_members_train_as_their_own_runs():
    # configs/ex2_spirals.yaml's options (R_rnd, warm starts, Anderson, contraction, clipping) on
    # 10 layers of width 32 instead of 100 of 100, 100 points, and a clipping threshold that the
    # gradients reach
    net = {
        **CLASSIFIER,
        **dict(layers=10, T=10.0, width=32, contraction=0.9, warm_start=True),
        "solver": Anderson(atol=1e-5, max_iter=50, history=3),
    }
    assert_members_are_their_own_runs(
        net,
        lambda: dict(
            loss="cross_entropy",
            lr=0.01,
            r_rnd=PerturbationRegularizer(weight=0.01, streams=2, sigma=0.05, seed=0),
        ),
        lambda: TwoSpirals(num_points=100),
        clip=0.05,
    )


def test_every_regulariser_counts_each_member_as_its_own_run():
    # not stationary, so that R_tv is not 0
    net = {**CLASSIFIER, "solver": FixedPoint(atol=1e-8, max_iter=100), "stationary_init": False}
    regularizers = lambda: dict(  # noqa: E731 - a fresh set (with fresh generators) per fit
        loss="cross_entropy",
        lr=0.01,
        r_fp=FixedPointRegularizer(weight=0.1),
        r_rnd=PerturbationRegularizer(weight=0.1, streams=2, seed=1),
        r_jac=JacobianRegularizer(weight=0.1, seed=2),
        r_div=DivergenceRegularizer(weight=0.1, seed=3),
        r_mag=MagnitudeRegularizer(weight=0.1),
        r_res=ResidualRegularizer(weight=0.1),
        r_tv=TotalVariationRegularizer(weight=0.1),
    )
    assert_members_are_their_own_runs(
        net, regularizers, lambda: TwoSpirals(num_points=40), clip=0.5, steps=5
    )


def test_members_are_logged_with_their_mean_and_spread():
    net = dict(EX1, layers=2, width=8, T=2.0, solver=FixedPoint(), linear_solver=Direct())
    module, epochs = fit(net, lambda: dict(loss="l2"), lambda: SineRegression(12), SEEDS, 2)
    logged = module.trainer.callback_metrics
    members = torch.tensor([float(logged[f"train/loss/member_{k}"]) for k in range(3)])
    # (Lightning keeps the logged values in float32)
    assert float(logged["train/loss"]) == pytest.approx(members.mean().item(), rel=1e-6)
    assert float(logged["train/loss/std"]) == pytest.approx(members.std().item(), rel=1e-5)
    assert {f"train/mse/member_{k}" for k in range(3)} <= set(logged)


def test_member_clipping_through_the_module():
    module = ImplicitNetModule(ODENet(**dict(EX1, layers=2, width=8), ensemble=2))
    optimiser = torch.optim.Adam(module.parameters())
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in module.parameters()]
    module.configure_gradient_clipping(optimiser, 0.1, "norm")
    for k in range(2):
        own = [g[k].clone().requires_grad_() for g in grads]
        for tensor, g in zip(own, grads):
            tensor.grad = g[k].clone()
        torch.nn.utils.clip_grad_norm_(own, 0.1)
        for p, q in zip(module.parameters(), own):
            torch.testing.assert_close(p.grad[k], q.grad)


@pytest.fixture
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["irnet"])


def test_the_command_lines_seed_is_the_first_members(tmp_path, monkeypatch, plain_argv):
    """``seed_everything: 3`` with ``ensemble: 2`` trains the networks of seeds 3 and 4."""
    common = [
        "fit",
        "--config",
        str(CONFIGS / "ex1_sine.yaml"),
        *tiny_net_overrides(2, 8),
        *QUIET,
        "--trainer.callbacks=[]",
        "--trainer.max_epochs",
        "3",
    ]
    nets = {}
    for name, extra in {
        "ensemble": ["--seed_everything", "3", "--model.net.init_args.ensemble", "2"],
        "seed3": ["--seed_everything", "3"],
        "seed4": ["--seed_everything", "4"],
    }.items():
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        nets[name] = main(args=[*common, *extra]).model.net
    x = torch.linspace(-5, 5, 11)[:, None]
    with torch.no_grad():
        both = rows_of(nets["ensemble"](x), 2)
        torch.testing.assert_close(both[0], nets["seed3"](x), rtol=0, atol=1e-6)
        torch.testing.assert_close(both[1], nets["seed4"](x), rtol=0, atol=1e-6)
    assert nets["ensemble"].member_seeds == [3, 4]


class BreakMember(pl.Callback):
    """Make one member's first-layer weights NaN before training step ``step``."""

    def __init__(self, member: int, step: int) -> None:
        self.member, self.step = member, step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                module.net.blocks[0].F.gamma1[self.member] = float("nan")


SMALL_NET = {**CLASSIFIER, "warm_start": True, "solver": Anderson(atol=1e-8, max_iter=50)}


def small_fit(seeds, epochs, callbacks=(), ckpt_path=None, root=None):
    torch.manual_seed(seeds[0])
    extra = {"ensemble": len(seeds), "member_seeds": seeds} if len(seeds) > 1 else {}
    module = ImplicitNetModule(ODENet(**SMALL_NET, **extra), loss="cross_entropy", lr=0.01)
    trainer = pl.Trainer(
        max_epochs=epochs,
        precision="64-true",
        logger=False,
        enable_checkpointing=root is not None,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=TwoSpirals(num_points=40), ckpt_path=ckpt_path)
    return module, trainer


def test_a_member_that_breaks_stops_and_the_others_train_as_their_own_runs():
    with pytest.warns(UserWarning, match=r"member 1 \(seed 4\) stopped: non-finite train/loss"):
        together, _ = small_fit(SEEDS, 8, [BreakMember(1, step=3)])
    assert together.net.members == 2 and together.member_ids == [0, 2]
    assert together.net.member_seeds == [3, 5]
    assert list(together.stopped_members.stopped) == [1]
    for position, seed in enumerate([3, 5]):
        alone, _ = small_fit([seed], 8)
        for (name, p), q in zip(together.net.named_parameters(), alone.net.parameters()):
            torch.testing.assert_close(p[position], q, rtol=0, atol=1e-9, msg=name)
    logged = together.trainer.callback_metrics
    assert {"train/loss/member_0", "train/loss/member_2"} <= set(logged)
    assert torch.isfinite(logged["train/loss"]) and torch.isfinite(logged["train/loss/std"])


def test_the_run_fails_when_every_member_has_broken():
    breaks = [BreakMember(k, step=2) for k in range(2)]
    with pytest.raises(Exception, match="every member of the ensemble broke"):
        small_fit(SEEDS[:2], 4, breaks)


def test_a_stopped_member_stays_out_after_a_resume(tmp_path):
    with pytest.warns(UserWarning, match="member 0"):
        small_fit(SEEDS, 4, [BreakMember(0, step=1)], root=tmp_path)
    last = next(tmp_path.rglob("*.ckpt"))
    assert torch.load(last, weights_only=False)["stopped_members"]["ids"] == [1, 2]
    resumed, trainer = small_fit(SEEDS, 6, ckpt_path=last, root=tmp_path / "again")
    assert trainer.current_epoch == 6 and resumed.member_ids == [1, 2]
    assert resumed.net.blocks[0].F.gamma1.shape[0] == 2
