"""``python -m irnet fit|validate|test|predict --config …``: LightningCLI for irnet
(``python -m irnet reproduce …`` is dispatched by :mod:`irnet.__main__` to :mod:`irnet.reproduce`).

The model is an :class:`~irnet.module.ImplicitNetModule` (or a subclass named by
``model.class_path``), the data any LightningDataModule named by
``data.class_path``. Defaults set here: a TensorBoard logger writing to
``runs/<name>/version_<n>`` in the working directory (``<name>`` is the config
file's stem, else the data module's class name), a ``checkpoint``
ModelCheckpoint keeping the best checkpoint on ``val/loss``, a
``last_checkpoint`` writing ``last.ckpt`` after every epoch (for ``--ckpt_path``),
and for ``predict`` a ``prediction_writer`` saving ``predictions.pt`` in the run
directory. ``--threads`` / ``threads:`` sets torch's threads (:mod:`irnet.cli.threads`;
default one per process).

Mistakes (a bad value, an unknown key or class, an unreadable config or
checkpoint, a resume whose settings contradict the checkpoint) end the run with
one line naming the key and exit status 2 (:mod:`irnet.cli.errors`;
``IRNET_TRACEBACK=1`` shows the traceback). Options must be spelled out in full.
Usage lines name the program ``irnet``, however it was started; Lightning's advertisements
(litlogger, litmodels) and a deprecation warning from its own code are held back while the
command runs (:mod:`irnet.cli.quiet`).
"""

from __future__ import annotations

import copy
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Optional, Union

from pytorch_lightning import LightningDataModule
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from irnet.callbacks.prediction_writer import PredictionWriter
from irnet.cli.checks import (
    check_checkpoint,
    check_config_file,
    check_data_fits_model,
    check_strategy,
    config_files,
    model_conflicts,
    refuse_conflicts,
)
from irnet.cli.errors import CliError, flatten, report, summarize
from irnet.cli.nulls import spell_nested_nulls
from irnet.cli.quiet import quiet_notices
from irnet.cli.threads import apply_threads, check_threads
from irnet.failure import TrainingFailure
from irnet.module import ImplicitNetModule

LOG_DIR = "runs"
TENSORBOARD = "pytorch_lightning.loggers.TensorBoardLogger"
DESCRIPTION = (
    "irnet: implicit residual networks. Subcommands: fit, validate, test, predict "
    "(LightningCLI: python -m irnet fit --help) and reproduce (the paper's studies: "
    "python -m irnet reproduce --help) and extract-member (one member of an ensemble "
    "checkpoint: python -m irnet extract-member --help)."
)
EPILOG = (
    "reproduce   python -m irnet reproduce {stability,ex1,ex2,robustness} [--tiny] …: "
    "run one of the paper's studies end to end (see python -m irnet reproduce --help). "
    "extract-member   python -m irnet extract-member CKPT --member K --out OUT.ckpt: member K "
    "of an ensemble checkpoint as a single network's checkpoint"
)


class LastCheckpoint(ModelCheckpoint):
    """Overwrites ``last.ckpt`` with the state after every ``every_n_epochs``-th epoch.

    (``ModelCheckpoint(save_last=True)`` alone refreshes ``last.ckpt`` only when
    the monitored checkpoint improves, so resuming from it could go back in time.)

    Args:
        dirpath: directory; default ``<log_dir>/checkpoints``.
        every_n_epochs: epochs between saves.
    """

    def __init__(self, dirpath: Optional[str] = None, every_n_epochs: int = 1) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            every_n_epochs=every_n_epochs,
            enable_version_counter=False,
        )


class IrnetCLI(LightningCLI):
    """LightningCLI with irnet's defaults, thread policy, input checks and one-line errors."""

    threads: int = 0  # torch threads the run uses (set before the classes are built)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--threads",
            type=Optional[Union[int, str]],
            default=None,
            help="torch intra-op threads: an integer, 'auto' (torch's default), or unset: "
            "OMP_NUM_THREADS if set, else 1 (docs/training.md, Threads)",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.filename": "best-epoch={epoch}-step={step}",
                "checkpoint.auto_insert_metric_name": False,
                # full-batch toy sets take one step per epoch: log every step
                "trainer.log_every_n_steps": 1,
                "trainer.logger": {
                    "class_path": TENSORBOARD,
                    "init_args": {"save_dir": LOG_DIR, "name": None},
                },
            }
        )

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        argv = args if isinstance(args, (list, tuple)) else sys.argv[1:] if args is None else []
        for path in config_files(list(argv)):
            check_config_file(path)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise CliError(summarize(str(err), options=self._option_names())) from err

    def _option_names(self) -> list[str]:
        parsers = [self.parser, *getattr(self, "_subcommand_parsers", {}).values()]
        return sorted(
            {s.lstrip("-") for p in parsers for s in p._option_string_actions if s.startswith("--")}
        )

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        path = self.config[subcommand].get("ckpt_path")
        if check_checkpoint(path) is None:
            return
        requested = copy.deepcopy(self.config[subcommand].get("model"))
        try:
            super()._parse_ckpt_path()
        except (ArgumentError, SystemExit) as err:
            raise CliError(
                f"ckpt_path {path}: its saved hyperparameters do not fit this config's model: "
                f"{summarize(str(err))}"
            ) from err
        refuse_conflicts(model_conflicts(requested, self.config[subcommand].get("model")), path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        try:
            self.threads = apply_threads(check_threads(config.get("threads")))
        except ValueError as err:
            raise CliError(f"threads: {err}") from err
        logger = config.get("trainer.logger")
        if _is_tensorboard(logger) and logger.init_args.get("name") is None:
            logger.init_args.name = run_name(config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except CliError:
            raise
        except Exception as err:  # a constructor's ValueError, a MisconfigurationException …
            config = self.config[self.subcommand] if self.subcommand else self.config
            kind = "" if isinstance(err, ValueError) else f"{type(err).__name__}: "
            raise CliError(kind + summarize(str(err), config=flatten(config))) from err
        check_strategy(self.trainer)

    def _run_subcommand(self, subcommand: str) -> None:
        check_data_fits_model(self.model, self.datamodule, subcommand)
        super()._run_subcommand(subcommand)


def _is_tensorboard(logger: Any) -> bool:
    return getattr(logger, "class_path", None) in (
        TENSORBOARD,
        "lightning.pytorch.loggers.TensorBoardLogger",
    )


def run_name(config: Any) -> str:
    """The run's name: the stem of its (last) config file, else the data module's class name."""
    files = [f for f in (config.get("config") or []) if f is not None]
    if files:
        return Path(str(files[-1])).stem
    data = config.get("data")
    class_path = getattr(data, "class_path", None) if data is not None else None
    return class_path.rsplit(".", 1)[-1].lower() if class_path else "irnet"


def main(args: ArgsType = None, run: bool = True) -> Optional[LightningCLI]:
    """Run LightningCLI's ``fit``, ``validate``, ``test`` or ``predict``.

    Returns the finished :class:`IrnetCLI`. A mistake in the command line or config, or a
    :class:`~irnet.failure.TrainingFailure`, raises ``SystemExit(2)`` after one line on stderr.
    (``python -m irnet reproduce …`` is dispatched before this, by :mod:`irnet.__main__`.)
    """
    if args is None:  # rewritten in place: LightningCLI warns when given args beside sys.argv
        sys.argv[1:] = spell_nested_nulls(sys.argv[1:])
    elif isinstance(args, (list, tuple)):
        args = spell_nested_nulls(args)
    try:
        with quiet_notices():
            return IrnetCLI(
                ImplicitNetModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={
                    "prog": "irnet",
                    "allow_abbrev": False,
                    "exit_on_error": False,
                    "description": DESCRIPTION,
                    "epilog": EPILOG,
                },
                args=args,
                run=run,
            )
    except (CliError, TrainingFailure) as err:  # both are reported as one line
        report(err)


def console_main() -> int:
    """``main()`` on ``sys.argv``: exit status 0 after a successful run."""
    main()
    return 0
