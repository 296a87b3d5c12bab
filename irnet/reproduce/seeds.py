"""``python -m irnet reproduce seeds --config C --seeds N``: one config over many seeds.

Every seed is trained exactly as ``python -m irnet fit --config C
--seed_everything s [--KEY=VALUE …]`` would train it (the same LightningCLI
parsing, so ``--set model.init_args.lr=0.1`` means ``--model.init_args.lr=0.1``),
with what only costs time switched off: the monitoring callbacks
(:data:`MONITORS`; PerturbationStreams stays when R_rnd is on, because it then
owns R_rnd's noise), both ModelCheckpoint callbacks (one ``last.ckpt`` is
written when the fit ends instead), the progress bar and the model summary.
A TensorBoard log per seed goes to ``<log-dir>/<label>/seed<s>``.

Per seed the study records the final and best validation loss (and accuracy
for classification), the final training loss, the epochs run, whether the run
failed (an exception such as a NaN stop, non-finite final losses or weights,
or a stop before the last epoch: a failed run is a result, not a crash of the
study), forward iterations per layer (mean over the run and over its last
10 % of epochs), unconverged and diverged forward solves, and wall time.
See docs/seeds.md for the columns.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import operator
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from irnet.reproduce._logged import as_logged

DEFAULT_SEEDS = 10
TINY_EPOCHS = 3
TINY_SEEDS = 2
MONITORS = (
    "SolverStatistics",
    "GradientMagnitudes",
    "StabilityMonitor",
    "Figures",
    "PerturbationStreams",
)
TENSORBOARD = "pytorch_lightning.loggers.TensorBoardLogger"
# the studies that train their seeds as ensembles (--no-ensemble applies to them)
ENSEMBLE_STUDIES = ("seeds", "ex1")


# -- arguments -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    """``metric op threshold``: whether a seed reached a target, e.g. ``val/loss<=0.12``.

    Attributes:
        text: the criterion as written.
        key: the result's field it reads (``final_val_loss``, ``best_val_acc`` …).
        op: one of ``<=``, ``<``, ``>=``, ``>``.
        threshold: the number compared with.
    """

    text: str
    key: str
    op: str
    threshold: float

    def met(self, result: dict) -> bool:
        """Whether ``result`` meets it. A failed run never meets a criterion on its final value;
        ``min(…)``/``max(…)`` count what it reached before it failed. NaN never meets one."""
        if result.get("failed") and self.key.startswith("final_"):
            return False
        value = result.get(self.key)
        return (
            value is not None
            and not math.isnan(value)
            and _OPS[self.op](as_logged(value), as_logged(self.threshold))
        )


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}
# Criterion metric → the result's field: the final value, or the best over the run.
METRICS = {
    "val/loss": "final_val_loss",
    "val/acc": "final_val_acc",
    "train/loss": "final_train_loss",
    "min(val/loss)": "best_val_loss",
    "max(val/acc)": "best_val_acc",
    # how far the run ended from its best: a run that passes its best and wanders off
    "drop(val/acc)": "final_val_acc_drop",  # best − final accuracy
    "rise(val/loss)": "final_val_loss_rise",  # final / best loss − 1
}
_CRITERION = re.compile(r"^\s*(?P<metric>\S+?)\s*(?P<op><=|>=|<|>)\s*(?P<value>\S+)\s*$")


def parse_criterion(text: str) -> Criterion:
    """Parse ``--criterion``: ``metric op number``, e.g. ``val/loss<=0.12``, ``max(val/acc)>=0.95``.

    Raises:
        ValueError: naming ``--criterion``, the allowed metrics and operators.
    """
    match = _CRITERION.match(text or "")
    allowed = (
        f"metric one of {', '.join(METRICS)}; operator one of {', '.join(_OPS)}; "
        "then a finite number, e.g. val/loss<=0.12"
    )
    if not match:
        raise ValueError(f"--criterion must be 'metric operator number' ({allowed}), got {text!r}")
    metric, op, value = match["metric"], match["op"], match["value"]
    if metric not in METRICS:
        raise ValueError(f"--criterion: unknown metric {metric!r} ({allowed})")
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"--criterion: threshold {value!r} is not a number ({allowed})") from None
    if not math.isfinite(threshold):
        raise ValueError(f"--criterion: threshold must be finite, got {value!r} ({allowed})")
    return Criterion(text.strip().replace(" ", ""), METRICS[metric], op, threshold)


def parse_stop_when(text: str) -> Criterion:
    """Parse ``--stop-when``: a criterion on the final ``val/loss`` or ``val/acc``.

    Raises:
        ValueError: naming ``--stop-when`` and what it accepts.
    """
    criterion = parse_criterion(text)
    if criterion.key not in STOP_MONITORS:
        raise ValueError(
            f"--stop-when takes a criterion on {' or '.join(STOP_MONITORS.values())}, got {text!r}"
        )
    return criterion


# ``--stop-when`` field → the logged metric that Lightning's EarlyStopping watches.
STOP_MONITORS = {"final_val_loss": "val/loss", "final_val_acc": "val/acc"}


def early_stop(criterion: Criterion) -> Any:
    """Lightning's EarlyStopping that ends the fit once ``criterion`` holds, and never otherwise."""
    from pytorch_lightning.callbacks import EarlyStopping

    mode = "min" if criterion.op in ("<=", "<") else "max"
    return EarlyStopping(
        monitor=STOP_MONITORS[criterion.key],
        mode=mode,
        patience=10**9,
        stopping_threshold=criterion.threshold,
        check_finite=False,
    )


def parse_set(text: str) -> tuple[str, str]:
    """Parse one ``--set KEY=VALUE`` (a dotted LightningCLI key, e.g. ``model.init_args.lr=0.1``).

    Raises:
        ValueError: naming ``--set`` when ``=`` or the key is missing or the key starts with ``-``.
    """
    key, sep, value = (text or "").partition("=")
    key = key.strip()
    if not sep or not key or key.startswith("-"):
        raise ValueError(
            f"--set must be KEY=VALUE with a dotted config key without leading dashes, "
            f"e.g. model.init_args.lr=0.1 or model.init_args.r_fp=null; got {text!r}"
        )
    return key, value


def _argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    convert.__name__ = parse.__name__
    return convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The seed study's own options (the shared ones are in :func:`irnet.reproduce.parser`)."""
    g = p.add_argument_group("seeds study")
    g.add_argument("--config", type=Path, help="seeds: the fit config (YAML) to train")
    g.add_argument("--first-seed", type=int, default=0, help="seeds: the first seed (default 0)")
    g.add_argument(
        "--set",
        dest="sets",
        action="append",
        type=_argtype(parse_set),
        default=[],
        metavar="KEY=VALUE",
        help="seeds: a config override, as --KEY=VALUE to fit (repeatable)",
    )
    g.add_argument(
        "--label",
        help="seeds: the run's name in tables, logs and the default --out "
        "(default: the config's stem)",
    )
    g.add_argument(
        "--criterion",
        action="append",
        type=_argtype(parse_criterion),
        default=[],
        help="seeds: a target counted over seeds, e.g. val/loss<=0.12, min(val/loss)<=0.15, "
        "max(val/acc)>=0.95 (repeatable)",
    )
    g.add_argument(
        "--stop-when",
        type=_argtype(parse_stop_when),
        help="seeds: end a seed's fit at the first validation that meets this criterion, "
        "e.g. val/loss<=0.15 (a target 'within N epochs' costs only the epochs it takes; "
        "the stop is strict: val/loss<0.15). Not a failure.",
    )
    p.add_argument(
        "--no-ensemble",
        dest="ensemble",
        action="store_false",
        help="seeds, ex1: train every seed in a run of its own (by default the seeds whose runs "
        "an ensemble reproduces exactly train as ensembles: docs/ensembles.md)",
    )
    g.add_argument(
        "--table",
        type=Path,
        help="seeds: also append the run's one-row summary to this "
        "markdown file (header written when the file is new)",
    )


def refuse_foreign(args: argparse.Namespace, error: Callable[[str], Any]) -> None:
    """Call ``error`` if the seeds study lacks ``--config`` or another study got seeds options."""
    if args.study == "seeds":
        if args.config is None:
            error("the seeds study needs --config (a fit config, e.g. configs/ex1_sine.yaml)")
        if args.config is not None and not args.config.is_file():
            error(f"--config: no such file: {args.config}")
        return
    given = [
        name
        for name, value in (
            ("--config", args.config),
            ("--set", args.sets),
            ("--label", args.label),
            ("--criterion", args.criterion),
            ("--table", args.table),
            ("--stop-when", args.stop_when),
        )
        if value
    ]
    if not getattr(args, "ensemble", True) and args.study not in ENSEMBLE_STUDIES:
        error(f"--no-ensemble applies to the {' and '.join(ENSEMBLE_STUDIES)} studies only")
    if given or args.first_seed:
        error(f"{', '.join(given) or '--first-seed'} apply to the seeds study only")


# -- one seed --------------------------------------------------------------------------------------


def cli_args(cell: dict) -> list[str]:
    """The LightningCLI arguments that train ``cell`` as ``fit`` would (minus time-only work)."""
    logger = {
        "class_path": TENSORBOARD,
        "init_args": {
            "save_dir": cell["log_dir"],
            "name": cell["label"],
            "version": f"seed{cell.get('version', cell['seed'])}",
        },
    }
    args = ["--config", cell["config"], "--seed_everything", str(cell["seed"])]
    args += [f"--{key}={value}" for key, value in cell["sets"]]
    if cell.get("epochs"):
        args.append(f"--trainer.max_epochs={cell['epochs']}")
    if (
        cell.get("threads") is not None
    ):  # else the CLI's own policy (OMP_NUM_THREADS, else 1), as for fit
        args.append(f"--threads={cell['threads']}")
    return args + [
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger={json.dumps(logger)}",
    ]


def build(cell: dict):
    """The configured (not yet fitted) :class:`~irnet.cli.IrnetCLI` of one seed, its time-only
    callbacks removed. A mistake in the config or ``--set`` prints one line, SystemExit(2)."""
    from irnet.cli import main

    with (
        warnings.catch_warnings()
    ):  # LightningCLI warns that sys.argv (the study's own) is not parsed
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = main(cli_args(cell), run=False)
    trainer, module = cli.trainer, cli.model
    trainer.callbacks = [c for c in trainer.callbacks if not _costs_only_time(c, module)]
    return cli


def _costs_only_time(callback: Any, module: Any) -> bool:
    from pytorch_lightning.callbacks import ModelCheckpoint

    name = type(callback).__name__
    if isinstance(callback, ModelCheckpoint):
        return True
    if type(callback).__module__.startswith("irnet.callbacks") and name in MONITORS:
        owns_noise = (
            name == "PerturbationStreams"
            and "r_rnd" in getattr(module, "active_regularizers", dict)()
        )
        return not owns_noise
    return False


def run_cell(cell: dict) -> dict:
    """Train one seed (in a worker process) and return its record; never raises for a failed fit."""
    from irnet.reproduce._seed_record import SeedRecorder  # imports Lightning

    recorder, error, trainer, module = SeedRecorder(), None, None, None
    try:
        cli = build(cell)
        trainer, module = cli.trainer, cli.model
        trainer.callbacks.insert(0, recorder)  # records an epoch before a later callback can raise
        _report_epochs(trainer, members=1)
        if cell.get("stop_when"):
            trainer.callbacks.append(early_stop(parse_criterion(cell["stop_when"])))
        _clear_old_run(Path(trainer.logger.log_dir))
        trainer.fit(module, datamodule=cli.datamodule)
    except (Exception, SystemExit) as err:  # SystemExit: a configuration error reported by the CLI
        if type(err).__name__ == "SIGTERMException":
            # the study was asked to stop (Lightning turns SIGTERM into this): not a seed's result
            raise
        error = f"{type(err).__name__}: {err}".strip()[:500]
    record = recorder.record(
        max_epochs=trainer.max_epochs if trainer is not None else cell.get("epochs")
    )
    record["checkpoint"] = _save_checkpoint(trainer)
    record["error"] = error or _silent_failure(record, module, cell.get("stop_when"))
    record["failed"] = record["error"] is not None
    return record


def run_ensemble_cell(cell: dict) -> dict:
    """Train the seeds ``cell["seeds"]`` as one ensemble (in a worker process); ``{"members":
    [record per seed]}``, each record as :func:`run_cell` gives a seed of its own."""
    from irnet.reproduce._seed_ensemble import EnsembleSeedRecorder

    seeds = cell["seeds"]
    recorder, error, trainer, module = EnsembleSeedRecorder(seeds), None, None, None
    try:
        cli = build(cell)
        trainer, module = cli.trainer, cli.model
        trainer.callbacks.insert(0, recorder)
        _report_epochs(trainer, members=len(seeds))
        _clear_old_run(Path(trainer.logger.log_dir))
        trainer.fit(module, datamodule=cli.datamodule)
    except (Exception, SystemExit) as err:
        if type(err).__name__ == "SIGTERMException":
            raise
        error = f"{type(err).__name__}: {err}".strip()[:500]
    max_epochs = trainer.max_epochs if trainer is not None else cell.get("epochs")
    checkpoint = _save_checkpoint(trainer)
    stopped = getattr(getattr(module, "stopped_members", None), "stopped", {})
    records = recorder.records(max_epochs)
    for member, (seed, record) in enumerate(zip(seeds, records)):
        record.update(seed=seed, checkpoint=checkpoint, member=member, ensemble=len(seeds))
        if member in stopped:
            record["error"] = f"member stopped ({stopped[member]})"
        else:
            record["error"] = error or _member_failure(record, cell.get("stop_when"))
        record["failed"] = record["error"] is not None
    return {"members": records}


def _report_epochs(trainer: Any, members: int) -> None:
    """Report this fit's epochs to the study's bar (:mod:`irnet.reproduce._epoch_progress`)."""
    from irnet.reproduce._epoch_progress import reporter

    callback = reporter(members)
    if callback is not None:
        trainer.callbacks.append(callback)


def _member_failure(record: dict, stop_when: Optional[str]) -> Optional[str]:
    """:func:`_silent_failure` for one member of an ensemble (its weights are checked by the
    module: a member with non-finite weights has stopped)."""
    return _silent_failure(record, None, stop_when)


def _clear_old_run(log_dir: Path) -> None:
    """Remove an earlier run's event files and checkpoint from this seed's folder (TensorBoard
    would otherwise show both runs' curves)."""
    for old in [*log_dir.glob("events.out.tfevents.*"), log_dir / "last.ckpt"]:
        if old.is_file():
            old.unlink()


def _save_checkpoint(trainer: Any) -> Optional[str]:
    """``last.ckpt`` beside the seed's TensorBoard log (the state the fit ended in), or None."""
    if trainer is None or trainer.logger is None or trainer.lightning_module is None:
        return None
    path = Path(trainer.logger.log_dir) / "last.ckpt"
    try:
        trainer.save_checkpoint(path)
    except Exception:  # a fit broken half-way may not be savable; the record says what happened
        return None
    return str(path)


def _silent_failure(record: dict, module: Any, stop_when: Optional[str] = None) -> Optional[str]:
    """Why a fit that raised nothing failed (non-finite losses or weights, an early stop other
    than ``--stop-when``'s), or None."""
    if module is not None and not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
        return "non-finite weights at the end"
    for key in ("final_train_loss", "final_val_loss"):
        if record[key] is not None and not math.isfinite(record[key]):
            return f"{key} is {record[key]}"
    if stop_when and parse_criterion(stop_when).met(record):
        return None
    if record["epochs_run"] < (record["max_epochs"] or 0):
        return f"stopped after {record['epochs_run']} of {record['max_epochs']} epochs"
    return None


# -- the study -------------------------------------------------------------------------------------


def cells(args: argparse.Namespace, log_dir: Path, label: str) -> list[dict]:
    """One cell per seed."""
    count = args.seeds or (TINY_SEEDS if args.tiny else DEFAULT_SEEDS)
    epochs = args.epochs or (TINY_EPOCHS if args.tiny else None)  # None: the config's max_epochs
    return [
        {
            "seed": seed,
            "config": str(args.config),
            "sets": [list(s) for s in args.sets],
            "epochs": epochs,
            "label": label,
            "log_dir": str(log_dir),
            "threads": args.threads,
            "stop_when": args.stop_when.text if args.stop_when else None,
        }
        for seed in range(args.first_seed, args.first_seed + count)
    ]


def as_ensembles(cell_list: Sequence[dict], workers: int) -> list[dict]:
    """The seeds' cells as ensembles of consecutive seeds, one per worker (each trained by
    ``--model.net.init_args.ensemble E --seed_everything`` its first seed)."""
    from irnet.reproduce._seed_ensemble import group_seeds

    first, by_seed = cell_list[0], {c["seed"]: c for c in cell_list}
    out = []
    for seeds in group_seeds(sorted(by_seed), workers):
        if len(seeds) == 1:  # a seed alone trains as its own run
            out.append(by_seed[seeds[0]])
            continue
        sets = [*first["sets"], ["model.net.init_args.ensemble", str(len(seeds))]]
        version = f"{seeds[0]}-{seeds[-1]}"
        out.append({**first, "seed": seeds[0], "seeds": seeds, "sets": sets, "version": version})
    return out


def _run_any(cell: dict) -> dict:
    """A seed's cell, or an ensemble's (:func:`run_ensemble_cell`)."""
    return run_ensemble_cell(cell) if "seeds" in cell else run_cell(cell)


def run_seeds(cell_list: Sequence[dict], workers: int, threads: Any = None) -> list[dict]:
    """Train every cell on ``workers`` processes, a line per finished seed; sorted by seed.

    A cell of an ensemble gives its members' records (its time shared out between them)."""
    from tqdm import tqdm

    from irnet.reproduce._epoch_progress import EpochBar, install
    from irnet.reproduce._runner import Timed, quiet_worker

    timed = Timed(_run_any)
    results: list[dict] = []
    bar = tqdm(total=sum(len(c.get("seeds", [c["seed"]])) for c in cell_list), desc="seeds")

    def done(result: dict) -> None:
        members = result.pop("members", None)
        records = [result] if members is None else [_member_record(result, m) for m in members]
        for record in records:
            results.append(record)
            bar.write(progress_line(record))
            bar.update()

    if workers <= 1:
        quiet_worker(threads)
        with EpochBar() as epochs:
            install(epochs.reports)
            try:
                for cell in cell_list:
                    done(timed(cell))
            finally:
                install(None)
    else:
        context = multiprocessing.get_context(
            "spawn"
        )  # fork would copy Lightning's and torch's threads
        with (
            EpochBar(context.Queue()) as epochs,
            context.Pool(
                min(workers, len(cell_list)),
                initializer=_reporting_worker,
                initargs=(threads, epochs.reports),
            ) as pool,
        ):
            for result in pool.imap_unordered(timed, cell_list):
                done(result)
    bar.close()
    return sorted(results, key=lambda r: r["seed"])


def _reporting_worker(threads: Any, reports: Any) -> None:
    """A worker as :func:`~irnet.reproduce._runner.quiet_worker` makes it, reporting its
    epochs to the study's bar."""
    from irnet.reproduce._epoch_progress import install
    from irnet.reproduce._runner import quiet_worker

    quiet_worker(threads)
    install(reports)


def _member_record(cell_result: dict, member: dict) -> dict:
    """One seed's record from its ensemble's: the cell's settings, its own numbers, and the
    ensemble's wall time shared equally (``ensemble_seconds`` keeps the whole)."""
    seeds = cell_result["seeds"]
    shared = {k: v for k, v in cell_result.items() if k not in ("seeds", "seconds", "version")}
    return {
        **shared,
        **member,
        "seconds": cell_result["seconds"] / len(seeds),
        "ensemble_seconds": cell_result["seconds"],
    }


def progress_line(r: dict) -> str:
    """One line for a finished seed."""
    from irnet.reproduce._seed_report import num

    acc = (
        f", val/acc {num(r['final_val_acc'])}"
        if not math.isnan(r.get("final_val_acc") or math.nan)
        else ""
    )
    state = f"FAILED ({r['error']})" if r["failed"] else "ok"
    return (
        f"seed {r['seed']}: val/loss {num(r['final_val_loss'])} "
        f"(best {num(r['best_val_loss'])}){acc}, "
        f"{r['epochs_run']} epochs, {r['seconds']:.0f} s, {state}"
    )


def main(args: argparse.Namespace, command: str) -> Path:
    """Run the study (or redraw it with ``--replot``); returns the path of ``summary.md``."""
    from irnet.cli.threads import resolve_threads
    from irnet.reproduce._runner import save_results
    from irnet.reproduce._summary import machine, saved_run

    label = args.label or args.config.stem
    out = args.out or Path("reproduce") / "seeds" / label
    log_dir = args.log_dir or Path("runs") / "reproduce" / "seeds"
    saved = log_dir / label
    start = time.perf_counter()
    if args.replot:
        meta, results = saved_run(saved)
    else:
        cell_list = cells(args, log_dir, label)
        if use_ensembles(args, check_config(args, log_dir, label), len(cell_list)):
            cell_list = as_ensembles(cell_list, args.workers)
        results = run_seeds(cell_list, args.workers, args.threads)
        meta = {
            "command": command,
            "ensembles": [len(c["seeds"]) for c in cell_list if "seeds" in c],
            "machine": machine(args.workers, resolve_threads(args.threads)),
            "minutes": (time.perf_counter() - start) / 60,
            "finished": _utc_now(),
            "config": str(args.config),
            "sets": ["=".join(s) for s in args.sets],
            "label": label,
            "criteria": [c.text for c in args.criterion],
            "stop_when": args.stop_when.text if args.stop_when else None,
            "switched_off": switched_off(),
        }
        saved.mkdir(parents=True, exist_ok=True)
        (saved / "cells.json").write_text(
            json.dumps({"meta": meta, "cells": results}, default=float)
        )
    criteria = [parse_criterion(text) for text in meta["criteria"]]
    from irnet.reproduce._seed_report import figure, render, table_row

    figures = [
        figure(
            results, criteria, out / f"seeds_{label}.png", title=f"{label}: {len(results)} seeds"
        )
    ]
    save_results(out, results, meta)
    summary = out / "summary.md"
    summary.write_text(render(meta, results, criteria, figures, out))
    if args.table:
        append_row(args.table, table_row(meta, results, criteria))
    failed = sum(r["failed"] for r in results)
    print(
        f"seeds: {len(results)} runs ({failed} failed) in {meta['minutes']:.1f} min; see {summary}"
    )
    return summary


def use_ensembles(args: argparse.Namespace, module: Any, seeds: int) -> bool:
    """Whether the seeds train as ensembles: not switched off, more than one seed, no
    ``--stop-when`` (it would stop every member at once), and a network whose seeds an ensemble
    trains exactly (:func:`~irnet.reproduce._seed_ensemble.can_ensemble`)."""
    from irnet.reproduce._seed_ensemble import can_ensemble

    return args.ensemble and seeds > 1 and not args.stop_when and can_ensemble(module)


def check_config(args: argparse.Namespace, log_dir: Path, label: str) -> Any:
    """Build the first seed's run in this process, so a mistake in ``--config``/``--set`` ends the
    study with the CLI's one-line message before any worker starts; returns its module."""
    import logging

    cell = cells(args, log_dir, label)[0]
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the Trainer's banners, once more from every worker
    try:
        return build(cell).model
    finally:
        logger.setLevel(level)


def switched_off() -> str:
    """What the study switches off, in words (for summary.md)."""
    return (
        f"{', '.join(MONITORS)} "
        "(PerturbationStreams kept when R_rnd is on: it owns R_rnd's noise), "
        "ModelCheckpoint and last_checkpoint (one last.ckpt is saved at the end), progress bar, "
        "model summary"
    )


def append_row(path: Path, row: tuple[str, str]) -> None:
    """Append a markdown table row to ``path`` (the header first if the file is new or empty)."""
    header, line = row
    new = not path.is_file() or not path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write((header + "\n" if new else "") + line + "\n")


def _utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
