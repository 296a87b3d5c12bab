"""A study's cells on a Ray cluster (``irnet reproduce <study> --backend ray [--address …]``).

Each unfinished cell becomes one Ray task that asks for as many CPUs as the cell has torch
threads, so the cluster runs as many cells at once as it has cores to give them. A task runs
the function the local pool runs (the same thread policy and quiet logging,
:func:`irnet.reproduce._runner.quiet_worker`) in the driver's working directory when that
directory exists on the node (a shared filesystem), so that a cell's relative log dir means
the same on every node. Results come back to the driver, which alone writes the study's
journal: a cell is recorded once, whichever node ran it. A task whose worker process or node
dies is run again (:data:`RETRIES` times at most); an exception raised by the cell itself is
not retried and ends the study, as it does on the local pool.

Ray is an optional dependency (``pip install 'irnet[ray]'``) and is imported only here, only
when this backend is asked for.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

from irnet.cli.threads import ThreadsSetting, resolve_threads

RETRIES = 3  # re-runs of a cell whose worker process or node died (Ray's max_retries)
INSTALL_HINT = "the ray backend needs Ray: pip install 'irnet[ray]'"


class RayBackendError(RuntimeError):
    """The cells cannot run on Ray: it is not installed, or no node has the CPUs a cell asks for
    (the message says what to do)."""


def import_ray() -> Any:
    """The ``ray`` module; :class:`RayBackendError` with the install command if it is missing."""
    try:
        import ray
    except ImportError as err:
        raise RayBackendError(INSTALL_HINT) from err
    return ray


def ray_results(
    function: Callable[[dict], dict],
    cells: Sequence[dict],
    setup: Callable[[int], None],
    workers: int,
    threads: ThreadsSetting = None,
    address: Optional[str] = None,
) -> Iterator[tuple[dict, dict]]:
    """``(cell, function(cell))`` pairs as the cells finish on the cluster at ``address``.

    ``setup(threads)`` prepares the worker process before each cell (the local pool's
    initializer, :func:`irnet.reproduce._runner.quiet_worker`).

    ``address`` is ``HOST:PORT`` of the cluster's head, or ``auto`` (the cluster ``ray start``
    started on this machine). Without it (and without ``RAY_ADDRESS`` in the environment) a new
    one-machine Ray is started with ``workers`` × threads CPUs, and stopped at the end. A Ray
    this process was already connected to is used as it is and left connected. Cells not yet
    finished when the iteration stops (an exception, a closed generator) are cancelled. No
    cells: no connection.
    """
    if not cells:
        return
    ray = import_ray()
    per_cell = resolve_threads(threads)  # the driver's reading, so every node agrees
    started = _connect(ray, address, workers * per_cell)
    try:
        _check_room(ray, per_cell)
        run = ray.remote(run_on_node).options(
            num_cpus=per_cell, max_retries=RETRIES, retry_exceptions=False
        )
        shared_function = ray.put(function)
        pending = {
            run.remote(setup, shared_function, per_cell, os.getcwd(), cell): index
            for index, cell in enumerate(cells)
        }
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(ready[0])
                yield cells[index], _result(ray, ready[0])
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()


def _connect(ray: Any, address: Optional[str], cpus: int) -> bool:
    """Connect to the cluster at ``address`` (or start one with ``cpus`` CPUs); whether this call
    connected (and so should disconnect)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = dict(logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **options)
    else:  # no cluster named: a new one of this machine alone ("local": not one of `ray start`)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **options)
    return True


def _check_room(ray: Any, per_cell: int) -> None:
    """:class:`RayBackendError` if no node has ``per_cell`` CPUs (Ray would wait forever)."""
    largest = max(
        (node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0
    )
    if largest < per_cell:
        raise RayBackendError(
            f"a cell asks for {per_cell} CPUs (--threads) and the largest node of the cluster has "
            f"{largest:g}: lower --threads or add larger nodes"
        )


def _result(ray: Any, ref: Any) -> dict:
    """The value of a finished task; a cell's own exception is raised as that exception's type."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        raise err.as_instanceof_cause() from None


def run_on_node(
    setup: Callable[[int], None],
    function: Callable[[dict], dict],
    threads: int,
    directory: str,
    cell: dict,
) -> dict:
    """One cell in a Ray worker process: ``setup(threads)``, then ``function(cell)`` in the
    driver's working directory ``directory`` if this node has it."""
    setup(threads)
    if os.path.isdir(directory):
        os.chdir(directory)
    else:
        print(
            f"irnet: {directory} is not on this node; the cell's relative paths (its logs) "
            f"start from {os.getcwd()} here",
            file=sys.stderr,
        )
    return function(cell)
