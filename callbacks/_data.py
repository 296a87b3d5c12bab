"""What the monitoring callbacks read from a LightningModule and a Trainer: network, blocks, data.

The callbacks rely only on this contract: ``pl_module.net`` is an
:class:`~irnet.nets.ImplicitODENet` (else the implicit blocks are found by
walking the module), an optional ``pl_module.task`` (``"regression"`` or
``"classification"``) or boolean ``pl_module.classification`` names the task,
batches are ``(x, y)`` pairs, and a data module may expose the function its
targets sample as a method ``target(x)``.

Seed ensembles (``ODENet(ensemble=E)``, :mod:`irnet.nets.ensemble`) hold every member's copy
of every sample as sample-major rows: row ``b · E + k`` is sample b in member k. Per-row
statistics (iterations, residuals, radii, distances) are member k's where the row is, and a
mean over all rows is the mean over members of each member's mean. The callbacks log those
pooled values under their usual tags and each member's under ``<tag>/member_<k>``, with the
spread across members under ``<tag>/std`` (as the module's ``{stage}/loss/member_<k>``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from irnet.nets import ConvODENet, ImplicitODENet
from irnet.nets.ensemble import members_of, rows_of


def find_net(pl_module: pl.LightningModule) -> Optional[ImplicitODENet]:
    """``pl_module.net`` when it is an implicit network, else None."""
    net = getattr(pl_module, "net", None)
    return net if isinstance(net, ImplicitODENet) else None


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


def is_classification(pl_module: pl.LightningModule) -> bool:
    """``pl_module.task == "classification"`` or a boolean ``pl_module.classification``;
    without either, guessed from the network's head (linear head or ConvODENet)."""
    task = getattr(pl_module, "task", None)
    if isinstance(task, str):
        return task == "classification"
    flag = getattr(pl_module, "classification", None)
    if isinstance(flag, bool):
        return flag
    net = find_net(pl_module)
    return isinstance(net, ConvODENet) or getattr(net, "readout_kind", None) == "linear"


def batch_inputs(batch: Any) -> Optional[Tensor]:
    """``x`` of an ``(x, y)`` batch (or a bare tensor batch), else None."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    return None


def _loaders(loaders: Any) -> list[Iterable]:
    """Flatten what ``trainer.train_dataloader`` / ``val_dataloaders`` hold into a list."""
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return [loader for value in loaders.values() for loader in _loaders(value)]
    if isinstance(loaders, (list, tuple)):
        return [loader for value in loaders for loader in _loaders(value)]
    return [loaders]


def collect(loaders: Any, max_points: int) -> Optional[tuple[Tensor, Tensor]]:
    """Up to ``max_points`` samples ``(x, y)`` from the first loader, on the CPU, or None.

    Only this rank's shard is seen under a distributed sampler, which is enough
    for pictures. The CPU RNG and the loaders' own generators are restored
    afterwards: a new iterator over a shuffling loader draws from them, and
    monitoring must not change training (nor, under DDP, let the processes'
    shuffling orders drift apart when only rank 0 reads).
    """
    generators = [g for loader in _loaders(loaders) for g in _generators(loader)]
    states = [g.get_state() for g in generators]
    try:
        with torch.random.fork_rng(devices=[]):
            return _collect(loaders, max_points)
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)


def _generators(loader: Any) -> list[torch.Generator]:
    """The distinct generators a loader's iterators draw from (its own, its samplers')."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = [
        loader,
        sampler,
        getattr(sampler, "batches", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
        getattr(getattr(sampler, "batches", None), "sampler", None),
    ]
    found: list[torch.Generator] = []
    for owner in owners:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _collect(loaders: Any, max_points: int) -> Optional[tuple[Tensor, Tensor]]:
    for loader in _loaders(loaders):
        xs, ys, count = [], [], 0
        for batch in loader:
            if not (
                isinstance(batch, (list, tuple))
                and len(batch) >= 2
                and isinstance(batch[0], Tensor)
                and isinstance(batch[1], Tensor)
            ):
                return None
            xs.append(batch[0].detach().cpu())
            ys.append(batch[1].detach().cpu())
            count += len(batch[0])
            if count >= max_points:
                break
        if xs:
            return torch.cat(xs)[:max_points], torch.cat(ys)[:max_points]
    return None


def training_data(trainer: pl.Trainer, max_points: int) -> Optional[tuple[Tensor, Tensor]]:
    """Training samples of the running fit (``trainer.train_dataloader``), or None."""
    return collect(trainer.train_dataloader, max_points)


def validation_data(trainer: pl.Trainer, max_points: int) -> Optional[tuple[Tensor, Tensor]]:
    """Validation samples (``trainer.val_dataloaders``), or None when there are none."""
    return collect(trainer.val_dataloaders, max_points)


def target_function(trainer: pl.Trainer) -> Optional[Callable[[Tensor], Tensor]]:
    """The data module's ``target(x)``, the function its targets are sampled from
    (``SineRegression``), or None."""
    target = getattr(getattr(trainer, "datamodule", None), "target", None)
    return target if callable(target) else None


def to_module(x: Tensor, pl_module: pl.LightningModule) -> Tensor:
    """``x`` on the module's device, floating inputs in the parameters' dtype."""
    param = next(pl_module.parameters(), None)
    if param is not None and x.is_floating_point():
        return x.to(device=param.device, dtype=param.dtype)
    return x.to(pl_module.device)


def class_labels(y: Tensor) -> Tensor:
    """Class indices from integer labels, float 0/1 labels or one-hot rows."""
    if y.dim() == 2 and y.shape[1] > 1:
        return y.argmax(1)
    return y.reshape(len(y)).round().long()
