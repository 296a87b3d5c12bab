"""Mistakes on the command line end with one line naming the culprit and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.training import CONFIGS, QUIET, subprocess_env, tiny_net_overrides
from irnet.cli import main

EX1 = str(CONFIGS / "ex1_sine.yaml")
TINY = tiny_net_overrides(2, 8)

# Files the table refers to as {name}: written into the test's folder.
FILES = {
    "empty.yaml": "",
    "comments.yaml": "# nothing but a comment\n",
    "syntax.yaml": "trainer: [1, 2\n  max_epochs: :\n",
    "list.yaml": "- model\n- data\n",
    "unknown_trainer.yaml": "trainer:\n  max_epoch: 3\n",
    "unknown_model.yaml": "model:\n  init_args:\n    lrr: 0.1\n",
    "unknown_top.yaml": "seeed_everything: 1\n",
    "unknown_data.yaml": "data:\n  init_args:\n    num_pointz: 30\n",
    "negative_tol.yaml": (
        "model:\n  init_args:\n    net:\n      init_args:\n        solver:\n"
        "          init_args:\n            atol: -1\n"
    ),
    "in_features.yaml": (
        "model:\n  init_args:\n    net:\n      init_args:\n        in_features: 2\n"
    ),
    "garbage.ckpt": "this is not a checkpoint\n",
}

# (id, extra arguments after `fit --config ex1_sine.yaml`, substrings the error line must contain)
CASES = [
    # wrong type
    ("type-trainer", ["--trainer.max_epochs", "abc"], ["trainer.max_epochs", "int", "abc"]),
    ("type-model", ["--model.lr", "fast"], ["model.lr", "float", "fast"]),
    (
        "type-net",
        ["--model.net.init_args.layers", "2.5"],
        ["model.net.init_args.layers", "int", "2.5"],
    ),
    # out of range: our constructors' ValueErrors, at every level
    (
        "range-theta",
        ["--model.net.init_args.theta", "1.5"],
        ["model.net.init_args.theta", "[0, 1]", "1.5"],
    ),
    (
        "range-layers",
        ["--model.net.init_args.layers", "-3"],
        ["model.net.init_args.layers", ">= 1", "-3"],
    ),
    (
        "range-solver-file",
        ["--config", "{negative_tol.yaml}"],
        ["solver.init_args.atol", "> 0", "-1"],
    ),
    ("range-data", ["--data.init_args.num_points", "0"], ["data.num_points", ">= 2", "0"]),
    ("choice-loss", ["--model.loss", "l3"], ["model.loss", "'l2', 'mse', 'cross_entropy'", "l3"]),
    ("range-threads", ["--threads", "0"], ["threads", "'auto'", "0"]),
    # unknown keys, at each level, on the command line and in files
    (
        "unknown-net",
        ["--model.net.init_args.thetaa", "0"],
        ["model.net.init_args.thetaa", "theta", "layers"],
    ),
    ("unknown-top", ["--seed_everythin", "1"], ["--seed_everythin", "seed_everything"]),
    ("abbrev-trainer", ["--trainer.max_epoch", "5"], ["--trainer.max_epoch", "trainer.max_epochs"]),
    ("abbrev-seed", ["--seed", "1"], ["--seed", "abbreviations"]),
    (
        "unknown-trainer-file",
        ["--config", "{unknown_trainer.yaml}"],
        ["trainer.max_epoch", "max_epochs"],
    ),
    (
        "unknown-model-file",
        ["--config", "{unknown_model.yaml}"],
        ["model.lrr", "lr_step", "did you mean lr"],
    ),
    (
        "unknown-top-file",
        ["--config", "{unknown_top.yaml}"],
        ["seeed_everything", "seed_everything"],
    ),
    ("unknown-data-file", ["--config", "{unknown_data.yaml}"], ["data.num_pointz", "num_points"]),
    # unknown class_path
    (
        "class-solver",
        ["--model.net.init_args.solver.class_path", "irnet.solvers.Newton"],
        ["model.net.init_args.solver", "irnet.solvers.Newton", "irnet.solvers.FixedPoint"],
    ),
    (
        "class-linear-bare",
        ["--model.net.init_args.linear_solver", "Jacobi"],
        ["model.net.init_args.linear_solver", "Jacobi", "irnet.linear.Neumann"],
    ),
    (
        "class-data",
        ["--data", "irnet.datamodules.Mnist"],
        ["data", "irnet.datamodules.Mnist", "irnet.datamodules.Digits"],
    ),
    # broken files
    ("file-empty", ["--config", "{empty.yaml}"], ["empty.yaml", "empty"]),
    ("file-comments", ["--config", "{comments.yaml}"], ["comments.yaml", "empty"]),
    ("file-syntax", ["--config", "{syntax.yaml}"], ["syntax.yaml", "not valid YAML", "line 2"]),
    ("file-list", ["--config", "{list.yaml}"], ["list.yaml", "mapping", "list"]),
    ("file-missing", ["--config", "{missing.yaml}"], ["missing.yaml", "does not exist"]),
    # data and model that do not fit
    (
        "shape-in-features",
        ["--config", "{in_features.yaml}"],
        ["SineRegression", "(1,)", "in_features"],
    ),
    (
        "shape-data",
        ["--data", "irnet.datamodules.TwoSpirals", "--data.init_args.num_points", "40"],
        ["TwoSpirals", "(2,)", "in_features"],
    ),
    # trainer
    ("trainer-accelerator", ["--trainer.accelerator", "abacus"], ["accelerator", "abacus", "cpu"]),
    (
        "trainer-ddp-spawn",
        ["--trainer.strategy", "ddp_spawn"],
        ["trainer.strategy", "ddp_spawn", "--trainer.strategy ddp"],
    ),
    # checkpoints
    ("ckpt-missing", ["--ckpt_path", "{nothere.ckpt}"], ["ckpt_path", "nothere.ckpt", "no such"]),
    (
        "ckpt-garbage",
        ["--ckpt_path", "{garbage.ckpt}"],
        ["ckpt_path", "garbage.ckpt", "not a readable checkpoint"],
    ),
    (
        "ckpt-truncated",
        ["--ckpt_path", "{truncated.ckpt}"],
        ["ckpt_path", "truncated.ckpt", "not a readable checkpoint"],
    ),
    (
        "ckpt-not-lightning",
        ["--ckpt_path", "{plain.ckpt}"],
        ["plain.ckpt", "not a Lightning checkpoint"],
    ),
    (
        "resume-layers",
        ["--ckpt_path", "{last.ckpt}", "--model.net.init_args.layers", "3"],
        ["ckpt_path", "model.net.init_args.layers: checkpoint 2, given 3"],
    ),
    (
        "resume-lr",
        ["--ckpt_path", "{last.ckpt}", "--model.lr", "0.5"],
        ["model.lr: checkpoint 0.01, given 0.5"],
    ),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The table's files, and a real checkpoint (a tiny one-epoch fit) with broken copies of it."""
    root = tmp_path_factory.mktemp("cli_errors")
    for name, text in FILES.items():
        (root / name).write_text(text)
    before, argv = os.getcwd(), sys.argv
    try:
        os.chdir(root)
        sys.argv = ["irnet"]
        main(["fit", "--config", EX1, *TINY, *QUIET, "--trainer.max_epochs", "1"])
    finally:
        os.chdir(before)
        sys.argv = argv
    last = root / "runs" / "ex1_sine" / "version_0" / "checkpoints" / "last.ckpt"
    (root / "last.ckpt").write_bytes(last.read_bytes())
    (root / "truncated.ckpt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    torch.save({"weights": torch.zeros(2)}, root / "plain.ckpt")
    return root


def _args(extra: list[str], root: Path) -> list[str]:
    return [
        a.replace("{", str(root) + "/").replace("}", "") if a.startswith("{") else a for a in extra
    ]


def run_in_process(args: list[str], capsys) -> tuple[object, str]:
    """``irnet.cli.main(args)``: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("extra, culprits", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_exits_2_with_one_line_naming_it(extra, culprits, folder, capsys, monkeypatch):
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", ["irnet"])
    monkeypatch.delenv("IRNET_TRACEBACK", raising=False)
    code, err = run_in_process(
        ["fit", "--config", EX1, *TINY, *QUIET, *_args(extra, folder), "--trainer.max_epochs", "1"],
        capsys,
    )
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("irnet: error:")]
    assert len(lines) == 1, err
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])


def test_at_least_twenty_cases():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def test_a_refused_resume_writes_no_run(folder, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["irnet"])
    code, _ = run_in_process(
        [
            "fit",
            "--config",
            EX1,
            *TINY,
            *QUIET,
            "--ckpt_path",
            str(folder / "last.ckpt"),
            "--model.net.init_args.layers",
            "5",
        ],
        capsys,
    )
    assert code == 2 and not (tmp_path / "runs").exists()


def test_traceback_on_request(folder, capsys, monkeypatch):
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", ["irnet"])
    monkeypatch.setenv("IRNET_TRACEBACK", "1")
    code, err = run_in_process(
        ["fit", "--config", EX1, "--model.net.init_args.theta", "1.5"], capsys
    )
    assert code == 2
    assert "Traceback" in err and "theta must be a number in [0, 1], got 1.5" in err


@pytest.mark.slow
def test_a_real_process_exits_2_with_one_line(tmp_path):
    env = subprocess_env()
    env.pop("IRNET_TRACEBACK", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "irnet",
            "fit",
            "--config",
            EX1,
            "--model.net.init_args.theta",
            "1.5",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "irnet: error: model.net.init_args.theta: theta must be a number in [0, 1], got 1.5"
    )
