"""Every forward solver × every linear solver through a real Trainer: fit, validate, test, predict.

Lightning runs validate, test and predict under ``torch.inference_mode()`` (the
sanity check and the validation inside fit under ``no_grad``); solvers that
differentiate ``½‖r‖²`` must leave it. A callback records, after every batch of
every stage, the grad and inference modes and whether every block's last solve
converged with finite values.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from irnet.linear import GMRES, Direct, Neumann
from irnet.module import ImplicitNetModule
from irnet.nets import ODENet
from irnet.solvers import (
    LBFGS,
    Anderson,
    Broyden,
    Fallback,
    FixedPoint,
    GradientDescent,
    NonlinearCG,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]  # ~30 s in all

TOL = 1e-5
SOLVERS = {
    "fixed_point": lambda: FixedPoint(atol=TOL, max_iter=100),
    "anderson": lambda: Anderson(atol=TOL, max_iter=100),
    "gradient_descent": lambda: GradientDescent(atol=TOL, max_iter=100),
    "cg_fletcher_reeves": lambda: NonlinearCG(atol=TOL, max_iter=100, beta="fletcher-reeves"),
    "cg_polak_ribiere": lambda: NonlinearCG(atol=TOL, max_iter=100, beta="polak-ribiere"),
    "broyden": lambda: Broyden(atol=TOL, max_iter=100),
    "lbfgs": lambda: LBFGS(atol=TOL, max_iter=100),
    "fallback": lambda: Fallback(
        [
            FixedPoint(atol=TOL, max_iter=3),
            GradientDescent(atol=TOL, max_iter=100),
            Broyden(atol=TOL, max_iter=100),
        ]
    ),
}
LINEAR = {
    "neumann": lambda: Neumann(rtol=TOL, max_iter=100),
    "gmres": lambda: GMRES(rtol=TOL, max_iter=50),
    "direct": lambda: Direct(rtol=TOL),
}
# stage -> (inference mode, grad mode) that Lightning sets there
MODES = {
    "train": (False, True),
    "sanity_check": (False, False),
    "fit_validate": (False, False),
    "validate": (True, False),
    "test": (True, False),
    "predict": (True, False),
}


class StageRecorder(pl.Callback):
    """After each batch: the stage, inference mode, and every block's solver outcome."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def _record(self, trainer: pl.Trainer, module: ImplicitNetModule, stage: str) -> None:
        blocks = module.net.blocks
        fwd = [b.forward_stats for b in blocks]
        if trainer.sanity_checking:
            stage = "sanity_check"
        elif stage == "validate" and trainer.state.fn == "fit":
            stage = "fit_validate"
        self.records.append(
            dict(
                stage=stage,
                inference=torch.is_inference_mode_enabled(),
                grad=torch.is_grad_enabled(),
                converged=all(s is not None and bool(s.converged.all()) for s in fwd),
                finite=all(bool(torch.isfinite(s.residual).all()) for s in fwd if s is not None),
            )
        )

    def on_after_backward(self, trainer, module) -> None:
        bwd = [b.backward_stats for b in module.net.blocks]
        converged = all(s is not None and bool(s.converged.all()) for s in bwd)
        finite = all(bool(torch.isfinite(s.residual).all()) for s in bwd if s is not None)
        self.records.append(
            dict(
                stage="backward",
                inference=torch.is_inference_mode_enabled(),
                converged=converged,
                finite=finite,
            )
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._record(trainer, module, "train")

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self._record(trainer, module, "validate")

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self._record(trainer, module, "test")

    def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self._record(trainer, module, "predict")

    def of(self, stage: str) -> list[dict]:
        return [r for r in self.records if r["stage"] == stage]


def loader() -> DataLoader:
    x = torch.linspace(-1, 1, 16).unsqueeze(1)
    return DataLoader(TensorDataset(x, torch.sin(3 * x)), batch_size=8)


@pytest.mark.parametrize("linear", list(LINEAR))
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_stage_with_every_solver_pair(solver, linear):
    torch.manual_seed(0)
    net = ODENet(
        1,
        1,
        layers=2,
        T=1.0,
        width=8,
        activation="tanh",
        solver=SOLVERS[solver](),
        linear_solver=LINEAR[linear](),
    )
    module = ImplicitNetModule(net, loss="l2", lr=1e-2)
    recorder = StageRecorder()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        callbacks=[recorder],
    )
    trainer.fit(module, loader(), loader())
    assert trainer.global_step == 2
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
    (val,) = trainer.validate(module, loader(), verbose=False)
    (test,) = trainer.test(module, loader(), verbose=False)
    predictions = trainer.predict(module, loader())
    assert math.isfinite(val["val/loss"]) and math.isfinite(test["test/loss"])
    assert [p.shape for p in predictions] == [(8, 1), (8, 1)]
    assert all(bool(torch.isfinite(p).all()) for p in predictions)

    assert len(recorder.of("backward")) == 2
    for stage, (inference, grad) in MODES.items():
        records = recorder.of(stage)
        assert records, f"no batch recorded in {stage}"
        for r in records:
            assert r["converged"] and r["finite"], (stage, r)
            assert (r["inference"], r["grad"]) == (inference, grad), (stage, r)
    for r in recorder.of("backward"):
        assert r["converged"] and r["finite"] and not r["inference"]
