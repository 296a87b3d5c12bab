"""Adversarial attacks and robustness curves for classifiers (implicit or not).

:func:`fgsm` (Goodfellow et al., 2015) and :func:`pgd` (Madry et al., 2018) craft
L∞-bounded perturbations from the gradient of the loss with respect to the
input. For an implicit network that gradient flows through the layers' adjoint
solves (:class:`irnet._adjoint.ImplicitAdjoint`), so nothing here is specific to
them. :func:`accuracy_under_attack` and :func:`accuracy_under_noise` turn a
model into accuracy-versus-strength curves. Checks against gradient masking
(SPSA, restarts, transfer, tighter solves) are in :mod:`irnet.analysis.strong_attacks`.

Every function runs the model in eval mode and restores the mode it found;
gradients are taken with :func:`torch.autograd.grad` with respect to the input
only, so the parameters' ``.grad`` are never touched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as functional
from torch import Tensor, nn

from irnet._misc import check_choice, check_int, check_nonnegative, check_positive
from irnet.perturbations import GaussianPerturbation

LossFn = Callable[[Tensor, Tensor], Tensor]
Clamp = Optional[tuple[float, float]]


def _sum_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    # A sum, not a mean: each input's gradient then does not shrink with the batch size.
    return functional.cross_entropy(logits, target, reduction="sum")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration, then the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_clamp(clamp: Clamp) -> Clamp:
    if clamp is None:
        return None
    try:
        low, high = (float(c) for c in clamp)
    except (TypeError, ValueError):
        raise ValueError(
            f"clamp must be None or a (low, high) pair of numbers, got {clamp!r}"
        ) from None
    if not low < high:
        raise ValueError(f"clamp must have low < high, got {clamp!r}")
    return low, high


def _check_batch(x: Tensor, target: Tensor) -> None:
    if x.dim() < 1 or x.shape[0] == 0 or target.shape[:1] != x.shape[:1]:
        raise ValueError(
            f"x and target must share a non-empty batch dimension, got shapes "
            f"{tuple(x.shape)} and {tuple(target.shape)}"
        )


def _input_grad(model: nn.Module, x: Tensor, target: Tensor, loss_fn: LossFn) -> Tensor:
    """``∇_x loss(model(x), target)``, without touching the parameters' ``.grad``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():  # callers may sit inside torch.no_grad()
        loss = loss_fn(model(x), target)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def _project(x_adv: Tensor, x: Tensor, eps: float, clamp: Clamp) -> Tensor:
    """Onto the L∞ ball of radius ``eps`` around ``x``, then into the data range."""
    x_adv = x + (x_adv - x).clamp(-eps, eps)
    return x_adv if clamp is None else x_adv.clamp(*clamp)


def _uniform_ball(x: Tensor, eps: float, generator: Optional[torch.Generator]) -> Tensor:
    """Uniform noise in ``[-eps, eps]`` shaped like ``x``."""
    # Drawn where the generator lives, so a seed gives the same start on every device.
    device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    return eps * (2 * u - 1)


def fgsm(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    eps: float,
    loss_fn: Optional[LossFn] = None,
    clamp: Clamp = None,
) -> Tensor:
    """Fast gradient sign method: ``x + eps · sign(∇_x loss(model(x), target))``.

    Args:
        model: maps a batch ``x`` to outputs (logits for the default loss).
        x: a batch of inputs (first dimension is the batch).
        target: the true labels (class indices for the default loss).
        eps: L∞ radius ≥ 0; ``eps = 0`` returns a copy of ``x``.
        loss_fn: ``loss_fn(output, target)`` to increase; default summed cross-entropy.
        clamp: optional ``(low, high)`` data range the adversarial input is clamped to.

    Returns:
        The adversarial batch, detached, with the shape and dtype of ``x``.
    """
    eps = check_nonnegative("eps", eps)
    clamp = _check_clamp(clamp)
    _check_batch(x, target)
    if eps == 0:
        return x.detach().clone()
    with _eval_mode(model):
        grad = _input_grad(model, x, target, loss_fn or _sum_cross_entropy)
    return _project(x.detach() + eps * grad.sign(), x.detach(), eps, clamp)


def pgd(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    eps: float,
    steps: int = 10,
    step_size: Optional[float] = None,
    loss_fn: Optional[LossFn] = None,
    clamp: Clamp = None,
    random_start: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """L∞ projected gradient descent (ascent on the loss), Madry et al. 2018.

    Each of ``steps`` steps moves by ``step_size · sign(∇_x loss)`` and projects
    back onto the ``eps`` ball around ``x`` (and into ``clamp``).

    Args:
        model, x, target, loss_fn, clamp: as in :func:`fgsm`.
        eps: L∞ radius ≥ 0; ``eps = 0`` returns a copy of ``x``.
        steps: number of gradient steps ≥ 1.
        step_size: step length > 0; default ``2.5 · eps / steps``, enough to
            cross the ball from the centre to a corner and back.
        random_start: start from a uniform draw in the ball instead of ``x``.
        generator: source of the random start, for reproducible attacks.

    Returns:
        The adversarial batch, detached, with the shape and dtype of ``x``.
    """
    eps = check_nonnegative("eps", eps)
    steps = check_int("steps", steps, 1)
    step_size = 2.5 * eps / steps if step_size is None else check_positive("step_size", step_size)
    clamp = _check_clamp(clamp)
    _check_batch(x, target)
    if eps == 0:
        return x.detach().clone()
    loss_fn = loss_fn or _sum_cross_entropy
    x = x.detach()
    x_adv = _project(x + _uniform_ball(x, eps, generator), x, eps, clamp) if random_start else x
    with _eval_mode(model):
        for _ in range(steps):
            grad = _input_grad(model, x_adv, target, loss_fn)
            x_adv = _project(x_adv + step_size * grad.sign(), x, eps, clamp)
    return x_adv


ATTACKS = {"fgsm": fgsm, "pgd": pgd}
Attack = Callable[..., Tensor]


def _batches(x: Tensor, target: Tensor, batch_size: Optional[int]) -> Iterator[tuple[Tensor, ...]]:
    size = x.shape[0] if batch_size is None else check_int("batch_size", batch_size, 1)
    return zip(x.split(size), target.split(size))


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, target: Tensor) -> int:
    return int((model(x).argmax(dim=1) == target).sum())


def _check_levels(name: str, levels: Sequence[float]) -> list[float]:
    levels = list(levels)
    if not levels:
        raise ValueError(f"{name} must hold at least one value")
    return [check_nonnegative(f"{name}[{i}]", v) for i, v in enumerate(levels)]


def accuracy_under_attack(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    attack: Union[str, Attack],
    eps_list: Sequence[float],
    batch_size: Optional[int] = None,
    **kwargs,
) -> dict[float, float]:
    """Classification accuracy on attacked inputs, for every radius in ``eps_list``.

    Args:
        model: a classifier returning logits ``(batch, classes)``.
        x, target: the evaluation inputs and their class labels.
        attack: ``"fgsm"``, ``"pgd"`` or a callable ``attack(model, x, target, eps, **kwargs)``.
        eps_list: radii ≥ 0 (0 gives the clean accuracy).
        batch_size: attack and evaluate this many inputs at a time (default: all at once).
        **kwargs: passed on to the attack (``steps``, ``clamp``, ``generator``, ...).

    Returns:
        ``{eps: accuracy}`` with accuracies in [0, 1].
    """
    if isinstance(attack, str):
        attack = ATTACKS[check_choice("attack", attack, tuple(ATTACKS))]
    elif not callable(attack):
        raise ValueError(f"attack must be 'fgsm', 'pgd' or a callable, got {attack!r}")
    eps_list = _check_levels("eps_list", eps_list)
    _check_batch(x, target)
    with _eval_mode(model):
        return {
            eps: sum(
                _correct(model, attack(model, xb, tb, eps, **kwargs), tb)
                for xb, tb in _batches(x, target, batch_size)
            )
            / x.shape[0]
            for eps in eps_list
        }


def accuracy_under_noise(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    sigmas: Sequence[float],
    generator: Optional[torch.Generator] = None,
    repeats: int = 1,
    batch_size: Optional[int] = None,
    clip: Optional[tuple[float, float]] = None,
) -> dict[float, float]:
    """Classification accuracy on ``x + σ ε``, ``ε ~ N(0, I)``, for every σ in ``sigmas``.

    Args:
        model: a classifier returning logits ``(batch, classes)``.
        x, target: the evaluation inputs and their class labels.
        sigmas: noise levels ≥ 0 (0 gives the clean accuracy).
        generator: source of the noise, for reproducible curves.
        repeats: noise draws per input ≥ 1; the accuracy is averaged over them.
        batch_size: evaluate this many inputs at a time (default: all at once).
        clip: ``(low, high)``: noisy inputs are clipped to this range (pixels stay pixels, as in
            torchattacks' ``GN``, which the paper's authors used); ``None`` (default): no clipping.

    Returns:
        ``{sigma: accuracy}`` with accuracies in [0, 1].
    """
    sigmas = _check_levels("sigmas", sigmas)
    repeats = check_int("repeats", repeats, 1)
    _check_batch(x, target)
    if clip is not None and not (len(clip) == 2 and float(clip[0]) < float(clip[1])):
        raise ValueError(f"clip must be None or a pair (low, high) with low < high, got {clip!r}")

    def noisy(xb: Tensor, sigma: float) -> Tensor:
        if sigma == 0:
            return xb
        perturbed = GaussianPerturbation(sigma)(xb, generator)
        return perturbed if clip is None else perturbed.clamp(float(clip[0]), float(clip[1]))

    with _eval_mode(model):
        return {
            sigma: sum(
                _correct(model, noisy(xb, sigma), tb)
                for _ in range(repeats)
                for xb, tb in _batches(x, target, batch_size)
            )
            / (repeats * x.shape[0])
            for sigma in sigmas
        }
