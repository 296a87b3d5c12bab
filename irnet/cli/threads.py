"""How many torch threads a run uses: one per process unless told otherwise.

Why: a toy-set epoch is tens of thousands of tiny operations. With torch's
default intra-op pool (one thread per core) every operation waits at a barrier
for all threads; when another process shares the cores a thread is often
descheduled, and an Example 1 epoch went from 0.19 s (1 thread) to 27.8 s
(2 threads beside a busy process). One thread per process cannot collapse that
way, and on these small states it is as fast idle too (docs/training.md,
"Threads"). Large states (digits on many cores) may gain from more threads.

Precedence, first that applies:

1. the run's ``threads`` setting (``--threads N`` / ``threads: N`` in a config;
   ``auto`` means torch's own default: one thread per physical core, or what
   ``OMP_NUM_THREADS`` says);
2. the ``OMP_NUM_THREADS`` environment variable, if set (torch already reads it);
3. :data:`DEFAULT_THREADS` = 1.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch

DEFAULT_THREADS = 1
AUTO = "auto"
ENV_VAR = "OMP_NUM_THREADS"
# torch's default in this process, read before anything here changes it
_TORCH_DEFAULT = torch.get_num_threads()

ThreadsSetting = Union[int, str, None]


def check_threads(value: ThreadsSetting) -> ThreadsSetting:
    """``None``, ``"auto"`` or an integer >= 1 (also as a string); raises ValueError otherwise."""
    if value is None or value == AUTO:
        return value
    number = value
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"threads must be an integer >= 1 or 'auto', got {value!r}")
    return number


def resolve_threads(
    setting: ThreadsSetting = None, environ: Optional[Mapping[str, str]] = None
) -> int:
    """The intra-op thread count for ``setting`` under the precedence of this module's docstring.

    Args:
        setting: the run's ``threads`` value: an integer >= 1, ``"auto"``, or
            ``None`` (not given).
        environ: the environment to read ``OMP_NUM_THREADS`` from (default ``os.environ``).

    Returns:
        The number of intra-op threads to use.
    """
    setting = check_threads(setting)
    if setting == AUTO:
        return _TORCH_DEFAULT
    if setting is not None:
        return int(setting)
    env = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return DEFAULT_THREADS


def apply_threads(setting: ThreadsSetting = None) -> int:
    """Set torch's intra-op (and, where still possible, inter-op) threads; returns intra-op's.

    Inter-op threads (torch's pool for parallel independent ops) follow the
    intra-op count: one process, one core. torch lets them be set only once,
    before any inter-op work starts; later calls keep what is there.
    """
    threads = resolve_threads(setting)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set, or parallel work has started: harmless
        pass
    return threads
