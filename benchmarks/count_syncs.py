"""Host synchronisations per training step of each shipped config, counted on a GPU.

On CUDA every ``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``, boolean-mask index or
device-to-host copy waits for every queued kernel. ``torch.cuda.set_sync_debug_mode("warn")``
makes each such call warn; this script builds each config's run through
``irnet.cli.main([...], run=False)`` (the config's own callbacks, no logger), trains it on the
device with Lightning's loop, and counts during one training step (``--step``, after warm-up
steps) the sync warnings and the solves (outermost ``solve`` calls of irnet's solvers).
``tests/training/test_host_reads.py`` counts the same step on the CPU by patching torch, with the
accelerator path forced; its budget is one read per solve plus 10.

Usage::

    python benchmarks/count_syncs.py                                  # every config, on cuda
    python benchmarks/count_syncs.py --device cpu --configs ex1_sine  # runs steps, counts no syncs

Not a test: nothing here asserts. On the CPU there is nothing to count; the steps still run, so
the command is checked without a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers_sync import SolveCounter  # noqa: E402  (the tests count solves the same way)

DEFAULT_CONFIGS = ("ex1_sine", "ex1_sine_100", "ex2_spirals", "digits")
SYNC_MESSAGE = "called a synchronizing CUDA operation"


class CountOneStep(pl.Callback):
    """Records the warnings and counts the solves from the start to the end of training step
    ``step``."""

    def __init__(self, step: int, cuda: bool, solves: SolveCounter) -> None:
        self.step, self.cuda, self.solves = step, cuda, solves
        self.syncs: list = []
        self._catching: Optional[Any] = None
        self._records: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        self._catching = warnings.catch_warnings(record=True)
        self._records = self._catching.__enter__()
        warnings.simplefilter("always")  # every sync, not once per line
        self.solves.active = True
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._catching is None:
            return
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self.solves.active = False
        self._catching.__exit__(None, None, None)
        self._catching = None
        self.syncs = [r for r in self._records if SYNC_MESSAGE in str(r.message)]


def count(config: Path, device: str, step: int, root: Path) -> dict:
    """Solves and host syncs of training step ``step`` of ``config`` on ``device``."""
    from irnet.cli import main as cli_main

    cuda = device == "cuda"
    solves = SolveCounter()
    counter = CountOneStep(step, cuda, solves)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Lightning's tips
            cli = cli_main(
                [
                    "--config",
                    str(config),
                    "--trainer.logger",
                    "false",
                    "--trainer.accelerator",
                    "gpu" if cuda else "cpu",
                    "--trainer.devices",
                    "1",
                    "--trainer.default_root_dir",
                    str(root / config.stem),
                    "--trainer.max_steps",
                    str(step + 1),
                    "--trainer.limit_val_batches",
                    "0",
                    "--trainer.enable_model_summary",
                    "false",
                    "--trainer.enable_progress_bar",
                    "false",
                ],
                run=False,
            )
            cli.trainer.callbacks.append(counter)
            cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        solves.close()
    sources = collections.Counter(
        f"{Path(r.filename).parent.name}/{Path(r.filename).name}:{r.lineno}" for r in counter.syncs
    )
    return {
        "solves": solves.count,
        "syncs": len(counter.syncs) if cuda else None,
        "sources": sources,
        "seconds": time.perf_counter() - start,
    }


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| config | solves / step | syncs / step | syncs − solves | where (top 3) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in rows.items():
        syncs = "–" if row["syncs"] is None else str(row["syncs"])
        excess = "–" if row["syncs"] is None else str(row["syncs"] - row["solves"])
        where = ", ".join(f"{s} ×{n}" for s, n in row["sources"].most_common(3))
        lines.append(f"| {name} | {row['solves']} | {syncs} | {excess} | {where} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="(cuda)")
    parser.add_argument(
        "--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated config names"
    )
    parser.add_argument("--step", type=int, default=2, help="the training step counted, from 0 (2)")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments from count(), not from here
    warnings.simplefilter(
        "ignore"
    )  # Lightning's notes on short runs; the counted step records its own
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu")
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (no syncs to count)"
    print(
        f"# {where}, torch {torch.__version__}; training step {args.step} of each config",
        flush=True,
    )
    rows = {}
    with tempfile.TemporaryDirectory(prefix="count_syncs.") as root:
        for name in args.configs.split(","):
            config = ROOT / "configs" / f"{name}.yaml"
            if not config.exists():
                parser.error(f"--configs: no configs/{name}.yaml")
            rows[name] = count(config, args.device, args.step, Path(root))
            print(f"#   {name}: {rows[name]['seconds']:.0f} s", flush=True)
    print(table(rows))
    print(
        "tests/training/test_host_reads.py's budget for the same step on the CPU: "
        "syncs − solves ≤ 10"
    )


if __name__ == "__main__":
    main()
