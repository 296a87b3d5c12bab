"""The one place that decides whether a tensor's work takes the CPU path or the accelerator path.

On the CPU a host read (``.item()``, ``bool(t)``, ``.tolist()``, …) costs nothing, so irnet's
loops look at their residuals as often as it saves work and run their row loops
(:mod:`irnet.solvers.fixed_point`, :mod:`irnet.linear.neumann`). On a GPU each such read
waits for every queued kernel, so the accelerator path reads at most about once per solve
(:mod:`irnet._iterate`) and defers everything else to one read per training step.

The path follows the tensor's device unless the environment variable ``IRNET_DEVICE_PATH``
says ``accelerator`` or ``cpu``: ``IRNET_DEVICE_PATH=accelerator`` runs the accelerator path on
the CPU, so that tests without a GPU run it and count its host reads. :func:`forced_path`
does the same inside a ``with`` block.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

from torch import Tensor

ENV_VAR = "IRNET_DEVICE_PATH"
PATHS = ("auto", "cpu", "accelerator")


def _from_environment() -> Optional[str]:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in PATHS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(PATHS)}, got {value!r}")
    return None if value == "auto" else value


_forced: Optional[str] = _from_environment()


def on_accelerator_path(t: Tensor) -> bool:
    """Whether work on ``t`` takes the accelerator path (no host reads but where they decide)."""
    if _forced is not None:
        return _forced == "accelerator"
    return t.device.type != "cpu"


@contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Take ``path`` (``"cpu"``, ``"accelerator"`` or ``"auto"``) for every tensor in the block."""
    global _forced
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    before, _forced = _forced, None if path == "auto" else path
    try:
        yield
    finally:
        _forced = before
