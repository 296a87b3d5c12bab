"""Throughput of seed ensembles: an epoch of E members against an epoch of one network.

For each config (``ex1_sine`` and ``ex2_spirals`` by default) the module and data module are
built from the YAML by irnet's LightningCLI (``irnet.cli.main(args, run=False)``), once per
ensemble size E (``--members``, default 1, 10, 20: ``--model.init_args.net.init_args.ensemble
E``), with the config's network, solvers, regulariser, loss, lr and gradient clipping. Each is
trained through a Lightning ``Trainer`` (the real path: ``ImplicitNetModule.training_step``,
Lightning's loop, gradient clipping, the optimiser and the validation epoch) with no logger, no
checkpoints, no progress bar, no model summary and none of the config's monitoring callbacks.
The variants take turns in one process on one torch thread: each round gives every variant a
fit of ``--epochs`` epochs (the order reversed every other round, so a slow spell of the
machine hits all), ``--warmup`` rounds untimed, then ``--repeats`` timed rounds. An epoch is
timed from ``on_train_epoch_start`` to ``on_train_epoch_end`` (training step, clipping,
optimiser step, validation and their logging); each fit starts a fresh Trainer, so Adam's
moments restart every ``--epochs`` epochs, while the network (and its warm-start cache) carries
on. Printed: the median per epoch (wall clock), its ratio to E = 1, the throughput relative
to E = 1 (E / ratio: networks trained per second, as a multiple of one network's), and the mean
and largest forward iterations per layer of the training steps' main pass (a solver loop runs
until its slowest row is done, so the largest is what an ensemble's loop pays); the same for
the process's CPU time, which a busy neighbour disturbs less than the wall clock.

``--rows-layout 10`` also trains E = 10 with the member-wise F and head as they were first
written (member slabs ``(E, batch, dim)``, the state last, and the weights rescaled at every
evaluation, by factors of 1 if need be: :func:`rows_forward`, :func:`rows_head_forward` and
:func:`never_inside`, patched in for that variant's fits only), for a before / after comparison
in one run.

    .venv/bin/python benchmarks/bench_ensemble.py --rows-layout 10   # docs/benchmarks.md
    .venv/bin/python benchmarks/bench_ensemble.py --quick         # a smoke run, about a minute
    .venv/bin/python benchmarks/bench_ensemble.py --configs ex2_spirals --members 1,10 --profile

``--profile`` also prints, per config and E, torch.profiler's table of one timed fit's
operators (by self CPU time). Not a test: nothing here asserts.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_training import config_path, load_average, machine  # noqa: E402
from training_timer import solver_blocks  # noqa: E402

from irnet.nets.ensemble import from_member_slabs, rows_of  # noqa: E402
from irnet.nets.memberwise import MemberwiseLinear, MemberwiseMLP  # noqa: E402

ENSEMBLE_KEY = "--model.init_args.net.init_args.ensemble"


def rows_forward(self: MemberwiseMLP, y: torch.Tensor) -> torch.Tensor:
    """``MemberwiseMLP.forward`` as first written: slabs ``(E, batch, dim)``, the state last."""
    gamma1, gamma2 = self.weights()
    slabs = rows_of(y, self.members)
    hidden = self.activation(torch.baddbmm(self.bias[:, None], slabs, gamma1.transpose(1, 2)))
    return from_member_slabs(self.step * torch.bmm(hidden, gamma2.transpose(1, 2)))


def rows_head_forward(self: MemberwiseLinear, y: torch.Tensor) -> torch.Tensor:
    """``MemberwiseLinear.forward`` as first written."""
    slabs = rows_of(y, self.members)
    return from_member_slabs(torch.baddbmm(self.bias[:, None], slabs, self.weight.transpose(1, 2)))


def never_inside(self: MemberwiseMLP, key: tuple) -> bool:
    """As first written, F rescaled its weights (by factors of 1 if need be) at every evaluation."""
    return False


@contextlib.contextmanager
def rows_layout():
    """The member-wise F and head as first written, while inside."""
    saved = MemberwiseMLP.forward, MemberwiseMLP._all_inside, MemberwiseLinear.forward
    MemberwiseMLP.forward, MemberwiseMLP._all_inside = rows_forward, never_inside
    MemberwiseLinear.forward = rows_head_forward
    try:
        yield
    finally:
        MemberwiseMLP.forward, MemberwiseMLP._all_inside, MemberwiseLinear.forward = saved


class EpochClock(pl.Callback):
    """Wall and CPU seconds of every training epoch (validation included), and the mean and
    largest forward iterations per layer of each training step's main pass."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.mean_iters: list[float] = []
        self.max_iters: list[float] = []
        self._recording = False
        self._seen: set[int] = set()
        self._handles: list[Any] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        blocks = solver_blocks(getattr(pl_module, "net", None))
        self._handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, block: torch.nn.Module, inputs: Any, output: Any) -> None:
        # The block's first solve of a step is the main pass; R_rnd's streams come after it.
        if not self._recording or id(block) in self._seen:
            return
        self._seen.add(id(block))
        iterations = getattr(getattr(block, "forward_stats", None), "iterations", None)
        if iterations is not None:
            self.mean_iters.append(float(iterations.float().mean()))
            self.max_iters.append(float(iterations.max()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._seen.clear()
        self._recording = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._recording = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class Variant:
    """One config at one ensemble size: its module and data, trained fit after fit."""

    config: Path
    members: int
    rows: bool  # the member-wise F and head as first written (rows_layout)
    module: Any
    data: Any
    trainer_args: dict
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    mean_iters: list[float] = field(default_factory=list)
    max_iters: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, config: Path, members: int, rows: bool = False) -> "Variant":
        from irnet.cli import main as cli_main

        args = ["--config", str(config), ENSEMBLE_KEY, str(members), "--trainer.logger", "false"]
        with contextlib.redirect_stdout(io.StringIO()):  # Lightning's tips and seed notes
            cli = cli_main(args, run=False)
        trainer_args = {
            "gradient_clip_val": cli.trainer.gradient_clip_val,
            "log_every_n_steps": cli.trainer.log_every_n_steps,
        }
        return cls(config, members, rows, cli.model, cli.datamodule, trainer_args)

    @property
    def label(self) -> str:
        return f"{self.members}{' (rows layout)' if self.rows else ''}"

    def fit(self, epochs: int, timed: bool, profile: bool = False) -> None:
        """Train ``epochs`` more epochs with a fresh Trainer; record them if ``timed``."""
        clock = EpochClock()
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[clock],
            **self.trainer_args,
        )
        layout = rows_layout() if self.rows else contextlib.nullcontext()
        with layout, profiled() if profile else contextlib.nullcontext() as prof:
            trainer.fit(self.module, datamodule=self.data)
        if prof is not None:
            print(f"\n### profile: {self.config.stem}, E = {self.label}, {epochs} epochs\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        if timed:
            self.wall += clock.wall
            self.cpu += clock.cpu
            self.mean_iters += clock.mean_iters
            self.max_iters += clock.max_iters


def profiled():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


def bench_config(config: Path, args: argparse.Namespace) -> list[Variant]:
    variants = [Variant.build(config, members) for members in args.members]
    variants += [Variant.build(config, members, rows=True) for members in args.rows_layout]
    for round_ in range(args.warmup + args.repeats):
        timed = round_ >= args.warmup
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            variant.fit(args.epochs, timed)
    if args.profile:
        for variant in variants:
            variant.fit(args.epochs, timed=False, profile=True)
    return variants


def table(results: dict[str, list[Variant]]) -> str:
    lines = [
        "| config | E | ms/epoch | × E = 1 | throughput × E = 1 | CPU ms/epoch | CPU × E = 1 "
        "| iters/layer mean | iters/layer largest |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, variants in results.items():
        one_wall, one_cpu = statistics.median(variants[0].wall), statistics.median(variants[0].cpu)
        for v in variants:
            wall, cpu = statistics.median(v.wall), statistics.median(v.cpu)
            ratio = wall / one_wall
            lines.append(
                f"| {name} | {v.label} | {1e3 * wall:.1f} | {ratio:.2f}× "
                f"| {v.members / ratio:.2f}× | {1e3 * cpu:.1f} | {cpu / one_cpu:.2f}× "
                f"| {statistics.fmean(v.mean_iters):.2f} | {statistics.fmean(v.max_iters):.2f} |"
            )
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", default="ex1_sine,ex2_spirals", help="names in configs/ or YAML paths"
    )
    parser.add_argument("--members", default="1,10,20", help="ensemble sizes; 1 first (1,10,20)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per fit (5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (1)")
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds (6)")
    parser.add_argument(
        "--rows-layout",
        default="",
        help="ensemble sizes also trained with the member-wise F and head as first written",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile one untimed fit per variant"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: E = 1, 10; 2 epochs per fit, 2 rounds"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.members, args.epochs, args.warmup, args.repeats = "1,10", 2, 1, 2
    args.members = [int(m) for m in args.members.split(",")]
    args.rows_layout = [int(m) for m in args.rows_layout.split(",") if m]
    if args.members[0] != 1:
        raise ValueError(f"--members must start with 1 (the reference), got {args.members}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "GPU available: …", "Seed set to …"
    configs = [config_path(name) for name in args.configs.split(",")]
    command = " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])
    print(f"# {command}")
    print(f"# machine: {machine()}; {load_average()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    results = {}
    start = time.perf_counter()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="bench_ensemble-") as workdir:
        os.chdir(workdir)  # anything a fit writes lands here, not in the repository
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Lightning's notes on workers and logging
                for config in configs:
                    results[config.stem] = bench_config(config, args)
                    print(table({config.stem: results[config.stem]}).splitlines()[-1], flush=True)
        finally:
            os.chdir(cwd)
    print(f"# total {time.perf_counter() - start:.0f} s; {load_average()}\n")
    print(
        f"median of {args.repeats} rounds × {args.epochs} epochs per variant after "
        f"{args.warmup} warm-up round(s); one torch thread\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
