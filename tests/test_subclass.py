"""The worked subclass of docs/subclassing.md trains, in Python and from the command line."""

from __future__ import annotations

import importlib
import re

import pytest
import pytorch_lightning as pl
import torch

from helpers_training import REPO
from irnet.cli import main
from irnet.datamodules import SineRegression
from irnet.module import l2_loss
from irnet.regularizers import PerturbationRegularizer

DOC = REPO / "docs" / "subclassing.md"


@pytest.fixture()
def example(tmp_path, monkeypatch):
    """The first Python block of the doc, importable as ``subclass_example``."""
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    (tmp_path / "subclass_example.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.sys, "argv", ["irnet"])  # the CLI parses only the test's args
    module = importlib.import_module("subclass_example")
    yield module
    del importlib.sys.modules["subclass_example"]


def test_subclass_trains_and_logs_its_penalty(example):
    torch.manual_seed(0)
    data = SineRegression(num_points=21)
    module = example.SmoothDepthModule(
        example.GatedODENet(layers=3, dim=8), smoothness=1e-3, lr=2e-2,
        r_rnd=PerturbationRegularizer(weight=0.05, streams=2, perturbation=example.UniformPerturbation(0.05)),
    )
    x, y = data.tensors("val")
    with torch.no_grad():
        before = l2_loss(module(x), y).item()
    trainer = pl.Trainer(max_epochs=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    with torch.no_grad():
        after = l2_loss(module(x), y).item()
    assert after < 0.5 * before
    metrics = trainer.callback_metrics
    assert metrics["train/smooth"].item() > 0 and metrics["train/r_rnd"].item() > 0
    assert metrics["train/total"].item() == pytest.approx(
        (metrics["train/loss"] + metrics["train/smooth"] + metrics["train/r_rnd"]).item(), rel=1e-5)


def test_subclass_is_accepted_by_the_command_line(example):
    cli = main(args=[
        "fit",
        "--model", "subclass_example.SmoothDepthModule",
        "--model.net", "subclass_example.GatedODENet",
        "--model.net.init_args.layers", "2",
        "--model.smoothness", "0.01",
        "--model.lr", "0.005",
        "--model.r_rnd.init_args.weight", "0.1",
        "--model.r_rnd.init_args.perturbation", "subclass_example.UniformPerturbation",
        "--model.r_rnd.init_args.perturbation.init_args.radius", "0.2",
        "--data", "irnet.datamodules.SineRegression",
        "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false",
    ])
    model = cli.model
    assert type(model).__name__ == "SmoothDepthModule"
    assert model.smoothness == 0.01 and model.lr == 0.005  # lr reached the base class via **kwargs
    assert type(model.r_rnd.perturbation).__name__ == "UniformPerturbation"
    assert model.r_rnd.perturbation.radius == 0.2
    assert cli.trainer.current_epoch == 2
    assert "train/smooth" in cli.trainer.callback_metrics
