"""Thread policy (irnet/cli/threads.py): precedence, and that fit and reproduce apply it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers.training import CONFIGS, QUIET, tiny_net_overrides
from irnet.cli import main
from irnet.cli import threads as threads
from irnet.reproduce._runner import run_cells


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    """Each test leaves torch's thread count and argv as it found them."""
    monkeypatch.setattr(sys, "argv", ["irnet"])
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "setting, env, expected",
    [
        (None, {}, 1),  # default: one thread per process
        (None, {"OMP_NUM_THREADS": "3"}, 3),  # the user's environment
        (2, {"OMP_NUM_THREADS": "3"}, 2),  # the run's setting wins
        ("4", {}, 4),  # as a string (command line)
        (None, {"OMP_NUM_THREADS": "junk"}, 1),  # an unusable variable is ignored
    ],
)
def test_precedence(setting, env, expected):
    assert threads.resolve_threads(setting, environ=env) == expected


def test_auto_is_torchs_own_default():
    assert (
        threads.resolve_threads("auto", environ={"OMP_NUM_THREADS": "1"}) == threads._TORCH_DEFAULT
    )


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_bad_settings_name_the_argument(bad):
    with pytest.raises(ValueError, match=r"threads must be an integer >= 1 or 'auto', got"):
        threads.resolve_threads(bad)


def test_apply_sets_torch(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.apply_threads(3) == 3 and torch.get_num_threads() == 3
    assert threads.apply_threads(None) == 1 and torch.get_num_threads() == 1


@pytest.mark.parametrize(
    "flag, env, expected",
    [
        ([], None, 1),
        (["--threads", "2"], "1", 2),
        ([], "2", 2),
    ],
)
def test_the_command_line_applies_the_setting(flag, env, expected, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    torch.set_num_threads(5)  # whatever ran before must not leak into the run
    cli = main(["--config", str(CONFIGS / "ex1_sine.yaml"), *flag], run=False)
    assert cli.threads == expected and torch.get_num_threads() == expected


def test_threads_key_in_a_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = tmp_path / "threads.yaml"
    extra.write_text("threads: 2\n")
    cli = main(["--config", str(CONFIGS / "ex1_sine.yaml"), "--config", str(extra)], run=False)
    assert cli.threads == 2 and torch.get_num_threads() == 2


FIT_AND_REPORT = """
import sys, torch
from irnet.cli import main
cli = main(sys.argv[1:])
print("THREADS", torch.get_num_threads(), cli.trainer.current_epoch)
"""


@pytest.mark.slow
def test_a_fit_in_a_fresh_process_runs_on_one_thread(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONWARNINGS"] = "ignore"
    # without the config's monitoring callbacks: the figures they draw at the end take seconds and
    # have nothing to do with threads
    args = [
        "fit",
        "--config",
        str(CONFIGS / "ex1_sine.yaml"),
        *tiny_net_overrides(2, 8),
        *QUIET,
        "--trainer.max_epochs",
        "1",
        "--trainer.callbacks=[]",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", FIT_AND_REPORT, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "THREADS 1 1" in proc.stdout


def report_threads(cell: dict) -> dict:
    """A study cell that reports its worker's torch threads (module level: picklable)."""
    return {"threads": torch.get_num_threads()}


@pytest.mark.slow
def test_reproduce_workers_follow_the_policy(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # spawned workers inherit the environment
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    cells = [{"i": i} for i in range(3)]
    assert [
        r["threads"] for r in run_cells(report_threads, cells, workers=2, desc="t", threads=2)
    ] == [2, 2, 2]
    assert [r["threads"] for r in run_cells(report_threads, cells, workers=1, desc="t")] == [
        1,
        1,
        1,
    ]
