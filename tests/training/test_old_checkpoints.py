"""Checkpoints written before the package move still validate, load and resume with today's code.

``tests/data/checkpoints/`` holds, for each shipped config, a small checkpoint and the config the
CLI saved beside it (see its README.md). Each is validated through the command line with its
saved config (every class path in it must resolve, callbacks included), loaded with
``ImplicitNetModule.load_from_checkpoint``, and resumed for one more epoch (the optimiser's and
scheduler's states must load too).
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers.training import QUIET
from irnet.cli import main
from irnet.module import ImplicitNetModule
from irnet.nets import ConvODENet, ODENet

CHECKPOINTS = Path(__file__).resolve().parents[1] / "data" / "checkpoints"

#: each checkpoint's network class
NETS = {"ex1_sine": ODENet, "ex1_sine_100": ODENet, "ex2_spirals": ODENet, "digits": ConvODENet}

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    # the checkpoints were written under another directory: expected, and said for each
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["irnet"])  # the CLI is given its arguments in-process


def saved(name: str) -> dict:
    return torch.load(CHECKPOINTS / f"{name}.ckpt", map_location="cpu", weights_only=False)


def run_cli(subcommand: str, name: str, root: Path, *extra: str):
    """``irnet <subcommand>`` with the saved config and checkpoint, writing only under ``root``."""
    args = [
        subcommand,
        "--config",
        str(CHECKPOINTS / f"{name}.yaml"),
        "--ckpt_path",
        str(CHECKPOINTS / f"{name}.ckpt"),
        "--trainer.logger",
        "false",  # the saved config logs to the directory it was written in
        "--trainer.default_root_dir",
        str(root),
        *QUIET,
        *extra,
    ]
    with contextlib.redirect_stdout(io.StringIO()):  # the validation table
        return main(args)


#: configs added after the package move: they have no checkpoint written before it
AFTER_THE_MOVE = {"stiff", "lotka"}


def test_every_shipped_config_has_an_old_checkpoint():
    # Only the configs that existed before the package move (the four in tests/data/checkpoints/)
    # can have a checkpoint written before it; the configs added since are named in AFTER_THE_MOVE.
    shipped = {p.stem for p in (CHECKPOINTS.parents[2] / "configs").glob("*.yaml")}
    assert shipped - AFTER_THE_MOVE == set(NETS)
    for name in NETS:
        assert (CHECKPOINTS / f"{name}.ckpt").is_file()
        assert (CHECKPOINTS / f"{name}.yaml").is_file()


@pytest.mark.parametrize("name", sorted(NETS))
def test_an_old_checkpoint_validates_with_its_saved_config(name, tmp_path):
    cli = run_cli("validate", name, tmp_path / "run")
    metrics = cli.trainer.callback_metrics
    assert "val/loss" in metrics, sorted(metrics)
    assert math.isfinite(float(metrics["val/loss"]))
    assert type(cli.model.net) is NETS[name]
    # Every saved config has warm starts on, and the checkpoint was written right after the
    # validation pass: with its warm-start caches loaded, every validation solve starts at its
    # fixed point and takes no iterations.
    assert float(metrics["val/iters"]) == 0.0
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {"run"}, written


@pytest.mark.parametrize("name", sorted(NETS))
def test_an_old_checkpoint_loads_its_network_weights_and_warm_starts(name):
    checkpoint = saved(name)
    module = ImplicitNetModule.load_from_checkpoint(CHECKPOINTS / f"{name}.ckpt")
    assert type(module.net) is NETS[name]
    state = module.state_dict()
    assert state.keys() == checkpoint["state_dict"].keys()
    for key, value in checkpoint["state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key
    cached = checkpoint["state_dict"]["net._extra_state"]["warm_start"]["keys"]
    assert module.net.warm_start_cache is not None
    assert len(module.net.warm_start_cache) == len(cached) > 0


@pytest.mark.parametrize("name", sorted(NETS))
def test_an_old_checkpoint_resumes_training(name, tmp_path):
    """One more epoch from the checkpoint: Adam's and the scheduler's counts go on from it."""
    checkpoint = saved(name)
    # without the monitors (the validation test runs them; here they would draw figures)
    cli = run_cli(
        "fit", name, tmp_path / "run", "--trainer.max_epochs", "2", "--trainer.callbacks=[]"
    )
    trainer = cli.trainer
    assert trainer.current_epoch == 2
    assert trainer.global_step > checkpoint["global_step"]
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    # restored, not fresh: Adam counts every step since the start, the scheduler every epoch
    steps = {float(s["step"]) for s in trainer.optimizers[0].state_dict()["state"].values()}
    assert steps == {float(trainer.global_step)}
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == checkpoint["lr_schedulers"][0]["last_epoch"] + 1
