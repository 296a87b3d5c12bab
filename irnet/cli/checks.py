"""Checks run before anything trains; each raises :class:`CliError` naming the culprit.

* config files: exist, parse as YAML, hold a mapping;
* ``--ckpt_path``: an existing, readable Lightning checkpoint;
* a resumed checkpoint against the model the config asks for (conflicts are refused);
* the strategy: multiprocessing launchers (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) refused;
* data against model: one batch through a copy of the model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from irnet.cli.errors import CliError, cli_key, flatten

# ckpt_path values Lightning resolves itself
SPECIAL_CKPT = ("last", "best", "hpc", "registry")


def config_files(argv: Sequence[str]) -> list[str]:
    """The values of ``--config`` / ``-c`` in ``argv`` (both ``--config X`` and ``--config=X``)."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_file(path: str) -> None:
    """Raise :class:`CliError` unless ``path`` is a YAML file holding a mapping of keys."""
    file = Path(path)
    if not file.is_file():
        raise CliError(f"config file {path} does not exist")
    try:
        content = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CliError(f"config file {path} is not valid YAML{where}: {problem}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"config file {path} cannot be read: {err}") from err
    if content is None:
        raise CliError(
            f"config file {path} is empty; it must hold keys such as model:, data:, trainer:"
        )
    if not isinstance(content, dict):
        raise CliError(
            f"config file {path} must hold a mapping of keys (model:, data:, trainer: …), "
            f"got a {type(content).__name__}"
        )


def check_checkpoint(path: Optional[str]) -> Optional[dict]:
    """Load ``path``'s checkpoint (None for Lightning's special values); CliError if unusable."""
    if not path or str(path) in SPECIAL_CKPT or "://" in str(path):
        return None
    file = Path(path)
    if not file.is_file():
        raise CliError(f"ckpt_path: no such checkpoint file: {path}")
    try:
        ckpt = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises EOFError, OSError, RuntimeError, UnpicklingError …
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(
            f"ckpt_path: {path} is not a readable checkpoint (corrupted or truncated?): "
            f"{type(err).__name__}: {reason[:200]}"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CliError(f"ckpt_path: {path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def model_conflicts(requested: Any, restored: Any) -> list[str]:
    """``key: checkpoint X, given Y`` for every model setting the checkpoint overrides."""
    before, after = flatten(requested, "model"), flatten(restored, "model")
    return [
        f"{cli_key(k)}: checkpoint {after.get(k)!r}, given {before[k]!r}"
        for k in sorted(before)
        if k in after and not _same(before[k], after[k])
    ]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors and other exotic values
        return repr(a) == repr(b)


def refuse_conflicts(conflicts: Sequence[str], path: str) -> None:
    """Raise :class:`CliError` listing ``conflicts`` between the config and checkpoint ``path``."""
    if conflicts:
        raise CliError(
            f"ckpt_path {path}: a resumed or evaluated checkpoint keeps its own model, optimiser "
            f"and schedule, but the config asks for other settings ({'; '.join(conflicts)}). "
            f"Give the checkpoint's values (or drop the overrides), or start a new run without "
            f"--ckpt_path."
        )


def check_strategy(trainer: Any) -> None:
    """Refuse strategies that start workers with ``multiprocessing`` (spawn/fork)."""
    from lightning_fabric.strategies.launchers.multiprocessing import (
        _MultiProcessingLauncher as FabricLauncher,
    )
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, (_MultiProcessingLauncher, FabricLauncher)):
        method = getattr(launcher, "_start_method", "spawn")
        raise CliError(
            f"trainer.strategy: strategies that start their workers with multiprocessing "
            f"(start method {method!r}: ddp_spawn, ddp_fork, ddp_notebook) are not supported: "
            f"a worker that dies (e.g. 'unable to resize file' when /dev/shm is small) leaves the "
            f"parent waiting for ever. Use --trainer.strategy ddp, which runs one process per "
            f"device and stops when any of them fails."
        )


def check_data_fits_model(model: torch.nn.Module, datamodule: Any, stage: str) -> None:
    """Run one batch of ``datamodule`` through a copy of ``model``; CliError if shapes do not fit.

    Nothing of the run changes: a deep copy sees the batch, random states are restored.
    Data modules that cannot hand out a batch before the Trainer starts are not checked.
    """
    batch = _first_batch(datamodule, stage)
    if batch is None:
        return
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(x, torch.Tensor):
        return
    x = x[:2]
    with torch.random.fork_rng(devices=[]):
        probe = copy.deepcopy(model)
        try:
            with torch.no_grad():
                pred = probe(x)
        except (RuntimeError, ValueError, IndexError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CliError(
                f"data and model do not fit: {type(datamodule).__name__} gives inputs of shape "
                f"{tuple(x.shape[1:])} per sample, and {type(probe).__name__} fails on them: "
                f"{reason[:300]} (check model.net's in_features/out_features against data)"
            ) from err
    target = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
    if (
        isinstance(target, torch.Tensor)
        and target.is_floating_point()
        and isinstance(pred, torch.Tensor)
        and pred.shape[1:] != target.shape[1:]
    ):
        raise CliError(
            f"data and model do not fit: the model outputs shape {tuple(pred.shape[1:])} per "
            f"sample, the targets of {type(datamodule).__name__} have shape "
            f"{tuple(target.shape[1:])} "
            f"(check model.net's out_features)"
        )


def _first_batch(datamodule: Any, stage: str) -> Optional[Any]:
    loader_name = {
        "fit": "train_dataloader",
        "validate": "val_dataloader",
        "test": "test_dataloader",
        "predict": "predict_dataloader",
    }.get(stage)
    if datamodule is None or loader_name is None or not hasattr(datamodule, loader_name):
        return None
    try:
        with torch.random.fork_rng(devices=[]):
            datamodule.setup(stage)
            return next(iter(getattr(datamodule, loader_name)()))
    except Exception:  # not ours to judge: Lightning reports data-module errors itself
        return None
