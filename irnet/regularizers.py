"""The paper's regularisers R_fp (eq. 9) and R_rnd (eq. 10), the Jacobian regulariser R_jac
(Bai, Koltun & Kolter 2021), and the authors' regularisers along the trajectory: the divergence
R_div, the magnitude R_mag, the residual R_res and the total variation R_tv of the weights.

A regulariser is a small configurable object (so a YAML config can name it by
``class_path``) that the LightningModule calls with the network, the input
batch and the clean hidden states ``[y_0, …, y_T]`` of that batch; it returns
the *unweighted* penalty averaged over the batch. The module multiplies it by
``weight`` and adds it to the training loss.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from irnet._misc import ArgsRepr, check_choice, check_int, check_nonnegative, sample_norm
from irnet._scope import SolveScope
from irnet.nets.ensemble import members_of, rows_of
from irnet.nets.protocol import auxiliary_pass
from irnet.perturbations import GaussianPerturbation, Perturbation

DEFAULT_SIGMA = 0.05

#: Hidden states ``[y_0, …, y_T]`` of a batch (``ImplicitNetModule.trajectory``,
#: ``net.trajectory``).
Trajectory = Callable[[Tensor], list[Tensor]]


def power_weights(count: int, power: float, like: Tensor) -> Tensor:
    """``((i / count)^power for i = 1 … count)`` in the dtype and device of ``like``."""
    i = torch.arange(1, count + 1, dtype=like.dtype, device=like.device)
    return (i / count) ** power


class Regularizer(ArgsRepr):
    """Base class: a penalty added to the training loss with weight ``weight``.

    Args:
        weight: multiplier of the penalty in the loss; 0 switches it off (and
            the module then skips its computation entirely).
    """

    #: name under which the module logs the term (``train/<name>``).
    name = "reg"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = check_nonnegative("weight", weight)

    @property
    def active(self) -> bool:
        """Whether the penalty is on (``weight > 0``)."""
        return self.weight > 0

    def __call__(
        self,
        net: nn.Module,
        x: Tensor,
        states: list[Tensor],
        trajectory: Optional[Trajectory] = None,
    ) -> Tensor:
        """The unweighted penalty, a 0-d tensor differentiable in the network's weights.

        Args:
            net: the network (an :class:`~irnet.nets.ImplicitODENet`: ``.blocks``,
                ``.trajectory``).
            x: the input batch.
            states: the clean hidden states ``[y_0, y_1, …, y_T]`` of ``x``.
            trajectory: how hidden states of other inputs are computed, for a
                penalty that runs the network again (default ``net.trajectory``;
                the module passes its own :meth:`~irnet.module.ImplicitNetModule.trajectory`
                so that an override is seen here too).
        """
        raise NotImplementedError

    def apply_to_tensors(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Pass every tensor this regulariser keeps (its last measurements) through ``fn``: the
        module calls it from ``_apply``, so they follow the model to its device and dtype."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, fn(value))

    def check_network(self, net: nn.Module) -> None:
        """Refuse, with a ``ValueError``, a network this penalty cannot be computed for.

        The module calls it once, when it is built with this regulariser active; the base
        accepts every network (the module itself asks for ``trajectory`` and ``blocks``).
        """

    def on_train_epoch_start(self, epoch: int, rank: int = 0) -> None:
        """Called by the module at the start of every training epoch.

        Args:
            epoch: the epoch about to start.
            rank: the process's global rank under distributed training (0 otherwise).
        """


class FixedPointRegularizer(Regularizer):
    """R_fp = Σ_t Σ_k (k/K)^p ‖r(y_t^k)‖ over the fixed-point iterates of each layer (eq. 9).

    For layer t with input state ``y_{t-1}`` the iterates are
    ``y^0 = y_{t-1}``, ``y^{k+1} = y_{t-1} + (1−θ)F(y_{t-1}) + θF(y^k)`` and
    ``r(y^k) = y^k − y^{k+1}``; they are built with autograd (unrolled) for this
    term only, through :meth:`~irnet.ImplicitResidualBlock.fixed_point_residuals`,
    and exist only while the penalty is computed. The layer's input is detached,
    so the term of layer t is, as in the paper, a function of that layer's
    weights γ_t only. Per-sample sums are averaged over the batch. Explicit
    layers (θ = 0) contribute nothing (their fixed-point map is constant).

    Args:
        weight: weight in the loss.
        p: exponent of α_k = (k/K)^p; smaller p asks for faster convergence.
        iterations: K. ``None`` (default) uses, for each layer, the number of
            iterations its last forward solve took (the most in the batch, at
            least 1) — the iterates the forward pass actually performed (for an
            ensemble, each member's own most); an integer fixes K for every layer.
    """

    name = "r_fp"

    def __init__(
        self, weight: float = 1.0, p: float = 1.0, iterations: Optional[int] = None
    ) -> None:
        super().__init__(weight)
        self.p = check_nonnegative("p", p)
        self.iterations = None if iterations is None else check_int("iterations", iterations, 1)

    def __call__(
        self,
        net: nn.Module,
        x: Tensor,
        states: list[Tensor],
        trajectory: Optional[Trajectory] = None,
    ) -> Tensor:
        members = members_of(net)
        total = states[0].new_zeros(states[0].shape[0])
        implicit = [
            (block, y_in) for block, y_in in zip(net.blocks, states[:-1]) if block.theta != 0
        ]
        blocks = [block for block, _ in implicit]
        for (block, y_in), K in zip(implicit, self.layer_iterations(blocks, members)):
            norms = block.fixed_point_residuals(y_in.detach(), max(K))  # (K, batch)
            total = total + (self.iterate_weights(K, norms) * norms).sum(0)
        return total.mean()

    def iterate_weights(self, K: list[int], norms: Tensor) -> Tensor:
        """α_k = (k/K)^p for each iterate and row (``(max K, rows)``), with K per member (rows
        sample-major) and weight 0 past a member's own K."""
        columns = [
            torch.cat([power_weights(k, self.p, norms), norms.new_zeros(max(K) - k)]) for k in K
        ]
        return torch.stack(columns, 1).repeat(1, norms.shape[1] // len(K))

    def layer_iterations(self, blocks: list[nn.Module], members: int = 1) -> list[list[int]]:
        """K for each block and member: fixed, or the iterations of the block's last forward solve
        (the most over the member's samples; one host read for all)."""
        if self.iterations is not None:
            return [[self.iterations] * members] * len(blocks)
        known = [b for b in blocks if b.forward_stats is not None]
        most = (
            torch.stack(
                [rows_of(b.forward_stats.iterations, members).amax(1) for b in known]
            ).tolist()
            if known
            else []
        )
        taken = dict(zip(map(id, known), most))
        return [
            [max(1, int(k)) for k in taken[id(b)]]
            if id(b) in taken
            else [b.solver.max_iter] * members
            for b in blocks
        ]


class PerturbationRegularizer(Regularizer):
    """R_rnd = Σ_t (t/T)^r Σ_p ‖y_t − ỹ_t^(p)‖ over P perturbation streams (eq. 10).

    ``ỹ^(p)`` are the hidden states of the same network run on the perturbed
    copies ``perturbation(x)``, all P in one batched pass (through the
    ``trajectory`` the module hands in, so a subclass's override is used). The
    noise comes from :attr:`generator`, reseeded from ``(seed, epoch, rank)`` at
    the start of every training epoch: each epoch draws fresh perturbations, a
    resumed run draws the same ones, and under distributed training every
    process draws its own (rank 0, and a single process, draw those of
    ``(seed, epoch)``). Per-sample sums are averaged over the batch; both the
    clean and the perturbed states carry gradients.

    Args:
        weight: weight in the loss.
        streams: P, the number of perturbed copies of each input.
        sigma: σ of the default :class:`~irnet.perturbations.GaussianPerturbation`
            (0.05 if neither ``sigma`` nor ``perturbation`` is given).
        r: exponent of β_t = (t/T)^r; smaller r asks for faster damping.
        seed: seed of the perturbation streams.
        perturbation: the kind of perturbation (instead of ``sigma``).

    Attributes:
        perturbation: the :class:`~irnet.perturbations.Perturbation` in use;
            may be replaced at run time.
        generator: the ``torch.Generator`` the perturbations draw from.
        last_distances: detached ``(layers,)`` tensor, mean over batch and
            streams of ``‖y_t − ỹ_t^(p)‖`` of the last call (``None`` before).
    """

    name = "r_rnd"

    def __init__(
        self,
        weight: float = 1.0,
        streams: int = 1,
        sigma: Optional[float] = None,
        r: float = 1.0,
        seed: int = 0,
        perturbation: Optional[Perturbation] = None,
    ) -> None:
        super().__init__(weight)
        self.streams = check_int("streams", streams, 1)
        self.r = check_nonnegative("r", r)
        self.seed = check_int("seed", seed, 0)
        if perturbation is not None and sigma is not None:
            raise ValueError(
                "give sigma or perturbation, not both (sigma configures the default "
                "GaussianPerturbation)"
            )
        if perturbation is not None and not isinstance(perturbation, Perturbation):
            raise ValueError(
                f"perturbation must be an irnet.perturbations.Perturbation, "
                f"got {type(perturbation).__name__}"
            )
        self.perturbation = perturbation or GaussianPerturbation(
            DEFAULT_SIGMA if sigma is None else sigma
        )
        self.generator = torch.Generator()
        self.last_distances: Optional[Tensor] = None
        self.on_train_epoch_start(0)

    def __getstate__(self) -> dict:
        # The generator travels as plain bytes: pickled as a tensor (``ddp_spawn``
        # sends the module to its processes) its state would go through shared
        # memory, whose descriptor dies with the temporary tensor before the
        # process starts ("bad value(s) in fds_to_keep").
        state = dict(self.__dict__)
        state["generator"] = bytes(self.generator.get_state().numpy().tobytes())
        return state

    def __setstate__(self, state: dict) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update(state, generator=generator)

    def epoch_seed(self, epoch: int, rank: int = 0) -> int:
        """The generator's seed for ``epoch`` on process ``rank``: a well-mixed function of
        ``(seed, epoch, rank)``.

        NumPy's ``SeedSequence`` ignores trailing zero words, so rank 0 (and a
        single process) gets the seed of ``(seed, epoch)``: runs recorded before
        the rank entered the seed draw the same noise.
        """
        words = [self.seed, check_int("epoch", epoch, 0), check_int("rank", rank, 0)]
        return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)

    def on_train_epoch_start(self, epoch: int, rank: int = 0) -> None:
        self.generator.manual_seed(self.epoch_seed(epoch, rank))

    def perturb(self, x: Tensor) -> Tensor:
        """The P perturbed copies of ``x``, stacked along the batch: ``(P · batch, …)``."""
        return torch.cat([self.perturbation(x, self.generator) for _ in range(self.streams)])

    def __call__(
        self,
        net: nn.Module,
        x: Tensor,
        states: list[Tensor],
        trajectory: Optional[Trajectory] = None,
    ) -> Tensor:
        batch, layers = states[0].shape[0], len(states) - 1  # rows: an ensemble has E per input
        trajectory = net.trajectory if trajectory is None else trajectory
        # The perturbed pass must not overwrite the clean pass's solver statistics,
        # which the module and the monitoring callbacks read after the step, nor
        # fill a warm-start cache with inputs that will not come again.
        with auxiliary_pass(net):
            noisy = trajectory(self.perturb(x))
        if len(noisy) != len(states):
            raise ValueError(
                f"trajectory returned {len(noisy)} states for the perturbed inputs and "
                f"{len(states)} for the clean ones"
            )
        beta = power_weights(layers, self.r, states[0])
        total, distances = states[0].new_zeros(batch), []
        for t in range(1, layers + 1):
            clean = states[t].repeat(self.streams, *([1] * (states[t].dim() - 1)))
            d = sample_norm(noisy[t] - clean).view(self.streams, batch)  # (P, batch)
            distances.append(d.detach().mean())
            total = total + beta[t - 1] * d.sum(0)
        self.last_distances = torch.stack(distances)
        return total.mean()


class JacobianRegularizer(Regularizer):
    """R_jac = mean over implicit layers t of the batch mean of ``‖θ_t ∂F_t/∂y (y_t)‖_F²``.

    The Jacobian penalised is that of the fixed-point map ``y ↦ c + θF(y)`` at
    the layer's output ``y_t`` (its fixed point), i.e. ``θ·∂F/∂y``, not ``∂F/∂y``
    alone: its norm bounds the map's contraction factor
    (``ρ(θJ) ≤ ‖θJ‖₂ ≤ ‖θJ‖_F``), on which fixed-point and Neumann iterations
    depend, so the penalty scales with θ² and explicit layers (θ = 0) contribute
    nothing. As in Bai, Koltun & Kolter, "Stabilizing equilibrium models by
    Jacobian regularization" (ICML 2021), the squared Frobenius norm is
    estimated by Hutchinson's estimator ``‖J‖_F² = E‖vᵀJ‖²`` with
    ``E[vvᵀ] = I``, from ``samples`` vector–Jacobian products per layer (one
    draw per sample of the batch), averaged over the draws. Unlike Bai et al.
    the value is not divided by the state's dimension.

    The states are the module's clean hidden states (from its ``trajectory``),
    with their graph: the penalty is differentiated in F's parameters both
    directly and through the fixed point ``y_t`` (one adjoint solve per layer,
    shared with the loss's). Dropout masks are drawn afresh for the products.

    Args:
        weight: weight in the loss.
        samples: Hutchinson vectors per layer and sample; ``None`` computes the
            exact norm from ``n`` products with the unit vectors (``n`` the
            size of one sample's state) — for small states and for tests.
        noise: distribution of the vectors, ``"rademacher"`` (±1, the lower
            variance) or ``"gaussian"`` (Bai et al.).
        seed: seed of the vectors' generator, reseeded from ``(seed, epoch, rank)``
            at the start of every training epoch (as R_rnd's perturbations).

    Attributes:
        generator: the ``torch.Generator`` the vectors are drawn from (on the CPU).
    """

    name = "r_jac"
    NOISES = ("rademacher", "gaussian")

    def __init__(
        self,
        weight: float = 1.0,
        samples: Optional[int] = 1,
        noise: str = "rademacher",
        seed: int = 0,
    ) -> None:
        super().__init__(weight)
        self.samples = None if samples is None else check_int("samples", samples, 1)
        self.noise = check_choice("noise", noise, self.NOISES)
        self.seed = check_int("seed", seed, 0)
        self.generator = torch.Generator()
        self.on_train_epoch_start(0)

    __getstate__ = PerturbationRegularizer.__getstate__
    __setstate__ = PerturbationRegularizer.__setstate__
    epoch_seed = PerturbationRegularizer.epoch_seed

    def on_train_epoch_start(self, epoch: int, rank: int = 0) -> None:
        self.generator.manual_seed(self.epoch_seed(epoch, rank))

    def vectors(self, y: Tensor, members: int = 1) -> Tensor:
        """The probe vectors for states ``y``: ``(S, batch, …)``, in y's dtype and device.

        For an ensemble's rows (``members`` > 1, sample-major) one draw per input sample serves
        every member's copy of it: each member sees the probes of its own run.
        """
        if self.samples is None:  # the unit vectors e_1 … e_n, the same for every sample
            n = y[0].numel()
            eye = torch.eye(n, dtype=y.dtype, device=y.device).view(n, 1, *y.shape[1:])
            return eye.expand(n, *y.shape)
        shape = (self.samples, y.shape[0] // members, *y.shape[1:])
        if self.noise == "gaussian":
            v = torch.randn(shape, generator=self.generator, dtype=y.dtype)
        else:
            v = torch.randint(0, 2, shape, generator=self.generator).to(y.dtype).mul_(2).sub_(1)
        return (v if members == 1 else v.repeat_interleave(members, 1)).to(y.device)

    def __call__(
        self,
        net: nn.Module,
        x: Tensor,
        states: list[Tensor],
        trajectory: Optional[Trajectory] = None,
    ) -> Tensor:
        terms = []
        for block, x_in, y in zip(net.blocks, states[:-1], states[1:]):
            if block.theta == 0:
                continue
            # a one-leg block's map is differentiated at its stage, between x_in and y
            vectors = self.vectors(y, members_of(net))
            products = block.map_jacobian_products(y, vectors, x=x_in)  # (S, batch, …)
            squared = products.flatten(2).pow(2).sum(2)  # (S, batch): ‖vᵀ θJ‖² per draw and sample
            # Exact: the sum over the unit vectors; Hutchinson: the mean over the draws.
            each = squared.sum(0) if self.samples is None else squared.mean(0)
            terms.append(each.mean())
        if not terms:
            return states[0].new_zeros(())
        return torch.stack(terms).mean()


# -- the authors' regularisers along the trajectory ------------------------------------------------
# Reshniak & Webster's code (ImplicitResNet, ``compute_regularizers_and_statistics``) adds these to
# the loss with weights ``alpha``; here each is a regulariser of its own, over the layers of an
# implicit network, with layer t's residual function F_t and input state y_t (t = 0 … T−1).


def _sum_squares(y: Tensor) -> Tensor:
    """``‖y_b‖²`` per sample: shape ``(batch,)``."""
    return y.flatten(1).pow(2).sum(1)


class DivergenceRegularizer(Regularizer):
    """R_div = σ((1 / (T·d)) Σ_t ((t+1)/T)^p · tr ∂F_t/∂y (y_t)), the divergence along the path.

    ``tr ∂F_t/∂y (y_t)`` is the divergence of layer t's residual function at the
    layer's input state, averaged over the batch, with ``T`` the number of layers
    and ``d`` the size of one sample's state. The trace is Hutchinson's estimate
    ``(1/S) Σ_s v_sᵀ (∂F/∂y) v_s`` from ``samples`` probe vectors per layer and
    sample with ``E[v vᵀ] = I`` (unbiased: ``E[vᵀAv] = tr A``); ``samples: null``
    gives the exact trace from the unit vectors. Every layer counts, explicit
    ones too: the divergence is a property of F, not of θ.

    What it penalises: the sum of the divergences is, to first order, the
    logarithm of the factor by which the network's steps change volumes of
    states (``log det(I + ∂F/∂y) ≈ tr ∂F/∂y``), so a positive mean divergence
    means that nearby states move apart. The penalty pushes it down, towards
    steps that contract volumes, more strongly for later layers
    (``((t+1)/T)^p``). The sigmoid bounds it in (0, 1) (½ at zero divergence)
    and makes it saturate: its gradient fades as the mean divergence becomes
    strongly negative (it does not drive the divergence to −∞) and also as it
    becomes strongly positive.

    As in the authors' code the input states are detached: the gradient reaches
    F's parameters only, not the states. Their form is the same sigmoid of a
    time-weighted sum over the steps divided by the number of steps and by
    ``d``, with two differences: they take the trapezoid over the T + 1 states
    ``y_0 … y_T`` (weights ``((t+1)/(T+1))^p``), where here each layer's F is
    evaluated at its input (the left-point rule, ``((t+1)/T)^p``); and they
    differentiate the ODE's right-hand side f, where here F is the whole
    increment of a step (``h·f`` in :class:`~irnet.nets.ODENet`), so the
    sigmoid's argument is h times theirs. Dropout masks are drawn afresh.

    Args:
        weight: weight in the loss (the authors' ``alpha['div']``).
        samples: Hutchinson probes per layer and sample (the authors'
            ``mciters``, 1); ``None`` computes the exact trace from ``d``
            products (small states, tests).
        noise: the probes' distribution, ``"rademacher"`` (±1, the lower
            variance) or ``"gaussian"`` (the authors').
        p: exponent of the time weights ``((t+1)/T)^p`` (the authors' default 2).
        seed: seed of the probes' generator, reseeded from ``(seed, epoch, rank)``
            at the start of every training epoch (as R_jac's).

    Attributes:
        generator: the ``torch.Generator`` the probes are drawn from (on the CPU).
    """

    name = "r_div"
    NOISES = JacobianRegularizer.NOISES

    def __init__(
        self,
        weight: float = 1.0,
        samples: Optional[int] = 1,
        noise: str = "rademacher",
        p: float = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__(weight)
        self.samples = None if samples is None else check_int("samples", samples, 1)
        self.noise = check_choice("noise", noise, self.NOISES)
        self.p = check_nonnegative("p", p)
        self.seed = check_int("seed", seed, 0)
        self.generator = torch.Generator()
        self.on_train_epoch_start(0)

    __getstate__ = PerturbationRegularizer.__getstate__
    __setstate__ = PerturbationRegularizer.__setstate__
    epoch_seed = PerturbationRegularizer.epoch_seed
    on_train_epoch_start = JacobianRegularizer.on_train_epoch_start
    vectors = JacobianRegularizer.vectors

    @staticmethod
    def quadratic_forms(F: Callable[[Tensor], Tensor], y: Tensor, vectors: Tensor) -> Tensor:
        """``vᵀ (∂F/∂y)(y) v`` for each of ``S`` vectors per sample, at ``y`` detached.

        One graph of ``F(y)`` and one vector–Jacobian product per vector, kept
        (differentiable in F's parameters). The mean over vectors with
        ``E[v vᵀ] = I`` is Hutchinson's estimate of the trace.

        Args:
            F: the residual function.
            y: states, ``(batch, …)``.
            vectors: ``(S, batch, …)``.

        Returns:
            Tensor of shape ``(S, batch)``.

        Example:
            For ``F(y) = A y`` every ``vᵀ (∂F/∂y) v`` is ``vᵀ A v``; over the four
            ±1 vectors of ℝ² their mean is ``tr A``:

            >>> A = torch.tensor([[1.0, 2.0], [-3.0, 4.0]])
            >>> signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
            >>> forms = DivergenceRegularizer.quadratic_forms(
            ...     lambda y: y @ A.T, torch.zeros(1, 2), signs[:, None]
            ... )
            >>> forms[:, 0].tolist(), forms.mean().item()
            ([4.0, 6.0, 6.0, 4.0], 5.0)
        """
        if vectors.shape[1:] != y.shape:
            raise ValueError(
                f"vectors must have shape (S, *y.shape) = (S, {', '.join(map(str, y.shape))}), "
                f"got {tuple(vectors.shape)}"
            )
        with SolveScope(F, y) as scope, torch.enable_grad():
            y = y.detach().to(scope.dtype).requires_grad_()
            f = F(y)
            forms = []
            for v in vectors:
                v = v.to(f.dtype)
                (vj,) = torch.autograd.grad(f, y, v, create_graph=True, retain_graph=True)
                forms.append((vj * v).flatten(1).sum(1))
        return torch.stack(forms)

    def layer_traces(self, net: nn.Module, states: list[Tensor]) -> Tensor:
        """The batch mean of each layer's (estimated) ``tr ∂F_t/∂y (y_t)``: shape ``(T,)`` (for an
        ensemble the mean over its members too)."""
        return self.member_traces(net, states).mean(1)

    def member_traces(self, net: nn.Module, states: list[Tensor]) -> Tensor:
        """Each member's batch mean of each layer's ``tr ∂F_t/∂y (y_t)``: ``(T, E)`` (E = 1 for an
        ordinary network)."""
        members = members_of(net)
        traces = []
        for block, y in zip(net.blocks, states[:-1]):
            forms = self.quadratic_forms(block.F, y, self.vectors(y, members))  # (S, batch)
            # Exact: the sum over the unit vectors; Hutchinson: the mean over the draws.
            each = forms.sum(0) if self.samples is None else forms.mean(0)
            traces.append(rows_of(each, members).mean(1))
        return torch.stack(traces)

    def __call__(
        self,
        net: nn.Module,
        x: Tensor,
        states: list[Tensor],
        trajectory: Optional[Trajectory] = None,
    ) -> Tensor:
        traces = self.member_traces(net, states)  # (T, E)
        layers, dim = traces.shape[0], states[0][0].numel()
        weights = power_weights(layers, self.p, traces)[:, None]
        # The sigmoid is taken per member: an ensemble's value is the mean of its members'.
        return torch.sigmoid((weights * traces).sum(0) / (layers * dim)).mean()


class MagnitudeRegularizer(Regularizer):
    """R_mag = Σ_t mean_batch ‖F_t(y_t)‖², the squared size of the steps along the trajectory.

    A left-point sum over the layers of ``∫‖F‖²`` along the trajectory: each
    layer's F at its input state ``y_t`` (every layer, explicit ones too). The
    states keep their graph, as in the authors' code, so the gradient reaches F's
    parameters directly and through the states. The authors take the trapezoid
    over the T + 1 states and divide by the number of steps and the state's
    size, and differentiate f with ``F = h·f``; here nothing is divided (the
    weight absorbs it). Small steps mean a short, smooth path from ``y_0`` to
    ``y_T``. Dropout masks are drawn afresh.

    Args:
        weight: weight in the loss (the authors' ``alpha['f']``).
    """

    name = "r_mag"

    def __call__(
        self,
        net: nn.Module,
        x: Tensor,
        states: list[Tensor],
        trajectory: Optional[Trajectory] = None,
    ) -> Tensor:
        total = states[0].new_zeros(states[0].shape[0])
        for block, y in zip(net.blocks, states[:-1]):
            with SolveScope(block.F, y) as scope:
                f = block.F(y.to(scope.dtype))
            total = total + _sum_squares(f)
        return total.mean()


class ResidualRegularizer(Regularizer):
    """R_res = Σ_t mean_batch ‖y_{t+1} − y_t − (1−θ_t)F_t(y_t) − θ_t F_t(y_{t+1})‖² (detached y).

    The residual of each implicit layer's equation at the states the forward
    pass computed, detached, so the gradient reaches F's parameters only: it
    moves F so that the computed states solve the layers' equations more
    exactly. It is non-zero where a forward solve stopped short of its fixed
    point (not converged, or a loose ``atol``), and tiny at well-converged
    solves. Explicit layers (θ = 0) satisfy their equation by construction and
    contribute nothing. A block with ``scheme = "one_leg"`` solves
    ``y_{t+1} = y_t + F_t((1−θ)y_t + θy_{t+1})`` and its residual is that
    equation's (the authors' step). ``F_t(y_t)`` and ``F_t(y_{t+1})`` share one
    dropout draw (a fresh one, not the forward solve's). The authors divide the
    sum by the number of steps; here it is not divided (the weight absorbs it).

    Args:
        weight: weight in the loss (the authors' ``alpha['resid']``).
    """

    name = "r_res"

    def __call__(
        self,
        net: nn.Module,
        x: Tensor,
        states: list[Tensor],
        trajectory: Optional[Trajectory] = None,
    ) -> Tensor:
        total = states[0].new_zeros(states[0].shape[0])
        for block, y0, y1 in zip(net.blocks, states[:-1], states[1:]):
            if block.theta == 0:
                continue
            theta = block.theta
            with SolveScope(block.F, y0) as scope:
                y0, y1 = y0.detach().to(scope.dtype), y1.detach().to(scope.dtype)
                if getattr(block, "scheme", "linear") == "one_leg" and theta < 1:
                    r = y1 - y0 - block.F((1 - theta) * y0 + theta * y1)
                else:
                    r = y1 - y0 - theta * block.F(y1)
                    if theta < 1:
                        r = r - (1 - theta) * block.F(y0)
            total = total + _sum_squares(r)
        return total.mean()


class TotalVariationRegularizer(Regularizer):
    """R_tv = Σ_t ‖W_{t+1} − W_t‖², the squared differences of consecutive layers' weights.

    ``W_t`` are the parameters of layer t's residual function F_t (all of them,
    as ``F_t.parameters()`` lists them, raw: before any constraint applied at
    evaluation), summed over the parameters and over the T − 1 pairs of
    consecutive layers. It is 0 for a stationary network (every layer with the
    same weights) and pulls the layers' weights towards each other, i.e.
    towards an ODE whose right-hand side changes slowly in time. It does not
    depend on the batch. The authors divide the sum by the number of steps; here
    it is not divided (the weight absorbs it). Consecutive layers must have
    parameters of the same shapes (:meth:`check_network`).

    Args:
        weight: weight in the loss (the authors' ``alpha['TV']``).
    """

    name = "r_tv"

    @staticmethod
    def layer_parameters(net: nn.Module) -> list[list[Tensor]]:
        """Each layer's F's parameters, in ``parameters()`` order (none for a plain callable)."""
        return [
            list(block.F.parameters()) if isinstance(block.F, nn.Module) else []
            for block in net.blocks
        ]

    def check_network(self, net: nn.Module) -> None:
        """Refuse a network whose consecutive layers' F have parameters of different shapes."""
        layers = self.layer_parameters(net)
        for t, (a, b) in enumerate(zip(layers, layers[1:])):
            shapes = [tuple(w.shape) for w in a], [tuple(w.shape) for w in b]
            if shapes[0] != shapes[1]:
                raise ValueError(
                    f"r_tv compares consecutive layers' weights, but layer {t}'s F has parameters "
                    f"of shapes {shapes[0]} and layer {t + 1}'s {shapes[1]}"
                )

    def __call__(
        self,
        net: nn.Module,
        x: Tensor,
        states: list[Tensor],
        trajectory: Optional[Trajectory] = None,
    ) -> Tensor:
        self.check_network(net)
        total = states[0].new_zeros(())
        layers = self.layer_parameters(net)
        for a, b in zip(layers, layers[1:]):
            for wa, wb in zip(a, b):
                total = total + (wb - wa).pow(2).sum().to(total.dtype)
        # An ensemble's weights hold every member's: the members' mean, like the batch terms.
        return total / members_of(net)
