"""Resume stays exact: a fit killed mid-run (SIGKILL) and resumed from ``last.ckpt`` ends with
every weight, optimiser moment and scheduler value of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers.checkpoint import assert_same_training_state
from helpers.training import CONFIGS, QUIET, REPO, subprocess_env, tiny_net_overrides
from irnet.cli import main

EPOCHS, KILL_AT = 6, 3
# Example 2 (two spirals) with R_rnd on: its perturbations are redrawn every epoch, so an
# inexact resume (wrong epoch, seed or stream state) shows in the weights.
ARGS = [
    "fit",
    "--config",
    str(CONFIGS / "ex2_spirals.yaml"),
    *tiny_net_overrides(3, 16),
    *QUIET,
    "--data.init_args.num_points",
    "48",
    "--trainer.max_epochs",
    str(EPOCHS),
]
LAST = "runs/ex2_spirals/version_{}/checkpoints/last.ckpt"


@pytest.mark.slow
def test_killed_and_resumed_fit_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["irnet"])
    whole_dir, broken_dir = tmp_path / "whole", tmp_path / "killed"
    whole_dir.mkdir(), broken_dir.mkdir()

    # a crash in the middle of epoch KILL_AT's step, in a process of its own
    killer = json.dumps(
        {"class_path": "helpers.checkpoint.KillAt", "init_args": {"epoch": KILL_AT}}
    )
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "irnet", *ARGS, f"--trainer.callbacks+={killer}"],
        cwd=broken_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    saved = torch.load(broken_dir / LAST.format(0), weights_only=False)
    assert (
        saved["epoch"] == KILL_AT - 1 and saved["global_step"] == KILL_AT
    )  # epochs 0..KILL_AT-1 done

    monkeypatch.chdir(broken_dir)
    resumed = main(ARGS + ["--ckpt_path", str(broken_dir / LAST.format(0))])
    assert resumed.trainer.current_epoch == EPOCHS
    assert resumed.model.r_rnd is not None and resumed.model.r_rnd.weight > 0
    assert resumed.trainer.callback_metrics["train/r_rnd"].item() > 0

    monkeypatch.chdir(whole_dir)
    whole = main(ARGS)
    assert whole.trainer.current_epoch == EPOCHS

    count = assert_same_training_state(
        torch.load(broken_dir / LAST.format(1), weights_only=False),
        torch.load(whole_dir / LAST.format(0), weights_only=False),
    )
    assert count >= 3 * len(whole.model.state_dict())  # weights, exp_avg, exp_avg_sq at least
