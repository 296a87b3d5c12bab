"""Figures: the paper's pictures (Figs. 5, 7, 8, 9) to TensorBoard images and PNG files."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from irnet._misc import check_int
from irnet.analysis.plotting import (
    VectorField,
    plot_decision_regions,
    plot_layer_curves,
    plot_regression,
    plot_trajectories,
    plot_vector_fields,
)
from irnet.nets import ImplicitODENet, auxiliary_pass, find_blocks
from irnet.nets.ensemble import rows_of

from ._data import (
    class_labels,
    find_net,
    is_classification,
    member_slab,
    module_members,
    target_function,
    to_module,
    training_data,
    validation_data,
)
from ._logging import emit_figure
from ._schedule import EveryNEpochs, check_bool
from .solver_recorder import LayerAccumulator, SolverStatsRecorder, layer_vectors

KINDS = ("output", "trajectories", "fields", "decision", "iterations")


class Figures(Callback):
    """Every N epochs (and after the last), draws what applies to the network and data.

    * ``output`` (1-D regression, Figs. 7–8 right): the network on a
      ``grid_size``-point grid over the training and validation inputs' range,
      the target curve, the training points. The target is the data module's
      ``target(x)`` on the same grid when it has one (``SineRegression``),
      else the validation points joined up.
    * ``trajectories`` (flat states, Figs. 7–8): hidden states
      ``y_0 → … → y_T`` of up to ``max_trajectories`` training inputs in the
      plane of the first two state components (a projection when the state has
      more), coloured by the input (1-D) or the class.
    * ``fields`` (flat states, Fig. 7): ``F_t(y)`` on a grid over the first two
      components, for the first ``field_layers`` layers, with the states
      ``y_{t−1}`` it acts on; further components are held at the batch mean of
      ``y_{t−1}``.
    * ``decision`` (classification of 2-D inputs, Fig. 9): predicted class on a
      ``grid_size``² grid over the data's bounding box (padded 10 %), with the data.
    * ``iterations`` (Fig. 5): the epoch's mean forward iterations and mean
      backward (Neumann terms / Krylov steps) per layer, over training batches.

    Images go to TensorBoard as ``figures/<kind>`` (rank 0, when there is a
    TensorBoard logger) and, with ``save_png``, to
    ``<log_dir>/figures/figures_<kind>_epoch<NNNN>.png``. Data are read from
    the trainer's training and validation dataloaders (``(x, y)`` batches).

    Ensembles (``ODENet(ensemble=E)``):

    * ``output``: one thin curve per member and their mean (thick), in one axes.
    * ``decision``: the filled regions are the class of the members' mean probabilities
      (the ensemble's prediction); each member's own decision boundary is drawn over them as
      a line of its colour, so where the members disagree shows at a glance.
    * ``trajectories`` and ``fields``: member 0's (its states and its ``F_t``), said in the
      title: E overlaid trajectory bundles would hide each other.
    * ``iterations``: the mean over members, and each member's forward iterations per layer
      as a thin curve.

    Args:
        every_n_epochs: draw after every N-th training epoch (0: only after training).
        kinds: which figures to draw (default: all of :data:`KINDS` that apply).
        grid_size: points per axis of the output and decision grids.
        field_grid_size: arrows per axis of the vector fields.
        max_points: the most training/validation samples read for a figure.
        max_trajectories: the most trajectories drawn.
        field_layers: how many of the first layers get a vector-field panel.
        save_png: also save PNG files beside the logs.
        dpi: resolution of the PNG files.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        kinds: Optional[list[str]] = None,
        grid_size: int = 200,
        field_grid_size: int = 20,
        max_points: int = 2048,
        max_trajectories: int = 64,
        field_layers: int = 3,
        save_png: bool = True,
        dpi: int = 100,
    ) -> None:
        self.schedule = EveryNEpochs("every_n_epochs", every_n_epochs)
        kinds = list(KINDS) if kinds is None else list(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty list drawn from {KINDS}, got {kinds!r}")
        self.kinds = kinds
        self.grid_size = check_int("grid_size", grid_size, 2)
        self.field_grid_size = check_int("field_grid_size", field_grid_size, 2)
        self.max_points = check_int("max_points", max_points, 1)
        self.max_trajectories = check_int("max_trajectories", max_trajectories, 1)
        self.field_layers = check_int("field_layers", field_layers, 1)
        self.save_png = check_bool("save_png", save_png)
        self.dpi = check_int("dpi", dpi, 10)
        self._recorder = SolverStatsRecorder()
        self._iterations = LayerAccumulator()
        self._members = 1
        self._warned = False

    # -- Fig. 5 data: solver iterations per layer over the epoch ----------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.schedule.reset()
        self._members = module_members(pl_module)
        if "iterations" in self.kinds:
            self._recorder.attach(find_blocks(pl_module))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._recorder.detach()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._iterations.reset()

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
        if step is not None:
            self._iterations.add("forward", layer_vectors(step.forward)["iterations_mean"])
            self._iterations.add("backward", layer_vectors(step.backward)["iterations_mean"])
            if self._members > 1:
                self._iterations.add("forward_members", self._member_iterations(step.forward))

    def _member_iterations(self, stats: list) -> Tensor:
        """Each member's mean forward iterations per layer, ``(layers, E)``, NaN where a layer
        has no statistics."""
        present = [t for t, s in enumerate(stats) if s is not None]
        values = torch.full((len(stats), self._members), float("nan"))
        if present:
            iterations = torch.stack([stats[t].iterations.float() for t in present])
            per_member = rows_of(iterations.T, self._members).mean(1).T  # (layers', E)
            values = values.to(per_member.device)
            values[present] = per_member
        return values

    # -- drawing -----------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.schedule.due(epoch):
            self.draw(trainer, pl_module, epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.pending_at_end():
            self.draw(trainer, pl_module, self.schedule.last_epoch)

    def draw(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> dict[str, Figure]:
        """Draw every applicable figure and send it out (rank 0 only).

        Returns:
            kind → Figure, for the figures drawn.
        """
        self.schedule.mark(epoch)
        if not trainer.is_global_zero:
            return {}
        figures = self.make_figures(trainer, pl_module, epoch)
        for kind, fig in figures.items():
            emit_figure(trainer, f"figures/{kind}", fig, self.save_png, epoch=epoch, dpi=self.dpi)
        return figures

    def make_figures(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> dict[str, Figure]:
        """The figures for the current state of the network (no output is written)."""
        figures: dict[str, Figure] = {}
        if "iterations" in self.kinds:
            fig = self._iterations_figure(epoch)
            if fig is not None:
                figures["iterations"] = fig
        net = find_net(pl_module)
        data = training_data(trainer, self.max_points)
        if net is None or data is None:
            if net is None and not self._warned and set(self.kinds) - {"iterations"}:
                rank_zero_warn(
                    "Figures needs pl_module.net to be an irnet ImplicitODENet for its "
                    "output, trajectory, field and decision figures."
                )
                self._warned = True
            return figures
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad(), auxiliary_pass(net):
                figures.update(self._network_figures(trainer, pl_module, net, data, epoch))
        finally:
            net.train(was_training)
        return figures

    def _network_figures(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        net: ImplicitODENet,
        data: tuple[Tensor, Tensor],
        epoch: int,
    ) -> dict[str, Figure]:
        x, y = data
        figures: dict[str, Figure] = {}
        flat = x.dim() == 2
        classification = is_classification(pl_module)
        title = f"epoch {epoch}"
        if "output" in self.kinds and flat and x.shape[1] == 1 and not classification:
            figures["output"] = self._output_figure(trainer, pl_module, net, x, y, title)
        if "decision" in self.kinds and flat and x.shape[1] == 2 and classification:
            figures["decision"] = self._decision_figure(pl_module, net, x, y, title)
        if flat and {"trajectories", "fields"} & set(self.kinds):
            states = self._states(pl_module, net, x, y, classification)
            if states is not None:
                trajectory, colors, label = states
                if "trajectories" in self.kinds:
                    figures["trajectories"] = plot_trajectories(
                        np.stack([s[:, :2] for s in trajectory]),
                        colors,
                        title + self._member_note(),
                        label,
                    )
                if "fields" in self.kinds:
                    figures["fields"] = self._fields_figure(net, trajectory)
        return figures

    def _output_figure(self, trainer, pl_module, net, x: Tensor, y: Tensor, title: str) -> Figure:
        validation = validation_data(trainer, self.max_points)
        lo, hi = float(x.min()), float(x.max())
        if validation is not None:
            lo, hi = min(lo, float(validation[0].min())), max(hi, float(validation[0].max()))
        grid = torch.linspace(lo, hi, self.grid_size).unsqueeze(1)
        out = rows_of(net(to_module(grid, pl_module)).float().cpu(), self._members)  # (E, G, …)
        target = _target_on_grid(trainer, grid)
        if target is None and validation is not None:
            target = validation[0][:, 0], _first_column(validation[1])
        x_target, y_target = (
            (None, None) if target is None else (target[0].numpy(), target[1].numpy())
        )
        curves = out.reshape(self._members, len(grid), -1)[:, :, 0].numpy()  # (E, G)
        fig = plot_regression(
            grid[:, 0].numpy(),
            curves.mean(0),
            x[:, 0].numpy(),
            _first_column(y).numpy(),
            x_target,
            y_target,
            title,
        )
        if self._members > 1:
            _draw_member_curves(fig, grid[:, 0].numpy(), curves)
        return fig

    def _decision_figure(self, pl_module, net, x: Tensor, y: Tensor, title: str) -> Figure:
        lo, hi = x.min(0).values.float(), x.max(0).values.float()
        pad = 0.1 * (hi - lo).clamp_min(1e-6)
        axes = [
            torch.linspace(float(lo[i] - pad[i]), float(hi[i] + pad[i]), self.grid_size)
            for i in range(2)
        ]
        gx, gy = torch.meshgrid(*axes, indexing="xy")
        logits = net(to_module(torch.stack([gx.flatten(), gy.flatten()], 1), pl_module))
        logits = rows_of(logits.float().cpu(), self._members)  # (E, G², classes)
        if self._members == 1:
            predicted = _classes(logits[0])
        else:  # the ensemble's prediction: the class of the members' mean probabilities
            predicted = _classes(_probabilities(logits).mean(0), probabilities=True)
            title = f"{title}, {self._members} members: fill = mean probability"
        fig = plot_decision_regions(
            gx.numpy(),
            gy.numpy(),
            predicted.view_as(gx).numpy(),
            x.float().numpy(),
            class_labels(y).numpy(),
            title,
        )
        if self._members > 1:
            _draw_member_boundaries(fig, gx, gy, [_classes(m).view_as(gx) for m in logits])
        return fig

    def _states(self, pl_module, net: ImplicitODENet, x: Tensor, y: Tensor, classification: bool):
        """Hidden states of up to ``max_trajectories`` inputs, their colours, the colour label."""
        if x.shape[1] == 1:  # evenly spread over the sorted inputs
            order = torch.argsort(x[:, 0])
            pick = order[
                torch.linspace(0, len(x) - 1, min(self.max_trajectories, len(x))).round().long()
            ]
        else:
            pick = torch.arange(min(self.max_trajectories, len(x)))
        states = [
            member_slab(s, self._members, 0).float().cpu()
            for s in net.trajectory(to_module(x[pick], pl_module))
        ]
        if states[0].dim() != 2 or states[0].shape[1] < 2:
            return None
        if classification:
            return states, class_labels(y[pick]).float().numpy(), "class"
        if x.shape[1] == 1:
            return states, x[pick, 0].float().numpy(), "input x"
        return states, None, "sample"

    def _fields_figure(self, net: ImplicitODENet, trajectory: list[Tensor]) -> Figure:
        panels = []
        for t, block in enumerate(list(net.blocks)[: self.field_layers]):
            points = trajectory[t]
            lo, hi = points[:, :2].min(0).values, points[:, :2].max(0).values
            pad = 0.15 * (hi - lo).clamp_min(1e-3)
            axes = [
                torch.linspace(float(lo[i] - pad[i]), float(hi[i] + pad[i]), self.field_grid_size)
                for i in range(2)
            ]
            gx, gy = torch.meshgrid(*axes, indexing="xy")
            grid = points.mean(0).repeat(gx.numel(), 1)
            grid[:, 0], grid[:, 1] = gx.flatten(), gy.flatten()
            param = next(block.parameters(), None)
            if param is not None:
                grid = grid.to(device=param.device, dtype=param.dtype)
            # an ensemble's F takes every member's rows: member 0's field is slab 0
            rows = grid.repeat_interleave(self._members, 0)
            field = member_slab(block.F(rows), self._members, 0).float().cpu()
            panels.append(
                VectorField(
                    gx.numpy(),
                    gy.numpy(),
                    field[:, 0].view_as(gx).numpy(),
                    field[:, 1].view_as(gx).numpy(),
                    points[:, :2].numpy(),
                    f"$F_{{{t + 1}}}(y)$, θ={block.theta:g}" + self._member_note(),
                )
            )
        return plot_vector_fields(panels)

    def _member_note(self) -> str:
        return f", member 0 of {self._members}" if self._members > 1 else ""

    def _iterations_figure(self, epoch: int) -> Optional[Figure]:
        forward, backward = self._iterations.mean("forward"), self._iterations.mean("backward")
        if forward is None:
            return None
        mean = " (mean over members)" if self._members > 1 else ""
        curves = {f"forward (nonlinear solve){mean}": forward.cpu().numpy()}
        if backward is not None and bool(torch.isfinite(backward).any()):
            curves[f"backward (adjoint solve){mean}"] = backward.cpu().numpy()
        members = self._iterations.mean("forward_members")
        if members is not None:
            for k, values in enumerate(members.T.cpu().numpy()):
                curves[f"forward, member {k}"] = values
        return plot_layer_curves(
            curves, ylabel="mean iterations", title=f"epoch {epoch}", log_scale=False
        )


def _target_on_grid(trainer: pl.Trainer, grid: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """The data module's target function on ``grid`` (``(G, 1)``), as ``(x, f(x))``, or None."""
    target = target_function(trainer)
    if target is None:
        return None
    try:
        values = torch.as_tensor(target(grid)).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        return None  # another signature: fall back to the validation points
    if values.numel() != len(grid):
        return None
    return grid[:, 0], _first_column(values)


def _classes(values: Tensor, probabilities: bool = False) -> Tensor:
    """The predicted class of each row of logits (one logit: positive is class 1) or of
    probabilities."""
    if values.shape[1] == 1:
        return (values[:, 0] > (0.5 if probabilities else 0.0)).long()
    return values.argmax(1)


def _probabilities(logits: Tensor) -> Tensor:
    """Class probabilities of logits ``(…, classes)``: softmax, or a sigmoid for one logit."""
    return torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, -1)


def _draw_member_curves(fig: Figure, grid: np.ndarray, curves: np.ndarray) -> None:
    """Each member's output as a thin curve over the mean's (``curves``: ``(E, G)``)."""
    ax = fig.axes[0]
    for line in ax.lines:
        if line.get_label() == "network":
            line.set_label(f"mean of {len(curves)} members")
            line.set_linewidth(2.5)
    for k, values in enumerate(curves):
        ax.plot(grid, values, lw=0.8, alpha=0.8, color=f"C{(k + 4) % 10}", label=f"member {k}")
    ax.legend(loc="best", fontsize="small")


def _draw_member_boundaries(fig: Figure, gx: Tensor, gy: Tensor, predicted: list[Tensor]) -> None:
    """Each member's decision boundary (where its predicted class changes) as a line."""
    ax = fig.axes[0]
    handles = []
    for k, classes in enumerate(predicted):
        color = f"C{(k + 4) % 10}"
        low, top = int(classes.min()), int(classes.max())
        if top > low:  # a member that predicts one class everywhere has no boundary
            levels = np.arange(low, top) + 0.5
            ax.contour(gx.numpy(), gy.numpy(), classes.numpy(), levels=levels, colors=[color])
        handles.append(Line2D([], [], color=color, label=f"member {k}"))
    ax.legend(handles=handles, loc="best", fontsize="small")


def _first_column(y: Tensor) -> Tensor:
    """The first output of each sample as a 1-D float tensor."""
    return y.reshape(len(y), -1)[:, 0].float()
