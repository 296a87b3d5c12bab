"""Seed ensembles in the monitoring callbacks: how many members, each member's share of the rows.

An ensemble (``ODENet(ensemble=E)``, :mod:`irnet.nets.ensemble`) holds every member's copy of
every sample as sample-major rows: row ``b · E + k`` is sample b in member k. Per-row
statistics (iterations, residuals, radii, distances) are member k's where the row is; a mean
over all rows is the mean over members of each member's mean. The callbacks log those pooled
values under their usual tags and each member's value under ``<tag>/member_<k>``, with the
spread across members under ``<tag>/std`` (as the module's ``{stage}/loss/member_<k>``).
"""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from irnet.nets.ensemble import members_of, rows_of


def module_members(pl_module: pl.LightningModule) -> int:
    """E, the members the module's network trains (1 for an ordinary network or none)."""
    net = getattr(pl_module, "net", None)
    return members_of(net) if isinstance(net, nn.Module) else 1


def member_means(values: Tensor, members: int) -> Tensor:
    """Each member's mean of per-row ``values`` (``(batch · E, …)`` sample-major), ``(E,)``."""
    return rows_of(values.reshape(len(values), -1).float(), members).mean((1, 2))


def member_slab(rows: Tensor, members: int, member: int) -> Tensor:
    """Member ``member``'s rows of sample-major ``rows``, ``(batch, …)``."""
    return rows if members == 1 else rows_of(rows, members)[member]


def member_scalars(tag: str, values: Tensor) -> dict[str, float]:
    """``{tag}/member_<k>`` for each member's value and ``{tag}/std``, their spread.

    The spread is the sample standard deviation over members, as the module's
    ``{stage}/loss/std``.
    """
    values = values.detach().float().cpu()
    scalars = {f"{tag}/member_{k}": float(v) for k, v in enumerate(values)}
    if len(values) > 1:
        scalars[f"{tag}/std"] = float(values.std())
    return scalars


class MemberAccumulator:
    """Running, weighted per-member means over an epoch's steps, by name.

    Each step adds an ``(E,)`` vector with a weight (its batch size), so an epoch value is the
    same weighted mean of the steps that Lightning's ``_epoch`` values are.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._weights: dict[str, float] = {}

    def add(self, name: str, values: Tensor, weight: float = 1.0) -> None:
        """Add one step's ``(E,)`` values with ``weight``."""
        values = values.detach().float() * weight
        previous = self._sums.get(name)
        self._sums[name] = values if previous is None else previous + values.to(previous.device)
        self._weights[name] = self._weights.get(name, 0.0) + weight

    def mean(self, name: str) -> Optional[Tensor]:
        """The weighted mean of ``name`` per member, or None if never added."""
        if name not in self._sums or not self._weights[name]:
            return None
        return self._sums[name] / self._weights[name]

    def total(self, name: str) -> Optional[Tensor]:
        """The weighted sum of ``name`` per member (counts), or None if never added."""
        return self._sums.get(name)

    def names(self) -> list[str]:
        """The names added so far, in order."""
        return list(self._sums)

    def reset(self) -> None:
        """Forget everything."""
        self._sums.clear()
        self._weights.clear()


def stacked_rows(stats: list, field: str) -> Optional[Tensor]:
    """One per-row field (``"iterations"``, ``"converged"``…) of every layer's solver
    statistics that has one, ``(layers', rows)``, or None without any."""
    present = [getattr(s, field) for s in stats if s is not None]
    if not present:
        return None
    return torch.stack([p.float() for p in present])
