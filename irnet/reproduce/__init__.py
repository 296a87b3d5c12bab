"""``python -m irnet reproduce ex1|ex2|stability|robustness|digits_theta|mnist_theta|seeds``: the paper's
studies, end to end (``seeds``: one config over many seeds, :mod:`irnet.reproduce.seeds`; ``digits_theta``:
θ's effect on robustness over step and depth, :mod:`irnet.reproduce.digits_theta`; ``mnist_theta``: the
authors' MNIST set-up, :mod:`irnet.reproduce.mnist_theta`).

Each study trains its grid of configurations × seeds on the CPU (one worker
process per core), then writes into ``--out`` (default ``reproduce/<study>``):
``summary.md`` (the command, machine, time taken and tables), ``results.json``
(every cell's numbers) and PNG figures. TensorBoard logs of every training run
go to ``--log-dir`` (default ``runs/reproduce/<study>``). ``--tiny`` runs a
minute-sized version (for smoke tests); ``--seeds`` and ``--epochs`` override
a study's defaults. See docs/REPORT.md for what the full studies found.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from irnet.reproduce import seeds
from irnet.reproduce.journal import Journal, seed_from_published
from irnet.threads import apply_threads, check_threads, resolve_threads

STUDIES = ("stability", "ex1", "ex2", "robustness", "digits_theta", "mnist_theta", "seeds")
DRAWING_KEYS = ("grid_output", "trajectories", "field", "decision")  # in the figures, not results.json


def parser() -> argparse.ArgumentParser:
    from irnet.reproduce.runner import default_workers  # lazily: it imports Lightning
    p = argparse.ArgumentParser(prog="python -m irnet reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=STUDIES, help="which study to run")
    p.add_argument("--out", type=Path, help="folder for summary.md, results.json and figures "
                                            "(default: reproduce/<study>)")
    p.add_argument("--log-dir", type=Path, help="TensorBoard logs (default: runs/reproduce/<study>)")
    p.add_argument("--tiny", action="store_true", help="a minute-sized run (smoke test)")
    p.add_argument("--seeds", type=_positive, help="seeds per configuration (overrides the study's)")
    p.add_argument("--epochs", type=_positive, help="epochs of every run (overrides the study's)")
    p.add_argument("--layers", type=_positive, nargs="+", help="ex1 only: the depths to train (default 10 100)")
    p.add_argument("--thetas", type=_unit, nargs="+", help="ex1 only: the θ values (default 0 0.25 0.5 0.75 1)")
    p.add_argument("--variants", nargs="+", choices=("paper", "rfp", "contraction"),
                   help="ex1 only: the variants trained at θ > 0 (default all three; θ = 0 trains once)")
    p.add_argument("--replot", action="store_true",
                   help="redraw figures and summary from the last run's <log-dir>/cells.json (or the finished cells "
                        "of an unfinished run), no training; rerun the study's command to resume an unfinished run")
    p.add_argument("--workers", type=_positive, default=default_workers(),
                   help="parallel worker processes (default: one per core)")
    p.add_argument("--threads", type=_threads, default=None,
                   help="torch threads per worker: an integer or 'auto' (default: OMP_NUM_THREADS if set, else 1; "
                        "see docs/training.md, Threads)")
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


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run one study; returns the path of its ``summary.md``."""
    from irnet.reproduce.runner import run_cells, save_results

    args = parser().parse_args(argv)
    apply_threads(args.threads)  # the parent draws figures and runs the stability study itself
    out = args.out or Path("reproduce") / args.study
    log_dir = args.log_dir or Path("runs") / "reproduce" / args.study
    study = importlib.import_module(f"irnet.reproduce.{args.study}")
    command = "python -m irnet reproduce " + " ".join(shlex.quote(a) for a in (argv or sys.argv[2:]))
    seeds.refuse_foreign(args, parser().error)
    if args.study == "seeds":
        return seeds.main(args, command)
    start = time.perf_counter()
    if args.study == "stability":
        study.run(out, tiny=args.tiny)
        return out / "summary.md"
    settings = _settings(args, study)
    if args.replot:
        meta, results = _saved_run(log_dir)
        results = [getattr(study, "upgraded", dict)(result) for result in results]
    else:
        cells = study.cells(settings, log_dir, seeds=args.seeds, epochs=args.epochs)
        journal = Journal.of_study(log_dir)
        seeded = seed_from_published(journal, out / "results.json", cells)
        if seeded:
            print(f"{args.study}: resuming with {seeded} finished cells of the unfinished run in {out / 'results.json'}")
        results = run_cells(study.run_cell, cells, args.workers, desc=args.study, threads=args.threads,
                            journal=journal)
        results = [getattr(study, "upgraded", dict)(result) for result in results]  # seeded ones too
        minutes = (time.perf_counter() - start) / 60
        meta = {"command": command, "machine": machine(args.workers, resolve_threads(args.threads)),
                "minutes": minutes, "settings": settings}
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "cells.json").write_text(json.dumps({"meta": meta, "cells": results}, default=float))
        journal.remove()
    figures = study.figures(results, out)
    table = study.summarize(results)
    dropped = set(DRAWING_KEYS) - set(getattr(study, "PUBLISHED_DRAWINGS", ()))
    save_results(out, [{k: v for k, v in r.items() if k not in dropped} for r in results], meta,
                 history_stride=getattr(study, "HISTORY_STRIDE", 1))
    summary = out / "summary.md"
    summary.write_text(render_summary(args.study, meta, table, figures, out))
    print(f"{args.study}: {len(results)} runs in {meta['minutes']:.1f} min; see {summary}")
    return summary


def _settings(args: argparse.Namespace, study) -> dict:
    """The study's full or tiny settings, narrowed by ``--layers``, ``--thetas`` and ``--variants`` (ex1 only)."""
    settings = study.TINY if args.tiny else study.FULL
    if (args.layers or args.thetas or args.variants) and args.study != "ex1":
        parser().error("--layers, --thetas and --variants apply to ex1 only")
    if args.layers:
        epochs = settings["epochs"]
        settings = {**settings, "depths": tuple(args.layers),
                    "epochs": {n: epochs.get(n, max(epochs.values())) for n in args.layers}}
    if args.thetas:
        settings = {**settings, "thetas": tuple(args.thetas)}
    if args.variants:
        settings = {**settings, "variants": tuple(args.variants)}
    return settings


def _saved_run(log_dir: Path) -> tuple[dict, list[dict]]:
    """``(meta, results)`` of the last run that wrote ``log_dir/cells.json`` (for ``--replot``), or of
    an unfinished one: the cells its journal holds (a partial study's figures and tables)."""
    path = log_dir / "cells.json"
    journal = Journal.of_study(log_dir)
    if journal.path.is_file():  # an unfinished (killed) run is newer than any cells.json
        results = journal.results()
        return {"command": "(unfinished run, from its journal)", "minutes": sum(r["seconds"] for r in results) / 60,
                "machine": "machine not recorded (an unfinished run's journal)", "partial": True}, results
    if not path.is_file():
        parser().error(f"--replot needs a finished run's {path}; run the study without --replot first "
                       "(or pass its --log-dir)")
    saved = json.loads(path.read_text())
    return saved["meta"], saved["cells"]


def machine(workers: int, threads: int = 1) -> str:
    """One line: CPU, cores used, OS, Python and torch versions."""
    cpu = _cpu_model() or platform.processor() or platform.machine()
    return (f"{cpu}, {workers} worker process(es) × {threads} torch thread(s), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}")


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else an empty string."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def render_summary(name: str, meta: dict, table: str, figures: Sequence[Path], out: Path) -> str:
    images = "\n".join(f"![{f.stem}]({f.relative_to(out)})" for f in figures)
    return (f"# {name}\n\n`{meta['command']}`\n\n{meta['machine']}; {meta['minutes']:.1f} minutes.\n\n"
            f"Mean ± standard deviation over seeds.\n\n{table}\n\n{images}\n")


__all__ = ["STUDIES", "main"]
