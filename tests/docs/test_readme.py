"""README's code runs as printed, its main command writes what README promises, CI runs its test
command, and its layout table lists every module."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from helpers.training import QUIET, event_files, run_irnet, scalars

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def fenced_after(marker: str) -> str:
    block = re.search(re.escape(marker) + r"\s*```bash\n(.*?)\n```", README, re.S)
    assert block, f"README has no bash block after {marker}"
    return block.group(1).strip()


def test_python_example_runs_and_fills_the_stats():
    code = re.search(r"```python\n(.*?)\n```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    block = scope["block"]
    assert block.forward_stats.converged.all()
    assert block.backward_stats is not None and block.backward_stats.converged.all()
    assert scope["y"].shape == (32, 4)


def test_ci_runs_readme_test_command():
    command = fenced_after("<!-- test-command -->")
    extracted = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, check=True
    ).stdout
    assert extracted.strip() == command
    assert "pytest" in command and "-c constraints.txt" in command


def test_layout_table_lists_every_module_once():
    section = README[README.index("## Layout\n") : README.index("## Reference\n")]
    listed = re.findall(r"^\| `([^`]+)`", section, re.M)
    modules = sorted(
        str(path.relative_to(ROOT))
        for folder in ("irnet", "callbacks", "datamodules")
        for path in (ROOT / folder).rglob("*.py")
    )
    assert [m for m in modules if m not in listed] == [], "modules missing from README's layout"
    assert [p for p in listed if not (ROOT / p).exists()] == [], "stale paths in README's layout"
    assert sorted({p for p in listed if listed.count(p) > 1}) == [], "listed twice"


@pytest.mark.slow
def test_main_command_fit_writes_what_readme_promises(tmp_path):
    command = fenced_after("<!-- main-command -->")
    assert "-c constraints.txt" in command
    fit = re.search(r"python -m irnet (fit .*)$", command)
    assert fit, f"the main command does not end in a fit: {command}"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    # The same fit, callbacks and all, for 2 epochs instead of 400.
    proc = run_irnet(
        [*shlex.split(fit.group(1)), "--trainer.max_epochs", "2", *QUIET], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ex1_sine" / "version_0"  # where README says the run goes
    assert "runs/ex1_sine/version_0/" in README
    assert event_files(run), f"no TensorBoard events under {run}"
    assert (run / "config.yaml").exists() and (run / "hparams.yaml").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert list((run / "checkpoints").glob("best-*.ckpt"))  # the best checkpoint on val/loss
    figures = {p.name for p in (run / "figures").glob("*.png")}
    for kind in (
        "figures_output",
        "figures_trajectories",
        "figures_fields",
        "figures_iterations",
        "gradients_norm_vs_layer",
        "perturbation_distance_vs_depth",
    ):
        assert any(name.startswith(kind) for name in figures), (
            f"no {kind}*.png in {sorted(figures)}"
        )
    logged = scalars(run)
    assert len(logged["train/loss"]) == 2 and len(logged["val/loss"]) == 2
    # The config makes every layer a 0.9-contraction: every forward solve converges.
    assert [value for _, value in logged["solver/forward_not_converged_epoch"]] == [0.0, 0.0]
