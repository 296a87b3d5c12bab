"""The worked subclass of docs/subclassing.md trains, in Python and from the command line; every
stage and R_rnd's perturbed pass go through the overridden extension points."""

from __future__ import annotations

import importlib
import re
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch

from helpers.training import REPO, tiny_odenet
from irnet._misc import sample_norm
from irnet.cli import main
from irnet.datamodules import SineRegression
from irnet.module import ImplicitNetModule, l2_loss
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
        example.GatedODENet(layers=3, dim=8),
        smoothness=1e-3,
        lr=2e-2,
        r_rnd=PerturbationRegularizer(
            weight=0.05, streams=2, perturbation=example.UniformPerturbation(0.05)
        ),
    )
    x, y = data.tensors("val")
    with torch.no_grad():
        before = l2_loss(module(x), y).item()
    trainer = pl.Trainer(
        max_epochs=60,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    with torch.no_grad():
        after = l2_loss(module(x), y).item()
    assert after < 0.5 * before
    metrics = trainer.callback_metrics
    assert metrics["train/smooth"].item() > 0 and metrics["train/r_rnd"].item() > 0
    assert metrics["train/total"].item() == pytest.approx(
        (metrics["train/loss"] + metrics["train/smooth"] + metrics["train/r_rnd"]).item(), rel=1e-5
    )


def test_subclass_is_accepted_by_the_command_line(example):
    cli = main(
        args=[
            "fit",
            "--model",
            "subclass_example.SmoothDepthModule",
            "--model.net",
            "subclass_example.GatedODENet",
            "--model.net.init_args.layers",
            "2",
            "--model.smoothness",
            "0.01",
            "--model.lr",
            "0.005",
            "--model.r_rnd.init_args.weight",
            "0.1",
            "--model.r_rnd.init_args.perturbation",
            "subclass_example.UniformPerturbation",
            "--model.r_rnd.init_args.perturbation.init_args.radius",
            "0.2",
            "--data",
            "irnet.datamodules.SineRegression",
            "--trainer.max_epochs",
            "2",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    model = cli.model
    assert type(model).__name__ == "SmoothDepthModule"
    assert model.smoothness == 0.01 and model.lr == 0.005  # lr reached the base class via **kwargs
    assert type(model.r_rnd.perturbation).__name__ == "UniformPerturbation"
    assert model.r_rnd.perturbation.radius == 0.2
    assert cli.trainer.current_epoch == 2
    assert "train/smooth" in cli.trainer.callback_metrics


# -- every stage goes through the extension points ------------------------------------------------

SCALE, OFFSET, CONST = 3.0, 1.0, 0.25


class Traced(ImplicitNetModule):
    """Overrides every extension point with a recognisable transform and counts the calls by stage.

    trajectory: the last state times SCALE; readout: the net's readout plus OFFSET;
    compute_loss: half the L2 loss; regularization: R_rnd plus a constant CONST.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter = Counter()

    def _count(self, what: str, batch: int = 0) -> None:
        stage = getattr(self._trainer and self._trainer.state.stage, "value", "none")
        self.calls[(what, stage, batch)] += 1

    def trajectory(self, x):
        self._count("trajectory", x.shape[0])
        states = super().trajectory(x)
        return states[:-1] + [SCALE * states[-1]]

    def readout(self, y):
        self._count("readout", y.shape[0])
        return super().readout(y) + OFFSET

    def compute_loss(self, pred, target):
        self._count("compute_loss")
        return 0.5 * super().compute_loss(pred, target)

    def regularization(self, x, states):
        self._count("regularization")
        return {**super().regularization(x, states), "const": torch.tensor(CONST)}


def reference_output(net, x):
    """What the overrides make of ``x``, computed from the network's own pieces."""
    with torch.no_grad():
        return net.readout(SCALE * net.trajectory(x)[-1]) + OFFSET


class BeforeStep(pl.Callback):
    """Before each step, from the network's own pieces: the overridden loss, and R_rnd's last-layer
    distance of the plain network on the noise the step is about to draw."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.plain_distances: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        x, y = batch
        self.losses.append(0.5 * l2_loss(reference_output(module.net, x), y).item())
        reg = module.r_rnd
        state = reg.generator.get_state()
        with torch.no_grad():
            plain = module.net.trajectory(x)[-1].repeat(reg.streams, 1)
            noisy = module.net.trajectory(reg.perturb(x))[-1]
        reg.generator.set_state(state)
        self.plain_distances.append(sample_norm(noisy - plain).mean().item())


def test_every_stage_and_r_rnd_see_the_overrides():
    torch.manual_seed(0)
    data = SineRegression(num_points=21)
    streams = 2
    module = Traced(
        tiny_odenet(layers=2, width=8, seed=0),
        lr=1e-2,
        r_rnd=PerturbationRegularizer(weight=0.1, streams=streams, sigma=0.1, seed=4),
    )
    probe = BeforeStep()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
        num_sanity_val_steps=1,
    )
    trainer.fit(module, data)
    m = {k: v.item() for k, v in trainer.callback_metrics.items()}
    n_train, n_val = 21, 20
    calls = module.calls
    # training: the clean pass and R_rnd's perturbed pass (P·B samples) both through trajectory
    assert calls[("trajectory", "train", n_train)] == 2
    assert calls[("trajectory", "train", streams * n_train)] == 2
    assert calls[("readout", "train", n_train)] == 2
    assert calls[("compute_loss", "train", 0)] == 2 and calls[("regularization", "train", 0)] == 2
    assert calls[("trajectory", "sanity_check", n_val)] == 1
    assert (
        calls[("trajectory", "validate", n_val)] == 2 and calls[("readout", "validate", n_val)] == 2
    )
    assert m["train/loss_step"] == pytest.approx(probe.losses[-1], rel=1e-5)
    assert m["train/const"] == CONST
    assert m["train/total"] == pytest.approx(m["train/loss"] + m["train/r_rnd"] + CONST, rel=1e-6)

    # R_rnd's perturbed pass went through the override: its last-layer distance is SCALE × the
    # plain one
    assert module.r_rnd.last_distances[-1].item() == pytest.approx(
        SCALE * probe.plain_distances[-1], rel=1e-5
    )

    x_val, y_val = data.tensors("val")
    expected = 0.5 * l2_loss(reference_output(module.net, x_val), y_val).item()
    validated = trainer.validate(module, data, verbose=False)[0]
    tested = trainer.test(module, data, verbose=False)[0]
    predicted = torch.cat(trainer.predict(module, data))
    assert validated["val/loss"] == pytest.approx(expected, rel=1e-6)
    assert tested["test/loss"] == pytest.approx(
        expected, rel=1e-6
    )  # the test split is the val split
    torch.testing.assert_close(predicted, reference_output(module.net, x_val))
    assert calls[("trajectory", "validate", n_val)] == 3  # two in the fit, one here
    for stage in ("test", "predict"):
        assert calls[("trajectory", stage, n_val)] == 1 and calls[("readout", stage, n_val)] == 1, (
            stage
        )
    assert (
        calls[("regularization", "validate", 0)] == 0 and calls[("compute_loss", "predict", 0)] == 0
    )
    torch.testing.assert_close(module(x_val), reference_output(module.net, x_val))
