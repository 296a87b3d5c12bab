"""One ``__repr__`` for the small configuration objects (solvers, regularisers, perturbations)."""

from __future__ import annotations

import torch


class ArgsRepr:
    """``ClassName(arg=value, …)`` from the public attributes, as a config would name them.

    Private attributes (``_…``) and run-time state (tensors, generators) are left out.
    """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and not isinstance(v, (torch.Tensor, torch.Generator)))
        return f"{type(self).__name__}({args})"


__all__ = ["ArgsRepr"]
