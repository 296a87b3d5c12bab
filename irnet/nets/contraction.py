"""Lipschitz bounds on residual functions, enforced at every evaluation (docs/contraction.md).

A residual ``F(y) = h · A2 σ(A1 y + b)`` with linear maps ``A1``, ``A2`` and a
σ of Lipschitz constant ``a`` has ``Lip(F) ≤ h · a · ‖A2‖₂ ‖A1‖₂``.
:class:`LipschitzConstraint` rescales the two weights before each evaluation
so that this product is at most a given bound ``L``: when
``h · a · ‖A2‖ ‖A1‖ > L`` both weights are multiplied by the same factor
``√(L / (h · a · ‖A2‖ ‖A1‖))``, otherwise they are used as they are. Only the
product is constrained, not how it splits between the factors (the split is
free to learn; for ReLU it is a mere rescaling of the hidden units).

The operator norms are exact, not power-iteration estimates (which are lower
bounds of σ_max and so could let the bound slip): the largest singular value
of a matrix (an SVD), and for a zero-padded
convolution the largest singular value of its circular extension over all
frequencies of the FFT grid (an upper bound of the padded operator's norm).
A relative margin :data:`MARGIN` below ``L`` absorbs the rounding of those
norms. The raw parameters keep their names, so checkpoints are unchanged.

σ stays a tensor on the weights' device. On the CPU path
(:func:`irnet.device_path.on_accelerator_path`) the bound is compared on the
host once per weight change (free there), and weights below it are used
untouched; on the accelerator path nothing is read: the factor is the tensor
``min(1, L / (h · a · ‖A2‖ ‖A1‖))^(1/n)``, applied always, with derivative 0
where the bound is not reached. σ and dσ/dW are computed outside inference
mode and cached by the weights' version, so Lightning's validation passes reuse
the training step's SVDs; the caches are dropped when the module moves
(``_apply``). Non-finite weight entries are read as 0 by the SVD (which would
raise on them): the NaN then reaches F's output, where irnet's failure report
names the parameter.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from irnet.device_path import on_accelerator_path

#: relative margin kept below the bound, for rounding in the computed norms
MARGIN = 1e-4


def gelu_lipschitz() -> float:
    """sup |GELU'(x)| = Φ(√2) + √2 φ(√2) ≈ 1.1289 (GELU'' = φ(x)(2 − x²) vanishes at √2)."""
    r = math.sqrt(2.0)
    return 0.5 * (1 + math.erf(r / math.sqrt(2.0))) + r * math.exp(-1.0) / math.sqrt(2 * math.pi)


#: Lipschitz constant of each activation of :data:`irnet.nets.ACTIVATIONS`
ACTIVATION_LIPSCHITZ = {"relu": 1.0, "tanh": 1.0, "gelu": gelu_lipschitz()}


def matrix_norm(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Exact spectral norm σ of a matrix and its derivative ``u vᵀ`` (top singular vectors).

    Also for a stack of matrices ``(..., m, n)``: one batched SVD, one σ and one M per matrix.

    Returns:
        ``(σ, M)`` with ``σ = ⟨weight, M⟩``; computed without autograd.

    Example:
        >>> weight = torch.tensor([[3.0, 0.0], [4.0, 5.0]])
        >>> sigma, M = matrix_norm(weight)
        >>> round(sigma.item(), 4)  # √45
        6.7082
        >>> torch.allclose(sigma, torch.linalg.matrix_norm(weight, 2))
        True
        >>> torch.allclose((weight * M).sum(), sigma)
        True
    """
    with torch.no_grad():
        U, S, Vh = torch.linalg.svd(finite(weight), full_matrices=False)
        return S[..., 0], U[..., :, 0, None] * Vh[..., None, 0, :]


def finite(weight: Tensor) -> Tensor:
    """``weight`` with its NaN and ±Inf entries set to 0, on its device (no host read).

    ``torch.linalg.svd`` raises on non-finite input; the norms are taken of this
    instead, and the non-finite weight itself reaches F's output.
    """
    return torch.where(
        torch.isfinite(weight), weight, torch.zeros((), dtype=weight.dtype, device=weight.device)
    )


def conv_norm(weight: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Upper bound σ of the operator norm of a stride-1, zero-padded "same" conv2d, and dσ/dweight.

    The padded convolution on an n×n image equals crop ∘ circular convolution
    on an N×N grid ∘ zero embedding whenever N ≥ n + k//2; embedding and crop
    have norm 1, and the circular convolution is block-diagonalised by the DFT,
    its norm being the largest singular value of the kernel's transfer matrix
    ``K̂(ω) = Σ_ab K[:, :, a, b] e^{-iω·(a, b)}`` over the N×N frequencies. Real
    kernels have conjugate-symmetric transfer matrices, so half the frequencies
    (``rfft2``) suffice. At the maximising frequency ω* with top singular
    vectors u, v, ``σ = Re(uᴴ K̂(ω*) v) = ⟨K, M⟩`` with
    ``M[o, i, a, b] = Re(ū_o v_i e^{-iω*·(a, b)})``.

    Args:
        weight: kernel of shape (out, in, k, k), or a stack of them (B, out, in, k, k): one
            batched SVD, one σ and one M per kernel.
        size: the largest image side the bound must hold for.

    Returns:
        ``(σ, M)``; computed without autograd.
    """
    with torch.no_grad():
        stacked = weight if weight.dim() == 5 else weight.unsqueeze(0)  # (B, out, in, k, k)
        k = stacked.shape[-1]
        grid = size + k // 2
        # (B, N, N//2+1, out, in)
        transfer = torch.fft.rfft2(finite(stacked), s=(grid, grid)).permute(0, 3, 4, 1, 2)
        U, S, Vh = torch.linalg.svd(transfer, full_matrices=False)
        top = S[..., 0].flatten(1)  # (B, frequencies)
        # The maximising frequency stays a tensor (an index on the device, not a host read).
        best = top.argmax(1)
        p, q = (best // S.shape[2])[:, None, None], (best % S.shape[2])[:, None, None]
        rows = torch.arange(stacked.shape[0], device=weight.device)
        u = U.flatten(1, 2)[rows, best, :, 0]  # (B, out)
        v = Vh.flatten(1, 2)[rows, best, 0, :].conj()  # (B, in)
        taps = torch.arange(k, device=weight.device, dtype=weight.dtype)
        # (B, k, k)
        phase = torch.exp(-2j * math.pi * (p * taps[:, None] + q * taps[None, :]) / grid)
        M = (
            u.conj()[:, :, None, None, None] * v[:, None, :, None, None] * phase[:, None, None]
        ).real
        sigma, M = top[rows, best], M.to(weight.dtype)
        return (sigma, M) if weight.dim() == 5 else (sigma[0], M[0])


class _Rescale(torch.autograd.Function):
    """``W_i ↦ f · W_i`` with ``f = (target / (scale · Π σ_i))^(1/n)``, as one autograd node.

    ``σ_i`` enter as values with derivatives ``M_i = dσ_i/dW_i``, so
    ``df/dW_i = −(f / n) M_i / σ_i`` and, for output gradients ``g_j``,
    ``dL/dW_i = f g_i − (f / n) (Σ_j ⟨g_j, W_j⟩) M_i / σ_i``. With ``active``
    (a bool tensor: the accelerator path, which does not read whether the
    bound is reached) ``f`` is 1 where it is not, and the gradient there is
    ``g_i`` exactly, as for weights used untouched.
    """

    @staticmethod
    def forward(
        ctx,
        factor: Union[float, Tensor],
        active: Optional[Tensor],
        norms: Sequence[tuple[Tensor, Tensor]],
        *weights: Tensor,
    ):
        ctx.factor, ctx.active = factor, active
        ctx.sigmas = [sigma for sigma, _ in norms]
        ctx.save_for_backward(*(M for _, M in norms), *weights)
        return tuple(w * factor for w in weights)

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        n = len(grads)
        saved = ctx.saved_tensors
        Ms, weights = saved[:n], saved[n:]
        f = ctx.factor
        dot = sum((g * w).sum() for g, w in zip(grads, weights) if g is not None)
        out = []
        for g, M, sigma in zip(grads, Ms, ctx.sigmas):
            d = -(f / n) * dot * M / sigma
            full = d if g is None else f * g + d
            if ctx.active is not None:
                full = torch.where(ctx.active, full, torch.zeros_like(full) if g is None else g)
            out.append(full)
        return (None, None, None, *out)


class LipschitzConstraint(nn.Module):
    """Rescales a residual's two weights so that ``scale · ‖W2‖ ‖W1‖ ≤ bound``.

    It holds no parameters or buffers. Each weight's norm σ and its derivative
    ``M = dσ/dW`` come from an exact SVD, cached until the weight changes (new
    tensor, storage, dtype or in-place version: once per optimiser step,
    whether the next pass trains or validates under inference mode); in
    grad mode the rescaling is one autograd node (:class:`_Rescale`) whose
    backward uses ``dσ/dW = M`` — the derivative of ``σ = uᵀWv`` that
    ``torch.nn.utils.parametrizations.spectral_norm`` uses, with exact singular
    vectors. Where the bound is not reached the factor is 1 with derivative 0:
    on the CPU path the weights are then returned untouched (one host read per
    weight change decides), on the accelerator path multiplied by the tensor
    factor (no host read).

    Args:
        bound: the largest allowed ``Lip(F)``.
        scale: ``h · a``: the residual's step times its activation's Lipschitz constant.
        norm: ``W ↦ (σ, dσ/dW)`` for one weight (:func:`matrix_norm`, or
            :func:`conv_norm` with the image size bound in).
    """

    def __init__(
        self,
        bound: float,
        scale: float,
        norm: Callable[[Tensor], tuple[Tensor, Tensor]] = matrix_norm,
    ) -> None:
        super().__init__()
        if not bound > 0:
            raise ValueError(f"bound must be positive, got {bound!r}")
        self.bound = float(bound)
        self.scale = float(scale)
        self.norm = norm
        self._forget()

    def _forget(self) -> None:
        self.__dict__["_last"] = None  # the weights of the last call (kept only in a NormGroup)
        self._norms: dict[int, tuple[tuple, Tensor, Tensor]] = {}  # weight index → (key, σ, dσ/dW)
        self._factor: Optional[tuple[tuple, Union[float, Tensor], Optional[Tensor]]] = None
        self._scaled: Optional[tuple[tuple, tuple[Tensor, ...]]] = None

    def _apply(self, fn, recurse: bool = True):
        self._forget()  # cached on the old device and dtype: recomputed on the new ones when needed
        return super()._apply(fn, recurse)

    def lipschitz(self, *weights: Tensor) -> float:
        """The bound ``scale · Π ‖W‖`` on Lip(F) for these (unconstrained) weights (a host read)."""
        return self.scale * math.prod(float(self._norm(i, w)[0]) for i, w in enumerate(weights))

    def forward(self, *weights: Tensor) -> tuple[Tensor, ...]:
        """The weights, rescaled together if their bound exceeds ``bound``."""
        # for the group's next refresh; no Module.__setattr__ per evaluation
        if "_group" in self.__dict__:
            self.__dict__["_last"] = weights
        grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        key = self._key(weights)
        if not grad and self._scaled is not None and self._same(self._scaled[0], key):
            return self._scaled[1]
        factor, active = self._rescaling(key, weights)
        if factor is None:  # CPU path, bound not reached
            out = tuple(weights)
        elif grad:
            norms = [self._norm(i, w) for i, w in enumerate(weights)]
            return _Rescale.apply(factor, active, norms, *weights)
        else:
            with _outside_inference():
                out = tuple(w * factor for w in weights)
        if not grad and not torch.compiler.is_compiling():
            self._scaled = (key, out)
        return out

    def _rescaling(
        self, key: tuple, weights: Sequence[Tensor]
    ) -> tuple[Union[None, float, Tensor], Optional[Tensor]]:
        """The factor and, on the accelerator path, whether the bound is reached (a bool tensor).

        On the CPU path the factor is a float computed on the host as ever, or
        ``None`` where the bound is not reached (the weights are used as they are).
        """
        if self._factor is not None and self._same(self._factor[0], key):
            return self._factor[1], self._factor[2]
        sigmas = [self._norm(i, w)[0] for i, w in enumerate(weights)]
        target = self.bound * (1 - MARGIN)
        n = len(weights)
        if on_accelerator_path(weights[0]):
            with _outside_inference():
                lip = self.scale * torch.stack(sigmas).prod()
                factor, active = (target / lip).clamp(max=1.0) ** (1.0 / n), lip > target
        else:
            lip = self.scale * math.prod(float(s) for s in sigmas)
            factor, active = (None if lip <= target else (target / lip) ** (1.0 / n)), None
        if not torch.compiler.is_compiling():
            self._factor = (key, factor, active)
        return factor, active

    def _norm(self, index: int, w: Tensor) -> tuple[Tensor, Tensor]:
        """σ (a 0-dim tensor on ``w``'s device) and dσ/dW of weight ``index``, once per weight
        change."""
        key = self._key((w,))
        cached = self._norms.get(index)
        if cached is not None and self._same(cached[0], key):
            return cached[1], cached[2]
        group = self.__dict__.get("_group")
        if group is not None and on_accelerator_path(w) and not torch.compiler.is_compiling():
            group.refresh()  # every member's stale norms, one batched SVD per weight shape
            cached = self._norms.get(index)
            if cached is not None and self._same(cached[0], key):
                return cached[1], cached[2]
        # Outside inference mode, so that a norm first needed by a validation pass can
        # still be saved for backward by the next training step.
        with _outside_inference():
            sigma, M = self.norm(w.detach())
        if not torch.compiler.is_compiling():
            self._norms[index] = (key, sigma, M)
        return sigma, M

    @staticmethod
    def _key(weights: Sequence[Tensor]) -> tuple:
        return tuple((w, w._version, w.data_ptr(), w.dtype, w.device) for w in weights)

    @staticmethod
    def _same(old: tuple, new: tuple) -> bool:
        return len(old) == len(new) and all(
            a[0] is b[0] and a[1:] == b[1:] for a, b in zip(old, new)
        )

    def extra_repr(self) -> str:
        return f"bound={self.bound:.6g}"


class NormGroup:
    """Constraints whose matrix norms are computed together, on the accelerator path.

    On CUDA every ``torch.linalg.svd`` waits for the host (it checks its solver's
    error flag), so a network of L constrained layers would wait 2L times per
    optimiser step. Members of a group refresh together: the first one that
    finds its norms stale after a step computes those of every member, with the
    weights each used last, in one batched SVD per weight shape — two waits per
    step for the paper's networks and the convolutional ones. The CPU path keeps
    one SVD per weight.

    Args:
        members: constraints with :func:`matrix_norm` or :func:`conv_norm` (others are left to
            themselves).
    """

    def __init__(self, members: Sequence["LipschitzConstraint"]) -> None:
        self.members = [c for c in members if _stackable(c.norm)]
        for constraint in self.members:
            constraint.__dict__["_group"] = self  # a plain attribute: not a submodule

    def refresh(self) -> None:
        stale: dict[tuple, list[tuple[LipschitzConstraint, int, Tensor]]] = {}
        for constraint in self.members:
            for index, w in enumerate(constraint._last or ()):
                cached = constraint._norms.get(index)
                if cached is None or not constraint._same(cached[0], constraint._key((w,))):
                    shape = (tuple(w.shape), w.dtype, w.device, _stackable(constraint.norm))
                    stale.setdefault(shape, []).append((constraint, index, w))
        for (*_, norm), entries in stale.items():
            with _outside_inference():
                sigmas, Ms = norm(torch.stack([w.detach() for _, _, w in entries]))
            for (constraint, index, w), sigma, M in zip(entries, sigmas, Ms):
                constraint._norms[index] = (constraint._key((w,)), sigma, M)


def _stackable(norm: Callable) -> Optional[Callable]:
    """``norm`` as a function of a stack of weights (:func:`matrix_norm`, :func:`conv_norm` of one
    size), comparable between constraints; ``None`` for any other norm."""
    if norm is matrix_norm:
        return matrix_norm
    if isinstance(norm, partial) and norm.func is conv_norm and not norm.args:
        return _conv_norm_of_size(norm.keywords.get("size"))
    return None


@lru_cache(maxsize=None)
def _conv_norm_of_size(size: int) -> Callable:
    return partial(conv_norm, size=size)  # one object per size: equal sizes share a stack


@contextmanager
def _outside_inference() -> Iterator[None]:
    """Leave inference mode, grad off: tensors made inside it could not be saved for backward."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():  # inference_mode(False) alone turns grad on
        yield
