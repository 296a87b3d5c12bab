"""Every tensor an irnet module keeps between passes follows the model: ``.to(device)``, a dtype,
a checkpoint.

A tensor kept as a plain attribute (a cache, a store, the last solve's
statistics) does not move with ``module.to(device)``, and Lightning restores a
checkpoint before it moves the model; on a GPU the next pass then fails on a
device mismatch. Without a GPU the same ``_apply`` path is taken by a move to
the ``meta`` device (which holds no values but keeps every tensor's device)
and by a dtype move (``.double()``): each shipped config is trained two steps
in-process, moved, and every irnet module's attributes are searched for a
tensor left behind — recursively through lists, tuples, dicts, dataclasses
(``SolverStats``) and irnet's plain objects (the warm-start cache, solvers),
not into torch's or Lightning's own state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from typing import Any, Iterator, Optional

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from helpers.training import CONFIGS
from irnet.cli import main

#: each shipped config, shrunk, with warm starts and the contraction bound on where it is off,
#: so that every kind of cached tensor (stores, σ and dσ/dW, scaled weights, statistics) exists
SHRUNK = {
    "ex1_sine": [
        "--model.net.init_args.layers",
        "3",
        "--model.net.init_args.width",
        "16",
        "--model.net.init_args.warm_start",
        "true",
    ],
    "ex1_sine_100": [
        "--model.net.init_args.layers",
        "3",
        "--model.net.init_args.width",
        "16",
        "--model.net.init_args.contraction",
        "0.9",
    ],
    "ex2_spirals": ["--model.net.init_args.layers", "3", "--model.net.init_args.width", "16"],
    "digits": [
        "--model.net.init_args.layers",
        "2",
        "--model.net.init_args.warm_start",
        "true",
        "--model.net.init_args.contraction",
        "0.9",
    ],
    "stiff": [
        "--model.net.init_args.layers",
        "4",
        "--model.net.init_args.observe_every",
        "2",
        "--model.net.init_args.width",
        "8",
        "--data.init_args.steps",
        "4",
        "--data.init_args.observe_every",
        "2",
        "--model.net.init_args.warm_start",
        "true",
        "--model.net.init_args.contraction",
        "0.9",
    ],
    "lotka": [
        "--model.net.init_args.layers",
        "5",
        "--model.net.init_args.width",
        "8",
        "--data.init_args.steps",
        "5",
        "--data.init_args.substeps",
        "2",
        "--model.net.init_args.warm_start",
        "true",
        "--model.net.init_args.contraction",
        "0.9",
    ],
}

# Attributes every nn.Module / LightningModule has: torch's and Lightning's own state, not irnet's.
_FRAMEWORK = set(vars(pl.LightningModule())) | {"_hparams", "_hparams_initial", "_hparams_name"}


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["irnet"])  # the CLI is given its arguments in-process


def build(config: str) -> tuple[pl.LightningModule, Any]:
    """The config's module and data module, built as ``benchmarks/bench_training.py`` does them
    (no Trainer)."""
    with contextlib.redirect_stdout(io.StringIO()):
        cli = main(
            [
                "--config",
                str(CONFIGS / f"{config}.yaml"),
                "--trainer.logger",
                "false",
                *SHRUNK[config],
            ],
            run=False,
        )
    cli.datamodule.setup("fit")
    cli.model.setup("fit")
    return cli.model, cli.datamodule


def _to(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    return type(batch)(_to(b, dtype) for b in batch)


def train(
    module: pl.LightningModule, data: Any, steps: int = 2, dtype: torch.dtype = torch.float32
) -> None:
    """``steps`` bare training steps (forward, backward, optimiser step), then a validation step."""
    conf = module.configure_optimizers()
    optimizer = (
        conf["optimizer"]
        if isinstance(conf, dict)
        else conf[0][0]
        if isinstance(conf, tuple)
        else conf
    )
    module.train()
    for index, batch in zip(range(steps), data.train_dataloader()):
        optimizer.zero_grad(set_to_none=True)
        out = module.training_step(_to(batch, dtype), index)
        (out["loss"] if isinstance(out, dict) else out).backward()
        optimizer.step()
    module.eval()
    with torch.inference_mode():  # as Lightning validates
        module.validation_step(_to(next(iter(data.val_dataloader())), dtype), 0)
    module.train()


def _is_irnet(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "irnet"


def _children(value: Any) -> Iterator[tuple[str, Any]]:
    """(suffix, value) of what a value holds, where irnet may keep tensors."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"[{k!r}]", v
            if isinstance(k, Tensor):
                yield f"<key {k!r}>", k
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            yield f"[{i}]", v
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield f".{f.name}", getattr(value, f.name)
    elif _is_irnet(value) and not isinstance(value, nn.Module):
        attrs = dict(getattr(value, "__dict__", {}))
        for name in getattr(type(value), "__slots__", ()):
            if hasattr(value, name):
                attrs[name] = getattr(value, name)
        for k, v in attrs.items():
            yield f".{k}", v


def cached_tensors(root: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Each tensor an irnet module holds as a plain attribute (not a parameter or buffer), with its
    path."""
    seen: set[int] = set()

    def walk(value: Any, path: str) -> Iterator[tuple[str, Tensor]]:
        if id(value) in seen or isinstance(value, nn.Module):
            return  # modules are visited by named_modules (their parameters and buffers move)
        seen.add(id(value))
        if isinstance(value, Tensor):
            yield path, value
            return
        for suffix, child in _children(value):
            yield from walk(child, path + suffix)

    for name, module in root.named_modules():
        if not _is_irnet(module):
            continue
        for attr, value in vars(module).items():
            if attr in _FRAMEWORK or attr in ("_parameters", "_buffers", "_modules"):
                continue
            yield from walk(value, f"{name or type(root).__name__}.{attr}")


def left_behind(
    root: nn.Module, device: torch.device, dtype: Optional[torch.dtype] = None
) -> list[str]:
    """Cached tensors not on ``device`` (or, given ``dtype``, floating ones of another dtype)."""
    return [
        f"{path}: {t.device} {t.dtype} {tuple(t.shape)}"
        for path, t in cached_tensors(root)
        if t.device != device or (dtype is not None and t.is_floating_point() and t.dtype != dtype)
    ]


@pytest.mark.parametrize("config", sorted(SHRUNK))
def test_every_cached_tensor_moves_with_the_module(config):
    torch.manual_seed(0)
    module, data = build(config)
    train(module, data)
    cached = list(cached_tensors(module))
    assert any(".warm_start_cache." in path for path, _ in cached), "the test must see the cache"
    assert any("constraint." in path for path, _ in cached), (
        "the test must see the constraint's caches"
    )
    module.to("meta")
    stray = left_behind(module, torch.device("meta"))
    assert not stray, f"{len(stray)} tensors stayed behind:\n" + "\n".join(stray)


@pytest.mark.parametrize("config", sorted(SHRUNK))
def test_a_dtype_move_converts_every_cache_and_training_goes_on(config):
    torch.manual_seed(0)
    module, data = build(config)
    train(module, data)
    module.double()
    stray = left_behind(module, torch.device("cpu"), torch.float64)
    assert not stray, "after .double():\n" + "\n".join(stray)
    train(module, data, dtype=torch.float64)
    stray = left_behind(module, torch.device("cpu"), torch.float64)
    assert not stray, "after two more steps in float64:\n" + "\n".join(stray)


@pytest.mark.parametrize("config", ["ex2_spirals", "digits"])
def test_a_checkpoint_loads_onto_the_parameters_device_and_dtype(config):
    """A checkpoint (state dict and extra state, on the CPU in float32) into a float64 network: its
    warm-start stores are built like the parameters, not like the checkpoint's rows."""
    torch.manual_seed(0)
    module, data = build(config)
    train(module, data)
    saved = module.state_dict()
    assert len(saved["net._extra_state"]["warm_start"]["keys"]) > 0
    fresh, _ = build(config)
    fresh.double()
    fresh.load_state_dict(saved)
    assert len(fresh.net.warm_start_cache) == len(module.net.warm_start_cache)
    stray = left_behind(fresh, torch.device("cpu"), torch.float64)
    assert not stray, "after load_state_dict:\n" + "\n".join(stray)
    train(fresh, data, dtype=torch.float64)


def test_the_search_finds_a_tensor_left_behind():
    """The check itself: a plain tensor attribute of an irnet module is found after a move."""
    module, _ = build("ex1_sine")
    block = module.net.blocks[0]
    block.stray = {"deep": [torch.zeros(2)]}
    module.to("meta")
    assert left_behind(module, torch.device("meta")) == [
        "net.blocks.0.stray['deep'][0]: cpu torch.float32 (2,)"
    ]
