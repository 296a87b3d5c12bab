"""A study's journal (finished cells survive a kill; a re-run resumes) and its lean history
(the same per-epoch record as the monitoring callbacks, without logging them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl

from irnet.datamodules import SineRegression
from irnet.linear import Direct
from irnet.module import ImplicitNetModule
from irnet.nets import ODENet
from irnet.reproduce._journal import Journal, cell_key, seed_from_published
from irnet.reproduce._runner import LEAN_EVERY, run_cells, train
from irnet.reproduce._summary import saved_run
from irnet.solvers import FixedPoint

CALLS: list[int] = []


def test_an_unfinished_run_is_summarised_with_the_command_that_resumes_it(tmp_path):
    journal = Journal.of_study(tmp_path)
    journal.record({"i": 1}, {"seconds": 90.0})
    journal.record({"i": 2}, {"seconds": 30.0})
    meta, results = saved_run(tmp_path, resume_command="python -m irnet reproduce ex1 --out o")
    assert meta["command"] == "python -m irnet reproduce ex1 --out o" and meta["partial"]
    assert meta["minutes"] == pytest.approx(2.0) and len(results) == 2
    assert "2 cells finished" in meta["machine"]


def square(cell: dict) -> dict:
    CALLS.append(cell["i"])
    return {"square": cell["i"] ** 2}


def test_journal_keeps_finished_cells_and_ignores_a_line_cut_short(tmp_path):
    journal = Journal(tmp_path / "j.jsonl")
    journal.record({"i": 1, "theta": 0.5}, {"loss": 0.25, "nan": math.nan})
    with journal.path.open("a") as file:
        file.write('{"key": "{\\"i\\": 2')  # a kill mid-write
    done = journal.finished([{"theta": 0.5, "i": 1}, {"i": 2}])  # key order does not matter
    assert list(done) == [cell_key({"i": 1, "theta": 0.5})]
    assert done[cell_key({"i": 1, "theta": 0.5})]["loss"] == 0.25
    assert math.isnan(done[cell_key({"i": 1, "theta": 0.5})]["nan"])
    assert len(journal.results()) == 1
    journal.remove()
    assert not journal.path.exists() and journal.finished([{"i": 1}]) == {}


def test_run_cells_resumes_from_its_journal(tmp_path):
    journal, cells = Journal(tmp_path / "j.jsonl"), [{"i": i} for i in range(4)]
    CALLS.clear()
    first = run_cells(
        square, cells[:2], workers=1, desc="t", journal=journal
    )  # "killed" after two cells
    assert CALLS == [0, 1]
    results = run_cells(square, cells, workers=1, desc="t", journal=journal)
    assert CALLS == [0, 1, 2, 3]  # the finished cells were not run again
    assert [r["square"] for r in results] == [0, 1, 4, 9]
    assert results[:2] == first  # read back from the journal, order of ``cells`` kept
    assert len(journal.results()) == 4


def _publish(path: Path, cells: list[dict]) -> Path:
    path.write_text(json.dumps({"meta": {"command": "c"}, "cells": cells}))
    return path


def test_a_lost_journal_restarts_from_the_cells_a_study_published(tmp_path):
    cells = [{"i": i, "log_dir": "runs/x", "epochs": 25} for i in range(4)]
    published = [
        {**cells[1], "square": 1, "seconds": 2.0},
        {
            **cells[2],
            "square": 4,
            "history": {"loss": [1.0, 2.0], "stopped": 0},
            "history_stride": 10,
        },
        {"i": 3, "log_dir": "runs/other", "epochs": 25, "square": 9},
    ]  # another grid's cell
    journal = Journal(tmp_path / "j.jsonl")
    assert seed_from_published(journal, _publish(tmp_path / "results.json", published), cells) == 2
    assert list(journal.finished(cells)) == [cell_key(cells[1]), cell_key(cells[2])]
    CALLS.clear()
    results = run_cells(square, cells, workers=1, desc="t", journal=journal)
    assert (
        CALLS == [0, 3] and results[1] == published[0]
    )  # the published cells are not trained again
    # a thinned history comes back one entry per epoch, the kept epochs (10, 20) in place
    loss = results[2]["history"]["loss"]
    assert (
        len(loss) == 25
        and loss[9] == 1.0
        and loss[19] == 2.0
        and math.isnan(loss[0])
        and math.isnan(loss[24])
    )
    assert "history_stride" not in results[2] and results[2]["history"]["stopped"] == 0
    # a journal on disk wins; published results covering the whole grid (a finished run) are unused
    assert seed_from_published(journal, tmp_path / "results.json", cells) == 0
    finished = _publish(tmp_path / "done.json", [{**c, "square": c["i"] ** 2} for c in cells])
    assert seed_from_published(Journal(tmp_path / "new.jsonl"), finished, cells) == 0
    assert (
        seed_from_published(Journal(tmp_path / "new.jsonl"), tmp_path / "missing.json", cells) == 0
    )


@pytest.mark.slow
def test_run_cells_journal_with_two_workers_keeps_the_order(tmp_path):
    journal, cells = Journal(tmp_path / "j.jsonl"), [{"i": i} for i in range(5)]
    results = run_cells(square, cells, workers=2, desc="t", journal=journal)
    assert [r["i"] for r in results] == list(range(5)) and [r["square"] for r in results] == [
        0,
        1,
        4,
        9,
        16,
    ]
    assert sorted(r["i"] for r in journal.results()) == list(range(5))


def _fit(tmp_path: Path, lean: bool, epochs: int) -> dict:
    pl.seed_everything(3, verbose=False)
    net = ODENet(
        in_features=1,
        out_features=1,
        layers=3,
        T=3.0,
        width=16,
        theta=0.5,
        readout="component",
        component=1,
        solver=FixedPoint(atol=1e-6, max_iter=50),
        linear_solver=Direct(),
    )
    module = ImplicitNetModule(net, loss="l2", lr=1e-2)
    return train(module, SineRegression(num_points=21), epochs, tmp_path, f"lean{lean}", lean=lean)


@pytest.mark.slow
def test_robustness_study_resumes_its_unfinished_run_with_the_same_transfer_files(tmp_path):
    from irnet.reproduce import robustness

    first = robustness.cells(robustness.TINY, tmp_path)
    assert (
        robustness.cells(robustness.TINY, tmp_path)[0]["run"] != first[0]["run"]
    )  # nothing to resume: new id
    journal = Journal.of_study(tmp_path)
    journal.record(
        first[0], {**first[0], "clean_acc": 0.9}
    )  # results carry their cell's fields, "run" too
    resumed = robustness.cells(robustness.TINY, tmp_path)
    assert resumed == first and list(journal.finished(resumed)) == [cell_key(first[0])]
    other_grid = robustness.cells(
        robustness.TINY, tmp_path, epochs=3
    )  # a journal of another grid: new id
    assert other_grid[0]["run"] != first[0]["run"] and not journal.finished(other_grid)


def test_lean_history_records_what_the_monitoring_callbacks_log(tmp_path):
    epochs = 2 * LEAN_EVERY
    full, lean = _fit(tmp_path, False, epochs), _fit(tmp_path, True, epochs)
    for key in (
        "train_loss",
        "forward_iterations",
        "backward_iterations",
        "gradient_mean",
        "gradient_first",
        "gradient_last",
    ):
        assert lean[key] == pytest.approx(full[key], rel=1e-5), key
    assert 1 < lean["forward_iterations"][-1] < 50 and lean["gradient_first"][0] > 0
    validated = [epoch for epoch, value in enumerate(lean["val_loss"]) if not math.isnan(value)]
    assert validated == [LEAN_EVERY - 1, 2 * LEAN_EVERY - 1]  # validation every LEAN_EVERY epochs
    assert [lean["val_loss"][e] for e in validated] == pytest.approx(
        [full["val_loss"][e] for e in validated]
    )
    assert all(math.isnan(v) for v in lean["val_acc"])  # a regression: no accuracy


def test_results_json_keeps_every_stride_th_epoch_of_the_histories():
    from irnet.reproduce._runner import thinned

    result = {"seed": 0, "history": {"val_loss": list(range(1, 31)), "stopped": [12.0]}}
    kept = thinned(result, 10)
    assert kept["history"]["val_loss"] == [10, 20, 30] and kept["history"]["stopped"] == [12.0]
    assert (
        kept["history_stride"] == 10 and result["history"]["val_loss"][0] == 1
    )  # the input is untouched
    assert thinned(result, 1) is result
