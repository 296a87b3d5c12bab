"""Every ``python -m irnet …`` command shown in README.md and docs/*.md runs, at a tiny size.

The commands are read from the fenced code blocks (each distinct command once),
so a doc that names an option the code does not accept, or one that parses but
does nothing (``EFFECTS`` reads every shown option back from the built run),
fails here. Each runs in-process through ``irnet.cli.main`` as printed, with
overrides appended that make it take seconds: one epoch of one batch, a
4-layer network where a 100-layer config's command does not set the depth
itself, and no monitoring callbacks unless the command is about them (every
config's callbacks run in tests/cli/test_cli.py and tests/docs/test_readme.py; here they
would add seconds of figure drawing to each). All run one after the other in
one working directory (``configs/`` linked in); the checkpoints the docs resume
from or evaluate (``runs/<config>/version_0/…``) are written first by a tiny
plain ``fit`` of their config. Commands for several CPU processes or nodes are
parsed and their Trainer built (``run=False``; a fit would start the other
processes, and tests/cli/test_cli.py and tests/training/test_multinode.py run such fits);
commands for GPUs this machine lacks are parsed (``--print_config``). The paper
studies other than ``stability`` only have their arguments parsed here
(tests/reproduce/test_reproduce.py runs each at a tiny size).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml
from pytorch_lightning.strategies import DDPStrategy

from helpers.training import QUIET, REPO
from irnet.cli import main

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:^|\s)-m irnet\s+(.*)")  # python -m, srun python -m, torchrun … -m

# Commands shown on purpose as failing examples: none today. Add (doc, command) pairs here.
EXPECTED_TO_FAIL: set[tuple[str, str]] = set()

SHORT = [
    "--trainer.limit_train_batches",
    "1",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
    *QUIET,
]
EVALUATE = {
    "validate": "limit_val_batches",
    "test": "limit_test_batches",
    "predict": "limit_predict_batches",
}
DEEP_CONFIGS = ("ex2_spirals", "ex1_sine_100")  # 100 layers: cut to 4 where the command allows
KEEPS_CALLBACKS = "callbacks"  # commands about the callbacks keep them


def _blocks(cli):
    return list(cli.model.net.blocks)


def _streams_callback(cli):
    return next(c for c in cli.trainer.callbacks if type(c).__name__ == "PerturbationStreams")


# What each option a doc shows sets, read back from the built objects: an option that parses but
# does nothing (as --model.r_rnd.init_args.streams did under PerturbationStreams) fails here.
# Class paths compare by class name. Add an entry when a doc shows a new option. (R_rnd's streams,
# seed and noise are PerturbationStreams' where a config has it, and r_rnd gets its own back after
# the fit: read such settings from the callback, not from model.r_rnd.)
EFFECTS = {
    "--model.net.init_args.theta": lambda cli: [b.theta for b in _blocks(cli)],
    "--model.net.init_args.layers": lambda cli: len(_blocks(cli)),
    "--model.net.init_args.width": lambda cli: _blocks(cli)[0].F.gamma1.shape[0],
    "--model.net.init_args.solver.class_path": lambda cli: type(_blocks(cli)[0].solver).__name__,
    "--model.net.init_args.solver.init_args.atol": lambda cli: _blocks(cli)[0].solver.atol,
    "--model.net.init_args.solver.init_args.max_iter": lambda cli: _blocks(cli)[0].solver.max_iter,
    "--model.net.init_args.solver.init_args.fixed_count": lambda cli: (
        _blocks(cli)[0].solver.fixed_count
    ),
    "--model.net.init_args.linear_solver.class_path": lambda cli: (
        type(_blocks(cli)[0].linear_solver).__name__
    ),
    "--model.net.init_args.warm_start": lambda cli: cli.model.net.warm_start,
    "--model.net.init_args.contraction": lambda cli: _contraction(_blocks(cli)[0]),
    "--model.net.init_args.init": lambda cli: cli.model.net.init,
    "--model.net.init_args.ensemble": lambda cli: cli.model.net.members,
    "--model.r_fp.init_args.weight": lambda cli: cli.model.r_fp.weight,
    "--model.r_div.init_args.weight": lambda cli: cli.model.r_div.weight,
    "--model.r_div.init_args.p": lambda cli: cli.model.r_div.p,
    "--model.r_mag.init_args.weight": lambda cli: cli.model.r_mag.weight,
    "--model.r_res.init_args.weight": lambda cli: cli.model.r_res.weight,
    "--model.r_tv.init_args.weight": lambda cli: cli.model.r_tv.weight,
    "--model.r_fp.init_args.p": lambda cli: cli.model.r_fp.p,
    "--model.r_rnd.init_args.weight": lambda cli: cli.model.r_rnd.weight,
    "--model.r_rnd.init_args.sigma": lambda cli: cli.model.r_rnd.perturbation.sigma,
    "--model.r_rnd.init_args.r": lambda cli: cli.model.r_rnd.r,
    "--model.lr": lambda cli: cli.model.lr,
    "--model.lr_step": lambda cli: cli.model.lr_step,
    "--trainer.callbacks.init_args.perturbation.init_args.sigma": lambda cli: (
        _streams_callback(cli).perturbation.sigma
    ),
    "--trainer.callbacks.init_args.streams": lambda cli: _streams_callback(cli).streams,
    "--data": lambda cli: type(cli.datamodule).__name__,
    "--seed_everything": lambda cli: cli.config[cli.subcommand]["seed_everything"],
}
NOT_CHECKED = (
    "--config",
    "--ckpt_path",
    "--print_config",
    "--trainer.",
)  # files, or replaced by tiny()


def shown_options(args: list[str]) -> dict[str, str]:
    """``{option: value}`` of the ``--option value`` pairs a command shows (files and Trainer
    options left out)."""
    pairs = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            pairs[name] = value or (args[i + 1] if i + 1 < len(args) else "")
    return {k: v for k, v in pairs.items() if k in EFFECTS or not k.startswith(NOT_CHECKED)}


def shown_value(text: str):
    """A command-line value as the CLI reads it: a number (also ``1e-6``, which YAML 1.1 keeps as a
    string), else YAML (lists, booleans), else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _contraction(block) -> Optional[float]:
    """κ = θ · (the Lipschitz bound on F) of a block, None where F is unconstrained."""
    return None if block.F.constraint is None else block.theta * block.F.constraint.bound


def check_effects(cli, args: list[str]) -> None:
    for name, value in shown_options(args).items():
        assert name in EFFECTS, f"{name}: add to EFFECTS how to read it back"
        expected = shown_value(value)
        if isinstance(expected, str) and "." in expected:  # a class path
            expected = expected.rsplit(".", 1)[1]
        actual = EFFECTS[name](cli)
        if isinstance(actual, list) and not isinstance(expected, list):
            expected = [expected] * len(actual)
        assert (
            actual == pytest.approx(expected)
            if not isinstance(expected, str)
            else actual == expected
        ), f"{name} {value}: the built run has {actual!r}"


def shown_commands() -> list[tuple[str, str]]:
    """``(doc, arguments after 'python -m irnet')`` for every command in a fenced block, in order;
    a command shown in several docs is listed once, under its first doc."""
    found: dict[str, str] = {}
    for doc in DOCS:
        for block in re.findall(r"```[^\n]*\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                match = COMMAND.search(line)
                if match:
                    args = shlex.split(match.group(1), comments=True)
                    found.setdefault(shlex.join(args), doc.name)
    return [(doc, command) for command, doc in found.items()]


COMMANDS = shown_commands()


def test_the_docs_show_the_commands_this_test_expects():
    subcommands = {shlex.split(c)[0] for _, c in COMMANDS}
    assert {"fit", "validate", "test", "predict", "reproduce"} <= subcommands
    assert len(COMMANDS) >= 25
    assert (
        "training.md",
        "fit --config configs/ex2_spirals.yaml --trainer.callbacks.init_args.streams 4 "
        "--model.r_rnd.init_args.r 2",
    ) in COMMANDS


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working directory for all commands: ``configs/`` linked in, the doc's subclass example
    written."""
    root = tmp_path_factory.mktemp("doc_commands")
    (root / "configs").symlink_to(REPO / "configs")
    subclassing = (REPO / "docs" / "subclassing.md").read_text()
    (root / "subclass_example.py").write_text(
        re.search(r"```python\n(.*?)```", subclassing, re.S).group(1)
    )
    my_config = re.search(r"```yaml\n(# my_config.yaml\n.*?)```", subclassing, re.S).group(1)
    (root / "my_config.yaml").write_text(my_config)
    threads = torch.get_num_threads()  # the CLI sets the run's threads: give later tests theirs
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.syspath_prepend(str(root))  # the doc runs it with PYTHONPATH=.
        patch.setattr(sys, "argv", ["irnet"])
        # the checkpoints the docs name: plain fits of their configs, first
        for _, command in COMMANDS:
            args = shlex.split(command)
            if option(args, "--ckpt_path") is not None and launch_kind(args) == "run":
                ensure_checkpoint(args)
        yield root
    torch.set_num_threads(threads)
    sys.modules.pop("subclass_example", None)


def option(args: list[str], name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in ``args`` (the last one given)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def tiny(args: list[str]) -> list[str]:
    """``args`` with the overrides that make the run take seconds appended."""
    subcommand, config = args[0], Path(option(args, "--config") or "").stem
    if subcommand in EVALUATE:
        return [*args, f"--trainer.{EVALUATE[subcommand]}", "1", *QUIET]
    resumed = option(args, "--ckpt_path") is not None
    extra = ["--trainer.max_epochs", "2" if resumed else "1", *SHORT]
    if config in DEEP_CONFIGS and not any(
        a.startswith(("--model.net.init_args.layers", "--model.net.init_args.theta")) for a in args
    ):
        extra += ["--model.net.init_args.layers", "4"]
    if not any(KEEPS_CALLBACKS in a for a in args):
        extra += ["--trainer.callbacks=[]"]
    return [*args, *extra]


def launch_kind(args: list[str]) -> str:
    """``"run"``; ``"build"`` for several CPU processes; ``"parse"`` for GPUs this machine lacks."""
    devices = int(option(args, "--trainer.devices") or 1)
    nodes = int(option(args, "--trainer.num_nodes") or 1)
    if option(args, "--trainer.accelerator") == "gpu" and (
        nodes > 1 or devices > torch.cuda.device_count()
    ):
        return "parse"
    return "build" if devices > 1 or nodes > 1 else "run"


def run_in_process(args: list[str]):
    """``irnet.cli.main(args)``: the finished CLI, or None after an exit with status 0
    (``--print_config``)."""
    try:
        return main(args)
    except SystemExit as stop:
        assert stop.code in (0, None), f"exit status {stop.code}"
        return None


def ensure_checkpoint(args: list[str]) -> None:
    """Write the checkpoint a command resumes from or evaluates, if no earlier command did."""
    path = Path(option(args, "--ckpt_path"))
    if path.exists():
        return
    config = option(args, "--config")
    run_in_process(tiny(["fit", "--config", config]))
    assert path.exists(), f"a fit of {config} did not write {path}"


@pytest.mark.slow
@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{d}:{c}" for d, c in COMMANDS])
def test_shown_command_runs(doc, command, workdir, capsys):
    args = shlex.split(command)
    if (doc, command) in EXPECTED_TO_FAIL:
        with pytest.raises(SystemExit) as stop:
            main(tiny(args))
        assert stop.value.code not in (0, None)
        return
    if args[0] == "reproduce":
        run_reproduce(args[1:], workdir)
        return
    kind = launch_kind(args)
    if kind == "parse":  # hardware this machine lacks: every key and class_path is still checked
        run_in_process([*args, "--print_config"])
        return
    if kind == "build":  # a fit would start the other processes (relaunch, or other nodes)
        cli = main(tiny(args)[1:], run=False)  # without run, LightningCLI takes no subcommand
        assert isinstance(cli.trainer.strategy, DDPStrategy)
        assert cli.trainer.num_devices == int(option(args, "--trainer.devices") or 1)
        assert cli.trainer.num_nodes == int(option(args, "--trainer.num_nodes") or 1)
        return
    capsys.readouterr()
    cli = run_in_process(tiny(args))
    if cli is not None and args[0] == "fit":
        check_effects(cli, args)
    if args[0] == "predict":  # docs/training.md: predictions.pt in the run directory
        writer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "PredictionWriter")
        assert writer.path.name == "predictions.pt" and writer.path.parent == Path(
            cli.trainer.log_dir
        )
        saved = torch.load(writer.path)
        assert torch.isfinite(saved["predictions"]).all() and len(saved["predictions"]) > 0
    if "--print_config" in args:  # the config it printed is the command's
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["init_args"]["net"]["class_path"] == "irnet.nets.ODENet"


def run_reproduce(args: list[str], workdir: Path) -> None:
    """``stability`` runs (seconds at ``--tiny``); the training studies only parse their
    arguments."""
    from irnet.reproduce import main as reproduce
    from irnet.reproduce import parser

    parsed = parser().parse_args(args)  # a study the command line does not know exits here
    if parsed.study == "stability":
        summary = reproduce([*args, "--tiny", "--out", str(workdir / "reproduce_stability")])
        assert summary.exists() and summary.stat().st_size > 0
