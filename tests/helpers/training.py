"""Shared helpers of the training tests: command-line runs, TensorBoard logs, tiny networks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from irnet.linear import Neumann
from irnet.nets import ODENet
from irnet.solvers import FixedPoint

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

# Keep every training subprocess on one thread: the suite runs on two cores.
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def subprocess_env() -> dict[str, str]:
    """Environment of a training subprocess: one thread, no warnings noise, no GPU probing."""
    env = os.environ.copy()
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("MASTER_PORT", None)
    return env


def run_irnet(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m irnet *args`` in ``cwd`` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "irnet", *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def event_files(root: Path) -> list[Path]:
    """TensorBoard event files under ``root``."""
    return sorted(root.rglob("events.out.tfevents.*"))


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of the TensorBoard run in ``log_dir``: tag -> [(step, value)]."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tiny_odenet(
    layers: int = 2,
    width: int = 8,
    theta: float = 0.5,
    in_features: int = 1,
    out_features: int = 1,
    readout: str = "component",
    activation: str = "tanh",
    tol: float = 1e-6,
    max_iter: int = 100,
    seed: Optional[int] = 0,
    ensemble: int = 1,
) -> ODENet:
    """A small ODENet with tanh and tight solvers, quick to train in tests (``ensemble`` members
    of seeds ``seed``, ``seed + 1``, … where ``ensemble > 1``)."""
    if seed is not None:
        torch.manual_seed(seed)
    return ODENet(
        in_features=in_features,
        out_features=out_features,
        layers=layers,
        T=1.0,
        width=width,
        theta=theta,
        activation=activation,
        readout=readout,
        solver=FixedPoint(atol=tol, max_iter=max_iter),
        linear_solver=Neumann(rtol=tol, max_iter=max_iter),
        ensemble=ensemble,
    )


def tiny_net_overrides(layers: int = 2, width: int = 8, T: float = 1.0) -> list[str]:
    """Command-line overrides that shrink a config's ODENet (a short T keeps solves contractive)."""
    return [
        "--model.net.init_args.layers",
        str(layers),
        "--model.net.init_args.width",
        str(width),
        "--model.net.init_args.T",
        str(T),
    ]
