"""The robustness study's strong attacks: the per-sample worst case over a set of attacks.

Each trained digits classifier is attacked at :data:`EPSILONS` with the set of
:func:`irnet.analysis.strong_attacks.strong_attacks` (FGSM, 10-step PGD, PGD with more
steps and restarts, gradient-free SPSA, PGD under tighter solver tolerances)
plus a transfer attack crafted on the explicit (θ = 0) network of the same seed
and R_rnd setting; a sample counts as robust only if it is classified
correctly clean and under every attack (docs/robustness.md).

Cells run in separate worker processes, so the transfer attack goes through
files: the θ = 0 cell saves the inputs its ``pgd_restarts`` attack crafted
(exactly the transfer attack's inputs: the same seeded attack on the same
samples), and every cell of its group reads them and evaluates itself on
them. The study lists a group's θ = 0 cell before its other cells and the
worker pool hands cells out in order, so a cell that waits for the file waits
for a cell that is already running and never waits itself: no deadlock. The
contraction and Jacobian variants leave θ = 0 layers alone (κ bounds θ·Lip(F),
R_jac penalises θ·∂F/∂y), so their explicit network is the plain one and they
read its file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from irnet.analysis.attacks import Attack
from irnet.analysis.strong_attacks import strong_attacks, strongest_attack_accuracy

EPSILONS = (0.1, 0.2)
ATTACKS = ("fgsm", "pgd", "pgd_restarts", "spsa", "pgd_tight", "transfer")
# Attack sizes: PGD 20 steps × (2 random starts + 1 from x), SPSA 20 steps × 16 directions, on the
# first 200 test images; SPSA costs most. Measured on one (shared) core, a full-size cell (training
# and every evaluation) took 21 s at θ = 0, 119 s at θ = 0.5, 183 s at θ = 1 (about 40 s of it
# training), 154 s with κ = 0.9 and 135 s with R_jac at θ = 1: the full study takes about 45 min
# on 2 cores.
FULL = {
    "epsilons": EPSILONS,
    "samples": 200,
    "steps": 20,
    "restarts": 2,
    "spsa_samples": 16,
    "batch_size": 100,
}
TINY = {
    "epsilons": EPSILONS,
    "samples": 32,
    "steps": 3,
    "restarts": 1,
    "spsa_samples": 4,
    "batch_size": 32,
}
WAIT_SECONDS = 6 * 3600  # a transfer source that never appears: its cell died


def transfer_file(cell: dict) -> Path:
    """Where the explicit network of ``cell``'s seed and R_rnd setting saves its crafted inputs."""
    return (
        Path(cell["log_dir"])
        / "transfer"
        / cell["run"]
        / f"rrnd{int(cell['r_rnd'])}_seed{cell['seed']}.pt"
    )


def is_source(cell: dict) -> bool:
    return cell["theta"] == 0 and cell["variant"] == "plain"


def _recording(attack: Attack, store: list[Tensor]) -> Attack:
    """``attack`` that also keeps every batch it returns (in order)."""

    def run(model: nn.Module, x: Tensor, target: Tensor, eps: float) -> Tensor:
        adversarial = attack(model, x, target, eps)
        store.append(adversarial)
        return adversarial

    return run


def _save(path: Path, crafted: dict[str, Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.part")
    torch.save(crafted, partial)
    os.replace(partial, path)  # atomic: a waiting cell never reads half a file


def _load(path: Path, timeout: float = WAIT_SECONDS) -> dict[str, Tensor]:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"transfer source {path} did not appear within {timeout:.0f} s "
                "(did the θ = 0 cell of this seed and R_rnd setting fail?)"
            )
        time.sleep(2.0)
    return torch.load(path)


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, target: Tensor, batch_size: int) -> Tensor:
    return torch.cat(
        [
            model(xb).argmax(dim=1) == tb
            for xb, tb in zip(x.split(batch_size), target.split(batch_size))
        ]
    )


def evaluate(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    clamp: tuple[float, float],
    cell: dict,
    has_source: bool,
) -> dict[str, dict[str, float]]:
    """Per ε: each attack's accuracy, ``"clean"`` and ``"strongest"`` (the per-sample worst case).

    Args:
        model: the trained classifier (eval mode).
        x, target: test images and labels; the first ``cell["strong"]["samples"]`` are attacked.
        clamp: the valid pixel range.
        cell: the study's cell (``strong`` sizes, ``seed``, ``theta``, ``variant``, ``run``,
            ``log_dir``).
        has_source: whether the study trains this cell's explicit network (else no transfer attack).
    """
    sizes = cell["strong"]
    x, target = x[: sizes["samples"]], target[: sizes["samples"]]
    source, crafted, evaluated = is_source(cell), {}, {}
    for eps in sizes["epsilons"]:
        attacks = strong_attacks(
            clamp=clamp,
            seed=1000 + cell["seed"],
            steps=sizes["steps"],
            restarts=sizes["restarts"],
            spsa_samples=sizes["spsa_samples"],
        )
        if source:
            attacks["pgd_restarts"] = _recording(
                attacks["pgd_restarts"], crafted.setdefault(str(eps), [])
            )
        evaluated[str(eps)] = strongest_attack_accuracy(
            model, x, target, eps, attacks, sizes["batch_size"]
        )
    if source:
        _save(transfer_file(cell), {eps: torch.cat(batches) for eps, batches in crafted.items()})
    transferred = _load(transfer_file(cell)) if has_source else None
    table = {}
    for eps, result in evaluated.items():
        accuracy, robust = dict(result.per_attack), result.robust
        if transferred is not None:
            correct = _correct(model, transferred[eps], target, sizes["batch_size"])
            accuracy["transfer"], robust = correct.double().mean().item(), robust & correct
        table[eps] = {**accuracy, "strongest": robust.double().mean().item()}
    return table
