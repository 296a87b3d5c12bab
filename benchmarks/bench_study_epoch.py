"""A study cell's epoch with the monitoring callbacks against a lean one (``runner.train(lean=…)``).

Example 1 at 10 layers, θ = ½, the paper's settings (``irnet.reproduce.ex1.make_net``): the same
network and seed trained for ``--epochs`` epochs through ``irnet.reproduce._runner.train``, once
with the monitoring callbacks and validation every epoch (``lean=False``) and once lean
(:class:`~irnet.reproduce._lean_history.LeanHistory`, validation every 10th epoch), alternating
``--repeats`` times in one process with one torch thread. Prints ms an epoch and lean / full.

    .venv/bin/python benchmarks/bench_study_epoch.py --epochs 100 --repeats 3
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from irnet.datamodules import SineRegression  # noqa: E402
from irnet.module import ImplicitNetModule  # noqa: E402
from irnet.reproduce import ex1  # noqa: E402
from irnet.reproduce._runner import train  # noqa: E402


def seconds_per_epoch(lean: bool, epochs: int, log_dir: Path) -> float:
    pl.seed_everything(0, verbose=False)
    module = ImplicitNetModule(
        ex1.make_net(10, 0.5, "paper"), loss="l2", lr=1e-2, lr_step=500, lr_gamma=0.7
    )
    start = time.perf_counter()
    train(module, SineRegression(num_points=51), epochs, log_dir, f"lean{lean}", lean=lean)
    return (time.perf_counter() - start) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as log_dir:
        seconds_per_epoch(True, 5, Path(log_dir))  # warm-up: imports and first-call costs
        for _ in range(args.repeats):
            for lean in (False, True):
                times[lean].append(seconds_per_epoch(lean, args.epochs, Path(log_dir)))
    full, lean = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"full (callbacks, validation every epoch): {1e3 * full:.1f} ms/epoch  "
        f"lean (validation every 10th): {1e3 * lean:.1f} ms/epoch  lean / full: {lean / full:.2f}  "
        f"(median of {args.repeats}, {args.epochs} epochs, one thread)"
    )


if __name__ == "__main__":
    main()
