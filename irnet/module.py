"""The LightningModule that trains an implicit network, with the paper's regularisers.

Extension points for subclasses (see ``docs/subclassing.md``):

* the network: pass any ``nn.Module`` as ``net`` (an
  :class:`~irnet.nets.ImplicitODENet` gives the regularisers its hidden states);
* :meth:`ImplicitNetModule.trajectory` / :meth:`ImplicitNetModule.readout`: how
  hidden states and outputs are obtained from the network — the one forward
  path of every stage (train, validate, test, predict) and of R_rnd's
  perturbed pass;
* :meth:`ImplicitNetModule.compute_loss`: the data loss;
* :meth:`ImplicitNetModule.regularization`: the penalties added in training
  (each logged as ``train/<name>``);
* the perturbation of R_rnd: ``r_rnd.perturbation`` (a
  :class:`~irnet.perturbations.Perturbation`), in the config or at run time;
* :meth:`ImplicitNetModule.configure_optimizers`.

Loud failure (:mod:`irnet.failure`, on by default): a NaN/Inf loss, gradient or
parameter, or a layer whose forward solves keep failing, stops the run with a
:class:`~irnet.failure.TrainingFailure` naming the statistic and where. Under
distributed training every rank stops at the same step with the same message:
the one all-reduce of a step (the global means) also carries whether some rank
failed, so a rank's own failure (a NaN layer input) is raised by all.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, NoReturn, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError

from irnet._misc import check_choice, check_int, check_positive, sample_norm
from irnet.device_path import on_accelerator_path
from irnet.failure import (
    FailingStreaks,
    StoppedMembers,
    TrainingFailure,
    diagnosis,
    find,
    first_failure,
    listing,
    merged_diagnosis,
    nonfinite_gradients,
    nonfinite_parameters,
    nonfinite_tensors,
    rank_note,
    stop_together,
)
from irnet.layer import NonFiniteInputError, check_inputs_finite
from irnet.nets import TrajectoryNetwork, find_blocks
from irnet.nets.ensemble import clip_member_gradients, members_of, rows_of
from irnet.nets.warm_start_merge import merge_warm_starts
from irnet.regularizers import (
    DivergenceRegularizer,
    FixedPointRegularizer,
    JacobianRegularizer,
    MagnitudeRegularizer,
    PerturbationRegularizer,
    Regularizer,
    ResidualRegularizer,
    TotalVariationRegularizer,
)
from irnet.stats import flush_failure_warnings, reset_convergence_warnings

LOSSES = ("l2", "mse", "cross_entropy")
STAGES = ("train", "val", "test")
#: the head of the vector a step all-reduces: samples, failed ranks, values per rank (then the
#: values)
STEP_HEAD = 3


def l2_loss(pred: Tensor, target: Tensor) -> Tensor:
    """The paper's L2 loss: mean over samples of ``‖pred − target‖₂`` (not squared)."""
    return sample_norm(pred - target).mean()


def _described_by_config() -> bool:
    """Whether LightningCLI is instantiating the module (it then hands the config to hparams)."""
    try:  # private in Lightning; absent in old versions
        from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover
        return False
    return _given_hyperparameters.get() is not None


@dataclass(frozen=True)
class BatchShare:
    """This process's part of a global batch.

    Attributes:
        global_count: samples in the global batch (over all processes).
        weight: factor on this process's objective, ``count · world_size / global_count``:
            after DDP averages the gradients over processes, the gradient is that of
            the mean over the global batch, even when processes hold unequal parts.
    """

    global_count: int
    weight: float


class ImplicitNetModule(pl.LightningModule):
    """Train, validate, test and predict with an implicit residual network.

    The loss of a training step is ``compute_loss(pred, target) + Σ terms`` with
    the terms of :meth:`regularization` (``weight · R`` for each regulariser configured with a
    positive weight: ``r_fp``, ``r_rnd``, ``r_jac``, ``r_div``, ``r_mag``, ``r_res``, ``r_tv``).
    Logged per epoch: ``{stage}/loss`` (the data loss, comparable across
    stages), ``{stage}/mse`` (regression) or ``{stage}/acc`` (classification),
    ``{stage}/iters`` (mean forward solver iterations per layer and sample),
    and in training ``train/total`` (the minimised objective), one
    ``train/<name>`` per regularisation term and ``train/loss_step`` per step.
    The progress bar shows the losses and ``iters``.

    Under distributed training the logged values are means over the global
    batch and each process's objective is weighted by its share of it, so the
    run takes the steps of one process (``docs/distributed.md``).

    With an ensemble network (``ODENet(ensemble=E)``, docs/ensembles.md) the objective is the sum
    of the members' objectives, so each member trains as its own run; the logged values are the
    members' means, each member's are logged as ``{stage}/<metric>/member_<k>`` with their
    spread ``{stage}/<metric>/std``, gradient norms are clipped member by member, and a member
    whose numbers break is named and leaves the ensemble while the others train on
    (:class:`~irnet.failure.StoppedMembers`).

    Args:
        net: the network, e.g. :class:`~irnet.nets.ODENet`; regularisers need
            ``net.trajectory`` and ``net.blocks``.
        loss: ``"l2"`` (paper: mean of per-sample norms), ``"mse"`` or
            ``"cross_entropy"`` (classification: accuracy is the metric).
        num_classes: classes for the accuracy metric; read from the network
            (``out_features``, ``num_classes`` or ``head.out_features``) if omitted.
        lr: Adam's learning rate (paper: 1e-2).
        lr_step: epochs between learning-rate decays (paper: 500).
        lr_gamma: learning-rate factor at each decay (paper: 0.7).
        weight_decay: Adam's weight decay.
        r_fp: the fixed-point regulariser R_fp (eq. 9), or ``None``.
        r_rnd: the perturbation regulariser R_rnd (eq. 10), or ``None``.
        r_jac: the Jacobian regulariser R_jac (Bai et al. 2021), or ``None``.
        check_finite: stop the run with a :class:`~irnet.failure.TrainingFailure`
            on a NaN/Inf training loss (before backward), gradient (before the
            optimizer step), parameter (after each step, and in a
            checkpoint being loaded), or a layer's output made NaN by a diverged
            forward solve; the message names the parameters or layers. Nothing
            is checkpointed on the way out, so the newest checkpoint is the last
            good one. Under ``16-mixed`` precision the gradient scaler handles
            non-finite gradients itself and they are not checked.
        max_failing_steps: stop the fit when a layer's fraction of unconverged
            forward solves exceeds ``failing_fraction`` in this many consecutive
            training steps; ``None`` switches the check off.
        failing_fraction: the threshold of ``max_failing_steps``, in [0, 1).
        r_div: the authors' divergence regulariser R_div (σ of the time-weighted
            divergence of F along the trajectory), or ``None``.
        r_mag: the authors' magnitude regulariser R_mag (Σ_t ‖F_t(y_t)‖²), or ``None``.
        r_res: the authors' residual regulariser R_res (the layers' equations'
            residuals at the detached states), or ``None``.
        r_tv: the authors' total variation R_tv of consecutive layers' weights, or ``None``.

    The seven regularisers are keyword arguments, not a list, so that each is one
    dotted override on the command line (``--model.r_div.init_args.weight 0.1``), a
    saved config names each by its key, and the four added after ``failing_fraction``
    leave the positions and saved configs of the arguments before them as they were.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: str = "l2",
        num_classes: Optional[int] = None,
        lr: float = 1e-2,
        lr_step: int = 500,
        lr_gamma: float = 0.7,
        weight_decay: float = 0.0,
        r_fp: Optional[FixedPointRegularizer] = None,
        r_rnd: Optional[PerturbationRegularizer] = None,
        r_jac: Optional[JacobianRegularizer] = None,
        check_finite: bool = True,
        max_failing_steps: Optional[int] = 50,
        failing_fraction: float = 0.5,
        r_div: Optional[DivergenceRegularizer] = None,
        r_mag: Optional[MagnitudeRegularizer] = None,
        r_res: Optional[ResidualRegularizer] = None,
        r_tv: Optional[TotalVariationRegularizer] = None,
    ) -> None:
        super().__init__()
        # Under LightningCLI the hparams are the config (class_path/init_args), so
        # load_from_checkpoint can rebuild the network; a net passed as an object
        # is saved in the state dict only.
        self.save_hyperparameters(ignore=[] if _described_by_config() else ["net"])
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be an nn.Module, got {type(net).__name__}")
        self.net = net
        #: an ensemble's members that broke, named and dropped while the others train on
        self.stopped_members = StoppedMembers(members_of(net)) if members_of(net) > 1 else None
        self.loss_name = check_choice("loss", loss, LOSSES)
        self._set_optimiser_args(lr, lr_step, lr_gamma, weight_decay)
        self.regularizers: dict[str, Regularizer] = self._collect_regularizers(
            r_fp=r_fp,
            r_rnd=r_rnd,
            r_jac=r_jac,
            r_div=r_div,
            r_mag=r_mag,
            r_res=r_res,
            r_tv=r_tv,
        )
        if not isinstance(check_finite, bool):
            raise ValueError(f"check_finite must be true or false, got {check_finite!r}")
        self.check_finite = check_finite
        self.failing = FailingStreaks(max_failing_steps, failing_fraction)
        self._reduce_capacity = 0  # values the step's all-reduce holds (grows with the first steps)
        self.classification = self.loss_name == "cross_entropy"
        metrics = self._make_metrics(num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @property
    def members(self) -> int:
        """Networks trained at once (``ensemble: E``, less any stopped): the objective is the sum
        of theirs."""
        return members_of(self.net)

    @property
    def member_ids(self) -> list[int]:
        """The original number of each live member, by position (``[0]`` for one network)."""
        return [0] if self.stopped_members is None else self.stopped_members.ids

    def _set_optimiser_args(
        self, lr: float, lr_step: int, lr_gamma: float, weight_decay: float
    ) -> None:
        self.lr = check_positive("lr", lr)
        self.lr_step = check_int("lr_step", lr_step, 1)
        if (
            isinstance(lr_gamma, bool)
            or not isinstance(lr_gamma, (int, float))
            or not 0 < lr_gamma <= 1
        ):
            raise ValueError(f"lr_gamma must be a number in (0, 1], got {lr_gamma!r}")
        self.lr_gamma = float(lr_gamma)
        if (
            isinstance(weight_decay, bool)
            or not isinstance(weight_decay, (int, float))
            or not weight_decay >= 0
        ):
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        self.weight_decay = float(weight_decay)

    def _collect_regularizers(self, **given: Optional[Regularizer]) -> dict[str, Regularizer]:
        found = {}
        for name, reg in given.items():
            if reg is not None and not isinstance(reg, Regularizer):
                raise ValueError(
                    f"{name} must be an irnet.regularizers.Regularizer or None, "
                    f"got {type(reg).__name__}"
                )
            if reg is not None:
                found[name] = reg
        active = [name for name, reg in found.items() if reg.active]
        if active and not isinstance(self.net, TrajectoryNetwork):
            raise ValueError(
                f"{', '.join(active)} need{'s' if len(active) == 1 else ''} a network with "
                ".trajectory() and .blocks (an irnet.nets.ImplicitODENet), got "
                f"{type(self.net).__name__}"
            )
        for name in active:
            found[name].check_network(self.net)
        return found

    @property
    def r_fp(self) -> Optional[FixedPointRegularizer]:
        """The fixed-point regulariser, if configured."""
        return self.regularizers.get("r_fp")

    @property
    def r_rnd(self) -> Optional[PerturbationRegularizer]:
        """The perturbation regulariser, if configured."""
        return self.regularizers.get("r_rnd")

    @property
    def r_jac(self) -> Optional[JacobianRegularizer]:
        """The Jacobian regulariser, if configured."""
        return self.regularizers.get("r_jac")

    @property
    def r_div(self) -> Optional[DivergenceRegularizer]:
        """The divergence regulariser, if configured."""
        return self.regularizers.get("r_div")

    @property
    def r_mag(self) -> Optional[MagnitudeRegularizer]:
        """The magnitude regulariser, if configured."""
        return self.regularizers.get("r_mag")

    @property
    def r_res(self) -> Optional[ResidualRegularizer]:
        """The residual regulariser, if configured."""
        return self.regularizers.get("r_res")

    @property
    def r_tv(self) -> Optional[TotalVariationRegularizer]:
        """The total variation regulariser, if configured."""
        return self.regularizers.get("r_tv")

    def _make_metrics(self, num_classes: Optional[int]) -> MetricCollection:
        if not self.classification:
            return MetricCollection({"mse": MeanSquaredError()})
        if num_classes is None:
            num_classes = self._infer_num_classes()
        return MetricCollection(
            {"acc": MulticlassAccuracy(check_int("num_classes", num_classes, 2), average="micro")}
        )

    def _infer_num_classes(self) -> int:
        for owner, attr in (
            (self.net, "num_classes"),
            (self.net, "out_features"),
            (getattr(self.net, "head", None), "out_features"),
        ):
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                return value
        raise ValueError(
            "num_classes is required with loss='cross_entropy' when the network "
            "does not expose out_features/num_classes"
        )

    def active_regularizers(self) -> dict[str, Regularizer]:
        """The configured regularisers with a positive weight."""
        return {name: reg for name, reg in self.regularizers.items() if reg.active}

    # -- extension points -------------------------------------------------------
    # Every stage (training with or without regularisers, validation, test,
    # predict) and R_rnd's perturbed pass go through trajectory → readout, so an
    # override of either is seen everywhere.
    def forward(self, x: Tensor) -> Tensor:
        """The network's output: ``readout(trajectory(x)[-1])``."""
        return self.readout(self.trajectory(x)[-1])

    def trajectory(self, x: Tensor) -> list[Tensor]:
        """Hidden states ``[y_0, …, y_T]`` of ``x`` (what the regularisers see).

        ``net.trajectory(x)``; for a network without one (any ``nn.Module``), ``[x]``.
        """
        if self._net_has_states():
            return self.net.trajectory(x)
        return [x]

    def readout(self, y: Tensor) -> Tensor:
        """The output from the final hidden state: ``net.readout(y)``, or ``net(y)`` for a
        network without ``trajectory``/``readout`` (whose only state is its input)."""
        if self._net_has_states():
            return self.net.readout(y)
        return self.net(y)

    def _net_has_states(self) -> bool:
        return isinstance(self.net, TrajectoryNetwork)

    def compute_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The data loss of a batch, a mean over its samples (``loss`` chooses it); override for
        another loss.

        Under distributed training the module weights each process's loss by its
        share of the global batch, which is exact for a mean over samples.
        """
        if self.loss_name == "l2":
            return l2_loss(pred, target)
        if self.loss_name == "mse":
            return F.mse_loss(pred, target)
        return F.cross_entropy(pred, target)

    def regularization(self, x: Tensor, states: list[Tensor]) -> dict[str, Tensor]:
        """Penalties added to the training loss, by name: ``{"r_fp": w · R_fp, …}``.

        Args:
            x: the input batch.
            states: its clean hidden states ``[y_0, …, y_T]`` (from :meth:`trajectory`).

        Override and extend the returned dict to add penalties of your own; each
        is added to the loss and logged as ``train/<name>``. A penalty should be
        a mean over the batch's samples or independent of the batch (see
        ``docs/distributed.md``).
        """
        return {
            name: reg.weight * reg(self.net, x, states, trajectory=self.trajectory)
            for name, reg in self.active_regularizers().items()
        }

    def configure_optimizers(self) -> Any:
        """Adam with a StepLR schedule (the paper: lr 1e-2, × 0.7 every 500 epochs)."""
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=self.lr_step, gamma=self.lr_gamma
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    # -- the shared step ----------------------------------------------------------
    def _step(self, batch: Any, stage: str) -> Tensor:
        x, target = batch
        if self.members > 1:  # every member's copy of every sample (sample-major rows)
            target = target.repeat_interleave(self.members, 0)
        failure: Optional[TrainingFailure] = None
        try:
            pred, values = self._forward_values(x, target, stage)
        except TrainingFailure as err:
            if self._world() == 1:
                raise
            pred, values, failure = None, {}, err  # raised by every rank in _global_means
        means, share, host = self._global_means(values, x.shape[0], failure)
        if stage == "train":
            self._check_training_step(means, host)
        self._log_step(stage, means, share.global_count, pred, target)
        # Each row-wise mean is the members' mean: E times it is the sum of their objectives.
        total = values["total"] * self.members if self.members > 1 else values["total"]
        return total * share.weight if share.weight != 1 else total

    def _forward_values(
        self, x: Tensor, target: Tensor, stage: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The prediction and this process's batch means: loss, total, terms, iterations,
        unconverged fractions."""
        with self._named_failures(stage):
            states = self.trajectory(x)
            # The blocks there leave this check to one read here (an ensemble checks its members'
            # losses instead).
            if on_accelerator_path(states[0]) and self.members == 1:
                check_inputs_finite(states[:-1])
            pred = self.readout(states[-1])
            iters = self.forward_iterations()  # read before any regulariser re-runs the network
            failing = self.unconverged_fractions() if stage == "train" else {}
            loss = self.compute_loss(pred, target)
            terms = self.regularization(x, states) if stage == "train" else {}
        total = loss + sum(terms.values()) if terms else loss
        values = {"loss": loss, "total": total, **{f"term/{k}": v for k, v in terms.items()}}
        if self.members > 1:  # reduced with the rest (one all-reduce), read with the check's
            losses = self.member_metrics(pred, target)["loss"]
            values.update({f"member_loss/{i}": v for i, v in enumerate(losses)})
        if iters is not None:
            values["iters"] = iters
        values.update({f"unconverged/{i}": v for i, v in failing.items()})
        return pred, values

    def _world(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _global_means(
        self, values: dict[str, Tensor], count: int, failure: Optional[TrainingFailure] = None
    ) -> tuple[dict[str, Tensor], BatchShare, Optional[dict[str, float]]]:
        """Means over the global batch (all processes) of this process's batch means, its share, and
        (under distributed training) the same means read on the host.

        One all-reduce of a small vector per step under distributed training, which
        also counts the processes that failed (``failure``): if any did, every
        process raises the same :class:`~irnet.failure.TrainingFailure` here. One
        host read of it serves the share, the failure and :meth:`_check_training_step`.
        Nothing (the values themselves) on one process.
        """
        world = self._world()
        if world == 1:
            return {k: v.detach() for k, v in values.items()}, BatchShare(count, 1.0), None
        reduced, read = self._reduce_step(values, count, failure is not None)
        if read[1] > 0:
            self._raise_agreed(failure)
        global_count = int(round(read[0]))
        means = dict(zip(values, reduced[STEP_HEAD:]))
        return (
            means,
            BatchShare(global_count, count * world / global_count),
            dict(zip(values, read[STEP_HEAD:])),
        )

    def _reduce_step(
        self, values: dict[str, Tensor], count: int, failed: bool
    ) -> tuple[Tensor, list[float]]:
        """``[samples, failed processes, values per process, means …]`` over all processes, on the
        device and read.

        The all-reduced vector must have one length on every process, and a failed
        process has no values: they are padded to a capacity that every process
        holds alike and that grows (by a second all-reduce, the first step of a
        fit) when the processes report more values than it holds.
        """
        while True:
            packed = self._pack(values, count, failed)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Not strategy.reduce: it adds a barrier, a second collective (under NCCL a host
                # wait).
                torch.distributed.all_reduce(packed)
            else:
                packed = self.trainer.strategy.reduce(packed, reduce_op="sum")
            reduced = torch.cat([packed[:STEP_HEAD], packed[STEP_HEAD:] / packed[0]])
            read = reduced.tolist()  # the one host read of a step
            needed = int(round(read[2] / self._world()))
            if read[1] > 0 or needed <= self._reduce_capacity:
                return reduced, read
            self._reduce_capacity = needed

    def _pack(self, values: dict[str, Tensor], count: int, failed: bool) -> Tensor:
        """This process's ``[count, failed, number of values, count · values …]``, zero-padded to
        the capacity."""
        packed = torch.zeros(STEP_HEAD + self._reduce_capacity, device=self.device)
        packed[0], packed[1], packed[2] = float(count), float(failed), float(len(values))
        kept = min(len(values), self._reduce_capacity)
        if kept:
            local = torch.stack([v.detach().float().reshape(()) for v in values.values()])
            packed[STEP_HEAD : STEP_HEAD + kept] = local[:kept].to(packed.device) * count
        return packed

    def _gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, by rank (a collective: every process calls it at the same
        point)."""
        gathered: list[Any] = [None] * self._world()
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def _raise_agreed(self, failure: Optional[TrainingFailure]) -> NoReturn:
        """Some process failed: every process raises the lowest failing rank's message."""
        messages = self._gather(None if failure is None else str(failure))
        raise self._failure(first_failure(messages)) from failure

    # -- loud failure (irnet.failure) ----------------------------------------------
    def _failure(self, message: str) -> TrainingFailure:
        """The failure to raise; under distributed training every process raises it at this step."""
        stop_together(self._trainer)
        return TrainingFailure(message)

    def _where(self, stage: str) -> str:
        if stage == "train":
            return f"training stopped at epoch {self.current_epoch}, step {self.global_step}"
        return f"{'validation' if stage == 'val' else stage} stopped"

    def _blocks(self) -> list[nn.Module]:
        return find_blocks(self.net)

    @contextmanager
    def _named_failures(self, stage: str) -> Iterator[None]:
        """A block refusing a NaN input (made by an earlier layer) becomes a TrainingFailure naming
        that layer."""
        try:
            yield
        except NonFiniteInputError as err:
            if not self.check_finite:
                raise
            raise TrainingFailure(
                f"{self._where(stage)}: a layer's input is NaN/Inf"
                f"{rank_note(self.global_rank, self._world())}; "
                f"{diagnosis(self, self._blocks())}"
            ) from err

    def _diagnosis(self) -> str:
        """Where a non-finite loss came from; under distributed training from every process (a
        collective)."""
        if self._world() == 1:
            return diagnosis(self, self._blocks())
        return merged_diagnosis(self._gather(find(self, self._blocks())))

    def unconverged_fractions(self) -> dict[int, Tensor]:
        """Each implicit layer's fraction of unconverged forward solves in the last pass, by layer
        index."""
        if self.failing.max_steps is None:
            return {}
        return {
            i: (~b.forward_stats.converged).float().mean()
            for i, b in enumerate(self._blocks())
            if getattr(b, "forward_stats", None) is not None and getattr(b, "theta", 1) > 0
        }

    def _check_training_step(
        self, means: dict[str, Tensor], host: Optional[dict[str, float]] = None
    ) -> None:
        """Stop on a non-finite objective or a layer failing too long.

        ``host``: the means already read (distributed training); on one process
        they are read here, one host read for both checks.
        """
        keys = [k for k in means if k.startswith("unconverged/")]
        members = [k for k in means if k.startswith("member_loss/")] if self.check_finite else []
        if not self.check_finite and not keys:
            return
        if host is None:
            read = torch.stack(
                [means["total"].float().reshape(()), *(means[k].float() for k in keys + members)]
            ).tolist()
            host = dict(zip(["total", *keys, *members], read))
        where = self._where("train")
        if members:  # an ensemble: a member whose loss broke stops, the others go on
            broken = [i for i, k in enumerate(members) if not math.isfinite(host[k])]
            self._stop_members(broken, "non-finite train/loss")
        elif self.check_finite and not math.isfinite(host["total"]):
            bad = [
                "train/" + k.removeprefix("term/")
                for k in means
                if (k == "loss" or k.startswith("term/"))
                and not math.isfinite(host[k] if k in host else float(means[k]))
            ]
            raise self._failure(
                f"{where}: non-finite {', '.join(bad) or 'train/total'} ({host['total']}); "
                f"{self._diagnosis()}"
            )
        try:
            self.failing.update({int(k.split("/")[1]): host[k] for k in keys}, where)
        except TrainingFailure:
            stop_together(self._trainer)
            raise

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse a step with non-finite gradients (not applied, nothing saved)."""
        if not self.check_finite:
            return
        # (Non-finite parameters are caught by the loss of this step and after each step.)
        where = self._where("train")
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # 16-mixed: the scaler skips steps with inf gradients and lowers its scale
        grads = nonfinite_gradients(self)
        members = self.stopped_members
        if grads and members is not None:  # whose? (no further host read when all is well)
            self._stop_members(members.nonfinite_members(self.net, "grad"), "non-finite gradients")
        if members is not None and members.breaking:
            members.zero_gradients(self.net)  # the step is the others' alone
            grads = nonfinite_gradients(self)
        if grads:
            raise self._failure(
                f"{where}: non-finite gradients (before the optimizer step, not applied): "
                f"{listing(grads)}"
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then a check that it left the parameters finite (before any
        checkpoint)."""
        super().optimizer_step(*args, **kwargs)
        if self.check_finite:
            params = nonfinite_parameters(self)
            members = self.stopped_members
            if params and members is not None:
                self._stop_members(
                    members.nonfinite_members(self.net, "data"), "non-finite weights"
                )
            if members is not None and members.breaking:
                optimizer = self.trainer.optimizers[0] if self._trainer is not None else None
                members.drop(self.net, optimizer, self._where("train"))
                params = nonfinite_parameters(self)
            if params:
                raise self._failure(
                    f"{self._where('train')}: the optimizer step made parameters non-finite: "
                    f"{listing(params)}"
                )

    def _stop_members(self, positions: list[int], why: str) -> None:
        """Mark members (by position) whose numbers broke; the run fails if every one has, and
        under distributed training (DDP's buckets hold the parameters' shapes: a member cannot
        leave)."""
        if positions and self._world() > 1:
            ids = [self.member_ids[p] for p in positions]
            raise self._failure(
                f"{self._where('train')}: member(s) {ids} broke ({why}); under distributed "
                "training a member cannot leave the ensemble, so the run stops"
            )
        try:
            self.stopped_members.mark(positions, why)
        except TrainingFailure as err:
            raise self._failure(f"{self._where('train')}: {err}") from None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose weights hold NaN/Inf (it cannot give finite answers); an
        ensemble drops the members the checkpoint's run had stopped (before its weights load)."""
        stopped = checkpoint.get("stopped_members")
        if stopped is not None and self.stopped_members is not None:
            self.stopped_members.load_state_dict(stopped, self.net)
        if not self.check_finite:
            return
        state = checkpoint.get("state_dict", {})
        bad = nonfinite_tensors((k, v) for k, v in state.items() if isinstance(v, Tensor))
        if bad:
            raise self._failure(
                f"refusing a checkpoint with non-finite weights: {listing(bad)} "
                "(set check_finite: false to load it anyway)"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Under distributed training, every process's warm-start cache goes into the checkpoint; an
        ensemble's checkpoint records its members' seeds and its stopped members.

        Each process caches the fixed points of its own part of the batches, and
        rank 0 alone writes the checkpoint: the caches are merged by sample
        (:mod:`irnet.nets.warm_start_merge`), so every process finds its samples on resume.
        """
        if self._world() > 1:
            merge_warm_starts(self, checkpoint.get("state_dict", {}))
        if self.stopped_members is not None:  # which run each member is (extract-member reads it)
            checkpoint["member_seeds"] = list(self.net.member_seeds)
            checkpoint["stopped_members"] = self.stopped_members.state_dict()

    def forward_iterations(self) -> Optional[Tensor]:
        """Mean iterations of the last forward solves, over layers and samples (None if unknown)."""
        stats = [b.forward_stats for b in find_blocks(self.net) if b.forward_stats is not None]
        if not stats:
            return None
        return torch.stack([s.iterations.float().mean() for s in stats]).mean()

    def _log_step(
        self, stage: str, means: dict[str, Tensor], batch_size: int, pred: Tensor, target: Tensor
    ) -> None:
        # The values are already means over the global batch (the same on every
        # process); sync_dist only averages identical numbers.
        epoch = dict(on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
        loss = means["loss"]
        if self.members > 1:  # the members' mean, without a member that broke at this step
            loss = finite_mean_std(self._member_losses(means))[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, **epoch)
        metrics = getattr(self, f"{stage}_metrics")
        metrics(pred.detach(), target)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        iters = means.get("iters")
        if iters is not None:
            self.log(f"{stage}/iters", iters, **epoch)
        if self.members > 1:
            self._log_members(stage, means, pred, target, batch_size)
        if stage != "train":
            return
        self.log(
            "train/loss_step", means["loss"], on_step=True, on_epoch=False, batch_size=batch_size
        )
        self.log("train/total", means["total"], **epoch)
        for key, value in means.items():
            if key.startswith("term/"):
                self.log(f"train/{key[5:]}", value, **epoch)
        if iters is not None:
            self.log(
                "iters",
                iters,
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
                batch_size=batch_size,
            )

    def member_metrics(
        self, pred: Tensor, target: Tensor, losses: bool = True
    ) -> dict[str, Tensor]:
        """Each member's data loss and metric, ``(E,)`` each: ``{"loss": …, "acc" or "mse": …}``
        (without ``"loss"`` if not ``losses``).

        ``pred`` and ``target`` are the ensemble's sample-major rows.
        """
        with torch.no_grad():
            preds, targets = rows_of(pred.detach(), self.members), rows_of(target, self.members)
            values = {}
            if losses:
                values["loss"] = torch.stack(
                    [self.compute_loss(p, t) for p, t in zip(preds, targets)]
                )
            if self.classification:
                values["acc"] = (preds.argmax(-1) == targets).float().mean(1)
            else:
                values["mse"] = (preds - targets).pow(2).flatten(1).mean(1)
        return values

    def _log_members(
        self, stage: str, means: dict[str, Tensor], pred: Tensor, target: Tensor, batch_size: int
    ) -> None:
        """Per member ``{stage}/<metric>/member_<k>`` (k its original number), and the spread
        ``{stage}/<metric>/std`` over the members whose numbers are finite (the mean over
        members is ``{stage}/<metric>`` itself)."""
        metrics = self.member_metrics(pred, target, losses=False)
        metrics["loss"] = self._member_losses(means)
        logged = {}
        for name, values in metrics.items():
            logged.update(
                {f"{stage}/{name}/member_{k}": v for k, v in zip(self.member_ids, values)}
            )
            logged[f"{stage}/{name}/std"] = finite_mean_std(values)[1]
        self.log_dict(logged, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)

    def _member_losses(self, means: dict[str, Tensor]) -> Tensor:
        return torch.stack([means[f"member_loss/{i}"] for i in range(self.members)])

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: Optional[str] = None,
    ) -> None:
        """Clip as the Trainer says; an ensemble's gradient norms are clipped member by member
        (each member's step is the one its own run would take)."""
        if self.members == 1 or not gradient_clip_val or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clip_member_gradients(params, float(gradient_clip_val), self.members)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The network's output (regression values or class logits) for a batch ``x`` or
        ``(x, y)``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x)

    def _apply(self, fn, recurse: bool = True):
        # The regularisers are not modules: their last measurements follow the model here.
        super()._apply(fn, recurse)
        for reg in self.regularizers.values():
            reg.apply_to_tensors(fn)
        return self

    def setup(self, stage: str) -> None:
        # Each Trainer run (fit, validate, test, predict) warns afresh about failed solves.
        reset_convergence_warnings()

    def on_fit_start(self) -> None:
        # Every process starts from the same seed (seed_everything), so each would draw the
        # same dropout masks; ranks above 0 move to their own (rank 0 draws as one process).
        seed_rank_generators(self.global_rank)

    def on_train_start(self) -> None:
        # ... and training again after the sanity check, whose failures must not silence it.
        reset_convergence_warnings()
        self.failing.reset()

    # Solves on the accelerator path defer their convergence warnings (one host read for a step's).
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        flush_failure_warnings()

    def on_validation_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        flush_failure_warnings()

    def on_test_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        flush_failure_warnings()

    def on_predict_batch_end(
        self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        flush_failure_warnings()

    def on_train_epoch_start(self) -> None:
        # Fresh perturbations every epoch, seeded by the epoch (a resumed run repeats
        # them) and the process's rank (each process draws its own).
        for reg in self.regularizers.values():
            reg.on_train_epoch_start(self.current_epoch, self.global_rank)


def finite_mean_std(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and sample standard deviation of the finite entries of ``values`` (a member that broke
    this step is left out), without a host read (0 spread for fewer than two)."""
    finite = torch.isfinite(values)
    count = finite.sum()
    kept = torch.where(finite, values, torch.zeros_like(values))
    mean = kept.sum() / count.clamp(min=1)
    squares = torch.where(finite, (values - mean) ** 2, torch.zeros_like(values)).sum()
    return mean, (squares / (count - 1).clamp(min=1)).sqrt()


def seed_rank_generators(rank: int) -> None:
    """Give process ``rank`` its own default generators (CPU and accelerators), for dropout masks.

    Rank 0 keeps its generators, so a one-process run draws as before; rank r > 0 is
    reseeded with a well-mixed function of ``(torch.initial_seed(), r)``.
    """
    if rank == 0:
        return
    words = [torch.initial_seed(), check_int("rank", rank, 0)]
    torch.manual_seed(int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1))


class TrajectoryModule(ImplicitNetModule):
    """:class:`~irnet.module.ImplicitNetModule` with the mean squared error over the observed
    states, and a curriculum over the horizon.

    In training epoch e (from 0) the loss counts the first
    ``H(e) = min(n, horizon_start + ⌈(n − horizon_start) · e / horizon_epochs⌉)`` of the n
    observations (all of them from epoch ``horizon_epochs`` on); validation, test and the
    logged metrics always count all of them, so ``val/loss`` is the full trajectories' mean
    squared error throughout.

    Args:
        net: a network whose output is the observed states, shape ``(batch, n, features)``
            (e.g. :class:`~irnet.nets.FlowNet`).
        horizon_start: observations counted in the first epoch (observations, not steps: to
            cover the first s steps of data observed every k steps, ⌈s / k⌉; the Lotka–Volterra
            study, docs/REPORT.md §5b, found a first horizon of 25 steps too long to learn from).
        horizon_epochs: epochs over which the horizon grows to all observations; ``0`` counts
            all of them from the start (no curriculum).
        loss: ``"mse"`` (the only one).
        **kwargs: the other arguments of :class:`~irnet.module.ImplicitNetModule`.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        horizon_start: int = 1,
        horizon_epochs: int = 0,
        loss: str = "mse",
        **kwargs: Any,
    ) -> None:
        if loss != "mse":
            raise ValueError(f"TrajectoryModule trains with loss 'mse', got {loss!r}")
        super().__init__(net, loss=loss, **kwargs)
        self.horizon_start = check_int("horizon_start", horizon_start, 1)
        self.horizon_epochs = check_int("horizon_epochs", horizon_epochs, 0)

    def horizon(self, observations: int, epoch: int) -> int:
        """The observations counted by the training loss in ``epoch`` (of ``observations``).

        Example:
            >>> from irnet.nets import FlowNet
            >>> module = TrajectoryModule(FlowNet(layers=4), horizon_start=2, horizon_epochs=4)
            >>> [module.horizon(10, e) for e in range(6)]
            [2, 4, 6, 8, 10, 10]
        """
        if self.horizon_epochs == 0 or epoch >= self.horizon_epochs:
            return observations
        grown = math.ceil((observations - self.horizon_start) * epoch / self.horizon_epochs)
        return max(1, min(observations, self.horizon_start + grown))

    def compute_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The mean squared error over the first :meth:`horizon` observations in training, over
        all of them otherwise."""
        if pred.shape != target.shape:
            raise ValueError(
                f"the network's output has shape {tuple(pred.shape)} but the observed states "
                f"{tuple(target.shape)}: do the network's layers and observe_every match the "
                f"data's steps and observe_every?"
            )
        if self.training and pred.dim() > 1:
            count = self.horizon(pred.shape[1], self.current_epoch)
            pred, target = pred[:, :count], target[:, :count]
        return super().compute_loss(pred, target)
