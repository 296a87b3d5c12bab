"""Seed ensembles: E independently initialised networks trained as one (``ODENet(ensemble=E)``).

A toy network's training step is mostly per-operation overhead, so E networks put into the
same operations cost little more than one. Member k is the network built right after
``torch.manual_seed(seeds[k])``; its weights are slice ``[k]`` of every parameter of the
ensemble, which keeps the single network's parameter names (``blocks.0.F.gamma1`` of shape
``(E, width, dim)``), so a member is extracted by slicing (:func:`member_state_dict`).

**Rows.** The ensemble's states hold every member's copy of every sample, sample-major: row
``b · E + k`` is sample b in member k. The solvers see ordinary rows (per-sample stopping, so
each member's samples converge on their own), the warm-start cache sees one row of ``E · dim``
values per input, and every batch mean of a row-wise quantity (the loss, R_rnd, R_fp, R_jac,
the iterations) is the mean over members of each member's batch mean. The module minimises E
times the mean, the sum of the members' objectives, so each member's gradient and Adam step
are exactly those of its own run (docs/ensembles.md).

**Member-wise layers** (:mod:`irnet.nets.memberwise`) apply member k's weights to member k's
rows: batched matrix products, grouped convolutions; under a contraction bound each member's
weights are rescaled by its own factor (the bound of
:class:`~irnet.nets.contraction.LipschitzConstraint`, with the same exact norms and derivatives).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from irnet._misc import check_int
from irnet.nets.memberwise import (
    MEMBERWISE,
    MEMBERWISE_TYPES,
    MemberNormGroup,
    MemberwiseResidual,
    memberwise,
)
from irnet.nets.protocol import find_blocks


def member_seeds(members: int, seeds: Optional[Sequence[int]] = None) -> list[int]:
    """The seed of each member: ``seeds`` as given, or the global seed plus 0, 1, …, E − 1.

    The global seed is the one ``seed_everything`` (``torch.manual_seed``) set last, so an
    ensemble built under seed s has members s, s + 1, …: member k is then the network of a
    single run with seed s + k.
    """
    members = check_int("ensemble", members, 1)
    if seeds is None:
        base = torch.initial_seed()
        return [(base + k) % 2**64 for k in range(members)]
    seeds = list(seeds)
    if len(seeds) != members or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(
            f"member_seeds must be null or a list of {members} non-negative integers (one per "
            f"member of ensemble={members}), got {seeds!r}"
        )
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"member_seeds must differ from each other, got {seeds!r}")
    return seeds


def build_members(build, seeds: Sequence[int]) -> list[nn.Module]:
    """``build()`` once per seed, each right after ``torch.manual_seed(seed)``; the global
    generator is left as it was."""
    nets = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nets.append(build())
    return nets


def rows_of(y: Tensor, members: int) -> Tensor:
    """``(batch · E, …)`` sample-major rows as ``(E, batch, …)``, one slab per member."""
    return y.view(-1, members, *y.shape[1:]).transpose(0, 1)


def from_member_slabs(slabs: Tensor) -> Tensor:
    """The inverse of :func:`rows_of`: ``(E, batch, …)`` to sample-major ``(batch · E, …)``."""
    return slabs.transpose(0, 1).reshape(-1, *slabs.shape[2:])


def stack_members(net: nn.Module, members: Sequence[nn.Module]) -> None:
    """Make ``net`` (built like ``members[0]``) the ensemble of ``members``: every layer with
    weights (residual functions, convolutions, heads) becomes member-wise, with the members'
    weights stacked under its own name.

    Raises:
        ValueError: naming a parameter no member-wise layer holds.
    """
    _replace_layers(net, "", members)
    unstacked = [n for n, _ in net.named_parameters() if not _memberwise_owner(net, n)]
    if unstacked:
        raise ValueError(f"ensemble has no member-wise form of the layers of {unstacked}")
    residuals = [m for m in net.modules() if isinstance(m, MemberwiseResidual)]
    MemberNormGroup(residuals)
    for block in find_blocks(net):
        # a broken member's NaN rows are its own: the module stops that member, not the run
        block.refuse_nonfinite_input = False
    net.members = len(members)
    net.member_seeds = None


def make_ensemble(
    net: nn.Module, config: dict, ensemble: int, seeds: Optional[Sequence[int]]
) -> None:
    """Turn ``net``, built from its constructor's arguments ``config``, into the ensemble of
    ``ensemble`` members, each ``type(net)(**config)`` built under its seed
    (:func:`member_seeds`); nothing changes for one member without ``seeds``."""
    if ensemble == 1 and seeds is None:
        return
    seeds = member_seeds(ensemble, seeds)
    single = {**config, "ensemble": 1, "member_seeds": None}
    stack_members(net, build_members(lambda: type(net)(**single), seeds))
    net.member_seeds = seeds


def _replace_layers(module: nn.Module, prefix: str, members: Sequence[nn.Module]) -> None:
    """Replace each layer below ``module`` that has a member-wise form by it (depth first)."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if type(child) in MEMBERWISE:
            setattr(module, name, memberwise([m.get_submodule(path) for m in members]))
        else:
            _replace_layers(child, f"{path}.", members)


def _memberwise_owner(net: nn.Module, parameter: str) -> bool:
    """Whether a member-wise layer holds ``parameter`` (a dotted name of ``net``'s)."""
    modules = parameter.split(".")[:-1]
    return any(
        isinstance(net.get_submodule(".".join(modules[:i])), MEMBERWISE_TYPES)
        for i in range(1, len(modules) + 1)
    )


def member_state_dict(state: dict, member: int, members: int, prefix: str = "") -> dict:
    """Member ``member``'s single-network state dict from an ensemble's (keys under ``prefix``).

    Every tensor under ``prefix`` carries the member dimension first and is sliced; a
    warm-start cache (extra state) keeps the member's columns of each stored row.
    """
    if not 0 <= member < members:
        raise ValueError(f"member must be in [0, {members - 1}], got {member}")
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
        elif key.endswith("_extra_state"):
            out[key] = _member_extra_state(value, member, members)
        elif isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == members:
            out[key] = value[member].clone()
        else:
            raise ValueError(f"{key} has no member dimension of size {members}")
    return out


def _member_extra_state(state: dict, member: int, members: int) -> dict:
    cache = state.get("warm_start") if isinstance(state, dict) else None
    if cache is None:
        return state
    # each stored row is one input's states of every member, member-major within the row
    rows = [
        None if r is None else r.reshape(r.shape[0], members, -1)[:, member].clone()
        for r in cache["rows"]
    ]
    return {**state, "warm_start": {**cache, "rows": rows}}


def members_of(net: nn.Module) -> int:
    """How many members ``net`` trains (1 for an ordinary network)."""
    return getattr(net, "members", 1)


def clip_member_gradients(params: Sequence[Tensor], max_norm: float, members: int) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for each member on its own: member k's gradients
    (slice k of every parameter's) are scaled by ``min(1, max_norm / (‖g_k‖ + 1e-6))``.

    Returns:
        Each member's total gradient norm before clipping, ``(E,)``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(members)
    norms = torch.stack([g.reshape(members, -1).norm(dim=1) for g in grads]).norm(dim=0)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.view(members, *[1] * (g.dim() - 1)))
    return norms


def prune_members(
    net: nn.Module, keep: Sequence[int], optimizer: Optional[torch.optim.Optimizer] = None
) -> None:
    """Keep only the members at positions ``keep`` (a stopped member leaves the ensemble).

    Every parameter keeps its identity (the optimizer still knows it) and loses the other
    members' slices, as do the optimizer's per-parameter state (Adam's moments) and the
    warm-start cache's rows; the survivors' numbers are untouched.
    """
    members = net.members
    index = torch.tensor(list(keep), dtype=torch.long)
    for p in net.parameters():
        with torch.no_grad():
            p.data = p.data.index_select(0, index.to(p.device))
        p.grad = None
        state = {} if optimizer is None else optimizer.state.get(p, {})
        for key, value in state.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == members:
                state[key] = value.index_select(0, index.to(value.device))
    for module in net.modules():
        if isinstance(module, MEMBERWISE_TYPES):
            module.members = len(index)
    for cache in (net.warm_start_cache, getattr(net, "_paused_cache", None)):
        if cache is not None:
            cache.keep_members(index, members)
    net.members = len(index)
    net.member_seeds = [net.member_seeds[i] for i in index.tolist()]
