"""The spectral window: residual functions whose Jacobian's eigenvalues stay in a chosen disc.

A θ-step ``y = x + (1 − θ)F(x) + θF(y)`` of a linear ``F(y) = Jy`` multiplies each eigenvector
of J by ``R(z) = (1 + (1 − θ)z) / (1 − θz)``, z the eigenvalue (irnet's F includes the step h,
so z = hλ). To keep every layer's amplification in ``[min, max]``, the limits are mapped back
through ``R⁻¹`` to ``a = R⁻¹(min)``, ``b = R⁻¹(max)``, and F is built so that the eigenvalues of
``∂F/∂y`` lie in the disc with diameter ``[a, b]``:

    F(y) = ½[(b' − a')·sigmoid(s) ⊙ f̂(y) + (a' + b')·y],      ‖∂f̂/∂y‖₂ ≤ 1,

where f̂ is the residual function with spectrally normalised weights (each divided by its
largest singular value, estimated by power iterations whose vectors are kept as buffers, and
the activation's Lipschitz constant divided out), s are per-feature scales and
``[a', b'] ⊂ [a, b]`` is a window whose ends are learned (or fixed) through sigmoids, so they
cannot leave ``[a, b]``. The eigenvalues of ``½(b' − a')·diag(sigmoid(s))·∂f̂ + ½(a' + b')·I``
lie within ``½(b' − a')`` of ``½(a' + b')``. docs/contraction.md states what that guarantees,
and where it does not hold; the authors call the same construction the "spectral limits" of
their right-hand sides.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from irnet._misc import check_bool, check_int, check_unit_interval

#: power iterations run on a weight when a window is built or the weight is re-initialised
WARMUP_ITERS = 200
#: the window starts as the widest disc centred on ``R⁻¹(init)`` inside [a, b], times this
INITIAL_WIDTH = 0.99
#: sigmoid of fixed scales (``learn_scales=False``) and of learned ones at the start
FIXED_SCALE, INITIAL_LEARNED_SCALE = 0.99, 0.5


def stability_function(theta: float, z: float) -> float:
    """``R(z) = (1 + (1 − θ)z) / (1 − θz)``: the θ-step's factor on an eigenvalue z = hλ.

    Example:
        >>> stability_function(1.0, -1.0), stability_function(0.0, -1.0)
        (0.5, 0.0)
    """
    return (1 + (1 - theta) * z) / (1 - theta * z)


def inverse_stability_function(theta: float, r: float) -> float:
    """The real z < 1/θ with ``R(z) = r`` (r must exceed ``1 − 1/θ``, R's infimum there).

    Example:
        >>> inverse_stability_function(1.0, 0.5)
        -1.0
        >>> z = inverse_stability_function(0.5, 0.8)
        >>> round(stability_function(0.5, z), 12)
        0.8
    """
    return (r - 1) / (1 - theta + theta * r)


def check_limits(name: str, limits) -> list[float]:
    """``limits`` as a list, if they are 2 or 3 increasing finite numbers (``[min, max]`` or
    ``[min, init, max]``).

    Raises:
        ValueError: naming ``name`` otherwise.
    """
    values = list(limits) if isinstance(limits, (list, tuple)) else None
    if (
        values is None
        or len(values) not in (2, 3)
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        )
        or not all(lo < hi for lo, hi in zip(values, values[1:]))
    ):
        raise ValueError(
            f"{name} must be [min, init, max] or [min, max], increasing finite numbers, "
            f"got {limits!r}"
        )
    return values


def window_bounds(stability_limits: Sequence[float], theta: float) -> tuple[float, float, float]:
    """``(a, c, b)``: the limits ``[min, init, max]`` (or ``[min, max]``, init the middle of
    ``[a, b]``) mapped through ``R⁻¹`` of the θ-step.

    Raises:
        ValueError: naming ``stability_limits``, if they are not 2 or 3 increasing finite
            numbers, or ``min`` is not above ``1 − 1/θ`` (no real z < 1/θ reaches it).
    """
    theta = check_unit_interval("theta", theta)
    limits = check_limits("stability_limits", stability_limits)
    floor = 1 - 1 / theta if theta > 0 else -math.inf
    if not limits[0] > floor:
        raise ValueError(
            f"stability_limits' min must be > {floor:g} at theta={theta:g} (the θ-step's "
            f"factor R(z) never goes that low for real z), got {limits[0]!r}"
        )
    a, b = (inverse_stability_function(theta, float(r)) for r in (limits[0], limits[-1]))
    c = inverse_stability_function(theta, float(limits[1])) if len(limits) == 3 else (a + b) / 2
    return a, c, b


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class PowerNorm(nn.Module):
    """A weight divided by its largest singular value, estimated by power iterations.

    The vector ``v`` (a buffer: it follows the module and is saved in checkpoints) is refined by
    ``power_iters`` iterations ``v ← WᵀWv / ‖WᵀWv‖`` once per weight change, in training mode
    only (not under inference mode), so that F stays the same function within a step; then
    ``σ = ‖Wv‖`` with gradient ``u vᵀ`` (u = Wv/σ), as in spectral normalisation. σ is a lower
    bound of the true norm, exact when v has converged.

    Args:
        in_shape: shape of W's input without the batch: ``(n,)`` for a matrix (n, …),
            ``(C, H, W)`` for a convolution on H×W images.
        padding: the convolution's zero padding (stride 1, "same" shape), or ``None`` for a
            matrix.
        power_iters: iterations per weight change.
    """

    def __init__(
        self, in_shape: Sequence[int], padding: Optional[int] = None, power_iters: int = 1
    ) -> None:
        super().__init__()
        self.padding = padding
        self.power_iters = check_int("power_iters", power_iters, 1)
        v = torch.randn(1, *in_shape)
        self.register_buffer("v", v / torch.linalg.vector_norm(v))
        self._seen: Optional[tuple] = None  # the weight as of the last iterations (no tensor)

    def _op(self, w: Tensor, v: Tensor) -> Tensor:
        return Fn.linear(v, w) if self.padding is None else Fn.conv2d(v, w, padding=self.padding)

    def _adjoint(self, w: Tensor, u: Tensor) -> Tensor:
        if self.padding is None:
            return Fn.linear(u, w.t())
        return Fn.conv_transpose2d(u, w, padding=self.padding)

    @torch.no_grad()
    def iterate(self, w: Tensor, iters: int) -> None:
        """``iters`` power iterations on ``v`` (in place; a zero result keeps the old v)."""
        key, w, v = self._key(w), w.detach(), self.v
        for _ in range(iters):
            new = self._adjoint(w, self._op(w, v))
            n = torch.linalg.vector_norm(new)
            v = torch.where(n > 0, new / n.clamp_min(torch.finfo(new.dtype).tiny), v)
        self.v.copy_(v)
        self._seen = key

    @staticmethod
    def _key(w: Tensor) -> tuple:
        return (id(w), w._version, w.data_ptr(), w.dtype, w.device)

    def _apply(self, fn, recurse: bool = True):
        self._seen = None  # the weight moves too: iterate again where it now is
        return super()._apply(fn, recurse)

    def sigma(self, w: Tensor) -> Tensor:
        """The estimate ``‖Wv‖`` of W's largest singular value (differentiable in W)."""
        if self.training and not torch.is_inference_mode_enabled() and self._seen != self._key(w):
            self.iterate(w, self.power_iters)
        # v is cloned: a later step's in-place iterations must not touch a saved graph's tensor
        return torch.linalg.vector_norm(self._op(w, self.v.clone()))

    def forward(self, w: Tensor) -> Tensor:
        """``W / σ``."""
        return w / self.sigma(w).clamp_min(torch.finfo(w.dtype).tiny)


class SpectralWindow(nn.Module):
    """Maps a normalised residual f̂ (‖∂f̂/∂y‖ ≤ 1) to F whose ∂F/∂y has eigenvalues in the
    disc with diameter [a', b'] ⊂ [a, b] (module docstring).

    Residual functions register their weights' normalisers with :meth:`add`, use
    :meth:`normalized` in their forward, and return ``window(f̂(y), y)``.

    Args:
        stability_limits: ``[min, init, max]`` (or ``[min, max]``): the range of the θ-step's
            amplification factors; ``init`` sets where the window starts (its centre).
        theta: θ of the step F is used in.
        features: shape of the per-feature scales, broadcast against one sample
            (``(dim,)``; ``(channels, 1, 1)`` for images).
        learn_scales: learn the scales (start at sigmoid 0.5); else fixed at sigmoid 0.99.
        learn_shift: learn the window's ends (each a sigmoid between the centre and a or b);
            else fixed at the start: the widest window centred on ``R⁻¹(init)`` inside
            [a, b], times 0.99.
        power_iters: power iterations per weight change (training mode).

    Example:
        >>> window = SpectralWindow([0.5, 0.8, 1.0], theta=1.0, features=(2,))
        >>> a, b = window.bounds()
        >>> bool(-1.0 <= a < b <= 0.0)
        True
    """

    def __init__(
        self,
        stability_limits: Sequence[float],
        theta: float = 1.0,
        features: Sequence[int] = (1,),
        learn_scales: bool = False,
        learn_shift: bool = False,
        power_iters: int = 1,
    ) -> None:
        super().__init__()
        self.a, self.c, self.b = window_bounds(stability_limits, theta)
        self.stability_limits = list(stability_limits)
        self.theta = float(theta)
        self.power_iters = check_int("power_iters", power_iters, 1)
        start = INITIAL_LEARNED_SCALE if check_bool("learn_scales", learn_scales) else FIXED_SCALE
        scales = torch.full(tuple(features), _logit(start))
        delta = INITIAL_WIDTH * min(self.c - self.a, self.b - self.c)
        shift = torch.tensor([_logit(delta / (self.c - self.a)), _logit(delta / (self.b - self.c))])
        for name, value, learned in (
            ("scales", scales, learn_scales),
            ("shift", shift, check_bool("learn_shift", learn_shift)),
        ):
            if learned:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        self.norms = nn.ModuleDict()

    def add(self, name: str, in_shape: Sequence[int], padding: Optional[int] = None) -> None:
        """Register a normaliser for the weight ``name`` (see :class:`PowerNorm`)."""
        self.norms[name] = PowerNorm(in_shape, padding, self.power_iters)

    def normalized(self, name: str, w: Tensor) -> Tensor:
        """The weight ``name`` divided by its estimated spectral norm."""
        return self.norms[name](w)

    def warm_up(self, **weights: Tensor) -> None:
        """Converge the power iterations on freshly initialised weights."""
        for name, w in weights.items():
            self.norms[name].iterate(w, WARMUP_ITERS)

    def bounds(self) -> tuple[Tensor, Tensor]:
        """The window's ends ``(a', b')``, ``a ≤ a' < c < b' ≤ b``."""
        s = torch.sigmoid(self.shift)
        return self.c - s[0] * (self.c - self.a), self.c + s[1] * (self.b - self.c)

    def forward(self, f_hat: Tensor, y: Tensor) -> Tensor:
        """``½[(b' − a')·sigmoid(s) ⊙ f̂ + (a' + b')·y]``."""
        a, b = self.bounds()
        return 0.5 * ((b - a) * torch.sigmoid(self.scales) * f_hat + (a + b) * y)

    def extra_repr(self) -> str:
        return (
            f"stability_limits={self.stability_limits}, theta={self.theta:g}, "
            f"a={self.a:.6g}, b={self.b:.6g}"
        )


def make_window(
    stability_limits: Optional[Sequence[float]],
    theta: float,
    features: Sequence[int],
    learn_scales: bool,
    learn_shift: bool,
    power_iters: int,
    lipschitz: Optional[float] = None,
) -> Optional[SpectralWindow]:
    """A :class:`SpectralWindow`, or ``None`` without ``stability_limits`` (then the other
    options must be left at their defaults).

    Raises:
        ValueError: for ``stability_limits`` together with a Lipschitz bound (``contraction``),
            or ``learn_scales``/``learn_shift`` without ``stability_limits``.
    """
    if stability_limits is None:
        if check_bool("learn_scales", learn_scales) or check_bool("learn_shift", learn_shift):
            raise ValueError("learn_scales and learn_shift need stability_limits")
        check_int("power_iters", power_iters, 1)
        return None
    if lipschitz is not None:
        raise ValueError(
            "stability_limits and a Lipschitz bound (contraction) are mutually exclusive: "
            "set one of them"
        )
    return SpectralWindow(stability_limits, theta, features, learn_scales, learn_shift, power_iters)
