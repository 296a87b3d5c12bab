"""The study grids train the cells that differ only by seed as one ensemble (``reproduce ex1``;
``--no-ensemble`` trains every seed in a cell of its own): the same results per seed, a journal
kept per seed, and a resume that trains only the seeds still missing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from irnet.reproduce import ex1
from irnet.reproduce._journal import Journal, cell_key

# one θ with implicit solves and the explicit one; two seeds: every cell an ensemble of two
GRID = ["--layers", "2", "--thetas", "0", "1", "--seeds", "2", "--epochs", "12", "--workers", "1"]


class _Sine64(ex1.SineRegression):
    """The study's data in float64."""

    def build(self):
        return {k: tuple(t.double() for t in split) for k, split in super().build().items()}


def _study(root: Path, *args: str) -> dict:
    """``reproduce ex1`` in this process (``--workers 1``); its full-precision ``cells.json``."""
    from irnet.reproduce import main as reproduce

    reproduce(["ex1", *GRID, "--out", str(root / "out"), "--log-dir", str(root / "logs"), *args])
    return json.loads((root / "logs" / "cells.json").read_text())


def _by_seed(saved: dict) -> dict:
    return {(c["layers"], c["theta"], c["variant"], c["seed"]): c for c in saved["cells"]}


def _assert_close(a, b, rel: float, path: str = "") -> None:
    """Every number of ``a`` within ``rel`` of ``b``'s (NaN where NaN); the rest equal."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _assert_close(a[key], b[key], rel, f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isnan(a) == math.isnan(b), path
        # the history's gradient norms are taken in float32 (as GradientMagnitudes takes them)
        rel = max(rel, 1e-6) if ".history.gradient" in path else rel
        assert math.isnan(a) or a == pytest.approx(b, rel=rel, abs=1e-12), path
    else:
        assert a == b, path


def _measured(result: dict) -> dict:
    """A result without its times and log folder (those differ between runs)."""
    return {k: v for k, v in result.items() if k not in ("seconds", "ensemble_seconds", "log_dir")}


@pytest.fixture
def float64(monkeypatch):
    """The study in float64: last-bit differences of the ensemble's batched products then stay
    far below the solver's tolerance, so no sample's iteration count flips."""
    monkeypatch.setattr(ex1, "SineRegression", _Sine64)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def test_ex1_ensembles_give_every_seed_the_results_of_its_own_cell(tmp_path, float64):
    together = _study(tmp_path / "ensembles")
    apart = _study(tmp_path / "apart", "--no-ensemble")
    assert together["meta"]["ensembles"] == [2, 2, 2, 2] and "ensembles" not in apart["meta"]
    ours, theirs = _by_seed(together), _by_seed(apart)
    assert sorted(ours) == sorted(theirs) and len(ours) == 8  # (θ = 0, 3 variants at θ = 1) × 2
    for key in ours:
        # losses, every epoch's history (per-member iterations and gradient norms included), the
        # per-layer probe, trajectories and fields: each member's own
        _assert_close(_measured(ours[key]), _measured(theirs[key]), rel=1e-9, path=str(key))
        assert ours[key]["ensemble_seconds"] == pytest.approx(2 * ours[key]["seconds"])
    history = ours[(2, 1.0, "rfp", 1)]["history"]
    assert history["stopped"] == [] and not math.isnan(history["forward_iterations"][-1])
    # results.json: one entry per (layers, θ, variant, seed), as without ensembles
    published = json.loads((tmp_path / "ensembles" / "out" / "results.json").read_text())
    assert sorted(_by_seed(published)) == sorted(ours)


def test_ex1_ensembles_in_float32_agree_to_the_solver_tolerance(tmp_path):
    """The study as shipped (float32): the members' own numbers, up to last-bit rounding, which
    can move a sample across the fixed-point tolerance (1e-5): one iteration more or less."""
    together = _by_seed(_study(tmp_path / "ensembles", "--thetas", "1", "--variants", "paper"))
    apart = _by_seed(
        _study(tmp_path / "apart", "--thetas", "1", "--variants", "paper", "--no-ensemble")
    )
    assert sorted(together) == sorted(apart) == [(2, 1.0, "paper", 0), (2, 1.0, "paper", 1)]
    for key, ours in together.items():
        theirs = apart[key]
        for name in ("train_loss", "val_loss"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-3)
        for name in ("train_loss", "gradient_mean"):
            _assert_close(ours["history"][name], theirs["history"][name], rel=1e-3)
        # a few samples' solves (of 51 × 2 layers) one iteration longer or shorter
        assert ours["history"]["forward_iterations"] == pytest.approx(
            theirs["history"]["forward_iterations"], rel=1e-2
        )


def test_ensemble_cells_join_seeds_and_put_the_longest_first(tmp_path):
    cells = ex1.cells(
        {**ex1.FULL, "depths": (10, 100), "thetas": (0.0, 0.5)}, tmp_path, seeds=3, epochs=4
    )
    joined = ex1.ensemble_cells(cells)
    assert len(joined) == 2 * (1 + 3)
    # the longest first by the timed epochs: the deep implicit cells, the shallow explicit last
    seconds = [ex1.estimated_seconds(c["layers"], c["theta"], c["variant"], 4) for c in joined]
    assert seconds == sorted(seconds, reverse=True)
    assert [(c["layers"], c["theta"]) for c in joined[:3]] == [(100, 0.5)] * 3
    assert (joined[-1]["layers"], joined[-1]["theta"]) == (10, 0.0)
    for cell in joined:
        assert cell["seeds"] == [0, 1, 2] and "seed" not in cell
        assert [cell_key(c) for c in cell["cells"]] == [
            cell_key(c)
            for c in cells
            if all(c[k] == cell[k] for k in ("layers", "theta", "variant"))
        ]
    assert ex1.ensemble_cells(cells[:1]) == cells[:1]  # a seed alone trains as its own cell


def test_a_resume_trains_only_the_seeds_missing_from_the_journal(tmp_path, monkeypatch):
    cells = ex1.cells({**ex1.TINY, "thetas": (0.5,), "variants": ("paper",)}, tmp_path, seeds=3)
    cells = [c for c in cells if c["layers"] == 2]
    journal = Journal(tmp_path / "journal.jsonl")
    journal.record(cells[1], {**cells[1], "history": {}, "seconds": 7.0})  # seed 1 is done
    plan = ex1.ensembles(cells, journal)
    assert len(plan.cells) == 1 and plan.cells[0]["seeds"] == [0, 2] and plan.sizes == [2]
    assert plan.journal.finished(plan.cells) == {}
    members = [{**c, "val_loss": float(c["seed"])} for c in plan.cells[0]["cells"]]
    result = {**plan.cells[0], "members": members, "seconds": 10.0}
    plan.journal.record(plan.cells[0], result)  # what run_cells does as the cell arrives
    results = plan.results([result])
    assert [r["seed"] for r in results] == [0, 1, 2]
    assert [r["seconds"] for r in results] == [5.0, 7.0, 5.0]
    assert results[2]["val_loss"] == 2.0 and results[0]["ensemble_seconds"] == 10.0
    # the journal now holds every seed, each under its own cell's key
    assert set(journal.finished(cells)) == {cell_key(c) for c in cells}
    assert ex1.ensembles(cells, journal).cells == []


def test_a_resumed_study_trains_the_missing_seeds_as_one_ensemble(tmp_path, monkeypatch):
    grid = ["--layers", "2", "--thetas", "0.5", "--variants", "paper", "--seeds", "3"]
    args = [*grid, "--epochs", "2", "--workers", "1", "--log-dir", str(tmp_path / "logs")]
    cells = ex1.cells(
        {**ex1.FULL, "depths": (2,), "thetas": (0.5,), "variants": ("paper",)},
        tmp_path / "logs",
        seeds=3,
        epochs=2,
    )
    first = ex1.run_cell(cells[0])
    Journal.of_study(tmp_path / "logs").record(cells[0], {**cells[0], **first, "seconds": 3.0})
    ran = []

    def run_cell(cell):
        ran.append(cell.get("seeds", cell.get("seed")))
        return ex1.run_ensemble_cell(cell) if "seeds" in cell else ex1.run_cell(cell)

    monkeypatch.setattr(ex1, "run_cell", run_cell)
    from irnet.reproduce import main as reproduce

    reproduce(["ex1", *args, "--out", str(tmp_path / "out")])
    assert ran == [[1, 2]]
    saved = json.loads((tmp_path / "logs" / "cells.json").read_text())
    assert [c["seed"] for c in saved["cells"]] == [0, 1, 2] and saved["meta"]["ensembles"] == [2]
    assert saved["cells"][0]["seconds"] == 3.0  # the journal's, not trained again
    assert not Journal.of_study(tmp_path / "logs").path.exists()  # removed once finished


def test_no_ensemble_is_accepted_by_the_ensemble_studies_only(capsys):
    from irnet.reproduce import main as reproduce

    with pytest.raises(SystemExit) as stop:
        reproduce(["ex2", "--no-ensemble", "--tiny"])
    assert stop.value.code == 2
    assert "--no-ensemble applies to the seeds and ex1 studies only" in capsys.readouterr().err
    from irnet.reproduce._command import parser

    assert parser().parse_args(["ex1", "--no-ensemble"]).ensemble is False
    assert parser().parse_args(["ex1"]).ensemble is True


def test_a_member_that_breaks_is_a_stopped_run_and_the_other_its_own(
    tmp_path, float64, monkeypatch
):
    from irnet.failure import MemberStoppedWarning

    build = ex1.make_net

    def poisoned(*args, **ensemble):  # member 1's weights NaN: its loss breaks at the first step
        net = build(*args, **ensemble)
        if ensemble:
            with torch.no_grad():
                net.blocks[0].F.gamma1[1] = math.nan
        return net

    monkeypatch.setattr(ex1, "make_net", poisoned)
    settings = {**ex1.TINY, "depths": (2,), "thetas": (0.5,), "variants": ("paper",)}
    cells = ex1.cells(settings, tmp_path, seeds=2, epochs=3)
    [cell] = ex1.ensemble_cells(cells)
    with pytest.warns(MemberStoppedWarning):
        first, second = ex1.run_ensemble_cell(cell)["members"]
    assert second["history"]["stopped"] == [0.0] and math.isnan(second["val_loss"])
    assert all(math.isnan(v) for v in second["history"]["train_loss"])
    assert all(math.isnan(v) for v in second["per_layer"]["gradient"])
    own = {**cells[0], **ex1.run_cell(cells[0])}  # seed 0 alone (not poisoned)
    _assert_close(_measured(first), _measured(own), rel=1e-9)


@pytest.mark.parametrize("variant", ex1.VARIANTS)
def test_every_ex1_network_is_one_an_ensemble_trains_exactly(variant):
    from irnet.reproduce._seed_ensemble import can_ensemble

    cell = {"r_fp": ex1.R_FP_WEIGHT if variant == "rfp" else 0.0}
    assert can_ensemble(ex1.make_module(cell, ex1.make_net(2, 0.5, variant)))
