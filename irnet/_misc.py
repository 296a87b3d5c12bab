"""Small shared helpers: per-sample norms and products, argument checks, readable reprs.

* Per-sample reductions of a batch, in which every dimension but the first belongs to one
  sample: solvers, linear solvers, losses and monitors all stop, weigh and report each sample on
  its own.
* Argument checks shared by solvers, layers and networks; each error names the argument.
* :class:`ArgsRepr`, one ``__repr__`` for the small configuration objects (solvers,
  regularisers, perturbations).
"""

from __future__ import annotations

import torch
from torch import Tensor

# -- per-sample reductions -------------------------------------------------------------------------


def sample_norm(v: Tensor) -> Tensor:
    """Euclidean norm of each sample, shape ``(batch,)``."""
    return torch.linalg.vector_norm(v if v.dim() == 2 else v.flatten(1), dim=1)


def row_sample_norms(rows: Tensor) -> Tensor:
    """Euclidean norm of each sample of each row of stacked batches ``(rows, batch, …)``, shape
    ``(rows, batch)``."""
    return torch.linalg.vector_norm(rows.flatten(2), dim=2)


def sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """Inner product of each pair of samples, shape ``(batch,)``."""
    return (a * b).flatten(1).sum(1)


def per_sample(s: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``(batch,)`` tensor so it broadcasts against ``like``."""
    return s.view(-1, *([1] * (like.dim() - 1)))


# -- argument checks -------------------------------------------------------------------------------


def check_positive(name: str, value: float) -> float:
    """``value > 0`` as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: float) -> float:
    """``value >= 0`` as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def check_int(name: str, value: int, minimum: int) -> int:
    """An integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value: bool) -> bool:
    """``True`` or ``False`` (not a truthy stand-in such as 1 or "yes")."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_unit_interval(name: str, value: float) -> float:
    """A number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# -- reprs -----------------------------------------------------------------------------------------


class ArgsRepr:
    """``ClassName(arg=value, …)`` from the public attributes, as a config would name them.

    Private attributes (``_…``) and run-time state (tensors, generators) are left out.
    """

    def __repr__(self) -> str:
        args = ", ".join(
            f"{k}={v!r}"
            for k, v in vars(self).items()
            if not k.startswith("_") and not isinstance(v, (torch.Tensor, torch.Generator))
        )
        return f"{type(self).__name__}({args})"
