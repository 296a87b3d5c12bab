"""Training speed per config: the implicit network against its explicit (θ = 0) twin, idle and busy.

For every config in ``configs/`` (or those named by ``--configs``), side by side
in one run, one torch thread per process:

(a) **bare step** — no Lightning loop: the module and data module are built
    from the YAML by irnet's LightningCLI (``irnet.cli.main(args, run=False)``),
    then each epoch calls the module's own ``training_step`` (forward, loss,
    regularisers, metrics; ``self.log`` returns at once without a Trainer),
    backward and the optimiser step on every training batch (the data loading
    is left out of the time).
    The config as is ("implicit") and with θ = 0 ("explicit") train as two
    copies from the same initial weights, epoch by epoch in alternating order,
    so a slow spell of the machine hits both. ``--warmup`` epochs first (their
    mean forward iterations are the "early" column), then ``--epochs`` timed
    epochs per variant (the "late" iterations).
(b) **CLI epoch** — ``python -m irnet fit --config … --trainer.max_epochs N``
    with the config's callbacks, checkpoints and logger, timed by a callback
    (``training_timer.EpochTimer``) from one epoch start to the next: start-up,
    the sanity check, the first ``--cli-skip`` epochs and the last epoch (on
    which figure callbacks draw) are left out.
(c) **busy** — (a) and (b) again while a single-threaded busy process (a torch
    matmul loop, or a pure-Python loop with ``--busy python``) spins beside
    them. The busy process runs for the whole benchmark and is paused
    (SIGSTOP) during idle measurements and resumed (SIGCONT) for busy ones, so
    idle and busy epochs interleave too. ``--busy none`` skips (c).

Times are wall clock (``time.perf_counter``): a busy neighbour's cost is what
(c) measures. Every ratio compares numbers taken in the same run.

Options of the network or the solvers go through to the CLI unchanged, for both
variants: ``--set model.init_args.net.init_args.solver.init_args.max_iter=30``
(repeatable; any key the config or the CLI accepts, e.g. a block option such as
``warm_start`` once it exists). ``--theta-key`` names the key set to 0 for the
explicit twin.

Usage::

    python benchmarks/bench_training.py --quick                     # sanity run, about 2 minutes
    python benchmarks/bench_training.py --configs ex1_sine --warmup 60 --epochs 40
    python benchmarks/bench_training.py --parts bare --busy none --json out.json

Not a test: nothing here asserts; see ``docs/benchmarks.md`` for a recorded run.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and in every child

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from training_timer import IterationRecorder  # noqa: E402

DEFAULT_CONFIGS = ("ex1_sine", "ex1_sine_100", "ex2_spirals", "digits")
THETA_KEY = "model.init_args.net.init_args.theta"
VARIANTS = ("implicit", "explicit")

# Each loop exits once its parent is gone (a killed benchmark leaves no spinning orphan).
BUSY_SOURCES = {
    "matmul": (
        "import os; os.environ['OMP_NUM_THREADS'] = '1'\n"
        "import torch; torch.set_num_threads(1)\n"
        "parent = os.getppid()\n"
        "a = torch.randn(256, 256); b = torch.randn(256, 256)\n"
        "while os.getppid() == parent:\n    a = torch.tanh(a @ b)\n"
    ),
    "python": (
        "import os\nparent = os.getppid()\nx = 0\n"
        "while os.getppid() == parent:\n"
        "    for _ in range(100000):\n        x = (x + 1) % 1000003\n"
    ),
}


# -- the busy neighbour ----------------------------------------------------------------------------


class BusyNeighbour:
    """A single-threaded spinning process, paused until :meth:`busy` resumes it."""

    def __init__(self, kind: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", BUSY_SOURCES[kind]], env=dict(os.environ, OMP_NUM_THREADS="1")
        )
        time.sleep(2.0 if kind == "matmul" else 0.2)  # let it import torch before pausing
        self.running = True
        self.idle()

    def busy(self) -> None:
        if not self.running:
            os.kill(self.process.pid, signal.SIGCONT)
            self.running = True
            time.sleep(0.05)  # scheduled and spinning before the measurement starts

    def idle(self) -> None:
        if self.running:
            os.kill(self.process.pid, signal.SIGSTOP)
            self.running = False

    def set(self, condition: str) -> None:
        self.busy() if condition == "busy" else self.idle()

    def close(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)
        self.process.terminate()
        self.process.wait(timeout=10)


class NoNeighbour:
    def set(self, condition: str) -> None:
        pass

    def close(self) -> None:
        pass


# -- configs and overrides -------------------------------------------------------------------------


def config_path(name: str) -> Path:
    """``configs/<name>.yaml``, or ``name`` itself if it is a file."""
    path = Path(name)
    if path.is_file():
        return path.resolve()
    path = ROOT / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"--configs: no config {name!r} (neither a file nor configs/{name}.yaml)")
    return path


def cli_overrides(pairs: list[str]) -> list[str]:
    """``["a.b=1", …]`` → ``["--a.b", "1", …]`` for LightningCLI."""
    args = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
        args += [f"--{key.lstrip('-')}", value]
    return args


def variant_overrides(variant: str, args: argparse.Namespace) -> list[str]:
    extra = cli_overrides(args.set)
    return extra + ([f"--{args.theta_key}", "0"] if variant == "explicit" else [])


# -- (a) the bare training step --------------------------------------------------------------------


def optimizer_and_scheduler(module: Any) -> tuple[torch.optim.Optimizer, Any]:
    """The first optimiser and scheduler of ``configure_optimizers`` in any of Lightning's forms."""
    conf = module.configure_optimizers()
    if isinstance(conf, (list, tuple)) and len(conf) == 2 and isinstance(conf[0], (list, tuple)):
        return conf[0][0], (conf[1][0] if conf[1] else None)
    if isinstance(conf, (list, tuple)):
        conf = conf[0]
    if isinstance(conf, dict):
        sched = conf.get("lr_scheduler")
        return conf["optimizer"], sched.get("scheduler") if isinstance(sched, dict) else sched
    return conf, None


@dataclass
class BareRun:
    """One variant of one config, trained epoch by epoch without Lightning's loop."""

    name: str
    module: Any
    loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    recorder: IterationRecorder
    times: dict[str, list[float]] = field(default_factory=lambda: {"idle": [], "busy": []})
    early_iters: list[float] = field(default_factory=list)
    late_iters: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, config: Path, variant: str, args: argparse.Namespace) -> "BareRun":
        from irnet.cli import main as cli_main

        with contextlib.redirect_stdout(io.StringIO()):  # Lightning's tips and seed notes
            cli = cli_main(
                [
                    "--config",
                    str(config),
                    *variant_overrides(variant, args),
                    "--trainer.logger",
                    "false",
                ],
                run=False,
            )
        module, data = cli.model, cli.datamodule
        data.setup("fit")
        module.setup("fit")
        optimizer, scheduler = optimizer_and_scheduler(module)
        recorder = IterationRecorder(getattr(module, "net", None))
        return cls(variant, module, data.train_dataloader(), optimizer, scheduler, recorder)

    def step(self, batch: Any, index: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.recorder.new_step()
        out = self.module.training_step(batch, index)
        loss = out["loss"] if isinstance(out, dict) else out
        loss.backward()
        self.optimizer.step()

    def epoch(self) -> tuple[float, Optional[float]]:
        """Train one epoch; its wall seconds (steps only) and mean main-pass iterations."""
        self.module.train()
        batches = list(self.loader)
        self.module.on_train_epoch_start()
        start = time.perf_counter()
        for index, batch in enumerate(batches):
            self.step(batch, index)
        elapsed = time.perf_counter() - start
        if self.scheduler is not None:
            self.scheduler.step()
        return elapsed, self.recorder.take()


def bench_bare(
    config: Path, args: argparse.Namespace, neighbour, log: Callable[[str], None]
) -> dict:
    runs = [BareRun.build(config, v, args) for v in VARIANTS]
    conditions = ["idle"] + (["busy"] if args.busy != "none" else [])
    neighbour.set("idle")
    for e in range(args.warmup):
        for run in runs if e % 2 == 0 else runs[::-1]:
            _, iters = run.epoch()
            if iters is not None:
                run.early_iters.append(iters)
    k = 0
    for e in range(args.epochs):
        for condition in conditions if e % 2 == 0 else conditions[::-1]:
            neighbour.set(condition)
            for run in runs if k % 2 == 0 else runs[::-1]:
                seconds, iters = run.epoch()
                run.times[condition].append(seconds * 1e3)
                if iters is not None:
                    run.late_iters.append(iters)
            k += 1
        neighbour.set("idle")
    for run in runs:
        run.recorder.remove()
    log(f"#   bare {config.stem}: done")
    return {
        run.name: {"ms": run.times, "early_iters": run.early_iters, "late_iters": run.late_iters}
        for run in runs
    }


# -- (b) the CLI epoch -----------------------------------------------------------------------------


def cli_run(config: Path, variant: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One ``python -m irnet fit`` subprocess; its per-epoch seconds and iterations."""
    out = workdir / f"{config.stem}-{variant}-{time.monotonic_ns()}.json"
    timer = {
        "class_path": "training_timer.EpochTimer",
        "init_args": {"path": str(out), "threads": args.threads},
    }
    command = [
        sys.executable,
        "-m",
        "irnet",
        "fit",
        "--config",
        str(config),
        "--trainer.max_epochs",
        str(args.cli_epochs),
        *variant_overrides(variant, args),
        f"--trainer.callbacks+={json.dumps(timer)}",
    ]
    pythonpath = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=pythonpath)
    with open(workdir / "cli.log", "a") as logfile:
        logfile.write(f"\n$ {' '.join(command)}\n")
        logfile.flush()
        done = subprocess.run(
            command, cwd=workdir, env=env, stdout=logfile, stderr=subprocess.STDOUT
        )
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"{' '.join(command)} failed (exit {done.returncode}); see {workdir / 'cli.log'}"
        )
    return json.loads(out.read_text())


def bench_cli(
    config: Path, args: argparse.Namespace, neighbour, workdir: Path, log: Callable[[str], None]
) -> dict:
    conditions = ["idle"] + (["busy"] if args.busy != "none" else [])
    result = {
        v: {"ms": {c: [] for c in conditions}, "iters": [], "threads": None} for v in VARIANTS
    }
    k = 0
    for rep in range(args.repeats):
        for condition in conditions if rep % 2 == 0 else conditions[::-1]:
            neighbour.set(condition)
            for variant in VARIANTS if k % 2 == 0 else VARIANTS[::-1]:
                run = cli_run(config, variant, args, workdir)
                epochs = run["epoch_s"][args.cli_skip : -1]  # the last epoch draws figures
                result[variant]["ms"][condition] += [s * 1e3 for s in epochs]
                result[variant]["iters"] += [
                    i for i in run["iterations"][args.cli_skip : -1] if i is not None
                ]
                result[variant]["threads"] = run["threads"]
            k += 1
        neighbour.set("idle")
        log(
            f"#   cli {config.stem}: repeat {rep + 1}/{args.repeats} done; torch threads in the "
            f"fits: {result['implicit']['threads']}, {result['explicit']['threads']}"
        )
    return result


# -- reporting -------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def fmt(value: float, digits: int = 1) -> str:
    return "—" if value != value else f"{value:.{digits}f}"


def ratio(a: float, b: float) -> str:
    return "—" if not (a == a and b == b and b > 0) else f"{a / b:.2f}×"


def bare_table(results: dict[str, dict]) -> str:
    lines = [
        "| config | implicit ms/epoch | explicit ms/epoch | impl/expl | iters early | iters late "
        "| busy impl ms | busy/idle impl | busy/idle expl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        imp, exp = r["implicit"], r["explicit"]
        mi, me = median(imp["ms"]["idle"]), median(exp["ms"]["idle"])
        bi, be = median(imp["ms"]["busy"]), median(exp["ms"]["busy"])
        lines.append(
            f"| {name} | {fmt(mi)} | {fmt(me)} | {ratio(mi, me)} "
            f"| {fmt(mean(imp['early_iters']))} | {fmt(mean(imp['late_iters']))} "
            f"| {fmt(bi)} | {ratio(bi, mi)} | {ratio(be, me)} |"
        )
    return "\n".join(lines)


def cli_table(results: dict[str, dict]) -> str:
    lines = [
        "| config | implicit ms/epoch (median / mean) | explicit ms/epoch (median / mean) "
        "| impl/expl (median) | iters | busy impl ms (median) | busy/idle impl | busy/idle expl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        imp, exp = r["implicit"], r["explicit"]
        mi, me = median(imp["ms"]["idle"]), median(exp["ms"]["idle"])
        bi, be = median(imp["ms"].get("busy", [])), median(exp["ms"].get("busy", []))
        lines.append(
            f"| {name} | {fmt(mi)} / {fmt(mean(imp['ms']['idle']))} "
            f"| {fmt(me)} / {fmt(mean(exp['ms']['idle']))} | {ratio(mi, me)} "
            f"| {fmt(mean(imp['iters']))} | {fmt(bi)} | {ratio(bi, mi)} | {ratio(be, me)} |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op thread(s), Python {platform.python_version()}"
    )


def load_average() -> str:
    try:
        return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help="comma-separated config names in configs/ or YAML paths (all four)",
    )
    parser.add_argument("--parts", default="bare,cli", help="bare, cli or both (bare,cli)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=20,
        help="bare: untimed epochs per variant first, the 'early' iterations (20)",
    )
    parser.add_argument(
        "--epochs", type=int, default=20, help="bare: timed epochs per variant and condition (20)"
    )
    parser.add_argument("--cli-epochs", type=int, default=12, help="cli: --trainer.max_epochs (12)")
    parser.add_argument(
        "--cli-skip",
        type=int,
        default=2,
        help="cli: first epochs left out of the time (2); the last is always left out",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="cli: fits per variant and condition; epochs pooled (1)",
    )
    parser.add_argument(
        "--busy",
        choices=("matmul", "python", "none"),
        default="matmul",
        help="the busy neighbour of (c); none skips it (matmul)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a CLI override for both variants, e.g. "
        "model.init_args.net.init_args.solver.init_args.atol=1e-5 (repeatable)",
    )
    parser.add_argument(
        "--theta-key",
        default=THETA_KEY,
        help=f"the key set to 0 for the explicit twin ({THETA_KEY})",
    )
    parser.add_argument("--json", default=None, help="also write every measured time here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="sanity run: 2 warm-up + 3 timed bare epochs, 5 CLI epochs",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.epochs, args.cli_epochs, args.cli_skip, args.repeats = 2, 3, 5, 1, 1
    parts = set(args.parts.split(","))
    if not parts or parts - {"bare", "cli"}:
        raise ValueError(f"--parts must name bare and/or cli, got {args.parts!r}")
    args.parts = parts
    if args.cli_epochs < args.cli_skip + 2:
        raise ValueError(f"--cli-epochs must be >= --cli-skip + 2, got {args.cli_epochs}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.json:
        args.json = str(Path(args.json).resolve())  # the benchmark changes directory
    # SIGTERM (e.g. from `timeout`) unwinds like an exception: the neighbour and the temporary
    # directory are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "Seed set to …", "GPU available: …"
    configs = [config_path(name) for name in args.configs.split(",")]
    log = lambda line: print(line, flush=True)  # noqa: E731
    command = " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])
    log(f"# {command}")
    log(f"# machine: {machine()}; {load_average()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    neighbour = BusyNeighbour(args.busy) if args.busy != "none" else NoNeighbour()
    bare, cli = {}, {}
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_training-") as tmp:
            workdir = Path(tmp)
            cwd = os.getcwd()
            os.chdir(workdir)  # runs/ and checkpoints of the CLI land here, not in the repository
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ConvergenceWarning, Lightning's notes
                    for config in configs:
                        if "bare" in args.parts:
                            bare[config.stem] = bench_bare(config, args, neighbour, log)
                            log(bare_table({config.stem: bare[config.stem]}).splitlines()[-1])
                        if "cli" in args.parts:
                            cli[config.stem] = bench_cli(config, args, neighbour, workdir, log)
                            log(cli_table({config.stem: cli[config.stem]}).splitlines()[-1])
                        save_json(args, command, bare, cli)  # partial results survive a kill
            finally:
                os.chdir(cwd)
    finally:
        neighbour.close()
    log(f"# total {time.perf_counter() - start:.0f} s; {load_average()}\n")
    if bare:
        log(
            f"## (a) bare training step: median of {args.epochs} epochs after {args.warmup} "
            f"warm-up epochs; busy neighbour: {args.busy}\n"
        )
        log(bare_table(bare) + "\n")
    if cli:
        log(
            f"## (b) CLI epoch with the config's callbacks: epochs {args.cli_skip + 1}–"
            f"{args.cli_epochs - 1} of {args.cli_epochs}, {args.repeats} fit(s) per variant and "
            f"condition; busy neighbour: {args.busy}\n"
        )
        log(cli_table(cli))
    save_json(args, command, bare, cli)


def save_json(args: argparse.Namespace, command: str, bare: dict, cli: dict) -> None:
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"command": command, "machine": machine(), "bare": bare, "cli": cli}, indent=1
            )
        )


if __name__ == "__main__":
    main()
