"""``python -m irnet reproduce seeds``: argument parsing, criteria, and tiny end-to-end runs whose
numbers are checked against an ordinary ``fit``, ``validate`` on the checkpoint and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback

from irnet.reproduce import main as reproduce
from irnet.reproduce import parser
from irnet.reproduce.seeds import (
    Criterion,
    _silent_failure,
    parse_criterion,
    parse_set,
    parse_stop_when,
)

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "ex1_sine.yaml")
SMALL = ["model.init_args.net.init_args.layers=3"]  # a 3-layer sine network: seconds per run


class FailOnSeed(Callback):
    """Raises at the end of the first training epoch of the run seeded `seed` (a forced failure)."""

    def __init__(self, seed: int = 1) -> None:
        self.seed = seed

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if int(os.environ.get("PL_GLOBAL_SEED", -1)) == self.seed:
            raise RuntimeError(f"forced failure of seed {self.seed}")


# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, op, threshold",
    [
        ("val/loss<=0.12", "final_val_loss", "<=", 0.12),
        (" val/loss < 1e-1 ", "final_val_loss", "<", 0.1),
        ("val/acc>=0.95", "final_val_acc", ">=", 0.95),
        ("max(val/acc)>0.9", "best_val_acc", ">", 0.9),
        ("min(val/loss)<=0.15", "best_val_loss", "<=", 0.15),
        ("train/loss<=2", "final_train_loss", "<=", 2.0),
    ],
)
def test_criterion_parser_accepts(text, key, op, threshold):
    c = parse_criterion(text)
    assert (c.key, c.op, c.threshold) == (key, op, threshold)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("loss<=0.1", "unknown metric"),
        ("val/loss=0.1", "metric operator number"),
        ("val/loss<=abc", "not a number"),
        ("val/loss<=nan", "finite"),
        ("val/loss<=inf", "finite"),
        ("", "metric operator number"),
        ("val/loss=<0.1", "unknown metric"),
        ("min(val/acc)>=0.9", "unknown metric"),
    ],
)
def test_criterion_parser_refuses_with_the_argument_named(text, fragment):
    with pytest.raises(ValueError, match="--criterion") as err:
        parse_criterion(text)
    assert fragment in str(err.value)


def test_criterion_counts_final_values_of_completed_runs_only():
    final, best = parse_criterion("val/loss<=0.12"), parse_criterion("min(val/loss)<=0.12")
    ok = {"failed": False, "final_val_loss": 0.12, "best_val_loss": 0.1}
    broken = {"failed": True, "final_val_loss": 0.11, "best_val_loss": 0.1}
    nan = {"failed": False, "final_val_loss": math.nan, "best_val_loss": math.nan}
    assert [final.met(r) for r in (ok, broken, nan)] == [True, False, False]
    assert [best.met(r) for r in (ok, broken, nan)] == [True, True, False]
    assert not Criterion("val/loss<0.12", "final_val_loss", "<", 0.12).met(ok)


def test_set_parser():
    assert parse_set("model.init_args.r_fp=null") == ("model.init_args.r_fp", "null")
    assert parse_set("a.b=x=y") == ("a.b", "x=y")
    for bad in ("model.init_args.lr", "=1", "--model.lr=1"):
        with pytest.raises(ValueError, match="--set"):
            parse_set(bad)


def test_command_line_refusals_name_the_option(capsys):
    cases = [
        (["seeds", "--criterion", "loss<1"], "--criterion"),
        (["seeds"], "--config"),
        (["seeds", "--config", "no/such.yaml"], "--config"),
        (["ex2", "--set", "a=1"], "--set"),
        (["seeds", "--config", CONFIG, "--set", "lr"], "--set"),
        (["seeds", "--config", CONFIG, "--stop-when", "min(val/loss)<0.1"], "--stop-when"),
        (["ex1", "--stop-when", "val/loss<0.1"], "--stop-when"),
    ]
    for argv, option in cases:
        with pytest.raises(SystemExit) as exit_:
            reproduce(argv)
        assert exit_.value.code == 2
        assert option in capsys.readouterr().err
    assert parser().parse_args(["seeds", "--config", CONFIG]).seeds is None


# -- end to end ------------------------------------------------------------------------------------


def _study(tmp_path: Path, *extra: str, sets=SMALL) -> dict:
    argv = [
        "seeds",
        "--config",
        CONFIG,
        "--tiny",
        "--first-seed",
        "2",
        "--workers",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--log-dir",
        str(tmp_path / "runs"),
        *[a for s in sets for a in ("--set", s)],
        *extra,
    ]
    summary = reproduce(argv)
    assert summary == tmp_path / "out" / "summary.md"
    return json.loads((tmp_path / "runs" / "ex1_sine" / "cells.json").read_text())


def _tensorboard(log_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_tiny_study_matches_fit_validate_and_tensorboard_and_survives_a_failing_seed(tmp_path):
    from irnet.cli import main as cli

    fail = '{"class_path": "test_seed_study.FailOnSeed", "init_args": {"seed": 4}}'
    saved = _study(
        tmp_path,
        "--no-ensemble",  # a run per seed: the forced failure names its seed's own process
        "--seeds",
        "3",
        "--epochs",
        "2",
        "--criterion",
        "val/loss<=10",
        "--table",
        str(tmp_path / "table.md"),
        sets=[*SMALL, f"trainer.callbacks+={fail}"],
    )
    seeds = {r["seed"]: r for r in saved["cells"]}
    assert sorted(seeds) == [2, 3, 4]
    for r in (seeds[2], seeds[3]):
        assert not r["failed"] and r["error"] is None and r["epochs_run"] == r["max_epochs"] == 2
        scalars = _tensorboard(str(Path(r["log_dir"]) / "ex1_sine" / f"seed{r['seed']}"))
        assert r["history"]["val_loss"] == pytest.approx(scalars["val/loss"], rel=1e-6)
        assert r["final_train_loss"] == pytest.approx(scalars["train/loss"][-1], rel=1e-6)
        assert r["best_val_loss"] == pytest.approx(min(scalars["val/loss"]), rel=1e-6)
        # full batch: one step an epoch, so the module's train/iters is the epoch's mean iterations
        assert r["history"]["iterations"] == pytest.approx(scalars["train/iters"], rel=1e-6)
        assert r["iterations_last10"] == pytest.approx(scalars["train/iters"][-1], rel=1e-6)
    # The forced failure is recorded, with the epoch it completed and a checkpoint, not raised.
    assert seeds[4]["failed"] and "RuntimeError: forced failure of seed 4" in seeds[4]["error"]
    assert (
        seeds[4]["epochs_run"] == 1
        and math.isfinite(seeds[4]["final_val_loss"])
        and seeds[4]["checkpoint"]
    )

    # Seed 3 (not the first run in this process) as `fit` trains it, with SolverStatistics and the
    # StabilityMonitor (extra passes every epoch) on: the same numbers.
    monitors = (
        '[{"class_path": "irnet.callbacks.SolverStatistics", "init_args": {"per_layer": false}},'
        ' {"class_path": "irnet.callbacks.StabilityMonitor", "init_args": {"every_n_epochs": 1}}]'
    )
    fit = cli(
        [
            "fit",
            "--config",
            CONFIG,
            "--seed_everything",
            "3",
            "--trainer.max_epochs=2",
            f"--{SMALL[0]}",
            f"--trainer.callbacks={monitors}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'fit'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    metrics = {k: float(v) for k, v in fit.trainer.callback_metrics.items()}
    assert seeds[3]["final_val_loss"] == pytest.approx(metrics["val/loss"], rel=1e-6)
    assert seeds[3]["history"]["unconverged"][-1] == metrics["solver/forward_not_converged_epoch"]
    assert seeds[3]["history"]["iterations"][-1] == pytest.approx(
        metrics["solver/forward_iterations_mean_epoch"]
    )

    # validate on the saved last checkpoint gives the recorded final validation loss.
    check = cli(
        [
            "validate",
            "--config",
            CONFIG,
            f"--{SMALL[0]}",
            "--ckpt_path",
            seeds[2]["checkpoint"],
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'validate'}",
        ]
    )  # its config.yaml goes there
    assert seeds[2]["final_val_loss"] == pytest.approx(
        float(check.trainer.callback_metrics["val/loss"]), rel=1e-4
    )

    summary = (tmp_path / "out" / "summary.md").read_text()
    reached = sum(seeds[s]["final_val_loss"] <= 10 for s in (2, 3))
    assert (
        f"{reached} of 3 seeds reach val/loss<=10" in summary
        and "failed: RuntimeError: forced" in summary
    )
    assert (tmp_path / "out" / "seeds_ex1_sine.png").stat().st_size > 5000
    assert (
        summary.count("\n| ex1_sine |") == 1
        and (tmp_path / "table.md").read_text().count("| ex1_sine |") == 1
    )
    (tmp_path / "out" / "summary.md").unlink()
    _study(tmp_path, "--replot")  # redrawn from cells.json, no training
    assert (tmp_path / "out" / "summary.md").read_text() == summary
    results = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    assert [r["final_val_loss"] for r in results] == pytest.approx(
        [seeds[s]["final_val_loss"] for s in (2, 3, 4)], rel=1e-3
    )


def test_stop_when_reads_the_final_validation_metric_only():
    assert parse_stop_when("val/loss<=0.15").threshold == 0.15
    assert parse_stop_when("val/acc>=0.95").key == "final_val_acc"
    for text in ("min(val/loss)<=0.1", "train/loss<1"):
        with pytest.raises(ValueError, match="--stop-when"):
            parse_stop_when(text)


def test_an_early_stop_is_a_failure_unless_the_stop_criterion_holds():
    net = torch.nn.Linear(2, 2)
    stopped = {"final_train_loss": 0.5, "final_val_loss": 0.4, "epochs_run": 2, "max_epochs": 9}
    assert _silent_failure(stopped, net, "val/loss<=0.45") is None
    assert _silent_failure(stopped, net, "val/loss<=0.3") == "stopped after 2 of 9 epochs"


@pytest.mark.slow
def test_stop_when_ends_each_fit_at_the_first_validation_that_meets_it(tmp_path):
    # A target every seed passes at its first validation: each fit ends after one epoch.
    cells = _study(tmp_path, "--seeds", "2", "--epochs", "4", "--stop-when", "val/loss<1e6")[
        "cells"
    ]
    assert [c["epochs_run"] for c in cells] == [1, 1]
    assert not any(c["failed"] for c in cells)
    assert all(len(c["history"]["val_loss"]) == 1 for c in cells)


def test_a_fit_that_raised_nothing_can_still_have_failed():
    net = torch.nn.Linear(2, 2)
    record = {"final_train_loss": 0.5, "final_val_loss": 0.4, "epochs_run": 3, "max_epochs": 3}
    assert _silent_failure(record, net) is None
    assert _silent_failure({**record, "epochs_run": 2}, net) == "stopped after 2 of 3 epochs"
    assert _silent_failure({**record, "final_val_loss": math.inf}, net) == "final_val_loss is inf"
    with torch.no_grad():
        net.weight[0, 1] = math.nan
    assert _silent_failure(record, net) == "non-finite weights at the end"


def _record(seed: int, loss: float, acc: float, failed: bool = False) -> dict:
    """A synthetic seed record with the fields the report reads."""
    return {
        "seed": seed,
        "final_val_loss": loss,
        "best_val_loss": loss / 2,
        "best_epoch": 4,
        "final_val_acc": acc,
        "best_val_acc": acc,
        "final_train_loss": loss,
        "epochs_run": 5,
        "max_epochs": 5,
        "iterations_mean": 6.0,
        "iterations_last10": 4.0 + seed,
        "unconverged": 10 * seed,
        "diverged": 0,
        "val_unconverged": 0,
        "seconds": 60.0 * (seed + 1),
        "failed": failed,
        "error": "TrainingFailure: x | y" if failed else None,
        "history": {"val_loss": [loss] * 5, "val_acc": [acc] * 5},
    }


def test_report_counts_and_spreads_over_seeds(tmp_path):
    from irnet.reproduce._seed_report import figure, seed_table, spread, table_row

    results = [_record(0, 0.3, 0.9), _record(1, 0.1, 0.97), _record(2, math.nan, 0.5, failed=True)]
    criteria = [parse_criterion("val/acc>=0.95"), parse_criterion("min(val/loss)<=0.15")]
    meta = {"label": "demo", "config": "c.yaml", "sets": ["a.b=1"]}
    header, row = table_row(meta, results, criteria)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:7] == [
        "demo",
        "`c.yaml`",
        "`a.b=1`",
        "3",
        "5",
        "1",
        "val/acc>=0.95: 1/3; min(val/loss)<=0.15: 2/3",
    ]
    assert cells[7] == "0.2 [0.1, 0.3] (1 non-finite)" and cells[8] == "0.9 [0.5, 0.97]"
    assert cells[9:] == ["5 [6]", "30 [20]", "2.0"]  # iterations median [max], unconverged, minutes
    assert len(header.splitlines()[0].split("|")) == len(row.split("|"))
    assert spread([None, math.nan]) == "–"
    table = seed_table(results).splitlines()
    assert "final val acc" in table[0] and "failed: TrainingFailure: x / y" in table[-1]
    assert figure(results, criteria, tmp_path / "f.png").stat().st_size > 5000


def test_sigterm_stops_the_study_instead_of_counting_as_a_failed_seed(monkeypatch, tmp_path):
    # Lightning turns SIGTERM during a fit into SIGTERMException (a SystemExit, like the CLI's
    # configuration errors, which do count as a failed seed): it must end the study.
    from types import SimpleNamespace

    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from irnet.reproduce import seeds

    class Terminated:
        callbacks: list = []
        max_epochs = 1
        lightning_module = None
        logger = SimpleNamespace(log_dir=str(tmp_path))

        def fit(self, *args, **kwargs):
            raise SIGTERMException()

    cli = SimpleNamespace(trainer=Terminated(), model=None, datamodule=None)
    monkeypatch.setattr(seeds, "build", lambda cell: cli)
    with pytest.raises(SIGTERMException):
        seeds.run_cell({"seed": 0})
    monkeypatch.setattr(
        Terminated, "fit", lambda self, *a, **k: (_ for _ in ()).throw(SystemExit(2))
    )
    assert seeds.run_cell({"seed": 0})["failed"]


def test_criterion_compares_in_the_precision_of_logged_metrics():
    exactly_95 = float(
        torch.tensor(95 / 100, dtype=torch.float32)
    )  # 0.949999988: what Lightning logs
    assert exactly_95 < 0.95
    assert parse_criterion("max(val/acc)>=0.95").met({"best_val_acc": exactly_95})
    assert not parse_criterion("max(val/acc)>=0.95").met(
        {"best_val_acc": float(torch.tensor(0.94))}
    )


# -- seeds as ensembles ----------------------------------------------------------------------------


def test_seeds_trained_as_ensembles_give_the_records_of_their_own_runs(tmp_path):
    together = _study(tmp_path / "ensembles", "--seeds", "3", "--epochs", "3", "--workers", "2")
    apart = _study(tmp_path / "apart", "--no-ensemble", "--seeds", "3", "--epochs", "3")
    assert together["meta"]["ensembles"] == [2] and apart["meta"]["ensembles"] == []  # 4 alone
    assert (
        [r["seed"] for r in together["cells"]] == [r["seed"] for r in apart["cells"]] == [2, 3, 4]
    )
    same = ("final_val_loss", "best_val_loss", "best_epoch", "final_train_loss", "unconverged")
    for mine, own in zip(together["cells"], apart["cells"]):
        assert not mine["failed"] and mine["epochs_run"] == own["epochs_run"] == 3
        for key in same:
            assert mine[key] == pytest.approx(own[key], rel=1e-5), key
        for key in ("val_loss", "train_loss", "iterations"):
            assert mine["history"][key] == pytest.approx(own["history"][key], rel=1e-5), key
    assert together["cells"][1]["member"] == 1 and together["cells"][1]["ensemble"] == 2


def test_a_network_an_ensemble_cannot_reproduce_trains_seed_by_seed(tmp_path):
    parabolic = [
        *SMALL,
        "model.init_args.net.init_args.rhs=parabolic",
        "model.init_args.net.init_args.contraction=null",
    ]
    saved = _study(tmp_path, "--seeds", "2", "--epochs", "1", sets=parabolic)
    assert saved["meta"]["ensembles"] == [] and len(saved["cells"]) == 2


class _Bar:
    """tqdm's part the epoch bar uses, recorded."""

    made: list["_Bar"] = []

    def __init__(self, total, desc, unit):
        self.total, self.n, self.desc = total, 0, desc
        _Bar.made.append(self)

    def refresh(self):
        pass

    def update(self, count):
        self.n += count

    def close(self):
        pass


def test_the_epoch_bar_counts_every_members_epochs(tmp_path, monkeypatch):
    """One ensemble of 3 seeds × 2 epochs, then 2 more seeds apart (--no-ensemble): the epoch bar
    ends at its total, 6 and 4 member-epochs."""
    from irnet.reproduce import _epoch_progress

    monkeypatch.setattr(_epoch_progress, "tqdm", _Bar)
    _Bar.made.clear()
    _study(tmp_path / "together", "--seeds", "3", "--epochs", "2")
    _study(tmp_path / "apart", "--seeds", "2", "--epochs", "2", "--no-ensemble")
    together, apart = _Bar.made
    assert (together.total, together.n) == (6, 6) and (apart.total, apart.n) == (4, 4)
    assert _epoch_progress.reporter(1) is None  # nothing installed after the study
