"""A small distributed fit, run as a script by the DDP and multi-node tests (and in-process for references).

``python tests/helpers_ddp.py SETTINGS.json`` fits ``ImplicitNetModule`` on
``SineRegression`` with the Trainer arguments in the settings and writes, to
``settings["out"]``: ``rank<r>.pt`` with the per-step training losses (from a
CSV logger on rank 0), the final weights, the validation metrics and the R_rnd
noise each rank drew. Lightning reads the rest of the distributed set-up from
the environment (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ...).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_training import tiny_odenet  # noqa: E402
from irnet.datamodules import SineRegression  # noqa: E402
from irnet.module import ImplicitNetModule  # noqa: E402
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


def make_module(r_rnd: bool) -> ImplicitNetModule:
    """The same initial weights on every process; R_fp with a fixed K (exact under any split)."""
    reg = PerturbationRegularizer(weight=0.1, streams=2, seed=5, perturbation=RecordingNoise(SIGMA)) if r_rnd else None
    return ImplicitNetModule(tiny_odenet(layers=2, width=8, seed=0), lr=1e-2,
                             r_fp=FixedPointRegularizer(weight=0.01, iterations=3), r_rnd=reg)


def step_losses(log_dir: Path) -> list[float]:
    """``train/loss_step`` per step from a CSVLogger's metrics.csv."""
    with open(log_dir / "metrics.csv") as handle:
        return [float(row["train/loss_step"]) for row in csv.DictReader(handle) if row.get("train/loss_step")]


def run(settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Fit as ``settings`` say; return (and on rank 0 save) what the tests compare."""
    torch.set_num_threads(1)
    out = Path(settings["out"])
    module = make_module(settings.get("r_rnd", False))
    data = SineRegression(num_points=settings.get("num_points", 51), batch_size=settings.get("batch_size"),
                          seed=3)
    logger = CSVLogger(str(out), name="csv", version=0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=settings["epochs"], logger=logger,
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, **settings.get("trainer", {}))
    trainer.fit(module, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    reg = module.r_rnd
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "metrics": metrics,
        "state": {k: v.detach().clone() for k, v in module.named_parameters()},
        "noise": [] if reg is None else reg.perturbation.drawn,
    }
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    trainer.strategy.barrier()
    if trainer.global_rank == 0:
        result["losses"] = step_losses(out / "csv" / "version_0")
        torch.save(result, out / "rank0.pt")
    return result


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
