"""What a run prints: usage lines that name ``irnet``, and none of Lightning's notices that tell an
irnet user nothing (the litlogger advertisement, a pytree deprecation warning) while irnet's own
output and real warnings still show.

The runs are real ``python -m irnet`` processes: in-process, pytest's capture and warning filters
(and a patched ``sys.argv``) would hide what a user sees.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from helpers.training import CONFIGS, QUIET, subprocess_env, tiny_net_overrides
from irnet.cli.quiet import TIP_LOGGERS, quiet_notices

ADVERT = "litlogger"
PYTREE = "isinstance(treespec, LeafSpec)"
TIP = (
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing "
    "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger."
)


def irnet(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m irnet *args`` in ``cwd``, with Python's default warning filters."""
    env = subprocess_env()
    env.pop("PYTHONWARNINGS")  # the helper's "ignore" would hide the warnings looked for here
    return subprocess.run(
        [sys.executable, "-m", "irnet", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, usage",
    [
        (["--help"], "usage: irnet [-c CONFIG] {fit,validate,test,predict}"),
        (["fit", "--help"], "usage: irnet [options] fit "),
        (["reproduce", "--help"], "usage: irnet reproduce "),
    ],
    ids=["irnet", "fit", "reproduce"],
)
def test_usage_lines_name_irnet(args, usage, tmp_path):
    proc = irnet(args, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(usage), proc.stdout[:300]
    assert "__main__" not in proc.stdout


@pytest.mark.slow
def test_a_run_shows_irnets_output_and_warnings_without_lightnings_notices(tmp_path):
    common = [
        "--config",
        str(CONFIGS / "ex1_sine.yaml"),
        *tiny_net_overrides(2, 8),
        *QUIET,
        "--trainer.callbacks=[]",
        # one fixed-point iteration cannot reach the tolerance: irnet's ConvergenceWarning
        "--model.net.init_args.solver.init_args.max_iter",
        "1",
    ]
    fit = irnet(["fit", *common, "--trainer.max_epochs", "1"], tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    last = tmp_path / "runs" / "ex1_sine" / "version_0" / "checkpoints" / "last.ckpt"
    predict = irnet(["predict", *common, "--ckpt_path", str(last)], tmp_path)
    assert predict.returncode == 0, predict.stderr[-3000:]
    for proc in (fit, predict):
        output = proc.stdout + proc.stderr
        assert ADVERT not in output and PYTREE not in output, output[-3000:]
        assert "GPU available" in output  # Lightning's other lines are kept
    assert "ConvergenceWarning" in fit.stderr and "did not converge" in fit.stderr
    written = Path("runs") / "ex1_sine" / "version_1" / "predictions.pt"
    assert f"Predictions written to {written}" in predict.stdout


def test_only_the_two_notices_are_held_back_and_only_inside_the_block():
    lightning = logging.getLogger(TIP_LOGGERS[0])
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    lightning.addHandler(handler)

    def pytree_warning(module: str) -> None:
        warnings.warn_explicit(
            f"`{PYTREE}` is deprecated, use ... instead.",
            FutureWarning,
            module.replace(".", "/") + ".py",
            1,
            module=module,
            registry={},
        )

    level = lightning.level
    lightning.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_notices():
                lightning.info(TIP)
                lightning.info("💡 Tip: For seamless cloud uploads and versioning, try litmodels.")
                lightning.info("GPU available: False, used: False")
                pytree_warning("pytorch_lightning.utilities._pytree")
                pytree_warning("irnet.layer")  # the same deprecation elsewhere is not Lightning's
                warnings.warn("a real warning", UserWarning)
            lightning.info(TIP)
            pytree_warning("pytorch_lightning.utilities._pytree")
    finally:
        lightning.removeHandler(handler)
        lightning.setLevel(level)
    assert logged == ["GPU available: False, used: False", TIP]
    assert [w.filename for w in caught if PYTREE in str(w.message)] == [
        "irnet/layer.py",
        "pytorch_lightning/utilities/_pytree.py",
    ]
    assert any(str(w.message) == "a real warning" for w in caught)
    assert not lightning.filters
