"""SolverStatistics: forward iterations, residuals, failures and adjoint-solve depth per layer."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from irnet._misc import check_int
from irnet.analysis.fidelity import gradient_cosine
from irnet.nets import find_blocks
from irnet.nets.ensemble import rows_of

from ._data import batch_inputs, module_members
from ._logging import (
    add_histogram,
    allow_unsynced_epoch_logs,
    layer_tag,
    log_metrics,
    member_scalars,
)
from ._schedule import check_bool
from .solver_recorder import (
    REDUCTIONS,
    LayerAccumulator,
    MemberAccumulator,
    SolverStatsRecorder,
    StepStats,
    finished_by,
    layer_vectors,
    over_layers,
    stacked_rows,
)

PER_LAYER_KEYS = ("iterations_mean", "iterations_max", "residual_max", "not_converged")
HISTOGRAM_KEYS = ("iterations_mean", "iterations_max", "residual_max")
DIRECTIONS = ("forward", "backward")


class SolverStatistics(Callback):
    """Logs what the forward (nonlinear) and backward (adjoint) solves of every layer did.

    Per training step, for ``forward`` and ``backward``: ``iterations_mean``
    (mean over the batch, then over layers), ``iterations_max``,
    ``residual_mean``, ``residual_max`` (forward: absolute ``‖r(y)‖``; backward:
    relative), ``not_converged`` and ``diverged`` (sample counts summed over
    layers: zero when all is well). Tags are ``solver/forward_iterations_mean``
    etc., with Lightning's ``_step`` / ``_epoch`` suffixes (epoch values reduce
    means by mean, maxima by max and counts by sum). Backward tags appear only
    for layers that ran an adjoint solve (not for θ = 0, nor in unrolled mode);
    explicit θ = 0 layers count 0 forward iterations.

    Chained solvers (:class:`~irnet.solvers.Fallback`): ``solver/finished_by/<Method>``
    is the fraction of the step's samples (pooled over such layers) that each
    method finished, e.g. ``solver/finished_by/Broyden``; the epoch value is
    the fraction over the epoch's samples (and ``val_solver/…`` for validation).

    With ``per_layer`` the same per layer under
    ``solver_layers/<direction>_<name>/layer_<t>`` (t = 1…T, for the names in
    ``PER_LAYER_KEYS``). With ``histograms``, at each training epoch end the
    epoch means of each layer go to TensorBoard histograms
    ``solver/<direction>_<name>_over_layers``. With ``validation``, the forward
    statistics of validation batches are logged per epoch under
    ``val_solver/…``.

    Forward statistics are those of each block's first call in the step (the
    main pass; extra passes such as R_rnd's perturbation streams are left out,
    as in the module's ``iters``); backward statistics are the block's last
    adjoint solve of the step.

    Gradient fidelity: with ``fidelity_every_n_epochs`` = n, every n-th training
    epoch ends with the cosine similarity between the parameter gradient the
    blocks' adjoint solvers give and the exact one (a tight GMRES adjoint), on
    up to ``fidelity_samples`` samples of the epoch's last batch, logged as
    ``solver/gradient_cosine`` (:func:`irnet.analysis.fidelity.gradient_cosine`): what a
    :class:`~irnet.linear.JacobianFree` or :class:`~irnet.linear.Phantom`
    shortcut costs in direction (1: none). ``None`` (default) turns it on, every
    10 epochs, only when some block uses such a shortcut; 0 turns it off.

    Ensembles (``ODENet(ensemble=E)``): a solve's samples are the ensemble's rows, every
    member's copy of every input, so the tags above pool the members: a mean is the mean over
    members of each member's mean, a maximum the maximum over members, a count the sum over
    members. With ``per_member`` each training epoch also ends with one value per member
    ``k``, logged once per epoch (to every logger, rank 0):
    ``solver/forward_iterations_mean/member_<k>`` and
    ``solver/backward_iterations_mean/member_<k>`` (the epoch's mean over steps, layers
    and the member's samples), ``solver/forward_not_converged/member_<k>`` (the epoch's count),
    each with ``…/std``, the spread across members. The gradient-fidelity cosine is that of
    all members' gradients together.

    Args:
        per_layer: also log one scalar per layer and statistic.
        histograms: write histograms over layers to TensorBoard each epoch.
        validation: also log the forward statistics of validation batches.
        sync_dist: reduce the values over processes under DDP (one collective
            per value and step, on every rank alike). Without it each rank logs
            its own batches' statistics and rank 0's reach the logger.
        fidelity_every_n_epochs: epochs between gradient-fidelity probes
            (``None``: 10 if a block's adjoint is approximate, else off; 0: off).
        fidelity_samples: the most samples of the probe batch.
        per_member: for an ensemble, log each member's epoch values (above).
    """

    def __init__(
        self,
        per_layer: bool = True,
        histograms: bool = True,
        validation: bool = True,
        sync_dist: bool = False,
        fidelity_every_n_epochs: Optional[int] = None,
        fidelity_samples: int = 64,
        per_member: bool = True,
    ) -> None:
        self.per_layer = check_bool("per_layer", per_layer)
        self.histograms = check_bool("histograms", histograms)
        self.validation = check_bool("validation", validation)
        self.sync_dist = check_bool("sync_dist", sync_dist)
        if fidelity_every_n_epochs is not None:
            fidelity_every_n_epochs = check_int(
                "fidelity_every_n_epochs", fidelity_every_n_epochs, 0
            )
        self.fidelity_every_n_epochs = fidelity_every_n_epochs
        self.fidelity_samples = check_int("fidelity_samples", fidelity_samples, 1)
        self.per_member = check_bool("per_member", per_member)
        self._members = 1
        self._member_epoch = MemberAccumulator()
        self._recorder = SolverStatsRecorder()
        self._epoch = LayerAccumulator()
        self._fidelity_every = 0
        self._probe: Optional[tuple[Tensor, Tensor]] = None

    # -- set-up ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        blocks = find_blocks(pl_module)
        if not blocks:
            rank_zero_warn(
                "SolverStatistics found no ImplicitResidualBlock in the module; it logs nothing."
            )
        self._recorder.attach(blocks)
        self._fidelity_every = self._fidelity_schedule(blocks)
        self._members = module_members(pl_module)
        if not self.sync_dist:
            allow_unsynced_epoch_logs(trainer, ("solver", "val_solver"))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._recorder.detach()

    # -- training ------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch.reset()
        self._member_epoch.reset()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._recorder.start()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = self._recorder.stop()
        if step is None:
            return
        self._log(pl_module, step, "solver", on_step=True, batch=batch)
        if self._fidelity_every and isinstance(batch, (list, tuple)) and len(batch) >= 2:
            self._probe = (batch[0][: self.fidelity_samples], batch[1][: self.fidelity_samples])
        if self.histograms:
            for direction in DIRECTIONS:
                vectors = layer_vectors(getattr(step, direction))
                for key in HISTOGRAM_KEYS:
                    self._epoch.add(f"{direction}_{key}", vectors[key])
        if self.per_member and self._members > 1:
            self._add_members(step, batch)

    def _add_members(self, step: StepStats, batch: Any) -> None:
        """Each member's iterations (mean over layers and its samples) and failed solves."""
        x = batch_inputs(batch)
        weight = float(x.shape[0]) if x is not None and x.dim() > 0 else 1.0
        for direction in DIRECTIONS:
            iterations = stacked_rows(getattr(step, direction), "iterations")
            if iterations is not None:  # (layers, rows) → (E, layers, batch)
                per_member = rows_of(iterations.T, self._members).mean((1, 2))
                self._member_epoch.add(f"{direction}_iterations_mean", per_member, weight)
        converged = stacked_rows(step.forward, "converged")
        if converged is not None:
            failed = rows_of((1 - converged).T, self._members).sum((1, 2))
            self._member_epoch.add("forward_not_converged", failed)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self._fidelity_every
            and self._probe is not None
            and (trainer.current_epoch + 1) % self._fidelity_every == 0
        ):
            self._log_fidelity(pl_module)
        if self.per_member and self._members > 1:
            self._log_members(trainer)
        if not (self.histograms and trainer.is_global_zero):
            return
        for direction in DIRECTIONS:
            for key in HISTOGRAM_KEYS:
                values = self._epoch.mean(f"{direction}_{key}")
                if values is not None:
                    add_histogram(trainer, f"solver/{direction}_{key}_over_layers", values)

    def _log_members(self, trainer: pl.Trainer) -> None:
        metrics: dict[str, float] = {}
        for name in self._member_epoch.names():
            how = (
                self._member_epoch.total
                if name.endswith("not_converged")
                else self._member_epoch.mean
            )
            metrics.update(member_scalars(f"solver/{name}", how(name)))
        log_metrics(trainer, metrics)

    # -- gradient fidelity -------------------------------------------------------------------
    def _fidelity_schedule(self, blocks: list) -> int:
        if self.fidelity_every_n_epochs is not None:
            return self.fidelity_every_n_epochs
        approximate = any(b.linear_solver.approximate for b in blocks)
        return 10 if approximate else 0

    def _log_fidelity(self, pl_module: pl.LightningModule) -> None:
        x, target = self._probe
        net = getattr(pl_module, "net", pl_module)
        if not hasattr(net, "blocks"):
            return
        if self._members > 1:  # the prediction has every member's row of every sample
            target = target.repeat_interleave(self._members, 0)

        def loss() -> Tensor:
            pred = pl_module(x)
            if hasattr(pl_module, "compute_loss"):
                return pl_module.compute_loss(pred, target)
            if target.is_floating_point():
                return nn.functional.mse_loss(pred, target)
            return nn.functional.cross_entropy(pred, target)

        cosine = gradient_cosine(net, loss)
        pl_module.log(
            "solver/gradient_cosine",
            cosine,
            on_step=False,
            on_epoch=True,
            batch_size=x.shape[0],
            sync_dist=self.sync_dist,
        )

    # -- validation ----------------------------------------------------------------------
    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.validation:
            self._recorder.start()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        step = self._recorder.stop() if self.validation else None
        if step is not None:
            self._log(
                pl_module,
                StepStats(step.forward, [None] * len(step.forward)),
                "val_solver",
                on_step=False,
                batch=batch,
            )

    # -- logging ----------------------------------------------------------------------------
    def _log(
        self, pl_module: pl.LightningModule, step: StepStats, group: str, on_step: bool, batch: Any
    ) -> None:
        """Log the layer-averaged summaries and, if asked, the per-layer ones.

        Which tags are logged depends only on the network's structure (which
        layers have stats), never on the values, so every DDP rank logs the
        same names.
        """
        x = batch_inputs(batch)
        batch_size = int(x.shape[0]) if x is not None and x.dim() > 0 else 1
        layers = len(step.forward)
        for direction in DIRECTIONS:
            summaries = {
                i: s.summary() for i, s in enumerate(getattr(step, direction)) if s is not None
            }
            for key, value in over_layers(list(summaries.values())).items():
                self._log_value(
                    pl_module, f"{group}/{direction}_{key}", value, key, on_step, batch_size
                )
            if not self.per_layer:
                continue
            for i, summary in summaries.items():
                for key in PER_LAYER_KEYS:
                    tag = layer_tag(f"{group}_layers", f"{direction}_{key}", i, layers)
                    self._log_value(pl_module, tag, summary[key], key, on_step, batch_size)
        for name, fraction in finished_by(step.forward, self._recorder.blocks).items():
            pl_module.log(
                f"{group}/finished_by/{name}",
                fraction,
                on_step=on_step,
                on_epoch=True,
                reduce_fx="mean",
                sync_dist=self.sync_dist,
                batch_size=batch_size,
            )

    def _log_value(
        self,
        pl_module: pl.LightningModule,
        name: str,
        value: Tensor,
        key: str,
        on_step: bool,
        batch_size: Optional[int],
    ) -> None:
        pl_module.log(
            name,
            value,
            on_step=on_step,
            on_epoch=True,
            reduce_fx=REDUCTIONS[key],
            sync_dist=self.sync_dist,
            batch_size=batch_size,
        )
