"""``python -m irnet``: every config fits, exit status, bad keys fail clearly, exact resume,
predict, DDP, print_config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.checkpoint import assert_identical, assert_same_training_state
from helpers.training import (
    CONFIGS,
    QUIET,
    event_files,
    scalars,
    subprocess_env,
    tiny_net_overrides,
)
from irnet.__main__ import main as console_script
from irnet.cli import main

SHORT = [
    "--trainer.max_epochs",
    "2",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.num_sanity_val_steps",
    "0",
    *QUIET,
]
# Tests about checkpoints, exit status and predict leave out the configs' monitoring callbacks: each
# fit would end drawing half a dozen figures (seconds), and every config's callbacks run in
# test_config_fits_from_the_command_line, test_readme, the resume test and the dying-DDP-child test.
NO_MONITORS = ["--trainer.callbacks=[]"]
# per config: shrink the network so that two epochs take seconds
TINY = {
    "ex1_sine": tiny_net_overrides(2, 16),
    "ex1_sine_100": tiny_net_overrides(3, 16),
    "ex2_spirals": tiny_net_overrides(3, 16),
    "digits": [
        "--model.net.init_args.layers",
        "1",
        "--model.net.init_args.channels",
        "2",
        "--model.net.init_args.hidden_channels",
        "2",
        "--data.init_args.batch_size",
        "64",
    ],
    "stiff": [
        "--model.net.init_args.layers",
        "4",
        "--model.net.init_args.observe_every",
        "2",
        "--model.net.init_args.width",
        "8",
        "--data.init_args.steps",
        "4",
        "--data.init_args.observe_every",
        "2",
    ],
    "lotka": [
        "--model.net.init_args.layers",
        "5",
        "--model.net.init_args.width",
        "8",
        "--data.init_args.steps",
        "5",
        "--data.init_args.substeps",
        "2",
    ],
}


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """In-process runs parse only what the test gives them."""
    monkeypatch.setattr(sys, "argv", ["irnet"])


def config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def test_every_config_has_fast_overrides():
    assert set(config_names()) == set(TINY), "add the new config to TINY"


@pytest.mark.slow
# ex1_sine's fit from the command line, callbacks and all, is tests/docs/test_readme.py's
# main-command test (in a fresh ``python -m irnet`` process; these run in-process through the same
# ``main``).
@pytest.mark.parametrize("name", [n for n in config_names() if n != "ex1_sine"])
def test_config_fits_from_the_command_line(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(args=["fit", "--config", str(CONFIGS / f"{name}.yaml"), *SHORT, *TINY[name]])
    run = tmp_path / "runs" / name / "version_0"
    assert event_files(run), f"no TensorBoard events under {run}"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "config.yaml").exists()
    logged = scalars(run)
    assert len(logged["train/loss"]) == 2 and len(logged["val/loss"]) == 2
    assert all(torch.isfinite(torch.tensor(v)) for _, v in logged["train/loss"])


def test_misspelled_key_fails_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            args=[
                "fit",
                "--config",
                str(CONFIGS / "ex1_sine.yaml"),
                "--model.net.init_args.thetaa",
                "0",
            ]
        )
    assert exit_info.value.code != 0
    assert "thetaa" in capsys.readouterr().err


def test_misspelled_key_in_a_config_file_fails_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit):
        main(args=["fit", "--config", str(CONFIGS / "ex1_sine.yaml"), "--config", str(bad)])
    assert "max_epoch" in capsys.readouterr().err


def test_print_config_shows_command_line_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            args=[
                "fit",
                "--config",
                str(CONFIGS / "ex1_sine.yaml"),
                "--model.net.init_args.theta",
                "0",
                "--model.net.init_args.layers",
                "100",
                "--model.net.init_args.solver.class_path",
                "irnet.solvers.Anderson",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: irnet.nets.ODENet" in out
    assert "theta: 0.0" in out and "layers: 100" in out
    assert "class_path: irnet.solvers.Anderson" in out
    assert "save_dir: runs" in out and "monitor: val/loss" in out


def test_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch):
    common = ["--config", str(CONFIGS / "ex1_sine.yaml"), *tiny_net_overrides(2, 8), *QUIET]
    (tmp_path / "whole").mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    whole = main(args=["fit", *common, "--trainer.max_epochs", "4"])
    monkeypatch.chdir(tmp_path)
    first = main(args=["fit", *common, "--trainer.max_epochs", "2"])
    assert first.trainer.current_epoch == 2 and first.trainer.global_step == 2
    last = tmp_path / "runs" / "ex1_sine" / "version_0" / "checkpoints" / "last.ckpt"
    second = main(args=["fit", *common, "--trainer.max_epochs", "4", "--ckpt_path", str(last)])
    assert second.trainer.current_epoch == 4
    assert second.trainer.global_step == 4  # two more steps, not four
    resumed = scalars(tmp_path / "runs" / "ex1_sine" / "version_1")
    assert [step for step, _ in resumed["train/loss_step"]] == [2, 3]
    # every weight, Adam moment and scheduler value as if the run had never stopped
    assert_identical(second.model.state_dict(), whole.model.state_dict(), "model")
    ckpt = "runs/ex1_sine/version_{}/checkpoints/last.ckpt"
    count = assert_same_training_state(
        torch.load(tmp_path / ckpt.format(1), weights_only=False),
        torch.load(tmp_path / "whole" / ckpt.format(0), weights_only=False),
    )
    assert count >= 3 * len(whole.model.state_dict())  # weights, exp_avg, exp_avg_sq at least


def test_last_checkpoint_is_the_latest_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # mode max: the "best" checkpoint stops improving after the first epoch as the loss falls
    cli = main(
        args=[
            "fit",
            "--config",
            str(CONFIGS / "ex1_sine.yaml"),
            *tiny_net_overrides(2, 8),
            *QUIET,
            *NO_MONITORS,
            "--checkpoint.mode",
            "max",
            "--trainer.max_epochs",
            "4",
        ]
    )
    folder = tmp_path / "runs" / "ex1_sine" / "version_0" / "checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (3, 4)
    # weights and buffers (a warm-start cache in _extra_state also holds later validation solves)
    weights = {k: v for k, v in cli.model.state_dict().items() if not k.endswith("_extra_state")}
    assert_identical({k: last["state_dict"][k] for k in weights}, weights, "state_dict")
    best = [p for p in folder.iterdir() if p.name.startswith("best-")]
    assert len(best) == 1 and torch.load(best[0], weights_only=False)["epoch"] < 3


def test_checkpoint_reloads_from_its_config_hyperparameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(
        args=[
            "fit",
            "--config",
            str(CONFIGS / "ex1_sine.yaml"),
            *tiny_net_overrides(2, 8),
            *QUIET,
            *NO_MONITORS,
            "--model.net.init_args.theta",
            "0.25",
            "--trainer.max_epochs",
            "1",
        ]
    )
    last = tmp_path / "runs" / "ex1_sine" / "version_0" / "checkpoints" / "last.ckpt"
    reloaded = type(cli.model).load_from_checkpoint(last)
    assert reloaded.net.blocks[0].theta == 0.25 and len(reloaded.net.blocks) == 2
    x = torch.linspace(-5, 5, 7)[:, None]
    with torch.no_grad():
        assert torch.allclose(reloaded(x), cli.model(x))


@pytest.mark.slow
def test_a_dying_ddp_child_ends_the_run_with_its_error(tmp_path):
    failing = (
        '{"class_path": "helpers.checkpoint.FailOnRank", "init_args": {"rank": 1, "epoch": 1}}'
    )
    args = [
        "fit",
        "--config",
        str(CONFIGS / "ex1_sine.yaml"),
        *tiny_net_overrides(2, 8),
        *QUIET,
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs",
        "50",
        f"--trainer.callbacks+={failing}",
    ]
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "irnet", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # a hang would raise TimeoutExpired
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr


def test_ddp_spawn_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            args=[
                "fit",
                "--config",
                str(CONFIGS / "ex1_sine.yaml"),
                *tiny_net_overrides(2, 8),
                *QUIET,
                "--trainer.accelerator=cpu",
                "--trainer.devices=2",
                "--trainer.strategy=ddp_spawn",
            ]
        )
    assert exit_info.value.code == 2
    assert "ddp_spawn" in capsys.readouterr().err and not (tmp_path / "runs").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", config_names())
def test_config_fits_on_a_gpu(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(
        args=[
            "fit",
            "--config",
            str(CONFIGS / f"{name}.yaml"),
            *SHORT,
            *TINY[name],
            "--trainer.accelerator",
            "gpu",
            "--trainer.devices",
            "1",
        ]
    )
    assert next(cli.model.parameters()).is_cuda
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"]).item()
    assert cli.trainer.current_epoch == 2


def test_run_name_falls_back_to_the_data_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(
        args=[
            "--model.net",
            "irnet.nets.ODENet",
            "--model.net.init_args.in_features",
            "2",
            "--data",
            "irnet.datamodules.Moons",
        ],
        run=False,
    )
    assert cli.trainer.logger.name == "moons"
    assert cli.trainer.logger.save_dir == "runs"
    named = main(args=["--config", str(CONFIGS / "digits.yaml")], run=False)
    assert named.trainer.logger.name == "digits"


def test_console_script_returns_exit_status_0(tmp_path, monkeypatch):
    assert 'irnet = "irnet.__main__:main"' in (CONFIGS.parent / "pyproject.toml").read_text()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "irnet",
            "fit",
            "--config",
            str(CONFIGS / "ex1_sine.yaml"),
            *tiny_net_overrides(2, 8),
            *QUIET,
            *NO_MONITORS,
            "--trainer.max_epochs",
            "1",
        ],
    )
    assert console_script() == 0  # what the script hands to sys.exit


@pytest.mark.slow
def test_installed_irnet_script_exits_0(tmp_path):
    script = Path(sys.executable).with_name("irnet")
    if not script.exists():
        pytest.skip("the irnet console script is not installed beside this Python")
    proc = subprocess.run(
        [
            str(script),
            "fit",
            "--config",
            str(CONFIGS / "ex1_sine.yaml"),
            *tiny_net_overrides(2, 8),
            *QUIET,
            *NO_MONITORS,
            "--trainer.max_epochs",
            "1",
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IrnetCLI object" not in proc.stdout + proc.stderr


def test_help_lists_every_subcommand_and_reproduce(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args=["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "validate", "test", "predict", "reproduce"))


def test_predict_writes_the_predictions_into_the_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = [
        "--config",
        str(CONFIGS / "ex1_sine.yaml"),
        *tiny_net_overrides(2, 8),
        *QUIET,
        *NO_MONITORS,
    ]
    main(args=["fit", *common, "--trainer.max_epochs", "1"])
    last = tmp_path / "runs" / "ex1_sine" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    cli = main(args=["predict", *common, "--ckpt_path", str(last)])
    written = tmp_path / "runs" / "ex1_sine" / "version_1" / "predictions.pt"
    assert f"Predictions written to {written.relative_to(tmp_path)}" in capsys.readouterr().out
    saved = torch.load(written, weights_only=True)
    # independent of the predict loop: the checkpoint's network applied to the test split
    model = type(cli.model).load_from_checkpoint(last)
    x, _ = cli.datamodule.tensors("test")
    with torch.no_grad():
        expected = model(x)
    assert saved["predictions"].shape == expected.shape == (x.shape[0], 1)
    assert torch.allclose(saved["predictions"], expected, rtol=1e-6, atol=1e-7)
    assert sorted(i for batch in saved["batch_indices"] for i in batch) == list(range(x.shape[0]))
