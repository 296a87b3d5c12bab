"""StabilityMonitor: spectral radii of each layer's Jacobian and of θ∂F/∂y, every N epochs."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from irnet._misc import check_int
from irnet.analysis.stability import layer_spectral_radii
from irnet.nets import ImplicitODENet
from irnet.nets.ensemble import rows_of
from irnet.nets.protocol import auxiliary_pass

from ._data import batch_inputs, find_net, module_members
from ._logging import add_histogram, layer_tag, log_metrics, member_scalars
from ._schedule import EveryNEpochs, check_bool


class StabilityMonitor(Callback):
    """Every N epochs, how each layer amplifies perturbations, whether its Neumann series converges.

    On up to ``max_samples`` inputs of the last training batch, the network's
    hidden states ``y_0 … y_T`` are computed (eval mode, no grad); for every
    layer t and **every sample** (F acts per sample, so each sample has its own
    Jacobian) two spectral radii are estimated matrix-free with Jacobian–vector
    products (:func:`irnet.analysis.stability.layer_spectral_radii`):

    * ``layer_radius``: ρ(∂y_t/∂y_{t−1}) with
      ``∂y_t/∂y_{t−1} = (I − θJ_F(y_t))⁻¹(I + (1−θ)J_F(y_{t−1}))`` (the inverse
      by a GMRES solve; for a one-leg block J_F is taken at its stage, docs/schemes.md).
      Above 1 the layer amplifies some input perturbation.
    * ``neumann_radius``: ρ(θJ_F(y_t)) for θ > 0. At or above 1 the Neumann
      series of the adjoint solve (and locally the fixed-point iteration) diverges.

    Both come from an Arnoldi iteration of ``krylov_dim`` steps, exact when
    that is at least the state size (the paper's ODENet has 2–4 states).

    Logged to every logger at the current step (rank 0 only, so no collective
    runs): ``stability/layer_radius_max`` / ``_mean`` (over layers and samples),
    ``stability/neumann_radius_max`` and ``stability/neumann_divergent_layers``
    (layers whose largest ρ(θJ_F) ≥ 1: zero when all is well); with
    ``per_layer`` ``stability_layers/<name>/layer_<t>`` (max over samples);
    with ``histograms`` TensorBoard histograms of all per-sample values.

    Ensembles (``ODENet(ensemble=E)``): each of the ``max_samples`` inputs is run through
    every member (E rows per input, so E times the work), and each member's samples get their
    own radii. The tags above pool the members: ``…_max`` is the maximum over members,
    ``layer_radius_mean`` the mean over members, ``neumann_divergent_layers`` counts layers
    where some member diverges, the per-layer tags are maxima over members. Each member's own
    ``stability/layer_radius_max/member_<k>``, ``stability/layer_radius_mean/member_<k>``,
    ``stability/neumann_radius_max/member_<k>`` and
    ``stability/neumann_divergent_layers/member_<k>`` are logged beside them, each with
    ``…/std``, the spread across members.

    Args:
        every_n_epochs: measure after every N-th training epoch (0: only after
            training). The last epoch is always measured.
        max_samples: how many inputs of the last training batch to use (for an ensemble,
            each in every member).
        krylov_dim: Arnoldi steps per radius.
        per_layer: also log one scalar per layer.
        histograms: write histograms to TensorBoard.
        seed: seed of the start vectors (monitoring never draws on the training RNG).
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        max_samples: int = 16,
        krylov_dim: int = 20,
        per_layer: bool = True,
        histograms: bool = True,
        seed: int = 0,
    ) -> None:
        self.schedule = EveryNEpochs("every_n_epochs", every_n_epochs)
        self.max_samples = check_int("max_samples", max_samples, 1)
        self.krylov_dim = check_int("krylov_dim", krylov_dim, 1)
        self.per_layer = check_bool("per_layer", per_layer)
        self.histograms = check_bool("histograms", histograms)
        self.seed = check_int("seed", seed, 0)
        self._inputs: Optional[Tensor] = None
        self._warned = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.schedule.reset()
        self._inputs = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        x = batch_inputs(batch)
        if x is not None:
            self._inputs = x[: self.max_samples].detach()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.schedule.due(epoch):
            self.schedule.mark(epoch)
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.pending_at_end():
            self.schedule.mark(self.schedule.last_epoch)
            self._measure(trainer, pl_module)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rank 0 only; uses ``pl_module.net`` directly, outside any DDP wrapper."""
        if not trainer.is_global_zero or self._inputs is None:
            return
        net = find_net(pl_module)
        if net is None:
            if not self._warned:
                rank_zero_warn(
                    "StabilityMonitor needs pl_module.net to be an irnet ImplicitODENet; "
                    "it measures nothing."
                )
                self._warned = True
            return
        layer, neumann = self.radii(net, self._inputs)
        self._report(trainer, net, layer, neumann)
        members = module_members(pl_module)
        if members > 1:
            self._report_members(trainer, net, layer, neumann, members)

    def radii(self, net: ImplicitODENet, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-layer, per-sample radii, each of shape ``(layers, samples)``.

        For an ensemble the samples are its rows, ``samples · E`` of them, sample-major (column
        ``b · E + k`` is input b in member k: :func:`irnet.nets.ensemble.rows_of` splits them).
        ``neumann`` is NaN in the rows of explicit (θ = 0) layers, which solve nothing.
        """
        generator = torch.Generator().manual_seed(self.seed)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad(), auxiliary_pass(net):
                param = next(net.parameters(), None)
                if param is not None and x.is_floating_point():
                    x = x.to(device=param.device, dtype=param.dtype)
                states = net.trajectory(x)
            layer, neumann = [], []
            for t, block in enumerate(net.blocks):
                rho_layer, rho_neumann = layer_spectral_radii(
                    block.F,
                    block.theta,
                    states[t],
                    states[t + 1],
                    self.krylov_dim,
                    generator,
                    scheme=block.scheme,
                )
                layer.append(rho_layer)
                neumann.append(
                    rho_neumann if block.theta > 0 else torch.full_like(rho_neumann, float("nan"))
                )
        finally:
            net.train(was_training)
        return torch.stack(layer).float(), torch.stack(neumann).float()

    def _report_members(
        self, trainer: pl.Trainer, net: ImplicitODENet, layer: Tensor, neumann: Tensor, members: int
    ) -> None:
        """Each member's maximum and mean radius and divergent layers, and their spread."""
        per_member = rows_of(layer.T, members)  # (E, samples, layers)
        metrics = member_scalars("stability/layer_radius_max", per_member.amax((1, 2)))
        metrics.update(member_scalars("stability/layer_radius_mean", per_member.mean((1, 2))))
        implicit = [t for t, block in enumerate(net.blocks) if block.theta > 0]
        if implicit:
            worst = rows_of(neumann[implicit].T, members).amax(1)  # (E, implicit layers)
            metrics.update(member_scalars("stability/neumann_radius_max", worst.amax(1)))
            metrics.update(
                member_scalars("stability/neumann_divergent_layers", (worst >= 1).sum(1))
            )
        log_metrics(trainer, metrics)

    def _report(
        self, trainer: pl.Trainer, net: ImplicitODENet, layer: Tensor, neumann: Tensor
    ) -> None:
        layers = layer.shape[0]
        metrics = {
            "stability/layer_radius_max": float(layer.max()),
            "stability/layer_radius_mean": float(layer.mean()),
        }
        implicit = [t for t, block in enumerate(net.blocks) if block.theta > 0]
        if implicit:
            worst = neumann[implicit].amax(1)
            metrics["stability/neumann_radius_max"] = float(worst.max())
            metrics["stability/neumann_divergent_layers"] = float((worst >= 1).sum())
        if self.per_layer:
            for t in range(layers):
                metrics[layer_tag("stability_layers", "layer_radius", t, layers)] = float(
                    layer[t].max()
                )
            for t in implicit:
                metrics[layer_tag("stability_layers", "neumann_radius", t, layers)] = float(
                    neumann[t].max()
                )
        log_metrics(trainer, metrics)
        if self.histograms:
            add_histogram(trainer, "stability/layer_radius", layer)
            if implicit:
                add_histogram(trainer, "stability/neumann_radius", neumann[implicit])
