"""Two "nodes" of one process each on this machine, through Lightning's own multi-node environment.

Each process is started as a cluster launcher (torchrun, a job script) would
start it on its node: ``MASTER_ADDR``/``MASTER_PORT`` of node 0, ``NODE_RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` in the environment, and ``num_nodes=2,
devices=1`` for the Trainer. Lightning's ``LightningEnvironment`` reads them.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from test_ddp import finish, load, run_script

import helpers.ddp
from helpers.training import subprocess_env

EPOCHS, STREAMS = 3, 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_one_process_each(tmp_path):
    """Full batch of 51 with R_rnd on: the nodes split it 26/25, and each draws its own noise."""
    settings = {
        "out": str(tmp_path / "nodes"),
        "epochs": EPOCHS,
        "r_rnd": True,
        "trainer": {"devices": 1, "num_nodes": 2, "strategy": "ddp"},
    }
    port = free_port()
    procs = []
    for node in range(2):
        env = subprocess_env()
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            NODE_RANK=str(node),
            LOCAL_RANK="0",
            WORLD_SIZE="2",
        )
        procs.append(run_script(settings, tmp_path, env=env))
    (tmp_path / "one").mkdir()
    helpers.ddp.run({**settings, "out": str(tmp_path / "one"), "trainer": {}})
    for proc in procs:
        finish(proc)
    ranks = [load(tmp_path / "nodes" / f"rank{r}.pt") for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    assert len(ranks[0]["losses"]) == EPOCHS
    # the same data and initial weights: the first step's data loss is the one-process one
    assert ranks[0]["losses"][0] == pytest.approx(
        helpers.ddp.step_losses(tmp_path / "one" / "csv" / "version_0")[0], abs=1e-6
    )
    reg = helpers.ddp.make_module(r_rnd=True).r_rnd  # its seed: (seed, epoch, rank) in epoch_seed
    for rank, result in enumerate(ranks):
        drawn = result["noise"]
        assert len(drawn) == EPOCHS * STREAMS
        for epoch in range(EPOCHS):
            g = torch.Generator().manual_seed(reg.epoch_seed(epoch, rank))
            for stream in range(STREAMS):
                eps = drawn[epoch * STREAMS + stream]
                assert eps.shape == ((26, 1) if rank == 0 else (25, 1))
                torch.testing.assert_close(
                    eps, helpers.ddp.SIGMA * torch.randn(eps.shape, generator=g), rtol=0, atol=0
                )
    assert not torch.allclose(
        ranks[0]["noise"][0][:25], ranks[1]["noise"][0]
    )  # not the same streams
    for name, value in ranks[0]["state"].items():  # the replicas stayed equal
        torch.testing.assert_close(ranks[1]["state"][name], value, rtol=0, atol=0)
    assert all(np.isfinite(ranks[0]["losses"]))
