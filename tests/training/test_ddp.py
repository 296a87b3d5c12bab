"""Distributed training: unpadded batch slices, global-batch weighting, per-rank R_rnd seeds,
ddp_spawn.

The end-to-end runs start real processes (gloo on the CPU) as subprocesses,
with MASTER_PORT left for Lightning to choose.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.multiprocessing import reductions  # noqa: F401  (registers torch's pickling of tensors)
from torch.utils.data import DataLoader, TensorDataset

import helpers.ddp
from helpers.training import subprocess_env
from irnet.datamodules import GlobalBatchSlices, SineRegression
from irnet.datamodules.sampler import even_slice
from irnet.regularizers import PerturbationRegularizer

SCRIPT = Path(helpers.ddp.__file__)


def run_script(
    settings: dict, tmp_path: Path, env: dict | None = None, timeout: float = 300
) -> subprocess.Popen:
    """Start ``helpers.ddp.py`` with ``settings`` (written beside ``settings["out"]``)."""
    path = tmp_path / f"settings_{len(list(tmp_path.glob('settings_*')))}.json"
    path.write_text(json.dumps(settings))
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(path)],
        env=env or subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def two_processes_and_one(settings: dict, tmp_path: Path) -> tuple[dict, dict]:
    """The same fit under 2-process DDP (rank 0's results) and in this process, 6 steps each."""
    proc = run_script(
        {**settings, "out": str(tmp_path / "two"), "trainer": {"devices": 2, "strategy": "ddp"}},
        tmp_path,
    )
    (tmp_path / "one").mkdir()
    one = helpers.ddp.run({**settings, "out": str(tmp_path / "one")})
    one["losses"] = helpers.ddp.step_losses(tmp_path / "one" / "csv" / "version_0")
    finish(proc)
    two = load(tmp_path / "two" / "rank0.pt")
    assert two["world_size"] == 2 and len(one["losses"]) == 6
    return one, two


# -- the sampler -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size, parts", [(51, 2), (11, 3), (4, 4), (10, 1)])
def test_even_slices_partition_a_range(size, parts):
    pieces = [list(range(size))[even_slice(size, parts, r)] for r in range(parts)]
    assert sum(pieces, []) == list(range(size))
    assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_slices_of_every_rank_make_the_batches_of_one_process(world, shuffle):
    size, batch = 23, 7  # batches of 7, 7, 7, 2 ... the last too small for 3 ranks
    if world == 3:
        batch = 10  # 10, 10, 3
    data = TensorDataset(torch.arange(size))
    one = DataLoader(
        data, batch_size=batch, shuffle=shuffle, generator=torch.Generator().manual_seed(4)
    )
    ranks = []
    for rank in range(
        world
    ):  # as the data modules build them: the loader and its sampler share a generator
        generator = torch.Generator().manual_seed(4)
        slices = GlobalBatchSlices(size, batch, world, rank, shuffle, generator)
        ranks.append(DataLoader(data, sampler=slices, batch_size=None, generator=generator))
    for epoch in range(2):  # the order moves on from epoch to epoch as in one process
        expected = [b[0].tolist() for b in one]
        got = [
            sum(parts, []) for parts in zip(*([b[0].tolist() for b in loader] for loader in ranks))
        ]
        assert got == expected
    assert all(len(loader) == len(one) for loader in ranks)


def test_a_batch_smaller_than_the_world_is_refused():
    with pytest.raises(ValueError, match="batch_size 25 on 51 samples leaves a batch of 1"):
        GlobalBatchSlices(51, 25, 2, 0)
    with pytest.raises(ValueError, match="rank"):
        GlobalBatchSlices(51, 10, 2, 2)


def test_data_module_gives_each_rank_its_part_without_padding():
    data = SineRegression(num_points=51)  # full batch
    x, _ = data.tensors("train")
    parts = []
    for rank in range(2):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        batches = list(data.train_dataloader())
        assert len(batches) == 1
        parts.append(batches[0][0])
    assert [len(p) for p in parts] == [26, 25]
    torch.testing.assert_close(torch.cat(parts), x, rtol=0, atol=0)


# -- R_rnd's seeds ---------------------------------------------------------------------------------


def test_each_rank_seeds_its_own_streams_and_rank_zero_keeps_the_old_seed():
    reg = PerturbationRegularizer(weight=1.0, seed=9, sigma=1.0)
    old = int(
        np.random.SeedSequence([9, 4]).generate_state(1, np.uint64)[0] >> 1
    )  # the seed before ranks
    assert reg.epoch_seed(4, 0) == old == reg.epoch_seed(4)
    seeds = {reg.epoch_seed(e, r) for e in range(3) for r in range(4)}
    assert len(seeds) == 12
    x = torch.zeros(5, 2)
    for rank in (0, 1):
        reg.on_train_epoch_start(4, rank)
        words = [9, 4, rank]
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)
        )
        torch.testing.assert_close(reg.perturb(x), torch.randn(5, 2, generator=g), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank"):
        reg.on_train_epoch_start(0, -1)


def test_regulariser_pickles_with_its_generator_state():
    """ddp_spawn pickles the module: the generator goes by value, not as a shared-memory tensor."""
    from multiprocessing.reduction import ForkingPickler

    reg = PerturbationRegularizer(weight=0.5, streams=2, seed=3)
    reg.on_train_epoch_start(2, 1)
    torch.randn(3, generator=reg.generator)  # move the state along
    assert isinstance(
        reg.__getstate__()["generator"], bytes
    )  # no tensor, so no shared-memory handle
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(reg)
    copy = ForkingPickler.loads(buffer.getvalue())
    x = torch.zeros(4, 3)
    torch.testing.assert_close(copy.perturb(x), reg.perturb(x), rtol=0, atol=0)
    assert (copy.weight, copy.streams, copy.seed) == (0.5, 2, 3)


# -- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one(tmp_path):
    """2-process DDP (gloo) = 1 process with the same global batch: 51 samples in shuffled batches
    of 20 (ranks hold 10/10, 10/10, 6/5), R_fp on, R_rnd off, 6 steps."""
    one, two = two_processes_and_one({"epochs": 2, "batch_size": 20}, tmp_path)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=1e-6)
    for name, value in one["state"].items():
        torch.testing.assert_close(two["state"][name], value, rtol=0, atol=1e-6)
    for key in ("val/loss", "val/mse", "train/loss", "train/r_fp", "train/total", "train/mse"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6, abs=1e-7), key
    # iterations are integers per sample: weights equal to 1e-7 may move one sample of one layer
    # across the tolerance (1 of 2 layers × 50 samples = 0.01)
    assert abs(two["metrics"]["val/iters"] - one["metrics"]["val/iters"]) <= 0.0101
    rank1 = load(tmp_path / "two" / "rank1.pt")
    for name, value in two["state"].items():  # DDP kept the replicas equal
        torch.testing.assert_close(rank1["state"][name], value, rtol=0, atol=0)


@pytest.mark.slow
def test_two_processes_train_an_ensemble_as_one_does(tmp_path):
    """An ensemble of 2 under 2-process DDP takes the steps of one process: the members' losses
    (logged per member), their stacked weights, the replicas equal."""
    one, two = two_processes_and_one({"epochs": 2, "batch_size": 20, "ensemble": 2}, tmp_path)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=1e-6)
    assert one["state"]["net.blocks.0.F.gamma1"].shape[0] == 2  # the member dimension
    for name, value in one["state"].items():
        torch.testing.assert_close(two["state"][name], value, rtol=0, atol=1e-6)
    for key in ("val/loss/member_0", "val/loss/member_1", "val/loss/std", "train/total"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6, abs=1e-7), key
    rank1 = load(tmp_path / "two" / "rank1.pt")
    for name, value in two["state"].items():
        torch.testing.assert_close(rank1["state"][name], value, rtol=0, atol=0)


@pytest.mark.slow
def test_ddp_spawn_fits_with_r_rnd(tmp_path):
    """ddp_spawn pickles the module (R_rnd's generator included) and returns rank 0's weights."""
    initial = {
        k: v.detach().clone() for k, v in helpers.ddp.make_module(r_rnd=True).named_parameters()
    }
    proc = run_script(
        {
            "out": str(tmp_path / "spawn"),
            "epochs": 2,
            "r_rnd": True,
            "trainer": {"devices": 2, "strategy": "ddp_spawn"},
        },
        tmp_path,
    )
    finish(proc)
    result = load(tmp_path / "spawn" / "rank0.pt")
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    assert result["metrics"]["train/r_rnd"] > 0
    moved = max((result["state"][k] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-4  # the parent holds the trained weights
