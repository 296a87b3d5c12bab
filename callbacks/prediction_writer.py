"""``python -m irnet predict``: predictions saved in the run directory, and the path printed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from irnet.nets.ensemble import rows_of

from ._data import module_members


class PredictionWriter(BasePredictionWriter):
    """Saves all predictions of a ``predict`` run with ``torch.save`` after the last batch.

    The file holds ``{"predictions": tensor, "batch_indices": [[int] per batch]}`` (batches
    concatenated along the first dimension; a list when they cannot be), one
    entry per dataloader when there are several. Under DDP each rank writes its
    own ``<stem>-rank<r>.pt``.

    Ensembles (``ODENet(ensemble=E)``): the network answers every sample once per member, so
    each prediction tensor has the member first, ``(E, samples, …)``: ``predictions[k, n]``
    is member k's output for sample n (the rows ``n · E + k`` of the network's output), and
    the file also holds ``"members": E``. A single network's file is as before, ``(samples,
    …)`` without ``"members"``.

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
        members = module_members(pl_module)
        several = bool(predictions) and isinstance(predictions[0], list)
        if several:  # one list of batches per dataloader
            payload = {
                "predictions": [_concat(p, members) for p in predictions],
                "batch_indices": list(batch_indices),
            }
        else:  # Lightning nests the batch indices per dataloader even for one
            indices = (
                batch_indices[0]
                if len(batch_indices) == 1 and _nested(batch_indices[0])
                else batch_indices
            )
            payload = {
                "predictions": _concat(predictions, members),
                "batch_indices": list(indices),
            }
        if members > 1:
            payload["members"] = members
        torch.save(payload, self.path)
        print(f"Predictions written to {self.path}", flush=True)  # every rank says its own


def _nested(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], list)


def _concat(batches: Sequence[Any], members: int = 1) -> Any:
    """The batches concatenated along the samples; an ensemble's as ``(E, samples, …)``."""
    if batches and all(isinstance(b, torch.Tensor) for b in batches):
        tensors = [_by_member(b.detach().cpu(), members) for b in batches]
        try:
            return torch.cat(tensors, dim=0 if members == 1 else 1)
        except RuntimeError:  # batches of different trailing shapes
            return tensors if members > 1 else list(batches)
    return list(batches)


def _by_member(rows: torch.Tensor, members: int) -> torch.Tensor:
    """An ensemble's sample-major output rows as ``(E, batch, …)`` (a single network's as
    they are)."""
    if members == 1:
        return rows
    if rows.dim() == 0 or rows.shape[0] % members:
        raise ValueError(
            f"PredictionWriter: the ensemble of {members} members returned {tuple(rows.shape)}, "
            f"not {members} rows per sample; write predictions of (batch · {members}, …) rows"
        )
    return rows_of(rows, members).contiguous()
