"""Training epochs on one device (a GPU or the CPU): explicit, implicit cold, implicit warm-started.

For every config in ``configs/`` (or those named by ``--configs``) three copies of the module
train side by side from the same initial weights, epoch by epoch in rotating order, with the
bare training step of ``bench_training.py`` (the module's own ``training_step``, backward and the
optimiser step; no Lightning loop, no callbacks):

* **explicit** — the config with θ = 0;
* **implicit, cold** — the config with ``warm_start: false`` (each solve from the explicit step);
* **implicit, warm** — the config with ``warm_start: true`` (each solve from the sample's last
  fixed point, :mod:`irnet.nets.warm_start`).

The batches are moved to ``--device`` once, before timing. An epoch's time runs from before its
first step to after its last, with ``torch.cuda.synchronize()`` at both ends on a GPU. Reported
per config and variant: the median epoch over ``--epochs`` timed epochs (after ``--warmup``
untimed ones), its ratio to the explicit epoch, the mean forward iterations per layer and sample
in the timed epochs, and the warm start's speed-up (cold / warm epoch).

Usage::

    python benchmarks/bench_device.py --device cuda                       # every config
    python benchmarks/bench_device.py --device cpu --configs ex1_sine --warmup 2 --epochs 3

Not a test: nothing here asserts; docs/benchmarks.md §5 says what was run where.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402
from pytorch_lightning.utilities import move_data_to_device  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_training import DEFAULT_CONFIGS, ROOT, THETA_KEY, BareRun  # noqa: E402

NET_KEY = "model.init_args.net.init_args"
VARIANTS = {
    "explicit": [f"{THETA_KEY}=0"],
    "implicit, cold": [f"{NET_KEY}.warm_start=false"],
    "implicit, warm": [f"{NET_KEY}.warm_start=true"],
}


class DeviceRun:
    """One variant of one config on ``device``: its module, its batches there, its epoch times."""

    def __init__(
        self, config: Path, variant: str, device: torch.device, args: argparse.Namespace
    ) -> None:
        build_args = argparse.Namespace(set=[*args.set, *VARIANTS[variant]], theta_key=THETA_KEY)
        self.run = BareRun.build(
            config, "implicit", build_args
        )  # "implicit": the overrides as given
        self.run.module.to(device)
        self.batches = [move_data_to_device(batch, device) for batch in self.run.loader]
        self.device = device
        self.ms: list[float] = []
        self.iters: list[float] = []

    def epoch(self, timed: bool) -> None:
        run = self.run
        run.module.train()
        run.module.on_train_epoch_start()
        self._sync()
        start = time.perf_counter()
        for index, batch in enumerate(self.batches):
            run.step(batch, index)
        self._sync()
        elapsed = time.perf_counter() - start
        if run.scheduler is not None:
            run.scheduler.step()
        iters = run.recorder.take()
        if timed:
            self.ms.append(elapsed * 1e3)
            if iters is not None:
                self.iters.append(iters)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def bench_config(
    config: Path, device: torch.device, args: argparse.Namespace
) -> dict[str, DeviceRun]:
    torch.manual_seed(0)
    runs = {name: DeviceRun(config, name, device, args) for name in VARIANTS}
    order = list(runs.values())
    for e in range(args.warmup + args.epochs):
        for run in order[e % len(order) :] + order[: e % len(order)]:  # rotate who goes first
            run.epoch(timed=e >= args.warmup)
    return runs


def table(results: dict[str, dict[str, DeviceRun]]) -> str:
    lines = [
        "| config | variant | ms / epoch | × explicit | fwd iters | warm speed-up |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for config, runs in results.items():
        med = {name: statistics.median(run.ms) for name, run in runs.items()}
        for name, run in runs.items():
            iters = (
                f"{statistics.fmean(run.iters):.2f}" if run.iters and name != "explicit" else "–"
            )
            speedup = (
                f"{med['implicit, cold'] / med[name]:.2f}×" if name == "implicit, warm" else ""
            )
            lines.append(
                f"| {config} | {name} | {med[name]:.1f} | {med[name] / med['explicit']:.2f}× "
                f"| {iters} | {speedup} |"
            )
    return "\n".join(lines)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu … (cuda)")
    parser.add_argument(
        "--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated config names"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed epochs first (5)")
    parser.add_argument("--epochs", type=int, default=10, help="timed epochs per variant (10)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every variant (repeatable)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(f"# {describe(device)}; warmup {args.warmup}, timed epochs {args.epochs}", flush=True)
    results = {}
    for name in args.configs.split(","):
        config = ROOT / "configs" / f"{name}.yaml"
        if not config.exists():
            parser.error(f"--configs: no configs/{name}.yaml")
        start = time.perf_counter()
        results[name] = bench_config(config, device, args)
        print(f"#   {name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
