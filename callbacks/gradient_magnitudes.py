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

from ._logging import add_histogram, allow_unsynced_epoch_logs, emit_figure, layer_tag
from ._schedule import EveryNEpochs, check_bool
from .solver_recorder import LayerAccumulator

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

    Args:
        per_layer: also log one scalar per layer.
        histograms: write histograms over layers to TensorBoard each epoch.
        plot_every_n_epochs: how often to draw the norm-vs-layer image (0: only
            after training).
        save_png: also save the image under ``<log_dir>/figures/``.
    """

    def __init__(
        self,
        per_layer: bool = True,
        histograms: bool = True,
        plot_every_n_epochs: int = 1,
        save_png: bool = False,
    ) -> None:
        self.per_layer = check_bool("per_layer", per_layer)
        self.histograms = check_bool("histograms", histograms)
        self.schedule = EveryNEpochs("plot_every_n_epochs", plot_every_n_epochs)
        self.save_png = check_bool("save_png", save_png)
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
        norm = sample_norm(grad.detach().float()).mean()
        previous = self._state_sums[index]
        self._state_sums[index] = norm if previous is None else previous + norm
        self._state_counts[index] += 1

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch.reset()

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
        params = [_param_grad_norm(b) for b in self._blocks]
        self._reset_states()
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
        fig = plot_layer_curves(curves, ylabel="gradient norm", title=f"epoch {epoch}")
        emit_figure(trainer, "gradients/norm_vs_layer", fig, self.save_png, epoch=epoch)


def _param_grad_norm(block: ImplicitResidualBlock) -> Optional[Tensor]:
    """Euclidean norm of all of the block's parameter gradients together (None without any)."""
    norms = [p.grad.detach().float().norm() for p in block.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def _vector(values: list[Optional[Tensor]]) -> Tensor:
    """Per-layer values as one tensor, NaN where a layer has none."""
    device = next((v.device for v in values if v is not None), torch.device("cpu"))
    nan = torch.tensor(math.nan, device=device)
    return torch.stack([nan if v is None else v.float() for v in values])
