"""ImplicitNetModule: losses, logged metrics, regularisation terms, optimiser, predict."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from helpers.training import tiny_odenet
from irnet.datamodules import SineRegression, TwoSpirals
from irnet.module import ImplicitNetModule, l2_loss
from irnet.nets import ConvODENet
from irnet.perturbations import GaussianPerturbation
from irnet.regularizers import (
    FixedPointRegularizer,
    JacobianRegularizer,
    PerturbationRegularizer,
)
from irnet.stats import ConvergenceWarning


def fit(
    module: pl.LightningModule, data: pl.LightningDataModule, epochs: int, **kwargs
) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kwargs,
    )
    trainer.fit(module, data)
    return trainer


def test_l2_loss_is_the_mean_of_per_sample_norms():
    pred = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert l2_loss(pred, target).item() == pytest.approx(2.5)


def test_compute_loss_choices():
    pred, target = torch.randn(6, 3), torch.randn(6, 3)
    net = tiny_odenet()
    assert ImplicitNetModule(net, loss="mse").compute_loss(pred, target) == F.mse_loss(pred, target)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    ce = ImplicitNetModule(net, loss="cross_entropy", num_classes=3).compute_loss(pred, labels)
    assert ce == F.cross_entropy(pred, labels)


def test_training_step_logs_losses_metrics_and_regularisers():
    torch.manual_seed(0)
    data = SineRegression(num_points=21)
    module = ImplicitNetModule(
        tiny_odenet(),
        lr=1e-2,
        r_fp=FixedPointRegularizer(weight=0.01, iterations=3),
        r_rnd=PerturbationRegularizer(weight=0.1, streams=2, sigma=0.05),
    )
    trainer = fit(module, data, epochs=3)
    m = {k: v.item() for k, v in trainer.callback_metrics.items()}
    for key in (
        "train/loss",
        "train/total",
        "train/r_fp",
        "train/r_rnd",
        "train/mse",
        "train/iters",
        "val/loss",
        "val/mse",
        "val/iters",
        "iters",
    ):
        assert key in m, key
    # one full batch per epoch: the epoch values are those of the last step
    assert m["train/total"] == pytest.approx(
        m["train/loss"] + m["train/r_fp"] + m["train/r_rnd"], rel=1e-5
    )
    assert m["train/r_fp"] > 0 and m["train/r_rnd"] > 0
    assert 1 <= m["train/iters"] <= 100
    x, y = data.tensors("val")
    with torch.no_grad():
        pred = module(x)
    assert m["val/loss"] == pytest.approx(l2_loss(pred, y).item(), rel=1e-5)
    assert m["val/mse"] == pytest.approx(F.mse_loss(pred, y).item(), rel=1e-5)
    assert module.r_rnd.last_distances.shape == (2,)


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    data = SineRegression(num_points=21)
    module = ImplicitNetModule(tiny_odenet(layers=2, width=16, tol=1e-4), lr=1e-2)
    x, y = data.tensors("val")
    with torch.no_grad():
        before = l2_loss(module(x), y).item()
    fit(module, data, epochs=80)
    with torch.no_grad():
        after = l2_loss(module(x), y).item()
    assert after < 0.3 * before


def test_classification_logs_accuracy():
    torch.manual_seed(0)
    data = TwoSpirals()
    net = tiny_odenet(in_features=2, out_features=2, readout="linear")
    module = ImplicitNetModule(net, loss="cross_entropy")
    trainer = fit(module, data, epochs=3)
    x, y = data.tensors("val")
    with torch.no_grad():
        acc = (module(x).argmax(1) == y).float().mean().item()
    assert trainer.callback_metrics["val/acc"].item() == pytest.approx(acc)
    assert "train/acc" in trainer.callback_metrics and "val/mse" not in trainer.callback_metrics


def test_inactive_regulariser_is_not_computed():
    module = ImplicitNetModule(tiny_odenet(), r_fp=FixedPointRegularizer(weight=0.0))
    assert module.active_regularizers() == {}
    trainer = fit(module, SineRegression(num_points=11), epochs=1)
    assert "train/r_fp" not in trainer.callback_metrics


class Recording(GaussianPerturbation):
    """Gaussian perturbation that keeps every noise tensor it draws."""

    def __init__(self, sigma: float) -> None:
        super().__init__(sigma)
        self.drawn: list[torch.Tensor] = []

    def noise(self, x, generator=None):
        eps = super().noise(x, generator)
        self.drawn.append(eps)
        return eps


def test_perturbations_are_redrawn_from_seed_and_epoch():
    reg = PerturbationRegularizer(weight=0.1, seed=11, perturbation=Recording(0.1))
    module = ImplicitNetModule(tiny_odenet(), r_rnd=reg)
    fit(module, SineRegression(num_points=11), epochs=3, num_sanity_val_steps=0)
    drawn = reg.perturbation.drawn
    assert len(drawn) == 3
    for epoch, eps in enumerate(drawn):
        g = torch.Generator().manual_seed(reg.epoch_seed(epoch))
        assert torch.equal(eps, 0.1 * torch.randn(eps.shape, generator=g))


def test_predict_returns_the_network_outputs():
    data = SineRegression(num_points=11)
    module = ImplicitNetModule(tiny_odenet())
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    out = torch.cat(trainer.predict(module, data))
    x, _ = data.tensors("test")
    with torch.no_grad():
        assert torch.allclose(out, module(x))
    assert out.shape == (10, 1)


def test_optimiser_defaults_follow_the_paper():
    config = ImplicitNetModule(tiny_odenet()).configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 1e-2
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert (scheduler.step_size, scheduler.gamma) == (500, 0.7)


def test_hyperparameters_skip_a_network_object():
    module = ImplicitNetModule(tiny_odenet(), loss="mse", lr=3e-3)
    assert "net" not in module.hparams
    assert module.hparams["lr"] == 3e-3 and module.hparams["loss"] == "mse"


def test_num_classes_is_read_from_the_network():
    module = ImplicitNetModule(
        ConvODENet(layers=1, channels=2, hidden_channels=2), loss="cross_entropy"
    )
    assert module.val_metrics["val/acc"].num_classes == 10
    assert (
        ImplicitNetModule(nn.Linear(2, 3), loss="cross_entropy").val_metrics["val/acc"].num_classes
        == 3
    )
    with pytest.raises(ValueError, match="num_classes"):
        ImplicitNetModule(nn.Sequential(nn.Linear(2, 3)), loss="cross_entropy")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(loss="huber"), "loss"),
        (dict(lr=0.0), "lr"),
        (dict(lr_step=0), "lr_step"),
        (dict(lr_gamma=1.5), "lr_gamma"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(r_fp=0.1), "r_fp"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ImplicitNetModule(tiny_odenet(), **kwargs)


def test_regularisers_need_the_hidden_states():
    with pytest.raises(ValueError, match=r"^r_fp needs a network with \.trajectory\(\)"):
        ImplicitNetModule(nn.Linear(1, 1), r_fp=FixedPointRegularizer())
    both = dict(r_fp=FixedPointRegularizer(), r_rnd=PerturbationRegularizer())
    with pytest.raises(ValueError, match=r"^r_fp, r_rnd need a network"):  # the active ones
        ImplicitNetModule(nn.Linear(1, 1), **both, r_jac=JacobianRegularizer(weight=0.0))
    with pytest.raises(ValueError, match="net must be"):
        ImplicitNetModule("ODENet")


def test_convergence_warnings_once_per_run_not_once_per_process():
    """A failure in the sanity check does not silence training's warning, nor a later fit's."""
    data = SineRegression(num_points=11)
    module = ImplicitNetModule(tiny_odenet(tol=1e-12, max_iter=2))  # every forward solve fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # two fits in one process
            fit(module, data, epochs=2, num_sanity_val_steps=1)
    forward = [
        w
        for w in caught
        if issubclass(w.category, ConvergenceWarning) and str(w.message).startswith("Forward solve")
    ]
    # per fit: once in the sanity check, once in training (its two epochs and validations share it)
    assert len(forward) == 4, [str(w.message) for w in forward]


def test_warning_period_is_per_solver_until_reset():
    from irnet.stats import SolverStats, reset_convergence_warnings, warn_if_failed

    failed = SolverStats.trivial(3, torch.device("cpu"), torch.float32)
    failed.converged[1] = False
    solvers = [object(), object()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for solver in solvers * 2:
            warn_if_failed(failed, "Forward solve", solver)
        warn_if_failed(SolverStats.trivial(3, torch.device("cpu"), torch.float32), "ok", object())
        reset_convergence_warnings()
        warn_if_failed(failed, "Forward solve", solvers[0])
    assert len(caught) == 3 and "1 of 3 samples" in str(caught[0].message)
