"""Running a study's cells (one configuration × one seed each) in parallel, and summarising them.

A study is a list of cells; each cell is a plain dict handed to a picklable
function in a worker process (one torch thread each by irnet's thread policy,
:mod:`irnet.cli.threads`, so two workers fill two cores without oversubscription).
Cells train with :func:`train`, a Lightning fit that writes TensorBoard logs
and records every epoch's metrics in a :class:`History`. Results come back as
plain dicts (floats and lists), are saved as JSON and summarised as mean ±
standard deviation over seeds. With ``backend="ray"`` the cells run as the tasks of a Ray
cluster instead (:mod:`irnet.reproduce._ray_backend`, docs/distributed.md); this process
records their results all the same.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from tqdm import tqdm

from irnet.callbacks import GradientMagnitudes, SolverStatistics
from irnet.cli.threads import ThreadsSetting, apply_threads
from irnet.failure import TrainingFailure
from irnet.reproduce._journal import Journal, cell_key
from irnet.reproduce._lean_history import LeanHistory

# Per-epoch values recorded by History (Lightning's epoch-aggregated names).
HISTORY_KEYS = {
    "train_loss": "train/loss",
    "val_loss": "val/loss",
    "train_acc": "train/acc",
    "val_acc": "val/acc",
    "forward_iterations": "solver/forward_iterations_mean_epoch",
    "backward_iterations": "solver/backward_iterations_mean_epoch",
    "gradient_mean": "gradients/state_norm_mean_epoch",
}
LEAN_EVERY = 10  # epochs between validations (and steps between TensorBoard writes) of a lean run


class History(Callback):
    """Records the scalars of :data:`HISTORY_KEYS` and per-layer gradient norms after every epoch.

    Placed after :class:`~irnet.callbacks.GradientMagnitudes` in the callback
    list so that the epoch's per-layer means are complete when it reads them.
    """

    def __init__(self, gradients: Optional[GradientMagnitudes] = None) -> None:
        self.values: dict[str, list[float]] = {key: [] for key in HISTORY_KEYS}
        self.values["gradient_first"], self.values["gradient_last"] = [], []
        self._gradients = gradients

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        for key, name in HISTORY_KEYS.items():
            self.values[key].append(float(metrics[name]) if name in metrics else math.nan)
        layers = self._gradients.layer_means("state_norm") if self._gradients else None
        self.values["gradient_first"].append(float(layers[0]) if layers is not None else math.nan)
        self.values["gradient_last"].append(float(layers[-1]) if layers is not None else math.nan)


def train(
    module: pl.LightningModule,
    data: pl.LightningDataModule,
    epochs: int,
    log_dir: Path,
    name: str,
    callbacks: Sequence[Callback] = (),
    gradient_clip_val: Optional[float] = None,
    lean: bool = False,
) -> dict[str, list[float]]:
    """Fit ``module`` on ``data`` for ``epochs`` epochs; TensorBoard logs under ``log_dir/name``.

    ``gradient_clip_val`` is the Trainer's (the norm of all gradients together; None: no clipping).
    ``lean``: for runs of thousands of epochs, record the history with
    :class:`~irnet.reproduce._lean_history.LeanHistory` instead of the monitoring callbacks,
    validate every :data:`LEAN_EVERY` epochs (NaN validation values between) and write TensorBoard
    every :data:`LEAN_EVERY` steps; an Example 1 epoch then takes about half the time
    (``benchmarks/bench_study_epoch.py``).

    Returns the per-epoch :class:`History` values, ``epochs`` of each (NaN where a metric does not
    apply, and after a callback such as early stopping ended the fit). A run that the module stops
    as broken (:class:`~irnet.failure.TrainingFailure`: non-finite numbers, or solves that keep
    failing) is a result, not a crash of the study: its epochs after the stop are NaN and
    ``values["stopped"]`` holds the epoch it stopped in (empty for a full run).

    An ensemble's lean run (``ODENet(ensemble=E)``) also returns ``values["members"]``: member
    k's own history (the same keys, "stopped" included), as its own run would record it.
    """
    members = getattr(getattr(module, "net", None), "members", 1)
    if members > 1 and not lean:
        raise ValueError("train: an ensemble records its members' histories with lean=True only")
    if lean:
        history = LeanHistory(members)
        monitors: list[Callback] = [history]
    else:
        gradients = GradientMagnitudes(per_layer=False, histograms=False, plot_every_n_epochs=0)
        history = History(gradients)
        monitors = [SolverStatistics(per_layer=False, histograms=False), gradients, history]
    every = LEAN_EVERY if lean else 1
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(log_dir), name=name, version=""),
        callbacks=[*monitors, *callbacks],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=every,
        check_val_every_n_epoch=every,
        gradient_clip_val=gradient_clip_val,
    )
    stopped: list[float] = []
    try:
        trainer.fit(module, datamodule=data)
    except TrainingFailure as failure:
        print(f"{name}: {failure}", file=sys.stderr)
        stopped.append(float(trainer.current_epoch))
    for values in history.values.values():  # epochs not run (a failure, an early stop): NaN
        values.extend([math.nan] * (epochs - len(values)))
    if members == 1:
        return {**history.values, "stopped": stopped}
    return {**history.values, "stopped": stopped, "members": _member_histories(history, stopped)}


def _member_histories(history: LeanHistory, stopped: list[float]) -> list[dict]:
    """Each member's history at full length; a member still in the ensemble when the whole
    run stopped stopped then."""
    out = []
    for k, values in enumerate(history.member_values):
        epochs = len(history.values["train_loss"])
        full = {key: v + [math.nan] * (epochs - len(v)) for key, v in values.items()}
        own = [history.member_stopped[k]] if k in history.member_stopped else list(stopped)
        out.append({**full, "stopped": own})
    return out


# -- workers ---------------------------------------------------------------------------------------


def quiet_worker(threads: ThreadsSetting = None) -> None:
    """Threads by irnet's policy (one per worker by default) and no chatter: Lightning's banners
    and solver warnings are noise here."""
    apply_threads(threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


BACKENDS = ("local", "ray")  # where cells run: this machine's process pool, or a Ray cluster


def run_cells(
    function: Callable[[dict], dict],
    cells: Sequence[dict],
    workers: int,
    desc: str,
    threads: ThreadsSetting = None,
    journal: Optional[Journal] = None,
    backend: str = "local",
    address: Optional[str] = None,
) -> list[dict]:
    """``[function(cell) for cell in cells]`` on ``workers`` processes, with a progress bar.

    Results keep the order of ``cells``; each gets ``seconds`` (its wall time). Each
    worker sets its torch threads by :func:`irnet.cli.threads.apply_threads` (``threads``;
    default one per worker, or ``OMP_NUM_THREADS``). With a ``journal``, every result is
    recorded as it arrives and cells already recorded there are not run again (a killed
    study resumes where it stopped). Cells with equal settings (:func:`cell_key`) run and
    are recorded once.

    ``backend="ray"`` sends the cells to the Ray cluster at ``address`` instead
    (:mod:`irnet.reproduce._ray_backend`; without ``address``, a Ray on this machine with
    ``workers`` × threads CPUs). This process still records every result, so the journal
    and the results are those of the local pool.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    done = journal.finished(cells) if journal else {}
    todo = list({cell_key(cell): cell for cell in cells if cell_key(cell) not in done}.values())
    timed = Timed(function)
    source = (
        _ray_results(timed, todo, workers, threads, address)
        if backend == "ray"
        else _local_results(timed, todo, workers, threads)
    )
    for cell, result in _progress(source, total=len(done) + len(todo), done=len(done), desc=desc):
        key = cell_key(cell)
        if key in done:  # a second report of a cell (a re-run elsewhere): the first one stands
            continue
        done[key] = result
        if journal:
            journal.record(cell, result)
    return [done[cell_key(cell)] for cell in cells]


def _progress(
    results: Iterator[tuple[dict, dict]], total: int, done: int, desc: str
) -> Iterator[tuple[dict, dict]]:
    """``results`` passed through, a progress bar over cells advancing as each arrives."""
    bar = tqdm(total=total, initial=done, desc=desc)
    try:
        for item in results:
            yield item
            bar.update()
    finally:
        bar.close()


def _local_results(
    timed: "Timed", cells: Sequence[dict], workers: int, threads: ThreadsSetting
) -> Iterator[tuple[dict, dict]]:
    """``(cell, result)`` pairs as the cells finish (in any order with several workers)."""
    if workers <= 1:
        quiet_worker(threads)
        for cell in cells:
            yield cell, timed(cell)
    else:
        context = multiprocessing.get_context(
            "spawn"
        )  # fork would copy Lightning's and torch's threads
        with context.Pool(workers, initializer=quiet_worker, initargs=(threads,)) as pool:
            for index, result in pool.imap_unordered(_Indexed(timed), list(enumerate(cells))):
                yield cells[index], result


def _ray_results(
    timed: "Timed",
    cells: Sequence[dict],
    workers: int,
    threads: ThreadsSetting,
    address: Optional[str],
) -> Iterator[tuple[dict, dict]]:
    """``(cell, result)`` pairs as the cells finish on a Ray cluster (imported only here: Ray
    is an optional dependency)."""
    from irnet.reproduce._ray_backend import ray_results

    return ray_results(timed, cells, quiet_worker, workers, threads, address)


class _Indexed:
    """Picklable ``(index, cell) -> (index, function(cell))``: results of an unordered map keep
    their cell."""

    def __init__(self, function: Callable[[dict], dict]) -> None:
        self.function = function

    def __call__(self, item: tuple[int, dict]) -> tuple[int, dict]:
        index, cell = item
        return index, self.function(cell)


class Timed:
    """Picklable wrapper that adds the wall time of a cell to its result."""

    def __init__(self, function: Callable[[dict], dict]) -> None:
        self.function = function

    def __call__(self, cell: dict) -> dict:
        start = time.perf_counter()
        result = self.function(cell)
        return {**cell, **result, "seconds": time.perf_counter() - start}


def default_workers() -> int:
    """One worker per available core (each runs one torch thread)."""
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )


# -- summaries -------------------------------------------------------------------------------------


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), NaNs included as NaN."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std`` with ``digits`` significant digits."""
    return f"{mean:.{digits}g} ± {std:.2g}"


def fmt_finite(values: Iterable[float]) -> str:
    """``mean ± std`` of the finite values (runs without the quantity left out), else "–"."""
    finite = [float(v) for v in values if not math.isnan(v)]
    return fmt(*mean_std(finite)) if finite else "–"


def paired_change(deltas: Sequence[float]) -> str:
    """``mean ± std (gained/n)`` of per-seed differences from a baseline run of the same seed."""
    return f"{fmt(*mean_std(deltas), digits=2)} ({sum(d > 0 for d in deltas)}/{len(deltas)})"


def group(results: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Results grouped by the values of ``keys`` (the configuration; seeds end up together)."""
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        groups.setdefault(tuple(result[k] for k in keys), []).append(result)
    return groups


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rounded(value: Any, digits: int = 4) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (compact results)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def save_results(out: Path, results: list[dict], meta: dict, history_stride: int = 1) -> None:
    """``results.json``: the configuration, the machine, the time taken and every cell's result
    (floats to 4 significant digits; one line per cell).

    ``history_stride`` > 1 keeps every ``history_stride``-th epoch of each per-epoch history (epochs
    ``stride, 2·stride, …``: those a lean run validated), so that runs of thousands of epochs make
    a file of a few MB; the full histories stay in the run's ``cells.json``.
    """
    out.mkdir(parents=True, exist_ok=True)
    cells = ",\n".join(
        json.dumps(rounded(thinned(r, history_stride)), allow_nan=True) for r in results
    )
    (out / "results.json").write_text(f'{{"meta": {json.dumps(meta)},\n"cells": [\n{cells}\n]}}\n')


def thinned(result: dict, stride: int) -> dict:
    """``result`` keeping every ``stride``-th epoch of its ``history``; ``history_stride`` set."""
    if stride <= 1 or "history" not in result:
        return result
    history = {
        key: values[stride - 1 :: stride] if key != "stopped" else values
        for key, values in result["history"].items()
    }
    return {**result, "history": history, "history_stride": stride}
