"""``irnet extract-member CKPT --member K --out OUT.ckpt``: one member of an ensemble checkpoint
as an ordinary single-network checkpoint.

An ensemble (``model.net.init_args.ensemble: E``, :mod:`irnet.nets.ensemble`) keeps member k's
weights as slice k of every parameter, and Adam's moments as slice k of each parameter's moments.
The member's checkpoint holds those slices (its warm-start cache rows too), hyper-parameters
that build one network (``ensemble: 1``, ``member_seeds: null``), and the ensemble's epoch, step,
loops and learning-rate schedule, so that ``irnet fit --ckpt_path OUT.ckpt`` continues member k
exactly as the ensemble would have continued it, and ``ImplicitNetModule.load_from_checkpoint``
gives member k's outputs (rows ``b · E + k`` of the ensemble's). The callbacks' states are left
out: they describe the ensemble (its best mean loss, its checkpoints' paths).

Member k's seed, when it is known, is recorded under the checkpoint's :data:`MEMBER_KEY`: as the
ensemble's checkpoint records it (its ``member_seeds`` key), else the configured
``member_seeds[k]``, else the ``seed_everything`` s of the ``config.yaml`` that
``irnet fit`` saved beside the run (the checkpoint's folder's parent) plus k.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import torch
import yaml
from torch import Tensor

from irnet.cli.errors import CliError, report
from irnet.nets.ensemble import member_state_dict

PROG = "irnet extract-member"
#: the checkpoint key that says which member of which ensemble a checkpoint holds
MEMBER_KEY = "ensemble_member"
DESCRIPTION = (
    "Write member K of an ensemble checkpoint (irnet fit with model.net.init_args.ensemble: E) "
    "as an ordinary single-network checkpoint: member K's weights, Adam moments and warm-start "
    "cache; the ensemble's epoch, step and learning-rate schedule; hyper-parameters with "
    "ensemble: 1 and member_seeds: null. ImplicitNetModule.load_from_checkpoint(OUT) gives member "
    "K's outputs; irnet fit --config <a config with ensemble: 1> --ckpt_path OUT continues member "
    "K as the ensemble would have. The callbacks' states (best checkpoint, its score) describe the "
    "ensemble and are left out. Member K's seed, when known (the ensemble's member_seeds, or the "
    "seed_everything of the config.yaml saved beside the run, plus K), is recorded under the "
    f"checkpoint's {MEMBER_KEY!r} key with K and E."
)
EPILOG = (
    "example: irnet extract-member runs/ex1_sine/version_0/checkpoints/last.ckpt --member 2 "
    "--out member2.ckpt, then irnet fit --config configs/ex1_sine.yaml --ckpt_path member2.ckpt "
    "--trainer.max_epochs 300 (the config's model settings must be the checkpoint's, ensemble "
    "aside: irnet fit names any that differ; the ensemble run's saved config.yaml serves with "
    "--model.net.init_args.ensemble 1). Mistakes end with one line and exit status 2."
)


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one line (through :func:`irnet.cli.errors.report`)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see {PROG} --help)")


def parser() -> argparse.ArgumentParser:
    """The command line of ``irnet extract-member``."""
    p = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False)
    p.add_argument("ckpt", metavar="CKPT", type=Path, help="the ensemble's checkpoint (.ckpt)")
    p.add_argument(
        "--member",
        metavar="K",
        type=int,
        required=True,
        help="which member: 0, 1, …, E - 1 (member K was built with seed s + K under "
        "seed_everything: s)",
    )
    p.add_argument("--out", metavar="OUT", type=Path, required=True, help="the checkpoint to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run ``irnet extract-member`` on ``argv``; returns the path written.

    A mistake (unreadable or non-ensemble checkpoint, K out of range, existing OUT without
    ``--force``) ends with one line on stderr and exit status 2.
    """
    try:
        args = parser().parse_args(argv)
        info = extract_member(args.ckpt, args.member, args.out, force=args.force)
    except CliError as err:
        report(err, prog=PROG)
    seed = "unknown" if info["seed"] is None else info["seed"]
    print(
        f"{PROG}: member {info['member']} of {info['members']} (seed {seed}) written to "
        f"{args.out}; resume it with irnet fit --config <config with ensemble: 1> --ckpt_path "
        f"{args.out}"
    )
    return args.out


def extract_member(ckpt: Path, member: int, out: Path, force: bool = False) -> dict:
    """Write member ``member`` of the ensemble checkpoint ``ckpt`` to ``out`` (see the module).

    Returns:
        What the written checkpoint records under :data:`MEMBER_KEY`: ``member``, ``members``
        (E), ``seed`` (None when unknown) and ``source``.

    Raises:
        CliError: ``ckpt`` missing, unreadable or not an ensemble's; ``member`` out of range;
            ``out`` existing without ``force``, or the same file as ``ckpt``.
    """
    ckpt, out = Path(ckpt), Path(out)
    _check_out(ckpt, out, force)
    source = load_checkpoint(ckpt)
    single = member_checkpoint(source, member)
    single[MEMBER_KEY].update(seed=member_seed(source, member, ckpt), source=str(ckpt))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    torch.save(single, partial)
    os.replace(partial, out)  # never a half-written OUT
    return single[MEMBER_KEY]


def _check_out(ckpt: Path, out: Path, force: bool) -> None:
    if out.exists() and ckpt.exists() and out.resolve() == ckpt.resolve():
        raise CliError(f"--out: {out} is CKPT itself; give another path for the member")
    if out.is_dir():
        raise CliError(f"--out: {out} is a folder; give a file path such as {out}/member.ckpt")
    if out.exists() and not force:
        raise CliError(f"--out: {out} exists; give another path, or --force to overwrite it")


def load_checkpoint(path: Path) -> dict:
    """The Lightning checkpoint in ``path``; :class:`CliError` naming CKPT if it is unusable."""
    if not path.is_file():
        raise CliError(f"CKPT: no such checkpoint file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises EOFError, OSError, RuntimeError, UnpicklingError …
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CliError(f"CKPT: {path} is not a readable checkpoint: {reason[:200]}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CliError(f"CKPT: {path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def ensemble_size(ckpt: dict) -> int:
    """E of the checkpoint's network; :class:`CliError` unless it is an ensemble of irnet fit."""
    net = ckpt.get("hyper_parameters", {}).get("net")
    init_args = net.get("init_args") if isinstance(net, dict) else None
    if not isinstance(init_args, dict):
        raise CliError(
            "CKPT: its hyper-parameters do not describe the network (model.net with class_path "
            "and init_args, as irnet fit saves them), so no member can be rebuilt from it"
        )
    members = init_args.get("ensemble", 1)
    # member_seeds alone also stacks the weights (an ensemble of one)
    if members == 1 and init_args.get("member_seeds") is None:
        raise CliError(
            "CKPT: not an ensemble (model.net.init_args.ensemble is 1); extract-member needs a "
            "checkpoint of a network trained with ensemble: E >= 2"
        )
    return members


def member_seed(ckpt: dict, member: int, path: Optional[Path] = None) -> Optional[int]:
    """Member ``member``'s seed: as the checkpoint records it (``member_seeds``, written by the
    module), else ``member_seeds[member]`` if the ensemble was given its seeds, else
    ``seed_everything + member`` from the run's ``config.yaml`` (beside ``path``'s folder) when it
    describes this ensemble; None when none says."""
    init_args = ckpt["hyper_parameters"]["net"]["init_args"]
    seeds = ckpt.get("member_seeds", init_args.get("member_seeds"))
    if seeds is not None:
        return seeds[member]
    config = _run_config(path)
    net = config.get("model", {}).get("init_args", {}).get("net", {}).get("init_args", {})
    seed = config.get("seed_everything")
    same_ensemble = net.get("ensemble") == init_args.get("ensemble")
    if not same_ensemble or isinstance(seed, bool) or not isinstance(seed, int):
        return None
    return (seed + member) % 2**64  # the default member seeds (irnet.nets.ensemble.member_seeds)


def _run_config(path: Optional[Path]) -> dict:
    """The ``config.yaml`` LightningCLI saved in the run's folder (``<run>/checkpoints/x.ckpt``)."""
    file = None if path is None else Path(path).resolve().parent.parent / "config.yaml"
    if file is None or not file.is_file():
        return {}
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}  # the seed is a record, not needed to extract the member
    return config if isinstance(config, dict) else {}


def member_checkpoint(ckpt: dict, member: int) -> dict:
    """The checkpoint of member ``member`` alone, from an ensemble's checkpoint ``ckpt``.

    Weights and warm-start cache are sliced by :func:`irnet.nets.ensemble.member_state_dict`,
    the optimizer's per-parameter state (Adam's ``exp_avg``, ``exp_avg_sq``) likewise; the epoch,
    step, loops and schedule are kept; the callbacks' states are dropped (they describe the
    ensemble).
    """
    members = ensemble_size(ckpt)
    if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < members:
        raise CliError(
            f"--member: must be one of 0 … {members - 1} (the checkpoint's ensemble has "
            f"{members} members), got {member!r}"
        )
    single = {key: value for key, value in ckpt.items() if key != "callbacks"}
    single["hyper_parameters"] = single_hyper_parameters(ckpt["hyper_parameters"])
    try:
        single["state_dict"] = member_state_dict(ckpt["state_dict"], member, members, "net.")
    except ValueError as err:  # a weight without the member dimension: not this ensemble's
        raise CliError(
            f"CKPT: its weights are not those of an ensemble of {members}: {err}"
        ) from err
    single["callbacks"] = {}
    single[MEMBER_KEY] = {"member": member, "members": members}
    shapes = [tuple(p.shape) for p in _rebuilt(single).parameters()]
    if "optimizer_states" in ckpt:  # absent from a weights-only checkpoint: it stays absent
        single["optimizer_states"] = [
            member_optimizer_state(state, member, members, shapes)
            for state in ckpt["optimizer_states"]
        ]
    return single


def single_hyper_parameters(hparams: dict) -> dict:
    """``hparams`` with the network's ``ensemble: 1`` and ``member_seeds: null``."""
    single = copy.deepcopy(hparams)
    single["net"]["init_args"].update(ensemble=1, member_seeds=None)
    return single


def _rebuilt(ckpt: dict) -> torch.nn.Module:
    """The module ``ckpt`` describes, loaded from it (strictly: every weight of the member fits)."""
    from irnet.module import ImplicitNetModule  # imported here: it pulls in Lightning

    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    buffer.seek(0)
    try:
        return ImplicitNetModule.load_from_checkpoint(buffer, map_location="cpu")
    except Exception as err:  # whatever the network's constructor or load_state_dict raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CliError(f"CKPT: the member's checkpoint does not load: {reason[:300]}") from err


def member_optimizer_state(
    state: dict, member: int, members: int, shapes: Sequence[tuple[int, ...]]
) -> dict:
    """One optimizer's state dict for member ``member``: each per-parameter tensor of the
    stacked shape ``(E, *shape)`` becomes its slice; scalars (Adam's step) are kept.

    ``shapes`` are the single network's parameter shapes, in the optimizer's order.
    """
    counted = sum(len(group["params"]) for group in state.get("param_groups", []))
    if counted != len(shapes):
        raise CliError(
            f"CKPT: its optimizer holds {counted} parameters, the network {len(shapes)}: "
            "the optimizer state cannot be split into members"
        )
    per_param = {}
    for index, values in state.get("state", {}).items():
        per_param[index] = {
            name: _member_slice(value, member, members, shapes[index], f"{name} of {index}")
            for name, value in values.items()
        }
    return {**state, "state": per_param}


def _member_slice(value: Any, member: int, members: int, shape: tuple, what: str) -> Any:
    if not isinstance(value, Tensor) or value.dim() == 0:
        return value
    if tuple(value.shape) != (members, *shape):
        raise CliError(
            f"CKPT: optimizer state {what} has shape {tuple(value.shape)}, not the stacked "
            f"parameter's {(members, *shape)}: it cannot be split into members"
        )
    return value[member].clone()
