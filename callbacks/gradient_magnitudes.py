"""GradientMagnitudes: loss-gradient norms per layer, for parameters and hidden states (Fig. 6)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from irnet._misc import sample_norm
from irnet.analysis.plotting import plot_layer_curves
from irnet.layer import ImplicitResidualBlock
from irnet.nets import find_blocks

from ._data import member_means, module_members
from ._logging import (
    add_histogram,
    allow_unsynced_epoch_logs,
    emit_figure,
    layer_tag,
    log_metrics,
    member_scalars,
)
from ._schedule import EveryNEpochs, check_bool
from .solver_recorder import LayerAccumulator, MemberAccumulator

NAMES = ("state_norm", "param_norm")


class GradientMagnitudes(Callback):
    """Per layer t, the size of the loss gradient w.r.t. its parameters and its output state.

    * ``param_norm``: ``‖∂L/∂γ_t‖₂``, the Euclidean norm of the gradients of
      all of block t's parameters together, read just before the optimiser step
      (after AMP unscaling, before gradient clipping; all-reduced under DDP).
    * ``state_norm``: ``‖∂L/∂y_t‖`` as the **mean over the batch of per-sample
      Euclidean norms** of the gradient w.r.t. block t's output ``y_t``, caught
      by a tensor hook that a forward hook puts on the block's output during
      training steps (first call of the block in each step: the main pass).
      ``L`` is the loss the module backpropagates; a batch-mean loss makes
      these scale like 1/batch size. Loss scaling of fp16 AMP is divided out.

    Logged per optimiser step (``_step``/``_epoch`` suffixes; an epoch value is
    the plain mean over the epoch's optimiser steps): the means over
    layers ``gradients/state_norm_mean`` and ``gradients/param_norm_mean``,
    ``gradients/state_norm_first_over_last`` (``‖∂L/∂y_1‖ / ‖∂L/∂y_T‖``: ≪ 1
    when gradients vanish on their way to the input, ≫ 1 when they explode)
    and, with ``per_layer``, ``gradients_layers/<name>/layer_<t>``. At epoch
    ends: histograms over layers ``gradients/<name>_over_layers`` and, every
    ``plot_every_n_epochs`` epochs and after the last, the image
    ``gradients/norm_vs_layer`` (epoch means against layer index, log scale).

    Ensembles (``ODENet(ensemble=E)``): every value above is the mean over members of each
    member's own value, comparable with a single network's: ``state_norm`` averages the
    per-row norms (each row's gradient is its member's, since the module minimises the sum
    of the members' objectives), ``param_norm`` averages the members' norms ``‖∂L/∂γ_t^(k)‖``
    (slice k of every parameter), not the norm of all members' gradients together, and
    ``state_norm_first_over_last`` is the ratio of the members' mean norms. With
    ``per_member`` each training epoch also ends with ``gradients/state_norm_mean/member_<k>``,
    ``gradients/param_norm_mean/member_<k>`` and
    ``gradients/state_norm_first_over_last/member_<k>`` (epoch means over the optimiser
    steps, each with ``…/std``, the spread across members), logged once per epoch to every
    logger (rank 0).

    Args:
        per_layer: also log one scalar per layer.
        histograms: write histograms over layers to TensorBoard each epoch.
        plot_every_n_epochs: how often to draw the norm-vs-layer image (0: only
            after training).
        save_png: also save the image under ``<log_dir>/figures/``.
        per_member: for an ensemble, log each member's epoch values (above).
    """

    def __init__(
        self,
        per_layer: bool = True,
        histograms: bool = True,
        plot_every_n_epochs: int = 1,
        save_png: bool = False,
        per_member: bool = True,
    ) -> None:
        self.per_layer = check_bool("per_layer", per_layer)
        self.histograms = check_bool("histograms", histograms)
        self.schedule = EveryNEpochs("plot_every_n_epochs", plot_every_n_epochs)
        self.save_png = check_bool("save_png", save_png)
        self.per_member = check_bool("per_member", per_member)
        self._members = 1
        self._member_epoch = MemberAccumulator()
        self._blocks: list[ImplicitResidualBlock] = []
        self._handles: list[RemovableHandle] = []
        self._capturing = False
        self._seen: list[bool] = []
        self._state_sums: list[Optional[Tensor]] = []
        self._state_counts: list[int] = []
        self._epoch = LayerAccumulator()

    # -- set-up ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._blocks = find_blocks(pl_module)
        if not self._blocks:
            rank_zero_warn(
                "GradientMagnitudes found no ImplicitResidualBlock in the module; it logs nothing."
            )
        self._handles = [
            b.register_forward_hook(partial(self._forward_hook, i))
            for i, b in enumerate(self._blocks)
        ]
        self._members = module_members(pl_module)
        _check_member_dimension(self._blocks, self._members)
        self._reset_states()
        self.schedule.reset()
        allow_unsynced_epoch_logs(trainer, ("gradients",))  # rank 0's own hidden-state gradients

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _reset_states(self) -> None:
        self._state_sums = [None] * len(self._blocks)
        self._state_counts = [0] * len(self._blocks)

    # -- capture of ∂L/∂y_t ----------------------------------------------------------------
    def _forward_hook(
        self, index: int, block: ImplicitResidualBlock, inputs: Any, output: Any
    ) -> None:
        if (
            self._capturing
            and not self._seen[index]
            and isinstance(output, Tensor)
            and output.requires_grad
            and torch.is_grad_enabled()
        ):
            self._seen[index] = True
            output.register_hook(partial(self._state_hook, index))

    def _state_hook(self, index: int, grad: Tensor) -> None:
        norms = sample_norm(grad.detach().float())
        # an ensemble's rows: each member's mean norm, (E,); the value logged is their mean
        norm = norms.mean() if self._members == 1 else member_means(norms, self._members)
        previous = self._state_sums[index]
        self._state_sums[index] = norm if previous is None else previous + norm
        self._state_counts[index] += 1

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch.reset()
        self._member_epoch.reset()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._capturing = True
        self._seen = [False] * len(self._blocks)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._capturing = False

    # -- per optimiser step ----------------------------------------------------------------
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._blocks:
            return
        state = self._state_norms(trainer)
        params = [_param_grad_norm(b, self._members) for b in self._blocks]
        self._reset_states()
        if self._members > 1:  # (E,) per layer: log the members' mean, keep each member's
            if self.per_member:
                self._add_members(state, params)
            state = [None if v is None else v.mean() for v in state]
            params = [None if v is None else v.mean() for v in params]
        self._log(pl_module, "state_norm", state)
        self._log(pl_module, "param_norm", params)
        if state[0] is not None and state[-1] is not None:
            ratio = state[0] / state[-1].clamp_min(torch.finfo(state[-1].dtype).tiny)
            pl_module.log(
                "gradients/state_norm_first_over_last",
                ratio,
                on_step=True,
                on_epoch=True,
                batch_size=1,
            )
        for name, values in (("state_norm", state), ("param_norm", params)):
            self._epoch.add(name, _vector(values))

    def _add_members(self, state: list[Optional[Tensor]], params: list[Optional[Tensor]]) -> None:
        """Each member's means over layers of this step's ``(E,)`` norms."""
        for name, values in (("state_norm", state), ("param_norm", params)):
            present = [v for v in values if v is not None]
            if present:
                self._member_epoch.add(f"{name}_mean", torch.stack(present).mean(0))
        if state[0] is not None and state[-1] is not None:
            ratio = state[0] / state[-1].clamp_min(torch.finfo(state[-1].dtype).tiny)
            self._member_epoch.add("state_norm_first_over_last", ratio)

    def _state_norms(self, trainer: pl.Trainer) -> list[Optional[Tensor]]:
        """Mean of the captured norms per layer (over accumulated batches), loss scale removed."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        return [
            None if s is None else s / (c * scale)
            for s, c in zip(self._state_sums, self._state_counts)
        ]

    def _log(
        self, pl_module: pl.LightningModule, name: str, values: list[Optional[Tensor]]
    ) -> None:
        present = {i: v for i, v in enumerate(values) if v is not None}
        if not present:
            return
        mean = torch.stack(list(present.values())).mean()
        pl_module.log(f"gradients/{name}_mean", mean, on_step=True, on_epoch=True, batch_size=1)
        if self.per_layer:
            for i, value in present.items():
                pl_module.log(
                    layer_tag("gradients_layers", name, i, len(values)),
                    value,
                    on_step=True,
                    on_epoch=True,
                    batch_size=1,
                )

    # -- per epoch --------------------------------------------------------------------------
    def layer_means(self, name: str) -> Optional[Tensor]:
        """This epoch's mean ``name`` (``"state_norm"`` or ``"param_norm"``) per layer, or None."""
        return self._epoch.mean(name)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.per_member and self._members > 1:
            metrics: dict[str, float] = {}
            for name in self._member_epoch.names():
                metrics.update(member_scalars(f"gradients/{name}", self._member_epoch.mean(name)))
            log_metrics(trainer, metrics)
        if self.histograms:
            for name in NAMES:
                values = self._epoch.mean(name)
                if values is not None:
                    add_histogram(trainer, f"gradients/{name}_over_layers", values)
        if self.schedule.due(epoch):
            self._plot(trainer, epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.pending_at_end():
            self._plot(trainer, self.schedule.last_epoch)

    def _plot(self, trainer: pl.Trainer, epoch: int) -> None:
        self.schedule.mark(epoch)
        state, params = self._epoch.mean("state_norm"), self._epoch.mean("param_norm")
        if not trainer.is_global_zero or state is None or params is None:
            return
        curves = {
            r"$\|\partial L/\partial y_t\|$ (mean per sample)": state.cpu().numpy(),
            r"$\|\partial L/\partial \gamma_t\|$": params.cpu().numpy(),
        }
        title = f"epoch {epoch}" + (
            f", mean over {self._members} members" if self._members > 1 else ""
        )
        fig = plot_layer_curves(curves, ylabel="gradient norm", title=title)
        emit_figure(trainer, "gradients/norm_vs_layer", fig, self.save_png, epoch=epoch)


def _param_grad_norm(block: ImplicitResidualBlock, members: int = 1) -> Optional[Tensor]:
    """Euclidean norm of all of the block's parameter gradients together (None without any).

    For an ensemble (``members`` > 1, every parameter's first dimension the member), each
    member's norm, ``(E,)``.
    """
    grads = [p.grad.detach().float() for p in block.parameters() if p.grad is not None]
    if not grads:
        return None
    if members == 1:
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    return torch.stack([g.reshape(members, -1).norm(dim=1) for g in grads]).norm(dim=0)


def _check_member_dimension(blocks: list[ImplicitResidualBlock], members: int) -> None:
    """Each member's ``param_norm`` slices every block parameter along its first dimension:
    refuse a parameter without one (a block of an ensemble that shares weights)."""
    if members == 1:
        return
    for t, block in enumerate(blocks):
        for name, param in block.named_parameters():
            if param.dim() == 0 or param.shape[0] != members:
                raise ValueError(
                    f"GradientMagnitudes: parameter {name!r} of block {t + 1} has shape "
                    f"{tuple(param.shape)}, not a first dimension of the ensemble's {members} "
                    "members, so its gradient cannot be split per member; leave "
                    "GradientMagnitudes out of trainer.callbacks for this network"
                )


def _vector(values: list[Optional[Tensor]]) -> Tensor:
    """Per-layer values as one tensor, NaN where a layer has none."""
    device = next((v.device for v in values if v is not None), torch.device("cpu"))
    nan = torch.tensor(math.nan, device=device)
    return torch.stack([nan if v is None else v.float() for v in values])
