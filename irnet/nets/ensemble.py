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

**Member-wise F.** :class:`MemberwiseMLP` applies member k's weights to member k's rows with
batched matrix products; under a contraction bound each member's weights are rescaled by its
own factor (the bound of :class:`~irnet.nets.contraction.LipschitzConstraint`, with the same
exact norms and derivatives).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from irnet._misc import check_int
from irnet.device_path import on_accelerator_path
from irnet.nets.contraction import MARGIN, _outside_inference, matrix_norm
from irnet.nets.residual import MLPResidual


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


def _stacked(tensors: Sequence[Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


def rows_of(y: Tensor, members: int) -> Tensor:
    """``(batch · E, …)`` sample-major rows as ``(E, batch, …)``, one slab per member."""
    return y.view(-1, members, *y.shape[1:]).transpose(0, 1)


def from_member_slabs(slabs: Tensor) -> Tensor:
    """The inverse of :func:`rows_of`: ``(E, batch, …)`` to sample-major ``(batch · E, …)``."""
    return slabs.transpose(0, 1).reshape(-1, *slabs.shape[2:])


class MemberwiseMLP(nn.Module):
    """E residuals ``F_k(y) = h · γ2_k σ(γ1_k y + b_k)`` applied each to its member's rows.

    Built from E :class:`~irnet.nets.MLPResidual` of one configuration (their weights are
    stacked, not shared). With a Lipschitz bound L, member k's weights are rescaled by
    ``f_k = min(1, L(1 − MARGIN) / (h·a·‖γ2_k‖‖γ1_k‖))^½``, the norms exact (SVD) and their
    derivatives ``dσ/dW = u vᵀ`` as in :class:`~irnet.nets.contraction.LipschitzConstraint`.

    Args:
        members: the residual functions, one per member.
    """

    #: no per-layer constraint object: the bound is applied here, per member
    constraint = None

    def __init__(self, members: Sequence[MLPResidual]) -> None:
        super().__init__()
        first = members[0]
        for F in members:
            if type(F) is not MLPResidual or F.window is not None:
                raise ValueError(
                    "ensemble supports rhs='mlp' without stability_limits for now, got "
                    f"{type(F).__name__}{' with a spectral window' if F.window else ''}"
                )
        self.members = len(members)
        self.step = first.step
        self.activation = copy.deepcopy(first.activation)
        self.activation_lipschitz = first.activation_lipschitz
        self.bound = None if first.constraint is None else first.constraint.bound
        self.gamma1 = _stacked([F.gamma1 for F in members])
        self.bias = _stacked([F.bias for F in members])
        self.gamma2 = _stacked([F.gamma2 for F in members])
        self._norms: Optional[tuple[tuple, list[tuple[Tensor, Tensor]]]] = None
        self._scaled: Optional[tuple[tuple, tuple[Tensor, Tensor]]] = None
        self._inside: Optional[tuple[tuple, bool]] = None

    def _apply(self, fn, recurse: bool = True):
        self._norms = self._scaled = self._inside = None  # cached on the old device and dtype
        return super()._apply(fn, recurse)

    def _key(self) -> tuple:
        return tuple((w._version, w.data_ptr(), w.dtype) for w in (self.gamma1, self.gamma2))

    def _member_norms(self) -> list[tuple[Tensor, Tensor]]:
        """Each weight's ``(σ, dσ/dW)`` per member, ``(E,)`` and ``(E, m, n)``: one batched SVD
        per weight change (on the accelerator path one for every layer of the group at once)."""
        if self._stale():
            group = self.__dict__.get("_group")
            if group is not None and on_accelerator_path(self.gamma1):
                group.refresh()
            else:
                with _outside_inference():
                    norms = [matrix_norm(w.detach()) for w in (self.gamma1, self.gamma2)]
                self._norms = (self._key(), norms)
        return self._norms[1]

    def _stale(self) -> bool:
        return self._norms is None or self._norms[0] != self._key()

    def weights(self) -> tuple[Tensor, Tensor]:
        """(γ1, γ2) stacked over members as F uses them: each member rescaled under the bound."""
        if self.bound is None:
            return self.gamma1, self.gamma2
        grad = torch.is_grad_enabled() and self.gamma1.requires_grad
        key = self._key()
        if not grad and self._scaled is not None and self._scaled[0] == key:
            return self._scaled[1]
        if self._all_inside(key):
            # Every factor is exactly 1 and, clamped, has derivative 0: the parameters are the
            # scaled weights, gradients included, without a dozen operations per evaluation.
            return self.gamma1, self.gamma2
        with _outside_inference() if not grad else nullcontext():
            factor = self._headroom().clamp(max=1.0).sqrt()[:, None, None]
            scaled = (self.gamma1 * factor, self.gamma2 * factor)
        if not grad:
            self._scaled = (key, scaled)
        return scaled

    def _headroom(self) -> Tensor:
        """``L(1 − MARGIN) / (h·a·‖γ2_k‖‖γ1_k‖)`` per member, ``(E,)``, differentiable in the
        weights; the factor is its square root where below 1."""
        (_, M1), (_, M2) = self._member_norms()
        # σ = ⟨W, M⟩ with M = u vᵀ held fixed: the value is the norm, the derivative M.
        sigma1 = (self.gamma1 * M1).sum((1, 2))
        sigma2 = (self.gamma2 * M2).sum((1, 2))
        lip = self.step * self.activation_lipschitz * sigma1 * sigma2
        return self.bound * (1 - MARGIN) / lip

    def _all_inside(self, key: tuple) -> bool:
        """Whether every member is strictly inside its bound (headroom above 1), read once per
        weight change; always False on the accelerator path, which reads nothing on the host."""
        if on_accelerator_path(self.gamma1):
            return False
        if self._inside is None or self._inside[0] != key:
            with torch.no_grad(), _outside_inference():
                self._inside = (key, bool((self._headroom() > 1.0).all()))
        return self._inside[1]

    def lipschitz(self) -> Tensor:
        """Each member's bound ``h · a · ‖γ2‖ ‖γ1‖`` on Lip(F) for the raw weights, ``(E,)``."""
        (s1, _), (s2, _) = self._member_norms()
        return self.step * self.activation_lipschitz * s1 * s2

    @staticmethod
    def columns_of(y: Tensor, members: int) -> Tensor:
        """Sample-major rows ``(batch · E, dim)`` as member slabs with the samples last,
        ``(E, dim, batch)``, contiguous.

        Every product of F then has the batch as its long output dimension, in its forward and
        in autograd's backward (the vector–Jacobian products of the adjoint included). With the
        state (2–4 values) last, as in ``rows_of``, the products that end in the state dimension
        run several times slower on the CPU's BLAS.
        """
        return y.view(-1, members, y.shape[-1]).permute(1, 2, 0).contiguous()

    @staticmethod
    def from_columns(columns: Tensor) -> Tensor:
        """The inverse of :meth:`columns_of`: ``(E, dim, batch)`` to rows ``(batch · E, dim)``."""
        return columns.permute(2, 0, 1).reshape(-1, columns.shape[1])

    def forward(self, y: Tensor) -> Tensor:
        gamma1, gamma2 = self.weights()
        columns = self.columns_of(y, self.members)  # (E, dim, batch)
        hidden = self.activation(torch.baddbmm(self.bias.unsqueeze(2), gamma1, columns))
        return self.from_columns(self.step * torch.bmm(gamma2, hidden))

    def extra_repr(self) -> str:
        return f"members={self.members}, step={self.step:.6g}, bound={self.bound}"


class MemberNormGroup:
    """The member-wise residuals of one ensemble, whose norms are computed together.

    On CUDA every ``torch.linalg.svd`` waits for the host; a network of L bounded layers would
    wait 2L times per optimiser step (each wait covering its E members). On the accelerator
    path the first residual that finds its norms stale computes those of every residual of the
    group, one batched SVD of all layers' and members' matrices per weight (two waits a step),
    as :class:`~irnet.nets.contraction.NormGroup` does for single networks.
    """

    def __init__(self, residuals: Sequence[MemberwiseMLP]) -> None:
        self.residuals = [F for F in residuals if F.bound is not None]
        for F in self.residuals:
            F.__dict__["_group"] = self  # a plain attribute: not a submodule

    def refresh(self) -> None:
        stale = [F for F in self.residuals if F._stale()]
        if not stale:
            return
        sizes = [F.gamma1.shape[0] for F in stale]
        with _outside_inference():
            norms = [
                matrix_norm(torch.cat([getattr(F, name).detach() for F in stale]))
                for name in ("gamma1", "gamma2")
            ]
        split = [(s.split(sizes), M.split(sizes)) for s, M in norms]
        for i, F in enumerate(stale):
            F._norms = (F._key(), [(sigmas[i], Ms[i]) for sigmas, Ms in split])


class MemberwiseLinear(nn.Module):
    """E linear heads ``W_k y + b_k``, each applied to its member's rows (sample-major)."""

    def __init__(self, members: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.members = len(members)
        self.weight = _stacked([m.weight for m in members])
        self.bias = _stacked([m.bias for m in members])
        self.out_features = members[0].out_features

    def forward(self, y: Tensor) -> Tensor:
        # Samples last, as in MemberwiseMLP.forward: the products' long dimension is the batch.
        columns = MemberwiseMLP.columns_of(y, self.members)  # (E, dim, batch)
        return MemberwiseMLP.from_columns(
            torch.baddbmm(self.bias.unsqueeze(2), self.weight, columns)
        )


def stack_members(net: nn.Module, members: Sequence[nn.Module]) -> None:
    """Make ``net`` (built like ``members[0]``) the ensemble of ``members``: every residual and
    the head become member-wise, with the members' weights stacked."""
    for t, block in enumerate(net.blocks):
        block.F = MemberwiseMLP([m.blocks[t].F for m in members])
        # a broken member's NaN rows are its own: the module stops that member, not the run
        block.refuse_nonfinite_input = False
    MemberNormGroup([block.F for block in net.blocks])
    if getattr(net, "head", None) is not None:
        net.head = MemberwiseLinear([m.head for m in members])
    net.members = len(members)
    net.member_seeds = None


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
        if isinstance(module, (MemberwiseMLP, MemberwiseLinear)):
            module.members = len(index)
    for cache in (net.warm_start_cache, getattr(net, "_paused_cache", None)):
        if cache is not None:
            cache.keep_members(index, members)
    net.members = len(index)
    net.member_seeds = [net.member_seeds[i] for i in index.tolist()]
