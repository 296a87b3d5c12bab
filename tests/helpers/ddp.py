"""A small distributed fit, run as a script by the DDP and multi-node tests (in-process too, for
references).

``python tests/helpers/ddp.py SETTINGS.json`` fits ``ImplicitNetModule`` on
``SineRegression`` with the Trainer arguments in the settings and writes, to
``settings["out"]``: ``rank<r>.pt`` with the per-step training losses (from a
CSV logger on rank 0), the final weights, the validation metrics and the R_rnd
noise each rank drew; with ``warm_start`` its warm-start cache, with ``masks`` a
dropout mask drawn when training starts, and with ``checkpoint`` a checkpoint
``last.ckpt`` made after the fit. Lightning reads the rest of the distributed
set-up from the environment (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ...).

With ``settings["cli"]`` (a list of arguments) it runs the command line instead
and writes each process's exit status to ``exit_rank<r>`` in ``settings["out"]``
(Lightning starts the other ranks as this same script, so every rank reports).
:class:`PoisonOnRank` is a callback for such runs (``class_path:
helpers.ddp.PoisonOnRank``, with this folder on ``PYTHONPATH``).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.training import tiny_odenet  # noqa: E402
from irnet.datamodules import SineRegression  # noqa: E402
from irnet.module import ImplicitNetModule  # noqa: E402
from irnet.nets.warm_start import WarmStartCache  # noqa: E402
from irnet.perturbations import GaussianPerturbation  # noqa: E402
from irnet.regularizers import FixedPointRegularizer, PerturbationRegularizer  # noqa: E402

SIGMA = 0.1


class RecordingNoise(GaussianPerturbation):
    """Gaussian noise that keeps what it draws (to check each rank's streams)."""

    def __init__(self, sigma: float) -> None:
        super().__init__(sigma)
        self.drawn: list[torch.Tensor] = []

    def noise(self, x, generator=None):
        eps = super().noise(x, generator)
        self.drawn.append(eps.detach().clone())
        return eps


class DrawMask(Callback):
    """Draws a dropout mask from the default generator when training starts (to compare ranks)."""

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None

    def on_train_start(self, trainer, pl_module):
        self.mask = torch.nn.functional.dropout(torch.ones(256), 0.5, training=True) > 0


class PoisonOnRank(Callback):
    """Fills a named parameter with NaN on one rank, before the forward of training step ``step``.

    Only that rank's replica is poisoned (DDP keeps replicas equal through their
    gradients, not by copying weights), as a fault of one device would.
    """

    def __init__(self, name: str, rank: int = 1, step: int = 2) -> None:
        self.name, self.rank, self.step = name, rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                dict(pl_module.named_parameters())[self.name].fill_(float("nan"))


def make_module(r_rnd: bool, ensemble: int = 1) -> ImplicitNetModule:
    """The same initial weights on every process; R_fp with a fixed K (exact under any split);
    ``ensemble`` members (seeds 0, 1, …) where it is above 1."""
    reg = (
        PerturbationRegularizer(weight=0.1, streams=2, seed=5, perturbation=RecordingNoise(SIGMA))
        if r_rnd
        else None
    )
    return ImplicitNetModule(
        tiny_odenet(layers=2, width=8, seed=0, ensemble=ensemble),
        lr=1e-2,
        r_fp=FixedPointRegularizer(weight=0.01, iterations=3),
        r_rnd=reg,
    )


def step_losses(log_dir: Path) -> list[float]:
    """``train/loss_step`` per step from a CSVLogger's metrics.csv."""
    with open(log_dir / "metrics.csv") as handle:
        return [
            float(row["train/loss_step"])
            for row in csv.DictReader(handle)
            if row.get("train/loss_step")
        ]


def run(settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Fit as ``settings`` say; return (and on rank 0 save) what the tests compare."""
    torch.set_num_threads(1)
    out = Path(settings["out"])
    module = make_module(settings.get("r_rnd", False), settings.get("ensemble", 1))
    if settings.get("warm_start"):
        module.net.warm_start_cache = WarmStartCache()
    masks = DrawMask()
    data = SineRegression(
        num_points=settings.get("num_points", 51), batch_size=settings.get("batch_size"), seed=3
    )
    logger = CSVLogger(str(out), name="csv", version=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=settings["epochs"],
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[masks] if settings.get("masks") else [],
        **settings.get("trainer", {}),
    )
    trainer.fit(module, data)
    if settings.get("checkpoint"):
        trainer.save_checkpoint(
            out / "last.ckpt"
        )  # on every rank: Lightning's checkpoints are collective
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    reg = module.r_rnd
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "metrics": metrics,
        "state": {k: v.detach().clone() for k, v in module.named_parameters()},
        "noise": [] if reg is None else reg.perturbation.drawn,
        "mask": masks.mask,
        "cache": module.net.warm_start_cache.state_dict() if settings.get("warm_start") else None,
    }
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    trainer.strategy.barrier()
    if trainer.global_rank == 0:
        result["losses"] = step_losses(out / "csv" / "version_0")
        torch.save(result, out / "rank0.pt")
    return result


def run_cli(settings: dict[str, Any]) -> None:
    """``irnet`` with ``settings["cli"]``; writes this process's exit status to ``exit_rank<r>``."""
    from irnet.cli import main

    try:
        main(settings["cli"])
        code: Any = 0
    except SystemExit as stop:
        code = stop.code
    except BaseException as err:  # noqa: BLE001  (recorded, then raised as it came)
        code = type(err).__name__
        raise
    finally:
        rank = os.environ.get("LOCAL_RANK", "0")
        (Path(settings["out"]) / f"exit_rank{rank}").write_text(str(code))
    sys.exit(code)


if __name__ == "__main__":
    given = json.loads(Path(sys.argv[1]).read_text())
    if "cli" in given:
        run_cli(given)
    else:
        run(given)
