"""Where monitoring output goes: TensorBoard (rank 0 only), metrics of any logger, PNG files.

Nothing here calls a collective: ``trainer.log_dir`` (which broadcasts) is
avoided, so rank 0 may call these on its own under DDP.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import Tensor


def tensorboard_writer(trainer: pl.Trainer):
    """The ``SummaryWriter`` of the first TensorBoardLogger on rank 0, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def output_dir(trainer: pl.Trainer) -> Path:
    """The first logger's ``log_dir`` (or ``save_dir``), else ``trainer.default_root_dir``."""
    for logger in trainer.loggers:
        directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if directory:
            return Path(directory)
    return Path(trainer.default_root_dir)


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Scalars to every logger at the current global step, on rank 0 only (no syncing)."""
    if not trainer.is_global_zero or not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


def member_scalars(tag: str, values: Tensor) -> dict[str, float]:
    """``{tag}/member_<k>`` for each member's value and ``{tag}/std``, their spread.

    The spread is the sample standard deviation over members, as the module's
    ``{stage}/loss/std``.
    """
    values = values.detach().float().cpu()
    scalars = {f"{tag}/member_{k}": float(v) for k, v in enumerate(values)}
    if len(values) > 1:
        scalars[f"{tag}/std"] = float(values.std())
    return scalars


def add_histogram(trainer: pl.Trainer, tag: str, values: Tensor) -> None:
    """A histogram of the finite ``values`` to TensorBoard (rank 0), if any."""
    writer = tensorboard_writer(trainer)
    if writer is None:
        return
    values = values.detach().float().cpu().flatten()
    values = values[torch.isfinite(values)]
    if values.numel():
        writer.add_histogram(tag, values, global_step=trainer.global_step)


def emit_figure(
    trainer: pl.Trainer, tag: str, fig: Figure, save_png: bool, epoch: int, dpi: int = 100
) -> Optional[Path]:
    """Send ``fig`` to TensorBoard as image ``tag`` and, if asked, save it as a PNG.

    The PNG goes to ``<log_dir>/figures/<tag>_epoch<NNNN>.png`` (``/`` in the tag
    becomes ``_``; ``epoch`` is the 0-based epoch the figure shows). Only rank 0
    writes.

    Returns:
        The PNG's path, or None when none was written.
    """
    if not trainer.is_global_zero:
        return None
    writer = tensorboard_writer(trainer)
    if writer is None and not save_png:
        return None
    rgba = render(fig, dpi)  # drawn once for both outputs: drawing dominates the cost
    if writer is not None:
        writer.add_image(tag, rgba[..., :3], global_step=trainer.global_step, dataformats="HWC")
    if not save_png:
        return None
    directory = output_dir(trainer) / "figures"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}_epoch{epoch:04d}.png"
    imsave(path, rgba)
    return path


def render(fig: Figure, dpi: int) -> np.ndarray:
    """The figure drawn by Agg at ``dpi``, as an ``(H, W, 4)`` uint8 RGBA array."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def layer_tag(group: str, name: str, index: int, layers: int) -> str:
    """``<group>/<name>/layer_<t>`` with t = index + 1 zero-padded to the network's depth."""
    return f"{group}/{name}/layer_{index + 1:0{len(str(layers))}d}"


def allow_unsynced_epoch_logs(trainer: pl.Trainer, groups: tuple[str, ...]) -> None:
    """Under DDP, silence Lightning's advice to ``sync_dist`` for our own tags in ``groups``.

    Monitoring logs each rank's own values (rank 0's reach the logger) unless
    asked to sync: a deliberate choice (no collective per value), so the advice,
    given once per tag, would only bury real warnings.
    """
    if trainer.world_size > 1:
        pattern = "|".join(re.escape(g) for g in groups)
        warnings.filterwarnings(
            "ignore",
            message=rf"It is recommended to use `self.log\('({pattern})",
            category=PossibleUserWarning,
        )
