"""Shared pytest set-up: reproducible draws, and the ``helpers`` package importable."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# ``from helpers.problems import ...`` works however pytest is invoked (rootdir, IDE, one file).
sys.path.insert(0, os.path.dirname(__file__))


# fixtures shared by test directories (a conftest.py per directory would clash with this one
# under --doctest-modules, which imports every conftest.py by its basename)
pytest_plugins = ["helpers.classification"]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2``, the test command's): one torch thread per worker process.

    Two workers with a pool of two threads each would fight over two cores; a pool that spins
    while another process holds the cores makes small operations many times slower.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """The same random draws in every test, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def float64_default():
    """Tensors made in the test default to float64 (exactness checks), restored afterwards."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny problems, restored afterwards.

    Tensors of a few dozen numbers gain nothing from a thread pool, and on a
    shared 2-core machine a pool that spins while another process holds the
    cores makes a 0.1 ms convolution take tens of milliseconds.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
