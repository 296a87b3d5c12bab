"""Distributed training when one rank goes wrong, and what each rank keeps of its own.

* A fault on one rank (NaN weights on rank 1) stops every rank at the same step with
  the same one line and status 2, no traceback, within seconds (two processes, gloo).
* The step's one all-reduce carries the failure flag; one host read serves the share,
  the flag and the checks (a simulated second rank, in one process).
* Each rank draws its own dropout masks; rank 0 draws those of one process.
* A checkpoint holds every rank's warm-start cache, merged by sample.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from test_ddp import finish, load, run_script

import helpers.ddp
from helpers.sync import HostReads
from helpers.training import CONFIGS, QUIET, subprocess_env, tiny_odenet
from irnet.datamodules import SineRegression
from irnet.device_path import forced_path
from irnet.failure import Finding, TrainingFailure, first_failure, merged_diagnosis
from irnet.module import STEP_HEAD, ImplicitNetModule, seed_rank_generators
from irnet.nets.warm_start import WarmStartCache
from irnet.nets.warm_start_merge import merged_state

TESTS = Path(__file__).resolve().parents[1]


# -- messages --------------------------------------------------------------------------------------


def test_every_rank_raises_the_lowest_failing_ranks_message():
    assert first_failure([None, "step 2: bad on rank 1 of 2", None]) == "step 2: bad on rank 1 of 2"
    assert first_failure(["a", None, "c", "d"]) == "a (and on ranks 2, 3)"
    assert first_failure([None, "b", "c"]) == "b (and on rank 2)"


def test_merged_diagnosis_names_the_rank_with_the_worst_finding():
    fine = Finding(0, "parameters finite and every forward solve converged")
    bad = Finding(3, "non-finite parameters", ": net.w (1 of 8 values)")
    diverged = Finding(
        2,
        "forward solve diverged",
        " (non-finite iterates, stats.diverged) in layer 1 (3 of 5 samples)",
    )
    assert (
        merged_diagnosis([fine, bad])
        == "non-finite parameters on rank 1 of 2: net.w (1 of 8 values)"
    )
    assert merged_diagnosis([diverged, bad, bad]).startswith(
        "non-finite parameters on rank 1 of 3:"
    )
    assert merged_diagnosis([diverged, fine]) == (
        "forward solve diverged on rank 0 of 2 (non-finite iterates, "
        "stats.diverged) in layer 1 (3 of 5 samples)"
    )
    assert (
        merged_diagnosis([fine, fine])
        == "parameters finite and every forward solve converged on every rank"
    )


# -- the step's all-reduce, with a simulated second rank -------------------------------------------


class SecondRank:
    """Stands in for rank 1 of 2 in torch.distributed's collectives: healthy (the same values as
    this rank), or failed with ``message`` (then its vector holds only the count and the flag)."""

    def __init__(self, message: str | None = None, finding: Finding | None = None) -> None:
        self.message, self.finding, self.reduces = message, finding, 0

    def all_reduce(self, tensor):
        self.reduces += 1
        peer = tensor.clone() if self.message is None else torch.zeros_like(tensor)
        peer[0], peer[1] = tensor[0], float(self.message is not None)
        if self.message is not None:
            peer[2] = 0.0
        tensor += peer

    def all_gather_object(self, out, obj):
        out[0], out[1] = obj, (self.message if isinstance(obj, (str, type(None))) else self.finding)


@pytest.fixture
def second_rank(monkeypatch):
    def attach(module: ImplicitNetModule, peer: SecondRank) -> SecondRank:
        monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "all_reduce", peer.all_reduce)
        monkeypatch.setattr(torch.distributed, "all_gather_object", peer.all_gather_object)
        module._trainer = SimpleNamespace(
            world_size=2,
            global_rank=0,
            current_epoch=1,
            global_step=4,
            strategy=SimpleNamespace(launcher=None),
        )
        return peer

    return attach


def step_values(total: float = 0.5) -> dict[str, torch.Tensor]:
    return {
        "loss": torch.tensor(0.25),
        "total": torch.tensor(total),
        "iters": torch.tensor(3.0),
        "unconverged/0": torch.tensor(0.0),
    }


def test_one_all_reduce_and_one_host_read_per_step(second_rank):
    module = ImplicitNetModule(tiny_odenet(layers=1))
    peer = second_rank(module, SecondRank())
    module._global_means(step_values(), 5)  # the first step finds how many values a step has
    assert peer.reduces == 2 and module._reduce_capacity == 4
    reads = HostReads()
    with reads.patched(), reads.counting():
        means, share, host = module._global_means(step_values(), 5)
        module._check_training_step(means, host)
    assert peer.reduces == 3
    ours = {k: v for k, v in reads.sources.items() if k.startswith("irnet/module.py")}
    assert sum(ours.values()) == 1, reads.report()
    assert share.global_count == 10 and share.weight == 1.0
    assert host == {"loss": 0.25, "total": 0.5, "iters": 3.0, "unconverged/0": 0.0}
    torch.testing.assert_close(
        torch.stack(list(means.values())), torch.tensor([0.25, 0.5, 3.0, 0.0])
    )


def test_a_failure_on_the_other_rank_is_raised_here(second_rank):
    module = ImplicitNetModule(tiny_odenet(layers=1))
    message = "training stopped at epoch 1, step 4: a layer's input is NaN/Inf on rank 1 of 2; …"
    second_rank(module, SecondRank(message=message))
    with pytest.raises(TrainingFailure) as failure:
        module._global_means(step_values(), 5)  # even before the capacity is known
    assert str(failure.value) == message


def test_a_failure_here_is_raised_with_its_own_message(second_rank):
    module = ImplicitNetModule(tiny_odenet(layers=1))
    second_rank(module, SecondRank())
    mine = TrainingFailure("validation stopped: a layer's input is NaN/Inf on rank 0 of 2; …")
    with pytest.raises(TrainingFailure) as failure:
        module._global_means({}, 5, failure=mine)
    assert str(failure.value) == str(mine) and failure.value.__cause__ is mine


def test_a_non_finite_loss_names_the_parameter_of_the_rank_that_has_it(second_rank):
    module = ImplicitNetModule(tiny_odenet(layers=1))
    bad = Finding(3, "non-finite parameters", ": net.blocks.0.F.gamma1 (16 of 16 values)")
    second_rank(module, SecondRank(finding=bad))
    means, _, host = module._global_means(step_values(total=math.nan), 5)
    with pytest.raises(TrainingFailure) as failure:
        module._check_training_step(means, host)
    assert str(failure.value) == (
        "training stopped at epoch 1, step 4: non-finite train/total (nan); non-finite "
        "parameters on rank 1 of 2: net.blocks.0.F.gamma1 (16 of 16 values)"
    )


def test_the_vector_grows_when_a_step_has_more_values(second_rank):
    module = ImplicitNetModule(tiny_odenet(layers=1))
    peer = second_rank(module, SecondRank())
    module._global_means(
        {"loss": torch.tensor(1.0), "total": torch.tensor(1.0)}, 3
    )  # validation first
    assert module._reduce_capacity == 2
    means, _, _ = module._global_means(step_values(), 3)  # then training: more values
    assert module._reduce_capacity == 4 and peer.reduces == 4
    assert list(means) == list(step_values()) and float(means["iters"]) == 3.0
    packed = module._pack({"loss": torch.tensor(2.0)}, 3, False)
    assert packed.tolist() == [3.0, 0.0, 1.0, 6.0, 0.0, 0.0, 0.0] and STEP_HEAD == 3


class CountStep(pl.Callback):
    """Counts host reads from the start of training step ``step`` to the start of the next
    (the module's own ``on_train_batch_end`` included)."""

    def __init__(self, reads: HostReads, step: int) -> None:
        self.reads, self.step, self._counting = reads, step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._counting is not None:
            self._counting.__exit__(None, None, None)
            self._counting = None
        if trainer.global_step == self.step:
            self._counting = self.reads.counting()
            self._counting.__enter__()


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
def test_one_process_reads_once_per_training_step_in_the_module(path, monkeypatch):
    """The loss and solver checks: one read a training step; deferred solver warnings are flushed
    once at the end of every training, validation and test step."""
    flushes = []
    monkeypatch.setattr("irnet.module.flush_failure_warnings", lambda: flushes.append(1))
    module = ImplicitNetModule(tiny_odenet(layers=2))
    reads = HostReads()
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[CountStep(reads, step=2)],
    )
    data = SineRegression(num_points=11)
    with forced_path(path), reads.patched():
        trainer.fit(module, data)
    in_module = sum(
        n for source, n in reads.sources.items() if source.startswith("irnet/module.py")
    )
    assert in_module == 1, reads.report()
    assert len(flushes) == 4 + 4  # a training and a validation step per epoch
    trainer.test(module, data, verbose=False)
    assert len(flushes) == 4 + 4 + 1


# -- dropout masks ---------------------------------------------------------------------------------


def mask_after(seed: int, rank: int) -> torch.Tensor:
    torch.manual_seed(seed)
    module = ImplicitNetModule(tiny_odenet(layers=1, seed=None))
    module._trainer = SimpleNamespace(global_rank=rank)
    module.on_fit_start()
    return torch.nn.functional.dropout(torch.ones(512), 0.5, training=True) > 0


def test_each_rank_draws_its_own_dropout_masks_and_rank_zero_those_of_one_process():
    torch.manual_seed(7)
    tiny_odenet(layers=1, seed=None)  # the same draws as building the module
    one_process = torch.nn.functional.dropout(torch.ones(512), 0.5, training=True) > 0
    masks = [mask_after(7, rank) for rank in range(3)]
    assert torch.equal(masks[0], one_process)
    assert not torch.equal(masks[1], masks[0]) and not torch.equal(masks[2], masks[1])
    assert torch.equal(mask_after(7, 1), masks[1])  # reproducible
    with pytest.raises(ValueError, match="rank"):
        seed_rank_generators(-1)


# -- merging warm-start caches ---------------------------------------------------------------------


def byte_keys(x: torch.Tensor) -> list[bytes]:
    """The checkpoint's keys of a batch's samples: dtype, per-sample shape, bytes."""
    prefix = f"{x.dtype}{tuple(x.shape[1:])}".encode()
    return [
        prefix + row.numpy().tobytes()
        for row in x.detach().contiguous().flatten(1).view(torch.uint8)
    ]


def by_key(state: dict) -> dict[bytes, tuple[torch.Tensor, ...]]:
    """A cache state's rows of every layer (with a store), by key."""
    return dict(zip(state["keys"], zip(*(rows for rows in state["rows"] if rows is not None))))


def cache_of(xs: torch.Tensor, layers: int = 2, capacity: int = 100) -> WarmStartCache:
    cache = WarmStartCache(capacity)
    cache.store(
        WarmStartCache.keys(xs), [xs * (t + 1) if t < layers - 1 else None for t in range(layers)]
    )
    return cache


def test_merged_cache_finds_every_ranks_samples():
    xs = torch.arange(10.0).reshape(5, 2)
    ranks = [cache_of(xs[:3]), cache_of(xs[3:])]
    merged = WarmStartCache(100)
    merged.load_state_dict(merged_state([c.state_dict() for c in ranks], capacity=100))
    assert len(merged) == 5
    found = merged.lookup(WarmStartCache.keys(xs), layers=2)
    torch.testing.assert_close(found[0], xs, rtol=0, atol=0)
    assert found[1] is None  # a layer without a solve stays without rows


def test_merge_keeps_the_most_recent_keys_in_turns_within_capacity():
    xs = torch.arange(16.0).reshape(8, 2)
    a, b = cache_of(xs[:4]), cache_of(xs[4:])  # LRU order: a0 a1 a2 a3 / b4 b5 b6 b7
    a.store(WarmStartCache.keys(xs[:1]), [xs[:1] * 10, None])  # a0 used again, with a new row
    state = merged_state([a.state_dict(), b.state_dict()], capacity=5)
    keys = byte_keys(xs)
    # most recent first, in turns: a0, b7, a3, b6, a2 (capacity 5); stored oldest first
    assert state["keys"] == [keys[2], keys[6], keys[3], keys[7], keys[0]]
    torch.testing.assert_close(state["rows"][0][-1], xs[0] * 10, rtol=0, atol=0)


def test_merge_takes_a_shared_key_from_its_most_recent_turn_and_fills_unknown_layers_with_nan():
    xs = torch.arange(6.0).reshape(3, 2)
    a = cache_of(xs)  # x0 x1 x2
    b = WarmStartCache(100)
    b.store(WarmStartCache.keys(xs[:1]), [xs[:1] * 5])  # x0, one layer only
    state = merged_state([a.state_dict(), b.state_dict(), None], capacity=100)
    keys = byte_keys(xs)
    # most recent first, in turns: x2 (a), x0 (b: its most recent), x1 (a); x0 is not taken again
    assert state["keys"] == [keys[1], keys[0], keys[2]]
    torch.testing.assert_close(state["rows"][0][1], xs[0] * 5, rtol=0, atol=0)
    assert state["rows"][1] is None  # no state holds rows for layer 1
    empty = merged_state(
        [WarmStartCache(4).state_dict(), WarmStartCache(4).state_dict()], capacity=4
    )
    assert empty == {"keys": [], "rows": []}


# -- end to end: two processes ---------------------------------------------------------------------


def fault_args(contraction: str, name: str, epochs: int = 4) -> list[str]:
    """ex1_sine on a 3-layer width-8 net, two CPU processes, rank 1's ``name`` NaN at step 2."""
    poison = [
        {
            "class_path": "helpers.ddp.PoisonOnRank",
            "init_args": {"name": name, "rank": 1, "step": 2},
        }
    ]
    return [
        "fit",
        "--config",
        str(CONFIGS / "ex1_sine.yaml"),
        *QUIET,
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.callbacks",
        json.dumps(poison),
        "--model.net.init_args.layers",
        "3",
        "--model.net.init_args.width",
        "8",
        "--model.net.init_args.contraction",
        contraction,
        "--model.net.init_args.warm_start",
        "true",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    ]


def run_cli_ranks(
    args: list[str], tmp_path: Path, timeout: float
) -> tuple[subprocess.Popen, str, float]:
    """``irnet *args`` in ``tmp_path`` through helpers.ddp (which records each rank's exit code)."""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"out": str(tmp_path), "cli": args}))
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(Path(helpers.ddp.__file__)), str(settings)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(
            proc.pid, signal.SIGKILL
        )  # the session started here: rank 0 and the rank it started
        out, _ = proc.communicate()
        pytest.fail(f"the ranks did not stop within {timeout} s:\n{out[-4000:]}")
    return proc, out, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize(
    "contraction, name, cause",
    [
        (
            "0.9",
            "net.blocks.0.F.gamma1",
            "a layer's input is NaN/Inf on rank 1 of 2; non-finite parameters: ",
        ),
        (
            "null",
            "net.blocks.2.F.gamma2",
            "non-finite train/loss (nan); non-finite parameters on rank 1 of 2: ",
        ),
    ],
    ids=["contraction-first-layer", "no-contraction-last-layer"],
)
def test_nan_weights_on_one_rank_stop_every_rank_with_one_line(tmp_path, contraction, name, cause):
    """Rank 1's weight turns NaN before step 2: both ranks exit 2 with the same line, no traceback.

    A NaN in the first layer makes the second layer's input NaN on rank 1 only (a
    rank-local failure, agreed through the step's all-reduce); a NaN in the last
    layer makes the global loss NaN (seen by both; rank 1's diagnosis is gathered).
    """
    proc, out, seconds = run_cli_ranks(fault_args(contraction, name), tmp_path, timeout=120)
    codes = {
        r: (tmp_path / f"exit_rank{r}").read_text()
        if (tmp_path / f"exit_rank{r}").exists()
        else None
        for r in range(2)
    }
    assert proc.returncode == 2 and codes == {0: "2", 1: "2"}, (codes, out[-4000:])
    assert "Traceback" not in out, out[-4000:]
    lines = [line for line in out.splitlines() if line.startswith("irnet: error:")]
    expected = f"irnet: error: training stopped at epoch 2, step 2: {cause}{name} ("
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith(expected), out[-4000:]
    assert seconds < 90
    # the last good checkpoint (epoch 1) holds both ranks' warm starts: every training sample's
    checkpoint = torch.load(
        tmp_path / "runs" / "ex1_sine" / "version_0" / "checkpoints" / "last.ckpt",
        weights_only=False,
    )
    assert checkpoint["epoch"] == 1
    rows = by_key(checkpoint["state_dict"]["net._extra_state"]["warm_start"])
    x, _ = SineRegression(num_points=51).tensors("train")
    assert all(torch.isfinite(torch.stack(rows[key])).all() for key in byte_keys(x))


@pytest.mark.slow
def test_ranks_draw_their_own_masks_and_the_checkpoint_holds_every_ranks_warm_starts(
    tmp_path, monkeypatch
):
    """2-process fit (gloo), full batches (51 training points: 26 + 25), warm starts, 2 epochs."""
    # An earlier in-process seed_everything leaves PL_GLOBAL_SEED behind; the DDP ranks (which
    # inherit it) would reseed from it at set-up and the one-process reference would not.
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    settings = {"epochs": 2, "warm_start": True, "masks": True, "checkpoint": True}
    proc = run_script(
        {**settings, "out": str(tmp_path / "two"), "trainer": {"devices": 2, "strategy": "ddp"}},
        tmp_path,
    )
    (tmp_path / "one").mkdir()
    one = helpers.ddp.run({**settings, "out": str(tmp_path / "one")})
    finish(proc)
    ranks = [load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["mask"], one["mask"]) and not torch.equal(
        ranks[1]["mask"], ranks[0]["mask"]
    )

    merged = torch.load(tmp_path / "two" / "last.ckpt", weights_only=False)["state_dict"][
        "net._extra_state"
    ]
    state = merged["warm_start"]
    own = [by_key(r["cache"]) for r in ranks]
    assert (
        len(own[0]) == 26 + 25 and len(own[1]) == 25 + 25
    )  # their parts of 51 training, 50 validation points
    assert len(state["keys"]) == 101 and set(state["keys"]) == set(own[0]) | set(own[1])
    merged_rows = by_key(state)
    for rows_of in own:  # each rank finds its own fixed points, as it left them
        for key, rows in rows_of.items():
            torch.testing.assert_close(
                torch.stack(merged_rows[key]), torch.stack(rows), rtol=0, atol=0
            )
    cache = WarmStartCache()
    cache.load_state_dict(state)
    assert len(cache) == 101
