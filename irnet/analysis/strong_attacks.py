"""Attacks that do not trust the solver's gradients, and the worst case over several attacks.

An implicit or ODE network can look robust because its input gradient is
poor (an adjoint solve stopped early, a loose forward tolerance, a flat or
noisy loss surface), not because no nearby input is misclassified: the
gradient is masked. The checks here attack from directions that do not use
that gradient, or use it harder:

* :func:`spsa`: gradient-free; the gradient is estimated from forward passes only
  (Uesato et al., 2018);
* :func:`pgd_restarts`: PGD (:func:`irnet.analysis.attacks.pgd`) with several random
  starts, keeping each sample's worst result;
* :func:`transfer` / :func:`transfer_attack`: perturbations crafted on another
  network (e.g. the explicit θ = 0 one) and applied to this one;
* :func:`tighter_solves` / :func:`tighter_attack`: the attack computed with tighter
  forward and adjoint tolerances than the network runs with.

:func:`strongest_attack_accuracy` counts a sample as robust only if it is
classified correctly clean and under every attack of a set
(:func:`strong_attacks` by default). docs/robustness.md explains the rule.

As in :mod:`irnet.analysis.attacks`, every function runs the model in eval mode and
restores the mode it found, and never touches the parameters' ``.grad``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, NamedTuple, Optional, Union

import torch
import torch.nn.functional as functional
from torch import Tensor, nn

from irnet._misc import check_choice, check_int, check_nonnegative, check_positive, per_sample
from irnet.analysis.attacks import (
    Attack,
    Clamp,
    LossFn,
    _batches,
    _check_batch,
    _check_clamp,
    _eval_mode,
    _project,
    fgsm,
    pgd,
)
from irnet.linear import LinearSolver
from irnet.solvers import NonlinearSolver

UPDATES = ("adam", "sign")
_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8


def margin_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample margin ``max_{j≠y} z_j − z_y``: positive exactly where another class wins.

    Unlike the cross-entropy it does not saturate on confidently classified
    samples, which keeps finite differences informative (Uesato et al., 2018).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (batch, classes >= 2), got {tuple(logits.shape)}")
    true = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.masked_fill(functional.one_hot(target, logits.shape[1]).bool(), float("-inf"))
    return others.max(dim=1).values - true


def _per_sample_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return functional.cross_entropy(logits, target, reduction="none")


@torch.no_grad()
def _score(model: nn.Module, x: Tensor, target: Tensor, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
    """Per sample: misclassified?, and the loss."""
    logits = model(x)
    return logits.argmax(dim=1) != target, loss_fn(logits, target)


def _worse(mis: Tensor, loss: Tensor, best_mis: Tensor, best_loss: Tensor) -> Tensor:
    """Where a candidate is a stronger attack: misclassified first, then a higher loss."""
    return (mis & ~best_mis) | ((mis == best_mis) & (loss > best_loss))


def _rademacher(
    shape: tuple[int, ...], like: Tensor, generator: Optional[torch.Generator]
) -> Tensor:
    """±1 entries, drawn where the generator lives (same draws on every device for a seed)."""
    device = generator.device if generator is not None else like.device
    bits = torch.randint(0, 2, shape, generator=generator, device=device)
    return (2 * bits - 1).to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def _estimate(
    model: nn.Module, x: Tensor, target: Tensor, directions: Tensor, delta: float, loss_fn: LossFn
) -> Tensor:
    """``mean_k (L(x + δv_k) − L(x − δv_k)) / (2δ) · v_k`` per sample, in one forward pass."""
    samples, batch = directions.shape[:2]
    probes = torch.cat([x + delta * directions, x - delta * directions]).flatten(0, 1)
    losses = loss_fn(model(probes), target.repeat(2 * samples)).view(2 * samples, batch)
    slopes = (losses[:samples] - losses[samples:]) / (2 * delta)
    return (slopes.view(samples, batch, *[1] * (x.dim() - 1)) * directions).mean(dim=0)


def spsa_gradient(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    samples: int = 64,
    delta: float = 0.01,
    loss_fn: Optional[LossFn] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """SPSA estimate of each sample's ``∇_x loss``, from ``2 · samples`` forward passes.

    With Rademacher directions ``v`` (entries ±1), ``E[(vᵀg) v] = g``; the
    central difference makes the error of each term O(δ²).

    Args:
        model: a classifier returning logits ``(batch, classes)``.
        x, target: a batch of inputs and their class labels.
        samples: random directions per sample ≥ 1.
        delta: finite-difference step > 0 (in the units of ``x``).
        loss_fn: per-sample loss ``(logits, target) -> (batch,)``; default :func:`margin_loss`.
        generator: source of the directions, for reproducible estimates.

    Returns:
        The estimate, shaped like ``x``.
    """
    samples = check_int("samples", samples, 1)
    delta = check_positive("delta", delta)
    _check_batch(x, target)
    x = x.detach()
    directions = _rademacher((samples, *x.shape), x, generator)
    with _eval_mode(model):
        return _estimate(model, x, target, directions, delta, loss_fn or margin_loss)


class _Adam:
    """Adam ascent directions for the rows of a batch, each row with its own moments."""

    def __init__(self, x: Tensor) -> None:
        self.m, self.v = torch.zeros_like(x), torch.zeros_like(x)

    def direction(self, rows: Tensor, grad: Tensor, t: int) -> Tensor:
        (b1, b2) = _ADAM_BETAS
        self.m[rows] = b1 * self.m[rows] + (1 - b1) * grad
        self.v[rows] = b2 * self.v[rows] + (1 - b2) * grad * grad
        m_hat, v_hat = self.m[rows] / (1 - b1**t), self.v[rows] / (1 - b2**t)
        return m_hat / (v_hat.sqrt() + _ADAM_EPS)


def spsa(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    eps: float,
    steps: int = 100,
    samples: int = 64,
    step_size: Optional[float] = None,
    delta: float = 0.01,
    update: str = "adam",
    loss_fn: Optional[LossFn] = None,
    clamp: Clamp = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Gradient-free L∞ attack (SPSA; Uesato et al., 2018): forward passes only.

    Each step estimates every sample's loss gradient with :func:`spsa_gradient`
    (``samples`` Rademacher directions, central differences of size
    ``delta``), moves along it (Adam, as in the paper, or its sign) and
    projects onto the ``eps`` ball around ``x`` and into ``clamp``. Each sample
    keeps its worst iterate (misclassified first, then highest loss) and stops
    once misclassified; the attack stops when every sample has. A sample's
    result does not depend on the other samples of the batch: its directions
    are drawn at the same place of the stream whatever they do.

    Runs under ``torch.no_grad`` (also inside ``torch.inference_mode``), so a
    masked, wrong or missing backward pass cannot weaken it. Each step
    evaluates the model on ``2 · samples`` copies of the batch's active
    samples: use a smaller batch if that does not fit in memory.

    Args:
        model, x, target, clamp: as in :func:`irnet.analysis.attacks.fgsm`.
        eps: L∞ radius ≥ 0; ``eps = 0`` returns a copy of ``x``.
        steps: iterations ≥ 1.
        samples: random directions per sample and step ≥ 1.
        step_size: Adam learning rate or signed-step length > 0; default ``eps / 10``.
        delta: finite-difference step > 0 (in the units of ``x``).
        update: ``"adam"`` or ``"sign"``.
        loss_fn: per-sample loss to increase, ``(logits, target) -> (batch,)``;
            default :func:`margin_loss`.
        generator: source of the directions, for reproducible attacks.

    Returns:
        The adversarial batch, detached, with the shape and dtype of ``x``.
    """
    eps = check_nonnegative("eps", eps)
    steps = check_int("steps", steps, 1)
    samples = check_int("samples", samples, 1)
    step_size = eps / 10 if step_size is None else check_positive("step_size", step_size)
    delta = check_positive("delta", delta)
    update = check_choice("update", update, UPDATES)
    clamp = _check_clamp(clamp)
    _check_batch(x, target)
    x = x.detach()
    if eps == 0:
        return x.clone()
    loss_fn = loss_fn or margin_loss
    with _eval_mode(model), torch.no_grad():
        x_adv, best = x.clone(), x.clone()
        best_mis, best_loss = _score(model, x, target, loss_fn)
        adam = _Adam(x) if update == "adam" else None
        for t in range(1, steps + 1):
            rows = (~best_mis).nonzero().squeeze(1)
            if rows.numel() == 0:  # every sample misclassified: nothing left to attack
                break
            # Drawn for the whole batch, so a sample's draws do not depend on the others.
            directions = _rademacher((samples, *x.shape), x, generator)[:, rows]
            grad = _estimate(model, x_adv[rows], target[rows], directions, delta, loss_fn)
            step = grad.sign() if adam is None else adam.direction(rows, grad, t)
            x_adv[rows] = _project(x_adv[rows] + step_size * step, x[rows], eps, clamp)
            mis, loss = _score(model, x_adv[rows], target[rows], loss_fn)
            better = _worse(mis, loss, best_mis[rows], best_loss[rows])
            take = rows[better]
            best[take], best_mis[take], best_loss[take] = x_adv[take], mis[better], loss[better]
    return best


def pgd_restarts(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    eps: float,
    steps: int = 100,
    restarts: int = 5,
    clean_start: bool = True,
    generator: Optional[torch.Generator] = None,
    **kwargs,
) -> Tensor:
    """:func:`irnet.analysis.attacks.pgd` from several starts; each sample keeps its worst result.

    Runs ``restarts`` random starts (drawn in turn from ``generator``, so the
    first run is ``pgd`` with the same generator), then one run from ``x``
    itself if ``clean_start``. Per sample the result is a misclassified one if
    any run found one, else the one of highest cross-entropy: never weaker,
    sample by sample, than any of the runs.

    Args:
        model, x, target, eps: as in :func:`irnet.analysis.attacks.pgd`.
        steps: gradient steps of each run ≥ 1.
        restarts: random starts ≥ 1.
        clean_start: also run once from ``x`` (a random start can climb to a
            lower local maximum than the one next to ``x``).
        generator: source of the random starts.
        **kwargs: passed on to :func:`irnet.analysis.attacks.pgd` (``step_size``,
            ``loss_fn``, ``clamp``).

    Returns:
        The adversarial batch, detached, with the shape and dtype of ``x``.
    """
    restarts = check_int("restarts", restarts, 1)
    if not isinstance(clean_start, bool):
        raise ValueError(f"clean_start must be true or false, got {clean_start!r}")
    runs = [dict(random_start=True, generator=generator)] * restarts
    runs += [dict(random_start=False)] if clean_start else []
    best = best_mis = best_loss = None
    with _eval_mode(model):
        for run in runs:
            adv = pgd(model, x, target, eps, steps=steps, **run, **kwargs)
            mis, loss = _score(model, adv, target, _per_sample_cross_entropy)
            if best is None:
                best, best_mis, best_loss = adv, mis, loss
                continue
            take = _worse(mis, loss, best_mis, best_loss)
            best = torch.where(per_sample(take, x), adv, best)
            best_mis, best_loss = best_mis | mis, torch.where(take, loss, best_loss)
    return best


class Transfer(NamedTuple):
    """Result of :func:`transfer`."""

    adversarial: Tensor  #: the batch crafted on the source model
    source_accuracy: float  #: the source model's accuracy on it (white-box)
    target_accuracy: float  #: the target model's accuracy on it (transferred)


def _check_attack(name: str, attack: Attack) -> Attack:
    if not callable(attack):
        raise ValueError(f"{name} must be a callable attack(model, x, target, eps), got {attack!r}")
    return attack


def _check_model(name: str, model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} must be an nn.Module, got {type(model).__name__}")
    return model


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Per sample: classified correctly?"""
    with _eval_mode(model):
        return model(x).argmax(dim=1) == target


def transfer_attack(source_model: nn.Module, attack: Attack = pgd, **kwargs) -> Attack:
    """An attack that crafts on ``source_model`` whatever model it is handed.

    For :func:`strongest_attack_accuracy`: ``transfer_attack(explicit_net,
    pgd_restarts)`` attacks an implicit network through its explicit twin.

    Args:
        source_model: the network the perturbations are computed on.
        attack: ``attack(model, x, target, eps, **kwargs)`` returning the adversarial batch.
        **kwargs: passed on to ``attack``.
    """
    _check_model("source_model", source_model)
    _check_attack("attack", attack)

    def crafted_on_source(model: nn.Module, x: Tensor, target: Tensor, eps: float) -> Tensor:
        return attack(source_model, x, target, eps, **kwargs)

    return crafted_on_source


def transfer(
    source_model: nn.Module,
    target_model: nn.Module,
    x: Tensor,
    target: Tensor,
    eps: float,
    attack: Attack = pgd,
    **kwargs,
) -> Transfer:
    """Craft adversarial inputs on ``source_model`` and evaluate ``target_model`` on them.

    Args:
        source_model: the network attacked (white-box), e.g. the explicit θ = 0 network.
        target_model: the network evaluated on the transferred inputs.
        x, target, eps: as in :func:`irnet.analysis.attacks.pgd`.
        attack: ``attack(model, x, target, eps, **kwargs)``; default
            :func:`irnet.analysis.attacks.pgd`.
        **kwargs: passed on to ``attack`` (``steps``, ``clamp``, ``generator``, ...).

    Returns:
        A :class:`Transfer`: the adversarial batch and both models' accuracy on it.
    """
    _check_model("target_model", target_model)
    adversarial = transfer_attack(source_model, attack, **kwargs)(target_model, x, target, eps)
    return Transfer(
        adversarial,
        _correct(source_model, adversarial, target).double().mean().item(),
        _correct(target_model, adversarial, target).double().mean().item(),
    )


def _solver_objects(model: nn.Module) -> list[Union[NonlinearSolver, LinearSolver]]:
    """Every distinct forward and adjoint solver held by ``model``'s modules, once each.

    Blocks hold them as ``solver`` and ``linear_solver``; a chain
    (:class:`irnet.solvers.Fallback`) contributes its links as well.
    """
    found: dict[int, Union[NonlinearSolver, LinearSolver]] = {}
    for module in model.modules():
        for attr in ("solver", "linear_solver"):
            obj = getattr(module, attr, None)
            if isinstance(obj, (NonlinearSolver, LinearSolver)):
                for s in (obj, *getattr(obj, "solvers", ())):
                    found.setdefault(id(s), s)
    return list(found.values())


def _check_factors(
    atol_factor: float, rtol_factor: float, iter_factor: int
) -> tuple[float, float, int]:
    for name, value in (("atol_factor", atol_factor), ("rtol_factor", rtol_factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
            raise ValueError(f"{name} must be a number >= 1 (a tightening), got {value!r}")
    return float(atol_factor), float(rtol_factor), check_int("iter_factor", iter_factor, 1)


@contextmanager
def tighter_solves(
    model: nn.Module,
    atol_factor: float = 10.0,
    rtol_factor: float = 10.0,
    iter_factor: int = 10,
) -> Iterator[list[Union[NonlinearSolver, LinearSolver]]]:
    """Temporarily tighten every solver inside ``model``; restore the exact values on exit.

    Forward solvers' ``atol`` is divided by ``atol_factor``, adjoint solvers'
    ``rtol`` by ``rtol_factor``, and every ``max_iter`` multiplied by
    ``iter_factor`` (so the tighter tolerance can be reached). A solver object
    shared by several blocks (``ODENet`` passes one to all of its layers) is
    changed once. In float32, keep ``atol`` above roughly 1e-6 times the state's
    norm, or the solves stop at ``max_iter`` unconverged (and warn).

    Args:
        model: a module holding implicit blocks (none: nothing changes).
        atol_factor: ≥ 1, divides the forward tolerances.
        rtol_factor: ≥ 1, divides the adjoint tolerances.
        iter_factor: integer ≥ 1, multiplies the iteration limits.

    Yields:
        The solver objects changed.
    """
    _check_model("model", model)
    atol_factor, rtol_factor, iter_factor = _check_factors(atol_factor, rtol_factor, iter_factor)
    divisors = {"atol": atol_factor, "rtol": rtol_factor}
    solvers = _solver_objects(model)
    saved = [
        (s, name, value)
        for s in solvers
        for name, value in vars(s).items()
        if name in ("atol", "rtol", "max_iter")
    ]
    try:
        for s, name, value in saved:
            setattr(s, name, value * iter_factor if name == "max_iter" else value / divisors[name])
        yield solvers
    finally:
        for s, name, value in saved:
            setattr(s, name, value)


def tighter_attack(
    attack: Attack = pgd,
    atol_factor: float = 10.0,
    rtol_factor: float = 10.0,
    iter_factor: int = 10,
    **kwargs,
) -> Attack:
    """``attack`` computed inside :func:`tighter_solves` of the model it is handed.

    The adversarial inputs are then evaluated at the network's own tolerances.

    Args:
        attack: ``attack(model, x, target, eps, **kwargs)``; default
            :func:`irnet.analysis.attacks.pgd`.
        atol_factor, rtol_factor, iter_factor: as in :func:`tighter_solves` (checked here).
        **kwargs: passed on to ``attack``.
    """
    _check_attack("attack", attack)
    _check_factors(atol_factor, rtol_factor, iter_factor)  # now, not at the first call

    def tightened(model: nn.Module, x: Tensor, target: Tensor, eps: float) -> Tensor:
        with tighter_solves(model, atol_factor, rtol_factor, iter_factor):
            return attack(model, x, target, eps, **kwargs)

    return tightened


def _seeded(attack: Attack, seed: int, **kwargs) -> Attack:
    """``attack`` with a fresh generator seeded ``seed`` at each call: every call is the same."""

    def run(model: nn.Module, x: Tensor, target: Tensor, eps: float) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        return attack(model, x, target, eps, generator=generator, **kwargs)

    return run


def strong_attacks(
    clamp: Clamp = None,
    seed: int = 0,
    source_model: Optional[nn.Module] = None,
    steps: int = 100,
    restarts: int = 5,
    spsa_samples: int = 64,
) -> dict[str, Attack]:
    """The attack set of :func:`strongest_attack_accuracy`: the plain attacks and the checks for a
    masked gradient.

    ``fgsm``; ``pgd`` (10 steps, as the robustness study); ``pgd_restarts``
    (``steps`` steps, ``restarts`` random starts and one from ``x``); ``spsa``
    (``steps`` steps, ``spsa_samples`` directions); ``pgd_tight``
    (``steps``-step PGD from ``x`` under :func:`tighter_solves` with the
    default factors); and, if ``source_model`` is given, ``transfer``
    (``pgd_restarts`` crafted on it).

    Args:
        clamp: data range every attack keeps its inputs in.
        seed: seeds each randomised attack afresh at every call.
        source_model: the network transfer attacks are crafted on (e.g. the explicit one).
        steps: iterations of the long attacks ≥ 1.
        restarts: random starts of ``pgd_restarts`` ≥ 1.
        spsa_samples: directions per SPSA step ≥ 1.
    """
    clamp = _check_clamp(clamp)
    seed = check_int("seed", seed, 0)
    steps = check_int("steps", steps, 1)
    restarts = check_int("restarts", restarts, 1)
    spsa_samples = check_int("spsa_samples", spsa_samples, 1)
    attacks = {
        "fgsm": lambda model, x, target, eps: fgsm(model, x, target, eps, clamp=clamp),
        "pgd": _seeded(pgd, seed, steps=10, clamp=clamp),
        "pgd_restarts": _seeded(pgd_restarts, seed, steps=steps, restarts=restarts, clamp=clamp),
        "spsa": _seeded(spsa, seed, steps=steps, samples=spsa_samples, clamp=clamp),
        "pgd_tight": tighter_attack(pgd, steps=steps, random_start=False, clamp=clamp),
    }
    if source_model is not None:
        attacks["transfer"] = transfer_attack(
            source_model, _seeded(pgd_restarts, seed, steps=steps, restarts=restarts, clamp=clamp)
        )
    return attacks


class StrongestAttack(NamedTuple):
    """Result of :func:`strongest_attack_accuracy`."""

    accuracy: float  #: fraction classified correctly clean and under every attack
    per_attack: dict[str, float]  #: ``"clean"`` and each attack's own accuracy
    robust: Tensor  #: per sample (bool): correct clean and under every attack


def _check_attacks(attacks: Optional[Mapping[str, Attack]]) -> dict[str, Attack]:
    if attacks is None:
        return strong_attacks()
    if not isinstance(attacks, Mapping) or not attacks:
        raise ValueError(f"attacks must be a non-empty dict of name: attack, got {attacks!r}")
    if "clean" in attacks:
        raise ValueError("attacks must not use the name 'clean' (reserved for the clean accuracy)")
    return {str(name): _check_attack(f"attacks[{name!r}]", a) for name, a in attacks.items()}


def strongest_attack_accuracy(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    eps: float,
    attacks: Optional[Mapping[str, Attack]] = None,
    batch_size: Optional[int] = None,
) -> StrongestAttack:
    """Accuracy against the per-sample worst case over a set of attacks: the number that counts.

    A sample counts as robust only if it is classified correctly clean and
    under every attack. The result's ``accuracy`` is therefore at most every
    single attack's accuracy (``per_attack``); a robustness claim made with
    one attack counts only where it agrees with this number.

    Args:
        model: a classifier returning logits ``(batch, classes)``.
        x, target: the evaluation inputs and their class labels.
        eps: L∞ radius ≥ 0.
        attacks: ``{name: attack(model, x, target, eps)}``, each returning the
            adversarial batch; default :func:`strong_attacks` (no clamp).
        batch_size: attack this many inputs at a time (default: all at once).

    Returns:
        A :class:`StrongestAttack`.
    """
    eps = check_nonnegative("eps", eps)
    attacks = _check_attacks(attacks)
    _check_batch(x, target)
    masks: dict[str, list[Tensor]] = {name: [] for name in ("clean", *attacks)}
    with _eval_mode(model):
        for xb, tb in _batches(x, target, batch_size):
            masks["clean"].append(_correct(model, xb, tb))
            for name, attack in attacks.items():
                masks[name].append(_correct(model, attack(model, xb, tb, eps), tb))
    correct = {name: torch.cat(m) for name, m in masks.items()}
    robust = torch.stack(list(correct.values())).all(dim=0)
    return StrongestAttack(
        robust.double().mean().item(),
        {name: c.double().mean().item() for name, c in correct.items()},
        robust,
    )
