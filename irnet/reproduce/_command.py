"""``irnet reproduce <study> …``: the studies' command line.

:func:`parser` reads it: the study (one of :data:`STUDIES`), the options all studies share and
those of the ``seeds`` study. :func:`main` runs one study: its cells on worker processes, each
result recorded in the study's journal as it arrives (a killed run resumes where it stopped),
then results.json, the figures and summary.md; with ``--replot``, only the figures and
summary.md of the last run. ``stability`` and ``seeds`` run their own way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from irnet.cli.threads import apply_threads, check_threads, resolve_threads
from irnet.reproduce import seeds
from irnet.reproduce._journal import Journal, seed_from_published
from irnet.reproduce._summary import (
    DRAWING_KEYS,
    ReplotWithoutRun,
    machine,
    render_summary,
    saved_run,
)

BACKENDS = ("local", "ray")  # irnet.reproduce._runner.BACKENDS (imported there with Lightning)
DESCRIPTION = "Run one of the paper's studies end to end (see docs/REPORT.md)."
STUDIES = (
    "stability",
    "ex1",
    "ex2",
    "ex2_resnet",
    "robustness",
    "digits_theta",
    "mnist_theta",
    "mnist_authors",
    "stiff",
    "stiff_window",
    "lotka",
    "seeds",
)


# -- the command line ------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    from irnet.reproduce._runner import default_workers  # lazily: it imports Lightning

    p = argparse.ArgumentParser(prog="irnet reproduce", description=DESCRIPTION)
    p.add_argument("study", choices=STUDIES, help="which study to run")
    p.add_argument(
        "--out",
        type=Path,
        help="folder for summary.md, results.json and figures (default: reproduce/<study>)",
    )
    p.add_argument(
        "--log-dir", type=Path, help="TensorBoard logs (default: runs/reproduce/<study>)"
    )
    p.add_argument("--tiny", action="store_true", help="a minute-sized run (smoke test)")
    p.add_argument(
        "--seeds", type=_positive, help="seeds per configuration (overrides the study's)"
    )
    p.add_argument("--epochs", type=_positive, help="epochs of every run (overrides the study's)")
    p.add_argument(
        "--layers", type=_positive, nargs="+", help="ex1 only: the depths to train (default 10 100)"
    )
    p.add_argument(
        "--thetas", type=_unit, nargs="+", help="ex1 only: the θ values (default 0 0.25 0.5 0.75 1)"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=("paper", "rfp", "contraction"),
        help="ex1 only: the variants trained at θ > 0 (default all three; θ = 0 trains once)",
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="redraw figures and summary from the last run's <log-dir>/cells.json (or the "
        "finished cells of an unfinished run), no training; rerun the study's command to resume "
        "an unfinished run",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=default_workers(),
        help="parallel worker processes (default: one per core)",
    )
    p.add_argument(
        "--threads",
        type=_threads,
        default=None,
        help="torch threads per worker: an integer or 'auto' (default: OMP_NUM_THREADS if set, "
        "else 1; see docs/training.md, Threads)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="where the cells run: worker processes on this machine (local), or the tasks of "
        "a Ray cluster (ray; pip install 'irnet[ray]'; see docs/distributed.md)",
    )
    p.add_argument(
        "--address",
        help="--backend ray: the cluster's head, HOST:PORT, or 'auto' for the cluster that ray "
        "start started on this machine (default: RAY_ADDRESS if set, else a new Ray on this "
        "machine with --workers × --threads CPUs)",
    )
    seeds.add_arguments(p)
    return p


def _threads(text: str) -> object:
    try:
        return check_threads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _unit(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"θ must be in [0, 1], got {text}")
    return value


# -- running a study -------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run one study; returns the path of its ``summary.md``."""
    from irnet.reproduce._ray_backend import RayBackendError

    try:
        return _run(argv)
    except (ReplotWithoutRun, RayBackendError) as err:
        parser().error(str(err))


def _run(argv: Optional[Sequence[str]]) -> Path:
    from irnet.reproduce._runner import run_cells, save_results

    args = parser().parse_args(argv)
    apply_threads(args.threads)  # the parent draws figures and runs the stability study itself
    out = args.out or Path("reproduce") / args.study
    log_dir = args.log_dir or Path("runs") / "reproduce" / args.study
    study = importlib.import_module(f"irnet.reproduce.{args.study}")
    words = list(argv or sys.argv[2:])
    command = _command_line(words)
    seeds.refuse_foreign(args, parser().error)
    _check_backend(args)
    if args.study == "seeds":
        return seeds.main(args, command)
    start = time.perf_counter()
    if args.study == "stability":  # seconds in this process; it records its own time and machine
        study.run(out, tiny=args.tiny, command=command)
        return out / "summary.md"
    settings = _settings(args, study)
    if args.replot:
        meta, results = saved_run(log_dir, _command_line(a for a in words if a != "--replot"))
        results = [getattr(study, "upgraded", dict)(result) for result in results]
    else:
        cells = study.cells(settings, log_dir, seeds=args.seeds, epochs=args.epochs)
        journal = Journal.of_study(log_dir)
        seeded = seed_from_published(journal, out / "results.json", cells)
        if seeded:
            print(
                f"{args.study}: resuming with {seeded} finished cells of the unfinished run in "
                f"{out / 'results.json'}"
            )
        resumed = len(journal.finished(cells))
        # the cells that differ only by seed as one ensemble each, recorded per seed
        plan = study.ensembles(cells, journal) if _ensembles(args, study) else None
        results = run_cells(
            study.run_cell,
            plan.cells if plan else cells,
            args.workers,
            desc=args.study,
            threads=args.threads,
            journal=plan.journal if plan else journal,
            backend=args.backend,
            address=args.address,
        )
        if plan:
            results = plan.results(results)
        # seeded ones too
        results = [getattr(study, "upgraded", dict)(result) for result in results]
        minutes = (time.perf_counter() - start) / 60
        meta = {
            "command": command,
            "machine": machine(args.workers, resolve_threads(args.threads)),
            "minutes": minutes,
            "settings": settings,
        }
        if resumed:  # this run's minutes are not the study's: say what all its cells took
            meta["resumed"] = {
                "cells": resumed,
                "cell_minutes": sum(r["seconds"] for r in results) / 60,
            }
        if plan:
            meta["ensembles"] = plan.sizes
        if args.backend == "ray":  # "machine" is then the driver's: say where the cells ran
            meta["backend"] = f"ray at {args.address or 'this machine'}"
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "cells.json").write_text(
            json.dumps({"meta": meta, "cells": results}, default=float)
        )
        journal.remove()
    figures = study.figures(results, out)
    table = study.summarize(results)
    dropped = set(DRAWING_KEYS) - set(getattr(study, "PUBLISHED_DRAWINGS", ()))
    save_results(
        out,
        [{k: v for k, v in r.items() if k not in dropped} for r in results],
        meta,
        history_stride=getattr(study, "HISTORY_STRIDE", 1),
    )
    summary = out / "summary.md"
    summary.write_text(render_summary(args.study, meta, table, figures, out))
    print(f"{args.study}: {len(results)} runs in {meta['minutes']:.1f} min; see {summary}")
    return summary


def _command_line(words: Iterable[str]) -> str:
    """The ``reproduce`` command with arguments ``words``, quoted for a shell."""
    return "python -m irnet reproduce " + " ".join(shlex.quote(a) for a in words)


def _ensembles(args: argparse.Namespace, study) -> bool:
    """Whether the study trains its seeds as ensembles: it can (``study.ensembles``) and
    ``--no-ensemble`` is not given."""
    return args.ensemble and hasattr(study, "ensembles")


def _check_backend(args: argparse.Namespace) -> None:
    """Refuse what the chosen backend cannot do, before any cell runs; Ray must be importable for
    ``--backend ray`` (:class:`~irnet.reproduce._ray_backend.RayBackendError` otherwise)."""
    if args.address and args.backend != "ray":
        parser().error("--address applies to --backend ray only")
    if args.backend != "ray" or args.replot:
        return
    if args.study in ("seeds", "stability"):
        parser().error(f"--backend ray: the {args.study} study runs on this machine only")
    from irnet.reproduce._ray_backend import import_ray

    import_ray()


def _settings(args: argparse.Namespace, study) -> dict:
    """The study's full or tiny settings, narrowed by ``--layers``, ``--thetas`` and
    ``--variants`` (ex1 only)."""
    settings = study.TINY if args.tiny else study.FULL
    if (args.layers or args.thetas or args.variants) and args.study != "ex1":
        parser().error("--layers, --thetas and --variants apply to ex1 only")
    if args.layers:
        epochs = settings["epochs"]
        settings = {
            **settings,
            "depths": tuple(args.layers),
            "epochs": {n: epochs.get(n, max(epochs.values())) for n in args.layers},
        }
    if args.thetas:
        settings = {**settings, "thetas": tuple(args.thetas)}
    if args.variants:
        settings = {**settings, "variants": tuple(args.variants)}
    return settings
