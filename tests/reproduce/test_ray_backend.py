"""The study runner's Ray backend on a two-node cluster started here (a head and one worker node,
both processes on this machine): every cell recorded once in the journal by the driver, the
results those of the local pool, a cell whose worker process dies run again, a real tiny study
end to end; and the one-line refusals of the command line (these run without Ray too)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from irnet.reproduce._command import main
from irnet.reproduce._journal import Journal, cell_key
from irnet.reproduce._ray_backend import RayBackendError, run_on_node
from irnet.reproduce._runner import run_cells

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not HAS_RAY, reason="ray is not installed (pip install 'irnet[ray]')"
)
# set in the cluster's processes only: where cells leave a trace of the node that ran them
TRACE = "IRNET_TEST_RAY_TRACE"


# -- cells (imported by the cluster's workers from this file's folder) -----------------------------


def square_slowly(cell: dict) -> dict:
    """A cheap cell that lasts long enough for both nodes to get one; leaves a trace of its node
    when run on the test's cluster."""
    time.sleep(1.0)
    if os.environ.get(TRACE):
        import ray

        node = ray.get_runtime_context().get_node_id()
        (Path(os.environ[TRACE]) / f"{cell['i']}.{node}").touch()
    return {"square": cell["i"] ** 2, "threads": _torch_threads()}


def die_once(cell: dict) -> dict:
    """Kills its own worker process the first time it runs (as a lost node would end it)."""
    attempts = Path(cell["attempts"])
    with attempts.open("a") as file:
        file.write(f"{os.getpid()}\n")
    if len(attempts.read_text().splitlines()) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"square": cell["i"] ** 2}


def lose_the_worker_node_once(cell: dict) -> dict:
    """Takes down the worker node (its raylet: the node is gone for the cluster) when it runs
    there."""
    time.sleep(1.0)  # both cells running: one on each node
    attempts = Path(cell["attempts"])
    node = os.environ.get("IRNET_TEST_RAY_NODE", "head")
    with attempts.open("a") as file:
        file.write(f"{cell['i']} {node}\n")
    if node == "worker":  # its raylet (the worker process's parent), then the process itself
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return {"square": cell["i"] ** 2}


def square_or_fail(cell: dict) -> dict:
    """Raises ValueError for a negative cell, after the others have finished."""
    if cell["i"] < 0:
        time.sleep(2.0)
        raise ValueError(f"no square for {cell['i']} here")
    return {"square": cell["i"] ** 2}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# -- the cluster -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Node(NamedTuple):
    process: subprocess.Popen
    log: Path


def _ray_start(*options: str, root: Path, env: dict) -> Node:
    """``ray start … --block`` in a session of its own (stopped by signalling that session)."""
    ports = {  # the defaults of these would clash between two nodes on one machine
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
    }
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *options]
    command += [f"{flag}={port}" for flag, port in ports.items()]
    command += ["--num-cpus=1", "--object-store-memory=80000000", f"--temp-dir={root}"]
    command += ["--disable-usage-stats"]
    log = root / f"start{len(list(root.glob('start*.log')))}.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Node(process, log)


def _stop(node: Node) -> None:
    """SIGTERM to ``ray start --block`` (it stops its node), then SIGKILL to what is left of its
    session."""
    process = node.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _wait_for_nodes(address: str, nodes: list[Node], timeout: float = 120.0) -> None:
    """Until every node has joined the cluster; fails at once with the log of a node that quit."""
    import ray

    deadline = time.monotonic() + timeout
    ray.init(address=address, logging_level="ERROR")
    try:
        while sum(node["Alive"] for node in ray.nodes()) < len(nodes):
            for node in nodes:
                assert node.process.poll() is None, node.log.read_text()
            assert time.monotonic() < deadline, f"no {len(nodes)} nodes after {timeout} s"
            time.sleep(0.5)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_environment():
    """Ray's settings for this module's clusters and drivers: a token of their own (Ray would
    otherwise write one to ~/.ray), no usage reports, this file importable by the workers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv(
            "PYTHONPATH",
            os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        )
        patch.delenv("RAY_ADDRESS", raising=False)
        yield


@contextlib.contextmanager
def _two_nodes() -> Iterator[tuple[str, Path]]:
    """``(address, trace folder)`` of a head node and a worker node of one CPU each; the worker
    node's processes see ``IRNET_TEST_RAY_NODE=worker``."""
    # a short root: Ray's socket paths must stay under 108 characters
    root = Path(tempfile.mkdtemp(prefix="irnet-ray-"))
    trace = root / "trace"
    trace.mkdir()
    env = dict(os.environ, **{TRACE: str(trace)})
    port = _free_port()
    address = f"127.0.0.1:{port}"
    local = "--node-ip-address=127.0.0.1"
    head = ["--head", f"--port={port}", "--include-dashboard=false", local]
    nodes = [_ray_start(*head, root=root, env=env)]
    try:
        worker_env = dict(env, IRNET_TEST_RAY_NODE="worker")
        nodes.append(_ray_start(f"--address={address}", local, root=root, env=worker_env))
        _wait_for_nodes(address, nodes)
        yield address, trace
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_environment):
    """A two-node cluster shared by this module's tests (:func:`_two_nodes`)."""
    with _two_nodes() as address_and_trace:
        yield address_and_trace


def _without_seconds(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in results]


# -- on the cluster --------------------------------------------------------------------------------


@needs_ray
@pytest.mark.slow
def test_cells_on_two_nodes_are_recorded_once_with_the_local_pools_results(cluster, tmp_path):
    address, trace = cluster
    cells = [{"i": i} for i in range(4)]
    journal = Journal(tmp_path / "cells.partial.jsonl")
    results = run_cells(
        square_slowly, cells, workers=1, desc="ray", journal=journal, backend="ray", address=address
    )
    entries = [json.loads(line) for line in journal.path.read_text().splitlines()]
    assert sorted(entry["key"] for entry in entries) == sorted(cell_key(c) for c in cells)
    assert len({node.split(".")[1] for node in os.listdir(trace)}) == 2  # both nodes ran cells
    local = run_cells(square_slowly, cells, workers=1, desc="local")
    assert _without_seconds(results) == _without_seconds(local)
    assert [r["square"] for r in results] == [0, 1, 4, 9]
    assert {r["threads"] for r in results} == {1}  # the local pool's thread policy on the nodes

    # a re-run finds every cell in the journal and sends nothing to the cluster
    for path in trace.iterdir():
        path.unlink()
    again = run_cells(
        square_slowly, cells, workers=1, desc="ray", journal=journal, backend="ray", address=address
    )
    assert again == results and not list(trace.iterdir())


@needs_ray
@pytest.mark.slow
def test_a_cell_whose_worker_dies_runs_again_and_is_recorded_once(cluster, tmp_path):
    address, _ = cluster
    cells = [{"i": 3, "attempts": str(tmp_path / "attempts")}]
    journal = Journal(tmp_path / "cells.partial.jsonl")
    results = run_cells(
        die_once, cells, workers=1, desc="ray", journal=journal, backend="ray", address=address
    )
    pids = (tmp_path / "attempts").read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # killed once, then run in another process
    assert results[0]["square"] == 9
    assert [entry["key"] for entry in map(json.loads, journal.path.read_text().splitlines())] == [
        cell_key(cells[0])
    ]


@needs_ray
@pytest.mark.slow
def test_a_tiny_study_on_the_cluster_equals_the_local_run(cluster, tmp_path, monkeypatch):
    address, _ = cluster
    monkeypatch.chdir(tmp_path)  # the nodes run the cells here too: relative logs land here
    common = ["lotka", "--tiny", "--log-dir", "logs", "--threads", "1"]
    main([*common, "--out", "ray", "--backend", "ray", "--address", address])
    assert len(list(Path("logs").rglob("events.out.tfevents.*"))) == 2
    main([*common, "--out", "local", "--workers", "1"])
    on_cluster, local = (
        json.loads(Path(f"{out}/results.json").read_text()) for out in ("ray", "local")
    )
    assert on_cluster["meta"]["backend"] == f"ray at {address}"
    assert _without_seconds(on_cluster["cells"]) == _without_seconds(local["cells"])


@needs_ray
@pytest.mark.slow
def test_without_an_address_a_ray_on_this_machine_runs_the_cells(ray_environment, monkeypatch):
    root = Path(tempfile.mkdtemp(prefix="irnet-ray-"))  # short: Ray's socket paths
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    try:
        results = run_cells(
            square_slowly, [{"i": 2}, {"i": 5}], workers=2, desc="ray", backend="ray"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert [r["square"] for r in results] == [4, 25]
    import ray

    assert not ray.is_initialized()  # the Ray it started is stopped again


@needs_ray
@pytest.mark.slow
def test_a_cell_on_a_node_that_is_lost_runs_again_on_another(ray_environment, tmp_path):
    attempts = tmp_path / "attempts"
    cells = [{"i": i, "attempts": str(attempts)} for i in (2, 3)]
    journal = Journal(tmp_path / "cells.partial.jsonl")
    with _two_nodes() as (address, _):
        results = run_cells(
            lose_the_worker_node_once,
            cells,
            workers=1,
            desc="ray",
            journal=journal,
            backend="ray",
            address=address,
        )
    runs = [line.split() for line in attempts.read_text().splitlines()]
    lost = [i for i, node in runs if node == "worker"]
    assert len(lost) == 1  # one cell was on the worker node when it went
    assert sorted(i for i, node in runs if node == "head") == ["2", "3"]  # that one again
    assert [r["square"] for r in results] == [4, 9]
    assert sorted(
        entry["key"] for entry in map(json.loads, journal.path.read_text().splitlines())
    ) == sorted(cell_key(c) for c in cells)


@needs_ray
@pytest.mark.slow
def test_a_cells_own_exception_ends_the_study_and_keeps_the_finished_cells(cluster, tmp_path):
    address, _ = cluster
    journal = Journal(tmp_path / "cells.partial.jsonl")
    with pytest.raises(ValueError, match="no square for -1 here"):
        run_cells(
            square_or_fail,
            [{"i": 2}, {"i": -1}],
            workers=1,
            desc="t",
            journal=journal,
            backend="ray",
            address=address,
        )
    assert _without_seconds(journal.results()) == [{"i": 2, "square": 4}]


@needs_ray
@pytest.mark.slow
def test_cells_larger_than_every_node_are_refused(cluster):
    address, _ = cluster
    with pytest.raises(
        RayBackendError, match="asks for 2 CPUs .* largest node of the cluster has 1"
    ):
        run_cells(
            square_slowly,
            [{"i": 1}],
            workers=1,
            desc="t",
            threads=2,
            backend="ray",
            address=address,
        )


# -- in a worker process (no Ray needed) -----------------------------------------------------------


def test_a_task_runs_in_the_drivers_folder_where_the_node_has_it(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shared").mkdir()
    prepared: list[int] = []
    result = run_on_node(prepared.append, _cwd, 3, str(tmp_path / "shared"), {"i": 1})
    assert result == {"cwd": str(tmp_path / "shared")} and prepared == [3]
    result = run_on_node(prepared.append, _cwd, 3, str(tmp_path / "elsewhere"), {"i": 1})
    assert result == {"cwd": str(tmp_path / "shared")}  # stays where it is
    assert capsys.readouterr().err.strip() == (
        f"irnet: {tmp_path / 'elsewhere'} is not on this node; the cell's relative paths (its "
        f"logs) start from {tmp_path / 'shared'} here"
    )


def _cwd(cell: dict) -> dict:
    return {"cwd": os.getcwd()}


# -- the command line ------------------------------------------------------------------------------


def _refusal(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_backend_ray_without_ray_installed_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    line = _refusal(capsys, ["lotka", "--tiny", "--backend", "ray", "--log-dir", str(tmp_path)])
    assert line.endswith("the ray backend needs Ray: pip install 'irnet[ray]'")
    assert not (tmp_path / "cells.partial.jsonl").exists()


def test_address_without_backend_ray_and_seeds_on_ray_are_refused(capsys, tmp_path):
    line = _refusal(capsys, ["lotka", "--address", "10.0.0.1:6379", "--out", str(tmp_path)])
    assert line.endswith("--address applies to --backend ray only")
    line = _refusal(capsys, ["stability", "--backend", "ray", "--out", str(tmp_path)])
    assert line.endswith("the stability study runs on this machine only")


def test_unknown_backend_is_refused_by_the_runner():
    with pytest.raises(ValueError, match="backend must be one of"):
        run_cells(square_slowly, [{"i": 1}], workers=1, desc="t", backend="dask")


def test_cells_with_equal_settings_run_and_are_recorded_once(tmp_path):
    journal = Journal(tmp_path / "cells.partial.jsonl")
    cells = [{"i": 1}, {"i": 2}, {"i": 1}]
    CALLS.clear()
    results = run_cells(_count_calls, cells, workers=1, desc="t", journal=journal)
    assert [r["square"] for r in results] == [1, 4, 1]
    assert CALLS == [1, 2]
    assert len(journal.results()) == 2


CALLS: list[int] = []


def _count_calls(cell: dict) -> dict:
    CALLS.append(cell["i"])
    return {"square": cell["i"] ** 2}
