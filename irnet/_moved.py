"""Module paths from before irnet's modules moved into packages, still importable.

Configs, scripts and notes written before the move name modules such as
``irnet.staged_net`` or ``irnet.attacks``. Each old path imports as a module
holding the new module's names (with a ``DeprecationWarning`` naming the new
path), so that ``class_path: irnet.staged_net.StagedConvODENet`` and
``from irnet.attacks import pgd`` keep working. Class paths that did not move
(``irnet.nets.ODENet``, ``irnet.module.ImplicitNetModule``, ``irnet.solvers.…``,
``irnet.linear.…``, ``irnet.callbacks.…``, ``irnet.datamodules.…``) need nothing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any, Optional, Sequence

#: old module path -> where its contents live now
MOVED = {
    "irnet.arg_repr": "irnet._misc",
    "irnet.attacks": "irnet.analysis.attacks",
    "irnet.attacks_strong": "irnet.analysis.strong_attacks",
    "irnet.autograd": "irnet._adjoint",
    "irnet.auxiliary": "irnet.nets.protocol",
    "irnet.cli_checks": "irnet.cli.checks",
    "irnet.cli_errors": "irnet.cli.errors",
    "irnet.cli_nulls": "irnet.cli.nulls",
    "irnet.cli_predict": "irnet.callbacks.prediction_writer",
    "irnet.contraction": "irnet.nets.contraction",
    "irnet.fidelity": "irnet.analysis.fidelity",
    "irnet.held_dropout": "irnet._scope",
    "irnet.per_sample": "irnet._misc",
    "irnet.plotting": "irnet.analysis.plotting",
    "irnet.progress": "irnet._iterate",
    "irnet.solve_scope": "irnet._scope",
    "irnet.stability": "irnet.analysis.stability",
    "irnet.staged_net": "irnet.nets.staged",
    "irnet.stop_checks": "irnet._iterate",
    "irnet.threads": "irnet.cli.threads",
    "irnet.validation": "irnet._misc",
    "irnet.warm_start": "irnet.nets.warm_start",
    "irnet.warm_start_merge": "irnet.nets.warm_start_merge",
    "irnet.linear.neumann_rows": "irnet.linear.neumann",
    "irnet.solvers.line_search": "irnet.solvers._line_search",
    "irnet.solvers.picard_rows": "irnet.solvers.fixed_point",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as a view of the new module."""

    def find_spec(self, name: str, path: Optional[Sequence[str]] = None, target: Any = None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec: Any) -> types.ModuleType:
        return types.ModuleType(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        new = importlib.import_module(MOVED[module.__name__])
        warnings.warn(
            f"{module.__name__} has moved to {new.__name__}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        public = {k: v for k, v in vars(new).items() if not k.startswith("__")}
        module.__dict__.update(public)
        module.__getattr__ = lambda attr: getattr(new, attr)  # names set on the new module later


def install() -> None:
    """Let the old module paths import (once per process)."""
    if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
        sys.meta_path.append(_OldPaths())
