"""``python -m irnet fit|validate|test|predict --config …``: LightningCLI for irnet
(and ``python -m irnet reproduce …``, see :mod:`irnet.reproduce`).

The model is an :class:`~irnet.module.ImplicitNetModule` (or a subclass named by
``model.class_path``), the data any LightningDataModule named by
``data.class_path``. Defaults set here: a TensorBoard logger writing to
``runs/<name>/version_<n>`` in the working directory (``<name>`` is the config
file's stem, else the data module's class name), a ``checkpoint``
ModelCheckpoint keeping the best checkpoint on ``val/loss``, and a
``last_checkpoint`` writing ``last.ckpt`` after every epoch (for ``--ckpt_path``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning import LightningDataModule
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from irnet.module import ImplicitNetModule

LOG_DIR = "runs"
TENSORBOARD = "pytorch_lightning.loggers.TensorBoardLogger"


class LastCheckpoint(ModelCheckpoint):
    """Overwrites ``last.ckpt`` with the state after every ``every_n_epochs``-th epoch.

    (``ModelCheckpoint(save_last=True)`` alone refreshes ``last.ckpt`` only when
    the monitored checkpoint improves, so resuming from it could go back in time.)

    Args:
        dirpath: directory; default ``<log_dir>/checkpoints``.
        every_n_epochs: epochs between saves.
    """

    def __init__(self, dirpath: Optional[str] = None, every_n_epochs: int = 1) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         every_n_epochs=every_n_epochs, enable_version_counter=False)


class IrnetCLI(LightningCLI):
    """LightningCLI with irnet's logger and checkpoint defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/loss",
            "checkpoint.mode": "min",
            "checkpoint.filename": "best-epoch={epoch}-step={step}",
            "checkpoint.auto_insert_metric_name": False,
            # full-batch toy sets take one step per epoch: log every step
            "trainer.log_every_n_steps": 1,
            "trainer.logger": {"class_path": TENSORBOARD,
                               "init_args": {"save_dir": LOG_DIR, "name": None}},
        })

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.get("trainer.logger")
        if _is_tensorboard(logger) and logger.init_args.get("name") is None:
            logger.init_args.name = run_name(config)


def _is_tensorboard(logger: Any) -> bool:
    return getattr(logger, "class_path", None) in (TENSORBOARD, "lightning.pytorch.loggers.TensorBoardLogger")


def run_name(config: Any) -> str:
    """The run's name: the stem of its (last) config file, else the data module's class name."""
    files = [f for f in (config.get("config") or []) if f is not None]
    if files:
        return Path(str(files[-1])).stem
    data = config.get("data")
    class_path = getattr(data, "class_path", None) if data is not None else None
    return class_path.rsplit(".", 1)[-1].lower() if class_path else "irnet"


def main(args: ArgsType = None, run: bool = True) -> Optional[LightningCLI]:
    """Entry point of ``python -m irnet`` and the ``irnet`` console script.

    ``reproduce <study> …`` runs one of the paper's studies (:mod:`irnet.reproduce`);
    every other subcommand goes to LightningCLI.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "reproduce":
        from irnet.reproduce import main as reproduce  # imported lazily: it pulls in matplotlib

        reproduce(list(argv[1:]))
        return None
    return IrnetCLI(
        ImplicitNetModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


__all__ = ["IrnetCLI", "LastCheckpoint", "main", "run_name"]
