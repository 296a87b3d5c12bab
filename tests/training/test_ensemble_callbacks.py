"""Monitoring callbacks on seed ensembles: each member's values are those of its own network.

Member k of ``ODENet(ensemble=E, member_seeds=seeds)`` is the network built right after
``torch.manual_seed(seeds[k])``; after training it is ``member_state_dict`` of the
ensemble's weights. Every member-wise value a callback logs is compared with the same
quantity computed on that single network, in float64.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from helpers.callbacks import events, fit, loader, scalar, sine_data, two_class_data
from irnet.callbacks import (
    Figures,
    GradientMagnitudes,
    PerturbationStreams,
    SolverStatistics,
    StabilityMonitor,
)
from irnet.callbacks.prediction_writer import PredictionWriter
from irnet.module import ImplicitNetModule
from irnet.nets import ODENet
from irnet.nets.ensemble import member_state_dict, rows_of
from irnet.regularizers import PerturbationRegularizer
from irnet.solvers import FixedPoint

SEEDS = [11, 12, 13]
E = len(SEEDS)
SINE = dict(in_features=1, out_features=1, layers=3, T=2.0, width=8, theta=0.5)
SPIRAL = dict(SINE, in_features=2, out_features=2, readout="linear")


def make_net(config: dict, seed: int) -> ODENet:
    """Member ``seed`` alone: the single network built right after ``manual_seed(seed)``."""
    torch.manual_seed(seed)
    return ODENet(**config, solver=FixedPoint(atol=1e-9, max_iter=200)).double()


def make_ensemble(config: dict) -> ODENet:
    return ODENet(
        **config, ensemble=E, member_seeds=SEEDS, solver=FixedPoint(atol=1e-9, max_iter=200)
    ).double()


def member(ensemble: ODENet, config: dict, k: int) -> ODENet:
    """Member k of a (trained) ensemble as a single network."""
    single = make_net(config, SEEDS[k])
    single.load_state_dict(member_state_dict(ensemble.state_dict(), k, E))
    return single


def sine_loader():
    x, y = sine_data(21)
    return loader(x.double(), y.double())


def spiral_loader():
    x, y = two_class_data(24)
    return loader(x.double(), y)


def member_values(acc, tag: str) -> list[float]:
    """The last logged value of ``tag/member_k`` for every member."""
    return [scalar(acc, f"{tag}/member_{k}")[-1] for k in range(E)]


def test_members_are_the_single_networks_of_their_seeds() -> None:
    ensemble, x = make_ensemble(SINE), sine_data(21)[0].double()
    out = rows_of(ensemble(x), E)
    for k, seed in enumerate(SEEDS):
        torch.testing.assert_close(out[k], make_net(SINE, seed)(x), rtol=1e-10, atol=1e-12)


# -- solver statistics and gradient magnitudes: one full-batch step at the initial weights --------


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """One training step (one epoch, full batch) of the sine ensemble, with both callbacks."""
    root = tmp_path_factory.mktemp("one_step")
    module = ImplicitNetModule(make_ensemble(SINE), loss="l2")
    fit(
        module,
        [SolverStatistics(fidelity_every_n_epochs=1), GradientMagnitudes(plot_every_n_epochs=0)],
        root,
        sine_loader(),
        epochs=1,
    )
    return events(Path(root) / "tb" / "version_0")


def single_step(seed: int):
    """A single network's forward solve and loss gradients on the same batch."""
    net = make_net(SINE, seed)
    x, y = sine_loader().dataset.tensors
    states = net.trajectory(x)
    for state in states[1:]:
        state.retain_grad()
    iterations = torch.stack([b.forward_stats.iterations.double().mean() for b in net.blocks])
    ImplicitNetModule(net, loss="l2").compute_loss(net.readout(states[-1]), y).backward()
    state_norms = torch.stack([s.grad.norm(dim=1).mean() for s in states[1:]])
    param_norms = torch.stack(
        [torch.cat([p.grad.flatten() for p in b.parameters()]).norm() for b in net.blocks]
    )
    return iterations.mean(), state_norms, param_norms


def test_solver_iterations_per_member_equal_the_single_networks(one_step) -> None:
    acc = one_step
    expected = [float(single_step(seed)[0]) for seed in SEEDS]
    logged = member_values(acc, "solver/forward_iterations_mean")
    assert logged == pytest.approx(expected, rel=1e-6)
    assert len(set(expected)) > 1  # the members differ, so a mix-up of rows would show
    pooled = scalar(acc, "solver/forward_iterations_mean_epoch")[-1]
    assert pooled == pytest.approx(sum(expected) / E, rel=1e-6)
    std = scalar(acc, "solver/forward_iterations_mean/std")[-1]
    assert std == pytest.approx(float(torch.tensor(expected).std()), rel=1e-5)
    assert member_values(acc, "solver/forward_not_converged") == [0.0] * E


def test_gradient_fidelity_probe_runs_on_every_members_rows(one_step) -> None:
    # the probe's loss repeats the targets per member; the default adjoint is near exact
    assert scalar(one_step, "solver/gradient_cosine")[-1] == pytest.approx(1.0, abs=1e-6)


def test_gradient_norms_per_member_equal_the_single_networks(one_step) -> None:
    acc = one_step
    singles = [single_step(seed) for seed in SEEDS]
    state = member_values(acc, "gradients/state_norm_mean")
    params = member_values(acc, "gradients/param_norm_mean")
    ratio = member_values(acc, "gradients/state_norm_first_over_last")
    for k, (_, state_norms, param_norms) in enumerate(singles):
        assert state[k] == pytest.approx(float(state_norms.mean()), rel=1e-5)
        assert params[k] == pytest.approx(float(param_norms.mean()), rel=1e-5)
        assert ratio[k] == pytest.approx(float(state_norms[0] / state_norms[-1]), rel=1e-5)
    # the pooled tag is the members' mean, comparable with one network's (not their joint norm)
    pooled = scalar(acc, "gradients/param_norm_mean_step")[-1]
    assert pooled == pytest.approx(sum(params) / E, rel=1e-5)


# -- stability ------------------------------------------------------------------------------


def test_stability_per_member_equals_the_single_networks(tmp_path: Path) -> None:
    monitor = StabilityMonitor(every_n_epochs=2, max_samples=5, krylov_dim=2)
    module = ImplicitNetModule(make_ensemble(SINE), loss="l2")
    fit(module, [monitor], tmp_path, sine_loader(), epochs=2)
    acc = events(Path(tmp_path) / "tb" / "version_0")
    inputs = sine_loader().dataset.tensors[0][:5]
    layer_max, neumann_max = [], []
    for k in range(E):  # 2-D states, 2 Arnoldi steps: the radii are exact
        layer, neumann = monitor.radii(member(module.net, SINE, k), inputs)
        layer_max.append(float(layer.max()))
        neumann_max.append(float(neumann.max()))
    assert member_values(acc, "stability/layer_radius_max") == pytest.approx(layer_max, rel=1e-6)
    assert member_values(acc, "stability/neumann_radius_max") == pytest.approx(
        neumann_max, rel=1e-6
    )
    assert scalar(acc, "stability/layer_radius_max")[-1] == pytest.approx(max(layer_max), rel=1e-6)
    assert len(set(round(v, 6) for v in layer_max)) == E


# -- perturbation streams -------------------------------------------------------------------


def test_own_streams_per_member_equal_the_single_networks(tmp_path: Path) -> None:
    streams = PerturbationStreams(streams=2, seed=3, every_n_epochs=1, plot_every_n_epochs=1)
    module = ImplicitNetModule(make_ensemble(SINE), loss="l2")
    fit(module, [streams], tmp_path, sine_loader(), epochs=2)
    per_member = streams.last_member_distances
    assert per_member.shape == (E, SINE["layers"] + 1)
    torch.testing.assert_close(per_member.mean(0), streams.last_distances, rtol=1e-6, atol=0)
    # the same streams of the last epoch through member k alone (the callback is set up again)
    streams.setup(None, module, "fit")
    x = sine_loader().dataset.tensors[0]
    for k in range(E):
        alone = streams.measure(member(module.net, SINE, k), x, epoch=1)
        torch.testing.assert_close(per_member[k], alone.float(), rtol=1e-5, atol=0)
    acc = events(Path(tmp_path) / "tb" / "version_0")
    ratios = (per_member[:, -1] / per_member[:, 0]).tolist()
    assert member_values(acc, "perturbation/amplification") == pytest.approx(ratios, rel=1e-5)
    assert [tag for tag in acc.Tags()["images"] if tag.startswith("perturbation/")]


def test_regularizer_streams_per_member_equal_the_single_networks(tmp_path: Path) -> None:
    """With R_rnd on, each member's distances come from the training step itself."""
    streams = PerturbationStreams(every_n_epochs=1, plot_every_n_epochs=0)
    r_rnd = PerturbationRegularizer(weight=0.1, streams=2, sigma=0.05, seed=4)
    module = ImplicitNetModule(make_ensemble(SINE), loss="l2", r_rnd=r_rnd)
    fit(module, [streams], tmp_path, sine_loader(), epochs=1)  # one step: initial weights
    per_member = streams.last_member_distances
    # R_rnd's own distances (t = 1…T) are the mean over the ensemble's rows
    torch.testing.assert_close(
        per_member.mean(0)[1:], streams.last_distances[1:], rtol=1e-6, atol=0
    )
    x = sine_loader().dataset.tensors[0]
    own = PerturbationRegularizer(weight=0.0, streams=2, sigma=0.05, seed=4)
    own.on_train_epoch_start(0)
    noisy_inputs = own.perturb(x)
    for k, seed in enumerate(SEEDS):
        net = make_net(SINE, seed)
        with torch.no_grad():
            clean, noisy = net.trajectory(x), net.trajectory(noisy_inputs)
        expected = torch.stack(
            [(n - c.repeat(2, 1)).norm(dim=1).mean() for c, n in zip(clean, noisy)]
        )
        torch.testing.assert_close(per_member[k], expected.float(), rtol=1e-5, atol=0)


# -- figures --------------------------------------------------------------------------------


def figure_lines(fig, prefix: str) -> dict[str, torch.Tensor]:
    return {
        line.get_label(): torch.as_tensor(line.get_ydata())
        for line in fig.axes[0].lines
        if line.get_label().startswith(prefix)
    }


def test_output_figure_draws_every_member_and_their_mean(tmp_path: Path) -> None:
    figures = Figures(every_n_epochs=0, kinds=["output", "trajectories", "fields"], grid_size=40)
    module = ImplicitNetModule(make_ensemble(SINE), loss="l2")
    trainer = fit(module, [figures], tmp_path, sine_loader(), epochs=1)
    drawn = figures.make_figures(trainer, module, epoch=0)
    members = figure_lines(drawn["output"], "member ")
    assert sorted(members) == [f"member {k}" for k in range(E)]
    (mean,) = figure_lines(drawn["output"], "mean of").values()
    grid = torch.linspace(-5, 5, 40, dtype=torch.float64).unsqueeze(1)
    curves = []
    for k in range(E):
        with torch.no_grad():
            curves.append(member(module.net, SINE, k)(grid)[:, 0].float())
        torch.testing.assert_close(members[f"member {k}"].float(), curves[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.float(), torch.stack(curves).mean(0), rtol=1e-5, atol=1e-6)
    # trajectories and fields are member 0's: the same figures as member 0 alone draws
    alone = ImplicitNetModule(member(module.net, SINE, 0), loss="l2")
    single = Figures(every_n_epochs=0, kinds=["trajectories", "fields"], grid_size=40)
    expected = single.make_figures(trainer, alone, epoch=0)
    assert "member 0 of 3" in drawn["trajectories"].axes[0].get_title()
    got_lines, want_lines = (
        drawn["trajectories"].axes[0].lines,
        expected["trajectories"].axes[0].lines,
    )
    assert len(got_lines) == len(want_lines) == 21  # one trajectory per training input
    for got, want in zip(got_lines, want_lines):
        torch.testing.assert_close(
            torch.as_tensor(got.get_ydata()),
            torch.as_tensor(want.get_ydata()),
            rtol=1e-5,
            atol=1e-6,
        )
    got_field, want_field = (
        drawn["fields"].axes[0].collections[0],
        expected["fields"].axes[0].collections[0],
    )
    torch.testing.assert_close(
        torch.as_tensor(got_field.U), torch.as_tensor(want_field.U), rtol=1e-5, atol=1e-6
    )


def test_decision_figure_draws_each_members_boundary(tmp_path: Path) -> None:
    figures = Figures(every_n_epochs=1, kinds=["decision", "iterations"], grid_size=30)
    module = ImplicitNetModule(make_ensemble(SPIRAL), loss="cross_entropy")
    trainer = fit(module, [figures], tmp_path, spiral_loader(), epochs=1)
    drawn = figures.make_figures(trainer, module, epoch=0)
    ax = drawn["decision"].axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == [f"member {k}" for k in range(E)]
    # one filled map (the mean probability's class) and one boundary per member that has one
    x = spiral_loader().dataset.tensors[0]
    lo, hi = x.min(0).values, x.max(0).values
    pad = 0.1 * (hi - lo)
    axes = [torch.linspace(float(lo[i] - pad[i]), float(hi[i] + pad[i]), 30) for i in range(2)]
    gx, gy = torch.meshgrid(*axes, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1).double()
    with torch.no_grad():
        classes = [member(module.net, SPIRAL, k)(grid).argmax(1) for k in range(E)]
    with_boundary = sum(int(c.min() != c.max()) for c in classes)
    assert len(ax.collections) == 2 + with_boundary  # contourf, the data, the boundaries
    assert with_boundary > 0
    curves = figure_lines(drawn["iterations"], "forward")
    mean = curves.pop("forward (nonlinear solve) (mean over members)")
    assert sorted(curves) == [f"forward, member {k}" for k in range(E)]
    torch.testing.assert_close(
        torch.stack(list(curves.values())).mean(0), mean, rtol=1e-6, atol=1e-9
    )


# -- predictions ----------------------------------------------------------------------------


def test_prediction_writer_puts_the_member_first(tmp_path: Path) -> None:
    module = ImplicitNetModule(make_ensemble(SINE), loss="l2")
    writer = PredictionWriter(dirpath=str(tmp_path))
    x, y = sine_data(21)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[writer], enable_progress_bar=False
    )
    trainer.predict(module, loader(x.double(), y.double(), batch_size=8))
    saved = torch.load(writer.path)
    assert saved["members"] == E
    assert saved["predictions"].shape == (E, 21, 1)
    for k, seed in enumerate(SEEDS):
        with torch.no_grad():
            expected = make_net(SINE, seed)(x.double())
        torch.testing.assert_close(saved["predictions"][k], expected, rtol=1e-10, atol=1e-12)


# -- a single network is as before ------------------------------------------------------------


def test_single_network_logs_no_member_tags(tmp_path: Path) -> None:
    callbacks = [
        SolverStatistics(),
        GradientMagnitudes(plot_every_n_epochs=0),
        StabilityMonitor(every_n_epochs=1, max_samples=4, krylov_dim=2),
        PerturbationStreams(every_n_epochs=1, plot_every_n_epochs=0),
    ]
    module = ImplicitNetModule(make_net(SINE, SEEDS[0]), loss="l2")
    fit(module, callbacks, tmp_path, sine_loader(), epochs=1)
    tags = events(Path(tmp_path) / "tb" / "version_0").Tags()["scalars"]
    assert "solver/forward_iterations_mean_epoch" in tags
    assert "perturbation/amplification" in tags
    assert not [tag for tag in tags if "/member_" in tag or tag.endswith("/std")]
    assert callbacks[-1].last_member_distances is None
    assert math.isfinite(callbacks[-1].last_distances.sum())


def test_gradient_magnitudes_refuse_a_block_parameter_without_members() -> None:
    net = make_ensemble(SINE)
    net.blocks[1].register_parameter("shared", torch.nn.Parameter(torch.zeros(5)))
    module = ImplicitNetModule(net, loss="l2")
    with pytest.raises(ValueError, match=r"GradientMagnitudes: parameter 'shared' of block 2"):
        GradientMagnitudes().setup(None, module, "fit")
