"""``python -m irnet``: every config fits, bad keys fail clearly, resume, DDP, print_config."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers_training import CONFIGS, QUIET, event_files, run_irnet, scalars, tiny_net_overrides
from irnet.cli import main

SHORT = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
         "--trainer.num_sanity_val_steps", "0", *QUIET]
# per config: shrink the network so that two epochs take seconds
TINY = {
    "ex1_sine": tiny_net_overrides(2, 16),
    "ex1_sine_100": tiny_net_overrides(3, 16),
    "ex2_spirals": tiny_net_overrides(3, 16),
    "digits": ["--model.net.init_args.layers", "1", "--model.net.init_args.channels", "2",
               "--model.net.init_args.hidden_channels", "2", "--data.init_args.batch_size", "64"],
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
@pytest.mark.parametrize("name", config_names())
def test_config_fits_from_the_command_line(name, tmp_path):
    proc = run_irnet(["fit", "--config", str(CONFIGS / f"{name}.yaml"), *SHORT, *TINY[name]], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / name / "version_0"
    assert event_files(run), f"no TensorBoard events under {run}"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "config.yaml").exists()
    logged = scalars(run)
    assert len(logged["train/loss"]) == 2 and len(logged["val/loss"]) == 2
    assert all(torch.isfinite(torch.tensor(v)) for _, v in logged["train/loss"])


def test_misspelled_key_fails_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args=["fit", "--config", str(CONFIGS / "ex1_sine.yaml"), "--model.net.init_args.thetaa", "0"])
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
        main(args=["fit", "--config", str(CONFIGS / "ex1_sine.yaml"), "--model.net.init_args.theta", "0",
                   "--model.net.init_args.layers", "100",
                   "--model.net.init_args.solver.class_path", "irnet.solvers.Anderson", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: irnet.nets.ODENet" in out
    assert "theta: 0.0" in out and "layers: 100" in out
    assert "class_path: irnet.solvers.Anderson" in out
    assert "save_dir: runs" in out and "monitor: val/loss" in out


def test_resume_from_last_checkpoint_continues_the_epoch_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(CONFIGS / "ex1_sine.yaml"), *tiny_net_overrides(2, 8), *QUIET]
    first = main(args=["fit", *common, "--trainer.max_epochs", "2"])
    assert first.trainer.current_epoch == 2 and first.trainer.global_step == 2
    last = tmp_path / "runs" / "ex1_sine" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.exists()
    second = main(args=["fit", *common, "--trainer.max_epochs", "4", "--ckpt_path", str(last)])
    assert second.trainer.current_epoch == 4
    assert second.trainer.global_step == 4  # two more steps, not four
    resumed = scalars(tmp_path / "runs" / "ex1_sine" / "version_1")
    assert [step for step, _ in resumed["train/loss_step"]] == [2, 3]
    # the resumed run starts from the saved weights, not from a fresh initialisation
    saved = torch.load(last, weights_only=False)["state_dict"]
    assert saved["net.blocks.0.F.gamma1"].shape == second.model.net.blocks[0].F.gamma1.shape


def test_last_checkpoint_is_the_latest_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # mode max: the "best" checkpoint stops improving after the first epoch as the loss falls
    cli = main(args=["fit", "--config", str(CONFIGS / "ex1_sine.yaml"), *tiny_net_overrides(2, 8), *QUIET,
                     "--checkpoint.mode", "max", "--trainer.max_epochs", "4"])
    folder = tmp_path / "runs" / "ex1_sine" / "version_0" / "checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (3, 4)
    for key, value in cli.model.state_dict().items():
        assert torch.equal(last["state_dict"][key], value), key
    best = [p for p in folder.iterdir() if p.name.startswith("best-")]
    assert len(best) == 1 and torch.load(best[0], weights_only=False)["epoch"] < 3


def test_checkpoint_reloads_from_its_config_hyperparameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(args=["fit", "--config", str(CONFIGS / "ex1_sine.yaml"), *tiny_net_overrides(2, 8), *QUIET,
                     "--model.net.init_args.theta", "0.25", "--trainer.max_epochs", "1"])
    last = tmp_path / "runs" / "ex1_sine" / "version_0" / "checkpoints" / "last.ckpt"
    reloaded = type(cli.model).load_from_checkpoint(last)
    assert reloaded.net.blocks[0].theta == 0.25 and len(reloaded.net.blocks) == 2
    x = torch.linspace(-5, 5, 7)[:, None]
    with torch.no_grad():
        assert torch.allclose(reloaded(x), cli.model(x))


@pytest.mark.slow
def test_two_process_ddp_fit_on_cpu(tmp_path):
    args = ["fit", "--config", str(CONFIGS / "ex1_sine.yaml"), *tiny_net_overrides(2, 8), *QUIET,
            "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
            "--trainer.max_epochs", "2"]
    proc = run_irnet(args, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "runs" / "ex1_sine"
    assert len(event_files(runs)) == 1  # only rank 0 writes
    logged = scalars(runs / "version_0")
    assert len(logged["train/loss"]) == 2
    assert (runs / "version_0" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", config_names())
def test_config_fits_on_a_gpu(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(args=["fit", "--config", str(CONFIGS / f"{name}.yaml"), *SHORT, *TINY[name],
                     "--trainer.accelerator", "gpu", "--trainer.devices", "1"])
    assert next(cli.model.parameters()).is_cuda
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"]).item()
    assert cli.trainer.current_epoch == 2


def test_run_name_falls_back_to_the_data_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(args=["--model.net", "irnet.nets.ODENet", "--model.net.init_args.in_features", "2",
                     "--data", "irnet.datamodules.Moons"], run=False)
    assert cli.trainer.logger.name == "moons"
    assert cli.trainer.logger.save_dir == "runs"
    named = main(args=["--config", str(CONFIGS / "digits.yaml")], run=False)
    assert named.trainer.logger.name == "digits"
