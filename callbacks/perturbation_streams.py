"""PerturbationStreams: owns R_rnd's streams and logs how perturbations grow across depth."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from irnet._misc import check_int
from irnet.analysis.plotting import plot_perturbation_growth
from irnet.nets import ImplicitODENet
from irnet.nets.ensemble import members_of
from irnet.nets.protocol import auxiliary_pass
from irnet.perturbations import Perturbation
from irnet.regularizers import PerturbationRegularizer

from ._data import batch_inputs, find_net, module_members, to_module
from ._logging import add_histogram, emit_figure, log_metrics, member_scalars
from ._schedule import EveryNEpochs, check_bool
from ._stream_distances import (
    InputDistanceHook,
    MemberDistanceHooks,
    amplification,
    depth_distances,
    member_depth_distances,
)
from .solver_recorder import LayerAccumulator

DEFAULT_STREAMS = 1
DEFAULT_SEED = 0
TRAIN = "regularizer"  # the distances come from R_rnd's training passes
OWN = "own"  # the callback draws and runs its own streams


class PerturbationStreams(Callback):
    """The P perturbation streams of R_rnd (paper eq. 10, Fig. 3), and ``‖y_t − ỹ_t‖`` per depth t.

    It owns the drawing of the perturbations, so another noise model (or an
    adversarial perturbation: any :class:`~irnet.perturbations.Perturbation`)
    is plugged in here, and it logs how far the perturbed hidden states
    ``ỹ_t`` are from the clean ones ``y_t`` at every depth t = 0…T (t = 0 is
    the lifted input): whether perturbations grow or damp across depth. What
    it measures depends on the module, decided when a fit starts:

    * **R_rnd is on** (``pl_module.r_rnd`` with a positive weight): the callback
      then **owns the regulariser's noise model**. It installs its
      ``perturbation`` (and ``streams`` and ``seed``, when given) into
      ``pl_module.r_rnd``, so the penalty trains on this noise; what it is not
      given stays as the regulariser has it. The module still reseeds the
      regulariser from ``(seed, epoch)`` at every epoch start. Nothing extra is
      computed: the distances are the ones the training steps measured
      (``r_rnd.last_distances`` for t = 1…T, and ``‖y_0 − ỹ_0‖`` caught at the
      first block's input), averaged over the epoch's steps, on this rank's
      batches. The regulariser gets its own settings back when the fit ends.
    * **R_rnd is off** (absent, or weight 0): the callback draws its own P
      perturbed copies of up to ``max_samples`` inputs of the epoch's last
      training batch, from its own generator seeded from ``(seed, epoch)``
      exactly as R_rnd seeds its streams (settings it is not given are taken
      from an inactive ``pl_module.r_rnd``, else Gaussian σ = 0.05, one
      stream, seed 0), and runs ``net.trajectory`` on the clean and perturbed
      inputs: eval mode, no grad, rank 0 only. It draws nothing from the
      training RNG and leaves the blocks' solver statistics as the training
      step left them, so training is the same with and without it.

    Logged every ``every_n_epochs`` epochs, every ``plot_every_n_epochs`` and
    after the last epoch, to every logger by rank 0 (no collective): scalars
    ``perturbation/layer_<t>`` (t = 00…T, the mean over samples and streams of
    ``‖y_t − ỹ_t‖``) and ``perturbation/amplification``
    (``‖y_T − ỹ_T‖ / ‖y_0 − ỹ_0‖``: above 1 perturbations grow through the
    network); the TensorBoard histogram ``perturbation/distance_over_layers``;
    and, at plot epochs, the image ``perturbation/distance_vs_depth`` (log
    scale) and its PNG ``<log_dir>/figures/perturbation_distance_vs_depth_epoch<NNNN>.png``.

    Ensembles (``ODENet(ensemble=E)``): every member runs the same perturbed inputs, and the
    distances above are the mean over members of each member's distances (what R_rnd
    measures over the ensemble's rows). With ``per_member`` each member's distances are
    measured too (with R_rnd on, by hooks on the blocks during the training steps, a few
    small tensor operations per block and step; otherwise from the callback's own pass):
    logged as ``perturbation/amplification/member_<k>`` with ``…/std``, the spread
    across members, drawn as one thin curve per member in the distance-vs-depth image, and
    kept in ``last_member_distances``.

    Args:
        perturbation: the noise model (default: R_rnd's, else
            ``GaussianPerturbation(sigma=0.05)``).
        streams: P, perturbed copies of each input (default: R_rnd's, else 1).
        seed: seed of the streams; epoch e draws from ``(seed, e)`` (default:
            R_rnd's, else 0).
        every_n_epochs: log the distances after every N-th epoch (0: only after
            training).
        plot_every_n_epochs: draw the distance-vs-depth image every N epochs
            (0: only after training).
        max_samples: inputs of the last training batch used when the callback
            runs its own streams.
        histograms: write the histogram over layers to TensorBoard.
        save_png: also save the image under ``<log_dir>/figures/``.
        per_member: for an ensemble, measure, log and draw each member's distances (above).

    Attributes:
        mode: during a fit, ``"regularizer"`` (R_rnd is on) or ``"own"``; else None.
        source: the streams in use during a fit: ``pl_module.r_rnd`` itself when
            R_rnd is on, else the callback's own (a weight-0
            :class:`~irnet.regularizers.PerturbationRegularizer`).
        last_distances: the last logged distances, ``(T+1,)`` float32 on the CPU
            (None before any).
        last_member_distances: for an ensemble, each member's last logged distances,
            ``(E, T+1)`` (row k member k's); None for a single network.
    """

    def __init__(
        self,
        perturbation: Optional[Perturbation] = None,
        streams: Optional[int] = None,
        seed: Optional[int] = None,
        every_n_epochs: int = 1,
        plot_every_n_epochs: int = 10,
        max_samples: int = 256,
        histograms: bool = True,
        save_png: bool = True,
        per_member: bool = True,
    ) -> None:
        if perturbation is not None and not isinstance(perturbation, Perturbation):
            raise ValueError(
                f"perturbation must be an irnet.perturbations.Perturbation or None, "
                f"got {type(perturbation).__name__}"
            )
        self.perturbation = perturbation
        self.streams = None if streams is None else check_int("streams", streams, 1)
        self.seed = None if seed is None else check_int("seed", seed, 0)
        self.schedule = EveryNEpochs("every_n_epochs", every_n_epochs)
        self.plot_schedule = EveryNEpochs("plot_every_n_epochs", plot_every_n_epochs)
        self.max_samples = check_int("max_samples", max_samples, 1)
        self.histograms = check_bool("histograms", histograms)
        self.save_png = check_bool("save_png", save_png)
        self.per_member = check_bool("per_member", per_member)
        self.source: Optional[PerturbationRegularizer] = None
        self.mode: Optional[str] = None
        self.last_distances: Optional[Tensor] = None
        self.last_member_distances: Optional[Tensor] = None
        self._members = 1
        self._member_hooks: Optional[MemberDistanceHooks] = None
        self._saved: Optional[tuple[Perturbation, int, int]] = None  # r_rnd's own settings
        self._input_hook = InputDistanceHook()
        self._epoch = LayerAccumulator()
        self._before: Optional[Tensor] = None
        self._inputs: Optional[Tensor] = None
        # (epoch, distances, each member's distances)
        self._measured: Optional[tuple[int, Optional[Tensor], Optional[Tensor]]] = None
        self._warned = False

    # -- set-up: whose streams ---------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.schedule.reset()
        self.plot_schedule.reset()
        self._inputs, self._measured, self.last_distances = None, None, None
        self.last_member_distances = None
        self._members = module_members(pl_module)
        regularizer = getattr(pl_module, "r_rnd", None)
        if not isinstance(regularizer, PerturbationRegularizer):
            regularizer = None
        if regularizer is not None and regularizer.active:
            self._install(regularizer)
            net = find_net(pl_module)
            if net is not None and len(net.blocks):
                self._input_hook.attach(net.blocks[0])
                if self.per_member and self._members > 1:  # R_rnd pools the members
                    self._member_hooks = MemberDistanceHooks(self._members)
                    self._member_hooks.attach(list(net.blocks))
        else:
            self.mode, self.source = OWN, self._own_streams(regularizer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._input_hook.detach()
        if self._member_hooks is not None:
            self._member_hooks.detach()
            self._member_hooks = None
        if self.mode == TRAIN and self._saved is not None:
            self.source.perturbation, self.source.streams, self.source.seed = self._saved
        self._saved, self.source, self.mode = None, None, None

    def _install(self, regularizer: PerturbationRegularizer) -> None:
        """Put the callback's perturbation, streams and seed (those given) into ``regularizer``."""
        self._saved = (regularizer.perturbation, regularizer.streams, regularizer.seed)
        wanted = (
            _given(self.perturbation, regularizer.perturbation),
            _given(self.streams, regularizer.streams),
            _given(self.seed, regularizer.seed),
        )
        if repr(wanted) != repr(self._saved):
            rank_zero_warn(
                f"PerturbationStreams owns R_rnd's noise: perturbation, streams, seed "
                f"{self._saved!r} replaced by {wanted!r} for this fit."
            )
        regularizer.perturbation, regularizer.streams, regularizer.seed = wanted
        self.mode, self.source = TRAIN, regularizer

    def _own_streams(
        self, regularizer: Optional[PerturbationRegularizer]
    ) -> PerturbationRegularizer:
        """A weight-0 regulariser that draws the callback's streams (defaults from an inactive
        R_rnd)."""
        has = regularizer is not None
        perturbation = _given(self.perturbation, regularizer.perturbation if has else None)
        streams = _given(self.streams, regularizer.streams if has else DEFAULT_STREAMS)
        seed = _given(self.seed, regularizer.seed if has else DEFAULT_SEED)
        return PerturbationRegularizer(
            weight=0.0, streams=streams, seed=seed, perturbation=perturbation
        )

    # -- training steps ----------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch.reset()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.mode == TRAIN:
            self._before = self.source.last_distances
            self._input_hook.start(self.source.streams)
            if self._member_hooks is not None:
                self._member_hooks.start(self.source.streams)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.mode == OWN:
            x = batch_inputs(batch)
            if x is not None:
                self._inputs = x[: self.max_samples].detach()
        elif self.mode == TRAIN:
            first = self._input_hook.stop()
            members = None if self._member_hooks is None else self._member_hooks.stop()
            layers = self.source.last_distances
            if layers is not None and layers is not self._before:
                first = torch.tensor(float("nan")) if first is None else first
                self._epoch.add("distance", torch.cat([first.reshape(1).to(layers), layers]))
                if members is not None:
                    self._epoch.add("member_distance", members)

    # -- reporting -----------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        scalars, plot = self.schedule.due(epoch), self.plot_schedule.due(epoch)
        if scalars or plot:
            self._report(trainer, pl_module, epoch, scalars, plot)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scalars, plot = self.schedule.pending_at_end(), self.plot_schedule.pending_at_end()
        if scalars or plot:
            self._report(trainer, pl_module, self.schedule.last_epoch, scalars, plot)

    def _report(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        epoch: int,
        scalars: bool,
        plot: bool,
    ) -> None:
        if scalars:
            self.schedule.mark(epoch)
        if plot:
            self.plot_schedule.mark(epoch)
        if not trainer.is_global_zero:
            return
        distances, members = self._distances(pl_module, epoch)
        if distances is None:
            return
        self.last_distances, self.last_member_distances = distances, members
        if scalars:
            self._log_scalars(trainer, distances, members)
        if plot:
            fig = plot_perturbation_growth(distances.numpy(), title=f"epoch {epoch}")
            if members is not None:
                _draw_members(fig, members)
            emit_figure(trainer, "perturbation/distance_vs_depth", fig, self.save_png, epoch=epoch)

    def _distances(
        self, pl_module: pl.LightningModule, epoch: int
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The epoch's distances t = 0…T and, for an ensemble, each member's (computed once per
        epoch); None without data."""
        if self._measured is None or self._measured[0] != epoch:
            if self.mode == TRAIN:
                distances = self._epoch.mean("distance")
                members = self._epoch.mean("member_distance")
            else:
                distances, members = self._measure_own(pl_module, epoch)
            self._measured = (epoch, _cpu(distances), _cpu(members))
        return self._measured[1], self._measured[2]

    def _measure_own(
        self, pl_module: pl.LightningModule, epoch: int
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        net = find_net(pl_module)
        if net is None or self._inputs is None or self.source is None:
            if net is None and not self._warned:
                rank_zero_warn(
                    "PerturbationStreams needs pl_module.net to be an irnet ImplicitODENet "
                    "to run its own streams; it measures nothing."
                )
                self._warned = True
            return None, None
        try:
            x = to_module(self._inputs, pl_module)
            if self._members == 1 or not self.per_member:
                return self.measure(net, x, epoch), None
            members = self.measure_members(net, x, epoch)
            return members.mean(0), members
        except ValueError as error:  # e.g. a non-finite state: monitoring must not end the fit
            rank_zero_warn(
                f"PerturbationStreams could not run its streams at epoch {epoch}: {error}"
            )
            return None, None

    def measure(self, net: ImplicitODENet, x: Tensor, epoch: int) -> Tensor:
        """Mean over samples and streams of ``‖y_t − ỹ_t‖`` for t = 0…T, the streams of ``epoch``.

        Runs ``net`` in eval mode without grad; the training RNG, the network's
        mode and its blocks' ``forward_stats`` are as they were afterwards.

        Args:
            net: the network.
            x: clean inputs, on the network's device.
            epoch: the epoch whose streams are drawn (seed ``(seed, epoch)``).

        Returns:
            Shape ``(T+1,)``; for an ensemble the mean over members.
        """
        clean, noisy = self._trajectories(net, x, epoch)
        return depth_distances(clean, noisy, self.source.streams)

    def measure_members(self, net: ImplicitODENet, x: Tensor, epoch: int) -> Tensor:
        """:meth:`measure` for each member of an ensemble: shape ``(E, T+1)``, row k member k's
        distances (those of its own network on the same perturbed inputs)."""
        clean, noisy = self._trajectories(net, x, epoch)
        return member_depth_distances(clean, noisy, self.source.streams, members_of(net))

    def _trajectories(
        self, net: ImplicitODENet, x: Tensor, epoch: int
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Clean and perturbed hidden states of ``x`` under the streams of ``epoch``."""
        if self.source is None:
            raise RuntimeError(
                "PerturbationStreams.measure is available during a fit (after setup)"
            )
        self.source.on_train_epoch_start(epoch)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]), auxiliary_pass(net):
                clean = net.trajectory(x)
                noisy = net.trajectory(self.source.perturb(x))
        finally:
            net.train(was_training)
        return clean, noisy

    def _log_scalars(
        self, trainer: pl.Trainer, distances: Tensor, members: Optional[Tensor]
    ) -> None:
        width = max(2, len(str(len(distances) - 1)))
        metrics = {
            f"perturbation/layer_{t:0{width}d}": float(d)
            for t, d in enumerate(distances)
            if torch.isfinite(d)
        }
        ratio = amplification(distances)
        if ratio is not None:
            metrics["perturbation/amplification"] = ratio
        if members is not None:
            ratios = [amplification(d) for d in members]
            if all(r is not None for r in ratios):
                metrics.update(member_scalars("perturbation/amplification", torch.tensor(ratios)))
        log_metrics(trainer, metrics)
        if self.histograms:
            add_histogram(trainer, "perturbation/distance_over_layers", distances)


def _draw_members(fig: Figure, members: Tensor) -> None:
    """Each member's distances as a thin curve on the distance-vs-depth axes."""
    ax = fig.axes[0]
    depth = np.arange(members.shape[1])
    for k, distances in enumerate(members.numpy()):
        keep = np.isfinite(distances) & (distances > 0)
        ax.plot(depth[keep], distances[keep], lw=0.8, alpha=0.7, label=f"member {k}")
    ax.legend(loc="best", fontsize="small")


def _cpu(values: Optional[Tensor]) -> Optional[Tensor]:
    return None if values is None else values.float().cpu()


def _given(value: Any, default: Any) -> Any:
    """``value`` unless it is None."""
    return default if value is None else value
