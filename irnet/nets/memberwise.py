"""Member-wise layers of an ensemble: E networks' weights stacked, each applied to its own rows.

An ensemble's states are sample-major rows, ``b · E + k`` being sample b in member k
(:mod:`irnet.nets.ensemble`). :class:`MemberwiseMLP` and :class:`MemberwiseConv` are E residual
functions F in one module, :class:`MemberwiseLinear` E heads. Each keeps the single layer's
parameter names with the member dimension first, so member k's weights are slice ``[k]``.

Under a contraction bound each member's two weights are rescaled by its own factor
``f_k = min(1, L(1 − MARGIN) / (h·a·‖W2_k‖‖W1_k‖))^½``, with the exact norms (SVD of a matrix,
FFT bound of a convolution) and their derivatives ``dσ/dW`` of
:class:`~irnet.nets.contraction.LipschitzConstraint`: the value and gradient its own run gets.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from irnet.device_path import on_accelerator_path
from irnet.nets.contraction import MARGIN, _outside_inference, conv_norm, matrix_norm
from irnet.nets.residual import ConvResidual, MLPResidual


def stacked(tensors: Sequence[Tensor]) -> nn.Parameter:
    """The members' tensors as one parameter, the member dimension first."""
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


def refuse_windows(members: Sequence[nn.Module], kind: type) -> None:
    """Refuse residuals of another type than ``kind``, or with a spectral window."""
    for F in members:
        if type(F) is not kind or F.window is not None:
            raise ValueError(
                f"ensemble supports {kind.__name__} without stability_limits for now, got "
                f"{type(F).__name__}{' with a spectral window' if F.window else ''}"
            )


class MemberwiseResidual(nn.Module):
    """E residual functions with two stacked weights each, bounded member by member.

    Built from E residuals of one type and configuration (``kind``), whose step, activation and
    bound it takes; subclasses stack the weights, and say which two are bounded
    (:meth:`bounded_weights`) and how their norms are taken (:meth:`norm`).
    """

    #: no per-layer constraint object: the bound is applied here, per member
    constraint = None

    def __init__(self, members: Sequence[nn.Module], kind: type) -> None:
        super().__init__()
        refuse_windows(members, kind)
        first = members[0]
        self.members = len(members)
        self.step = first.step
        self.activation = copy.deepcopy(first.activation)
        self.activation_lipschitz = first.activation_lipschitz
        self.bound = None if first.constraint is None else first.constraint.bound
        self._norms: Optional[tuple[tuple, list[tuple[Tensor, Tensor]]]] = None
        self._scaled: Optional[tuple[tuple, tuple[Tensor, Tensor]]] = None
        self._inside: Optional[tuple[tuple, bool]] = None

    def bounded_weights(self) -> tuple[Tensor, Tensor]:
        """The two stacked weights whose norms' product the bound limits."""
        raise NotImplementedError

    def norm(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """``(σ, dσ/dW)`` of each of a stack of weights."""
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):
        self._norms = self._scaled = self._inside = None  # cached on the old device and dtype
        return super()._apply(fn, recurse)

    def _key(self) -> tuple:
        return tuple((w._version, w.data_ptr(), w.dtype) for w in self.bounded_weights())

    def _stale(self) -> bool:
        return self._norms is None or self._norms[0] != self._key()

    def _member_norms(self) -> list[tuple[Tensor, Tensor]]:
        """Each weight's ``(σ, dσ/dW)`` per member, ``(E,)`` and ``(E, …)``: one batched norm per
        weight change (on the accelerator path one for every layer of the group at once)."""
        if self._stale():
            group = self.__dict__.get("_group")
            if group is not None and on_accelerator_path(self.bounded_weights()[0]):
                group.refresh()
            else:
                with _outside_inference():
                    norms = [self.norm(w.detach()) for w in self.bounded_weights()]
                self._norms = (self._key(), norms)
        return self._norms[1]

    def weights(self) -> tuple[Tensor, Tensor]:
        """The two weights stacked over members as F uses them: each member rescaled under the
        bound."""
        raw = self.bounded_weights()
        if self.bound is None:
            return raw
        grad = torch.is_grad_enabled() and raw[0].requires_grad
        key = self._key()
        if not grad and self._scaled is not None and self._scaled[0] == key:
            return self._scaled[1]
        if self._all_inside(key):
            # Every factor is exactly 1 and, clamped, has derivative 0: the parameters are the
            # scaled weights, gradients included, without a dozen operations per evaluation.
            return raw
        with _outside_inference() if not grad else nullcontext():
            factor = self._headroom().clamp(max=1.0).sqrt()
            scaled = tuple(w * factor.view(-1, *[1] * (w.dim() - 1)) for w in raw)
        if not grad:
            self._scaled = (key, scaled)
        return scaled

    def _headroom(self) -> Tensor:
        """``L(1 − MARGIN) / (h·a·‖W2_k‖‖W1_k‖)`` per member, ``(E,)``, differentiable in the
        weights; the factor is its square root where below 1."""
        norms = self._member_norms()
        # σ = ⟨W, M⟩ with M held fixed: the value is the norm, the derivative M.
        sigma1, sigma2 = (
            (w * M).flatten(1).sum(1) for w, (_, M) in zip(self.bounded_weights(), norms)
        )
        lip = self.step * self.activation_lipschitz * sigma1 * sigma2
        return self.bound * (1 - MARGIN) / lip

    def _all_inside(self, key: tuple) -> bool:
        """Whether every member is strictly inside its bound (headroom above 1), read once per
        weight change; always False on the accelerator path, which reads nothing on the host."""
        if on_accelerator_path(self.bounded_weights()[0]):
            return False
        if self._inside is None or self._inside[0] != key:
            with torch.no_grad(), _outside_inference():
                self._inside = (key, bool((self._headroom() > 1.0).all()))
        return self._inside[1]

    def lipschitz(self) -> Tensor:
        """Each member's bound ``h · a · ‖W2‖ ‖W1‖`` on Lip(F) for the raw weights, ``(E,)``."""
        (s1, _), (s2, _) = self._member_norms()
        return self.step * self.activation_lipschitz * s1 * s2

    def extra_repr(self) -> str:
        return f"members={self.members}, step={self.step:.6g}, bound={self.bound}"


class MemberwiseMLP(MemberwiseResidual):
    """E residuals ``F_k(y) = h · γ2_k σ(γ1_k y + b_k)`` applied each to its member's rows.

    Built from E :class:`~irnet.nets.MLPResidual` of one configuration (their weights are
    stacked, not shared).

    Args:
        members: the residual functions, one per member.
    """

    def __init__(self, members: Sequence[MLPResidual]) -> None:
        super().__init__(members, MLPResidual)
        self.gamma1 = stacked([F.gamma1 for F in members])
        self.bias = stacked([F.bias for F in members])
        self.gamma2 = stacked([F.gamma2 for F in members])

    def bounded_weights(self) -> tuple[Tensor, Tensor]:
        return self.gamma1, self.gamma2

    def norm(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        return matrix_norm(weights)

    @staticmethod
    def columns_of(y: Tensor, members: int) -> Tensor:
        """Sample-major rows ``(batch · E, dim)`` as member slabs with the samples last,
        ``(E, dim, batch)``, contiguous.

        Every product of F then has the batch as its long output dimension, in its forward and
        in autograd's backward (the vector–Jacobian products of the adjoint included). With the
        state (2–4 values) last the products that end in the state dimension run several times
        slower on the CPU's BLAS.
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


class _StackedConv(nn.Module):
    """A convolution's kernel ``(E, out, in, k, k)`` and bias ``(E, out)`` (the single layer's
    ``conv.weight`` and ``conv.bias`` names, member first)."""

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        self.weight = stacked([c.weight for c in convs])
        self.bias = stacked([c.bias for c in convs])
        self.padding = convs[0].padding


class MemberwiseConv(MemberwiseResidual):
    """E convolutional residuals ``h · conv2_k(σ(conv1_k(y)))`` (σ first too with
    pre-activation), each on its member's images, as one grouped convolution per layer.

    The sample-major rows ``(batch · E, C, H, W)`` are, viewed as ``(batch, E · C, H, W)``,
    exactly the channel groups of a convolution with ``groups=E``: no copy is made.

    Args:
        members: :class:`~irnet.nets.ConvResidual`, one per member.
    """

    def __init__(self, members: Sequence[ConvResidual]) -> None:
        super().__init__(members, ConvResidual)
        self.preactivation = members[0].preactivation
        self.image_size = members[0].image_size
        self.conv1 = _StackedConv([F.conv1 for F in members])
        self.conv2 = _StackedConv([F.conv2 for F in members])

    def bounded_weights(self) -> tuple[Tensor, Tensor]:
        return self.conv1.weight, self.conv2.weight

    def norm(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        return conv_norm(weights, self.image_size)

    def _grouped(self, y: Tensor, conv: _StackedConv, weight: Tensor) -> Tensor:
        """``conv`` of every member at once on ``(batch, E · channels, H, W)``."""
        kernels = weight.reshape(-1, *weight.shape[2:])  # (E · out, in, k, k)
        return Fn.conv2d(
            y, kernels, conv.bias.reshape(-1), padding=conv.padding, groups=self.members
        )

    def forward(self, y: Tensor) -> Tensor:
        if self.bound is not None and max(y.shape[-2:]) > self.image_size:
            raise ValueError(
                f"y's images must be at most {self.image_size} wide and high under the Lipschitz "
                f"bound, got {tuple(y.shape[-2:])}"
            )
        w1, w2 = self.weights()
        channels = y.shape[1:]
        grouped = y.reshape(-1, self.members * channels[0], *channels[1:])
        if self.preactivation:
            grouped = self.activation(grouped)
        hidden = self.activation(self._grouped(grouped, self.conv1, w1))
        out = self._grouped(hidden, self.conv2, w2)
        return (self.step * out).reshape(y.shape)


class MemberwiseConv2d(nn.Module):
    """E convolutions (any stride and padding), each on its member's images, as one grouped
    convolution: ``(batch · E, in, H, W)`` viewed as ``(batch, E · in, H, W)``."""

    def __init__(self, members: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        first = members[0]
        if first.groups != 1 or first.padding_mode != "zeros":
            raise ValueError("ensemble supports plain convolutions (groups=1, zero padding)")
        self.members = len(members)
        self.weight = stacked([c.weight for c in members])
        self.bias = None if first.bias is None else stacked([c.bias for c in members])
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation

    def forward(self, y: Tensor) -> Tensor:
        grouped = y.reshape(-1, self.members * y.shape[1], *y.shape[2:])
        kernels = self.weight.reshape(-1, *self.weight.shape[2:])
        bias = None if self.bias is None else self.bias.reshape(-1)
        out = Fn.conv2d(
            grouped, kernels, bias, self.stride, self.padding, self.dilation, self.members
        )
        return out.reshape(-1, self.weight.shape[1], *out.shape[2:])


class MemberNormGroup:
    """The member-wise residuals of one ensemble, whose norms are computed together.

    On CUDA every ``torch.linalg.svd`` waits for the host; a network of L bounded layers would
    wait 2L times per optimiser step (each wait covering its E members). On the accelerator
    path the first residual that finds its norms stale computes those of every residual of the
    group, one batched norm of all layers' and members' weights per weight (two waits a step),
    as :class:`~irnet.nets.contraction.NormGroup` does for single networks.
    """

    def __init__(self, residuals: Sequence[MemberwiseResidual]) -> None:
        self.residuals = [F for F in residuals if F.bound is not None]
        for F in self.residuals:
            F.__dict__["_group"] = self  # a plain attribute: not a submodule

    def refresh(self) -> None:
        stale = [F for F in self.residuals if F._stale()]
        if not stale:
            return
        sizes = [F.bounded_weights()[0].shape[0] for F in stale]
        with _outside_inference():
            norms = [
                stale[0].norm(torch.cat([F.bounded_weights()[i].detach() for F in stale]))
                for i in (0, 1)
            ]
        split = [(s.split(sizes), M.split(sizes)) for s, M in norms]
        for i, F in enumerate(stale):
            F._norms = (F._key(), [(sigmas[i], Ms[i]) for sigmas, Ms in split])


class MemberwiseLinear(nn.Module):
    """E linear heads ``W_k y + b_k``, each applied to its member's rows (sample-major)."""

    def __init__(self, members: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.members = len(members)
        self.weight = stacked([m.weight for m in members])
        self.bias = stacked([m.bias for m in members])
        self.out_features = members[0].out_features

    def forward(self, y: Tensor) -> Tensor:
        # Samples last, as in MemberwiseMLP.forward: the products' long dimension is the batch.
        columns = MemberwiseMLP.columns_of(y.flatten(1), self.members)  # (E, features, batch)
        return MemberwiseMLP.from_columns(
            torch.baddbmm(self.bias.unsqueeze(2), self.weight, columns)
        )


#: the member-wise module of each single layer type
MEMBERWISE: dict[type, Callable[[Sequence[nn.Module]], nn.Module]] = {
    MLPResidual: MemberwiseMLP,
    ConvResidual: MemberwiseConv,
    nn.Linear: MemberwiseLinear,
    nn.Conv2d: MemberwiseConv2d,
}
#: the member-wise modules: every parameter of an ensemble lives in one of them
MEMBERWISE_TYPES = (MemberwiseResidual, MemberwiseLinear, MemberwiseConv2d)


def memberwise(layers: Sequence[nn.Module]) -> nn.Module:
    """The member-wise module of E layers of one type (refused, naming it, for another type)."""
    kind = type(layers[0])
    if kind not in MEMBERWISE:
        raise ValueError(
            f"ensemble has no member-wise form of {kind.__name__} (it has one of "
            f"{', '.join(k.__name__ for k in MEMBERWISE)})"
        )
    return MEMBERWISE[kind](layers)
