"""``python -m irnet predict``: predictions saved in the run directory, and the path printed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Saves all predictions of a ``predict`` run with ``torch.save`` after the last batch.

    The file holds ``{"predictions": tensor, "batch_indices": [[int] per batch]}`` (batches
    concatenated along the first dimension; a list when they cannot be), one
    entry per dataloader when there are several. Under DDP each rank writes its
    own ``<stem>-rank<r>.pt``.

    Args:
        dirpath: folder; default the run's log directory (``runs/<name>/version_<n>``).
        filename: file name.
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = "predictions.pt") -> None:
        super().__init__(write_interval="epoch")
        self.dirpath = dirpath
        self.filename = filename
        self.path: Optional[Path] = None

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        name = Path(self.filename)
        if trainer.world_size > 1:
            name = name.with_name(f"{name.stem}-rank{trainer.global_rank}{name.suffix}")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / name
        several = bool(predictions) and isinstance(predictions[0], list)
        if several:  # one list of batches per dataloader
            payload = {
                "predictions": [_concat(p) for p in predictions],
                "batch_indices": list(batch_indices),
            }
        else:  # Lightning nests the batch indices per dataloader even for one
            indices = (
                batch_indices[0]
                if len(batch_indices) == 1 and _nested(batch_indices[0])
                else batch_indices
            )
            payload = {"predictions": _concat(predictions), "batch_indices": list(indices)}
        torch.save(payload, self.path)
        print(f"Predictions written to {self.path}", flush=True)  # every rank says its own


def _nested(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], list)


def _concat(batches: Sequence[Any]) -> Any:
    if batches and all(isinstance(b, torch.Tensor) for b in batches):
        try:
            return torch.cat([b.detach().cpu() for b in batches])
        except RuntimeError:  # batches of different trailing shapes
            pass
    return list(batches)
