"""Count, on the CPU, the calls that would wait for the device on a GPU (host reads).

On CUDA every ``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``.numpy()``,
``nonzero`` and boolean-mask index copies a value to the host and so waits for every queued
kernel, and so do the SVDs and eigendecompositions of ``torch.linalg`` (they check their
solver's error flag). On the CPU they are free, so nothing would show them; :class:`HostReads`
patches them onto torch and counts each call (with where it came from), the way the figures of
``docs/speed.md`` were taken.
"""

from __future__ import annotations

import collections
import traceback
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

_TENSOR_METHODS = (
    "item",
    "tolist",
    "numpy",
    "nonzero",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
)
_TORCH_FUNCTIONS = ("nonzero", "masked_select", "unique")
# linear algebra that PyTorch documents as synchronising a CUDA device with the CPU (error checks)
_LINALG_FUNCTIONS = ("svd", "svdvals", "eig", "eigvals", "eigh", "eigvalsh")


def _is_bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


class HostReads:
    """Counts host reads while :meth:`counting` is active.

    Attributes:
        count: reads seen so far.
        sources: ``"file:line"`` of the first frame outside torch → number of reads there.
    """

    def __init__(self, with_sources: bool = True) -> None:
        self.count = 0
        self.sources: collections.Counter = collections.Counter()
        self.with_sources = with_sources
        self._active = False
        self._inside = False  # a patched call made by another patched call counts once

    def _seen(self) -> None:
        if not self._active or self._inside:
            return
        stack = traceback.extract_stack()[:-2]
        # torch's optimisers keep their step counts on the host (capturable=False): free on a
        # GPU too
        if any("/torch/optim/" in frame.filename for frame in stack[-6:]):
            return
        self.count += 1
        if self.with_sources:
            for frame in reversed(stack):
                if "/torch/" not in frame.filename and "helpers.sync" not in frame.filename:
                    self.sources[
                        f"{frame.filename.split('/')[-2]}/{frame.filename.split('/')[-1]}:"
                        f"{frame.lineno}"
                    ] += 1
                    break

    def _wrap(self, original, condition=None):
        counter = self

        def wrapper(*args, **kwargs):
            if counter._inside or (condition is not None and not condition(*args, **kwargs)):
                return original(*args, **kwargs)
            counter._seen()
            counter._inside = True
            try:
                return original(*args, **kwargs)
            finally:
                counter._inside = False

        return wrapper

    @contextmanager
    def patched(self) -> Iterator["HostReads"]:
        """Patch torch for the duration (counting only inside :meth:`counting`)."""
        saved = []
        for name in _TENSOR_METHODS:
            original = getattr(Tensor, name)
            saved.append((Tensor, name, original))
            setattr(Tensor, name, self._wrap(original))
        for owner, names in ((torch, _TORCH_FUNCTIONS), (torch.linalg, _LINALG_FUNCTIONS)):
            for name in names:
                original = getattr(owner, name)
                saved.append((owner, name, original))
                setattr(owner, name, self._wrap(original))
        getitem = Tensor.__getitem__
        saved.append((Tensor, "__getitem__", getitem))
        Tensor.__getitem__ = self._wrap(getitem, lambda t, index: _is_bool_mask(index))
        try:
            yield self
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)

    @contextmanager
    def counting(self) -> Iterator["HostReads"]:
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def report(self, top: int = 15) -> str:
        return f"{self.count} host reads; " + ", ".join(
            f"{k} ×{v}" for k, v in self.sources.most_common(top)
        )


class SolveCounter:
    """Counts outermost ``solve`` calls of irnet's forward and linear solvers while ``active``.

    Patches ``solve`` on every solver class that defines it; :meth:`close` puts them back.
    """

    def __init__(self) -> None:
        from irnet.linear import LinearSolver
        from irnet.solvers import NonlinearSolver

        self.active, self.count, self._depth = False, 0, 0
        self._patched = [
            (cls, vars(cls)["solve"])
            for base in (NonlinearSolver, LinearSolver)
            for cls in (base, *_subclasses(base))
            if "solve" in vars(cls)
        ]
        for cls, original in self._patched:
            cls.solve = self._wrap(original)

    def _wrap(self, original):
        def solve(solver, *args, **kwargs):
            self.count += self.active and self._depth == 0
            self._depth += 1
            try:
                return original(solver, *args, **kwargs)
            finally:
                self._depth -= 1

        return solve

    def close(self) -> None:
        for cls, original in self._patched:
            cls.solve = original


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)
