"""Monitoring callbacks: short fits with TensorBoard, event files read back, numbers checked."""

from __future__ import annotations

import copy
import csv
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.autograd.functional import jacobian

from helpers.callbacks import (
    TinyModule,
    classifier_module,
    events,
    fit,
    loader,
    scalar,
    sine_data,
    sine_module,
    two_class_data,
)
from irnet.callbacks import (
    Figures,
    GradientMagnitudes,
    PerturbationStreams,
    SolverStatistics,
    StabilityMonitor,
)
from irnet.datamodules import SineRegression
from irnet.linear import Neumann
from irnet.solvers import FixedPoint
from irnet.stats import ConvergenceWarning

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def all_callbacks(every: int = 1, kinds: list[str] | None = None) -> list[pl.Callback]:
    return [
        SolverStatistics(),
        GradientMagnitudes(plot_every_n_epochs=every),
        StabilityMonitor(every_n_epochs=every, max_samples=8),
        Figures(every_n_epochs=every, kinds=kinds, grid_size=50, field_grid_size=8),
    ]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, path


# -- one full run with every callback, shared by the first tests ----------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Sine regression, 4 layers θ = 0.5, 3 epochs of 3 steps, validation, all callbacks."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("full")
    callbacks = [
        SolverStatistics(),
        GradientMagnitudes(plot_every_n_epochs=2),
        StabilityMonitor(every_n_epochs=2, max_samples=8),
        Figures(every_n_epochs=2, grid_size=50, field_grid_size=8),
    ]
    trainer = fit(
        sine_module(layers=4),
        callbacks,
        root,
        loader(*sine_data(), batch_size=17),
        loader(*sine_data(101)),
        epochs=3,
    )
    return trainer, events(trainer.logger.log_dir)


SOLVER_KEYS = [
    "iterations_mean",
    "iterations_max",
    "residual_mean",
    "residual_max",
    "not_converged",
    "diverged",
]


def test_scalar_tags_are_written_with_finite_values(full_run) -> None:
    _, acc = full_run
    expected = [
        f"solver/{d}_{k}_{s}"
        for d in ("forward", "backward")
        for k in SOLVER_KEYS
        for s in ("step", "epoch")
    ]
    expected += [
        f"solver_layers/{d}_iterations_mean/layer_{t}_step"
        for d in ("forward", "backward")
        for t in range(1, 5)
    ]
    expected += [f"val_solver/forward_{k}" for k in SOLVER_KEYS]
    expected += [
        f"gradients/{n}_mean_{s}" for n in ("state_norm", "param_norm") for s in ("step", "epoch")
    ]
    expected += ["gradients/state_norm_first_over_last_step"]
    expected += [f"gradients_layers/state_norm/layer_{t}_step" for t in range(1, 5)]
    expected += [
        "stability/layer_radius_max",
        "stability/layer_radius_mean",
        "stability/neumann_radius_max",
        "stability/neumann_divergent_layers",
        "stability_layers/layer_radius/layer_4",
    ]
    tags = set(acc.Tags()["scalars"])
    assert not set(expected) - tags
    for tag in expected:
        assert all(math.isfinite(v) for v in scalar(acc, tag)), tag
    assert len(scalar(acc, "solver/forward_iterations_mean_step")) == 9  # 3 epochs x 3 steps
    assert len(scalar(acc, "solver/forward_iterations_mean_epoch")) == 3
    assert len(scalar(acc, "stability/layer_radius_max")) == 2  # epoch 1 (every 2nd) and the last


def test_histogram_and_image_tags_are_written(full_run) -> None:
    _, acc = full_run
    histograms = {
        f"solver/{d}_{k}_over_layers"
        for d in ("forward", "backward")
        for k in ("iterations_mean", "iterations_max", "residual_max")
    }
    histograms |= {
        "gradients/state_norm_over_layers",
        "gradients/param_norm_over_layers",
        "stability/layer_radius",
        "stability/neumann_radius",
    }
    assert not histograms - set(acc.Tags()["histograms"])
    forward = acc.Histograms("solver/forward_iterations_mean_over_layers")
    assert len(forward) == 3 and forward[-1].histogram_value.num == 4  # one value per layer
    assert math.isfinite(forward[-1].histogram_value.sum) and forward[-1].histogram_value.max > 0
    images = {
        "figures/output",
        "figures/trajectories",
        "figures/fields",
        "figures/iterations",
        "gradients/norm_vs_layer",
    }
    assert not images - set(acc.Tags()["images"])
    for tag in images:
        shots = acc.Images(tag)
        assert len(shots) == 2 and shots[-1].width > 100 and shots[-1].height > 100, tag


def test_figures_are_png_files_beside_the_logs(full_run) -> None:
    trainer, _ = full_run
    directory = Path(trainer.logger.log_dir) / "figures"
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted(
        f"figures_{k}_epoch{e:04d}.png"
        for k in ("output", "trajectories", "fields", "iterations")
        for e in (1, 2)
    )
    for path in directory.iterdir():
        assert_png(path)


def test_layer_average_is_the_mean_of_the_layers(full_run) -> None:
    _, acc = full_run
    for direction in ("forward", "backward"):
        per_layer = [
            scalar(acc, f"solver_layers/{direction}_iterations_mean/layer_{t}_step")
            for t in range(1, 5)
        ]
        average = scalar(acc, f"solver/{direction}_iterations_mean_step")
        expected = [sum(values) / 4 for values in zip(*per_layer)]
        assert average == pytest.approx(expected, rel=1e-6)
        assert min(average) >= 1  # θ = 0.5 takes iterations, both ways
        maxima = [
            max(v)
            for v in zip(
                *[
                    scalar(acc, f"solver_layers/{direction}_iterations_max/layer_{t}_step")
                    for t in range(1, 5)
                ]
            )
        ]
        assert scalar(acc, f"solver/{direction}_iterations_max_step") == maxima
    # Every solve converged: the glance-scalars stay at zero.
    for tag in (
        "solver/forward_not_converged_step",
        "solver/backward_not_converged_step",
        "val_solver/forward_not_converged",
        "stability/neumann_divergent_layers",
    ):
        assert set(scalar(acc, tag)) == {0.0}, tag


# -- numbers against what the blocks and autograd say ------------------------------------------


def test_logged_statistics_equal_the_blocks_after_the_last_step(tmp_path: Path) -> None:
    module = sine_module(layers=3)
    trainer = fit(
        module, [SolverStatistics()], tmp_path, loader(*sine_data(), batch_size=17), epochs=2
    )
    acc = events(trainer.logger.log_dir)
    for t, block in enumerate(module.net.blocks, start=1):
        forward, backward = block.forward_stats, block.backward_stats
        checks = {
            "forward_iterations_mean": forward.iterations.float().mean(),
            "forward_iterations_max": forward.iterations.max(),
            "forward_residual_max": forward.residual.max(),
            "backward_iterations_mean": backward.iterations.float().mean(),
            "backward_residual_max": backward.residual.max(),
        }
        for name, value in checks.items():
            tag = f"solver_layers/{name}/layer_{t}_step"
            assert scalar(acc, tag)[-1] == pytest.approx(float(value), rel=1e-6), tag
    # Epoch values: the step mean over equal batches, the step maximum, the step sum.
    steps = scalar(acc, "solver/forward_iterations_mean_step")[-3:]
    assert scalar(acc, "solver/forward_iterations_mean_epoch")[-1] == pytest.approx(
        sum(steps) / 3, rel=1e-6
    )
    steps = scalar(acc, "solver/backward_iterations_max_step")[-3:]
    assert scalar(acc, "solver/backward_iterations_max_epoch")[-1] == max(steps)


class TwoPassModule(TinyModule):
    """Runs the network again on shifted inputs in training, like R_rnd's perturbation streams."""

    def training_step(self, batch, batch_idx: int):
        x, y = batch
        loss = self.loss(x, y)
        self.first_pass = [b.forward_stats for b in self.net.blocks]
        return loss + 1e-3 * self.net(x + 4.0).square().mean()


def test_statistics_come_from_the_main_pass(tmp_path: Path) -> None:
    module = TwoPassModule(sine_module(layers=2).net)
    trainer = fit(module, [SolverStatistics()], tmp_path, loader(*sine_data()), epochs=1)
    acc = events(trainer.logger.log_dir)
    for t, (first, block) in enumerate(zip(module.first_pass, module.net.blocks), start=1):
        logged = scalar(acc, f"solver_layers/forward_iterations_mean/layer_{t}_step")
        assert logged == [pytest.approx(float(first.iterations.float().mean()), rel=1e-6)]
        # The second pass solved other inputs with other counts; it is not what was logged.
        assert float(block.forward_stats.iterations.float().mean()) != logged[0]


def test_failed_solves_are_counted(tmp_path: Path) -> None:
    # Two fixed-point iterations and one Neumann term cannot meet a 1e-12 tolerance.
    module = sine_module(
        layers=2,
        solver=FixedPoint(atol=1e-12, max_iter=2),
        linear_solver=Neumann(rtol=1e-12, max_iter=1),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        trainer = fit(module, [SolverStatistics()], tmp_path, loader(*sine_data()), epochs=1)
    acc = events(trainer.logger.log_dir)
    forward_failed = sum(int((~b.forward_stats.converged).sum()) for b in module.net.blocks)
    backward_failed = sum(int((~b.backward_stats.converged).sum()) for b in module.net.blocks)
    assert forward_failed > 40 and backward_failed > 40  # nearly all 2 x 51 solves fail
    assert scalar(acc, "solver/forward_not_converged_step") == [forward_failed]
    assert scalar(acc, "solver/backward_not_converged_step") == [backward_failed]
    assert scalar(acc, "solver_layers/forward_iterations_max/layer_1_step") == [2.0]


def test_gradient_norms_equal_autograd_on_one_step(tmp_path: Path) -> None:
    module = sine_module(layers=3)
    x, y = sine_data()
    reference = copy.deepcopy(module.net)
    states = reference.trajectory(x)
    for state in states[1:]:
        state.retain_grad()
    torch.nn.functional.mse_loss(reference.readout(states[-1]), y).backward()
    state_norms = [float(s.grad.norm(dim=1).mean()) for s in states[1:]]  # mean of per-sample norms
    param_norms = [
        float(torch.cat([p.grad.flatten() for p in b.parameters()]).norm())
        for b in reference.blocks
    ]

    trainer = fit(module, [GradientMagnitudes()], tmp_path, loader(x, y), epochs=1)
    acc = events(trainer.logger.log_dir)
    for t in range(1, 4):
        assert scalar(acc, f"gradients_layers/state_norm/layer_{t}_step") == [
            pytest.approx(state_norms[t - 1], rel=1e-5)
        ]
        assert scalar(acc, f"gradients_layers/param_norm/layer_{t}_step") == [
            pytest.approx(param_norms[t - 1], rel=1e-5)
        ]
    assert scalar(acc, "gradients/state_norm_first_over_last_step") == [
        pytest.approx(state_norms[0] / state_norms[-1], rel=1e-5)
    ]
    assert len(acc.Images("gradients/norm_vs_layer")) == 1


def test_spectral_radii_equal_dense_eigenvalues(tmp_path: Path) -> None:
    module = sine_module(layers=3, theta=[0.5, 1.0, 0.0])
    x, y = sine_data()
    trainer = fit(
        module,
        [StabilityMonitor(every_n_epochs=1, max_samples=8)],
        tmp_path,
        loader(x.double(), y.double()),
        epochs=1,
        precision="64-true",
    )
    acc = events(trainer.logger.log_dir)
    net = module.net
    states = net.trajectory(x[:8].double())
    for t, block in enumerate(net.blocks):
        x_t, y_t = states[t].detach(), states[t + 1].detach()
        eye = torch.eye(2, dtype=torch.float64)
        jf = [jacobian(block.F, v[None]).reshape(2, 2) for v in (*x_t, *y_t)]
        jx, jy = jf[:8], jf[8:]
        layer = [
            torch.linalg.solve(eye - block.theta * b, eye + (1 - block.theta) * a)
            for a, b in zip(jx, jy)
        ]
        rho_layer = max(float(torch.linalg.eigvals(m).abs().max()) for m in layer)
        assert scalar(acc, f"stability_layers/layer_radius/layer_{t + 1}") == [
            pytest.approx(rho_layer, rel=1e-6)
        ]
        tag = f"stability_layers/neumann_radius/layer_{t + 1}"
        if block.theta == 0:
            assert tag not in acc.Tags()["scalars"]  # an explicit layer solves nothing
        else:
            rho = max(block.theta * float(torch.linalg.eigvals(b).abs().max()) for b in jy)
            assert scalar(acc, tag) == [pytest.approx(rho, rel=1e-6)]


# -- absent data, other loggers, other tasks --------------------------------------------------


def test_explicit_network_has_no_backward_statistics(tmp_path: Path) -> None:
    trainer = fit(
        sine_module(layers=3, theta=0.0),
        all_callbacks(every=2),
        tmp_path,
        loader(*sine_data()),
        epochs=2,
    )
    acc = events(trainer.logger.log_dir)
    tags = set(acc.Tags()["scalars"])
    assert not [t for t in tags if "backward" in t or "neumann" in t]
    assert set(scalar(acc, "solver/forward_iterations_mean_step")) == {0.0}
    assert set(scalar(acc, "solver/forward_not_converged_step")) == {0.0}
    assert all(math.isfinite(v) and v > 0 for v in scalar(acc, "stability/layer_radius_max"))
    assert "solver/backward_iterations_mean_over_layers" not in acc.Tags()["histograms"]
    assert_png(Path(trainer.logger.log_dir) / "figures" / "figures_iterations_epoch0001.png")


def test_mixed_theta_logs_backward_only_for_implicit_layers(tmp_path: Path) -> None:
    module = sine_module(layers=3, theta=[0.0, 0.5, 0.5])
    trainer = fit(module, [SolverStatistics()], tmp_path, loader(*sine_data()), epochs=1)
    tags = set(events(trainer.logger.log_dir).Tags()["scalars"])
    backward = {
        t
        for t in tags
        if t.startswith("solver_layers/backward_iterations_mean/") and t.endswith("_step")
    }
    assert backward == {
        "solver_layers/backward_iterations_mean/layer_2_step",
        "solver_layers/backward_iterations_mean/layer_3_step",
    }


@pytest.mark.parametrize("kind", ["none", "csv"])
def test_callbacks_work_without_tensorboard(tmp_path: Path, kind: str) -> None:
    logger = CSVLogger(str(tmp_path), name="csv", version=0) if kind == "csv" else False
    trainer = fit(
        sine_module(layers=2),
        all_callbacks(kinds=["output"]),
        tmp_path,
        loader(*sine_data()),
        loader(*sine_data(101)),
        epochs=1,
        logger=logger,
    )
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["solver/forward_iterations_mean_epoch"]))
    assert math.isfinite(float(metrics["gradients/state_norm_mean_epoch"]))
    directory = Path(logger.log_dir if logger else tmp_path) / "figures"
    assert_png(directory / "figures_output_epoch0000.png")
    if kind == "csv":
        with open(Path(logger.log_dir) / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        values = [
            float(r["stability/layer_radius_max"])
            for r in rows
            if r.get("stability/layer_radius_max")
        ]
        assert len(values) == 1 and math.isfinite(values[0]) and values[0] > 0


def test_validation_only_run(tmp_path: Path) -> None:
    module = sine_module(layers=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=all_callbacks(),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    (results,) = trainer.validate(module, loader(*sine_data(101)))
    iterations = [float(b.forward_stats.iterations.float().mean()) for b in module.net.blocks]
    assert results["val_solver/forward_iterations_mean"] == pytest.approx(
        sum(iterations) / 2, rel=1e-6
    )
    assert results["val_solver/forward_not_converged"] == 0
    assert not (tmp_path / "figures").exists()  # figures belong to training


@pytest.mark.parametrize("task", ["classification", None])
def test_classification_draws_decision_regions(tmp_path: Path, task) -> None:
    x, y = two_class_data()
    module = classifier_module(layers=2, task=task)  # None: guessed from the linear readout
    figures = Figures(every_n_epochs=1, grid_size=40, field_grid_size=6)
    trainer = fit(module, [figures], tmp_path, loader(x, y), epochs=1)
    directory = Path(trainer.logger.log_dir) / "figures"
    assert sorted(p.name for p in directory.iterdir()) == [
        f"figures_{k}_epoch0000.png" for k in ("decision", "fields", "iterations", "trajectories")
    ]
    drawn = figures.make_figures(trainer, module, epoch=0)
    # The decision figure colours the grid by the network's predicted class.
    contour = drawn["decision"].axes[0].collections[0]
    assert contour.levels.tolist() == [-0.5, 0.5, 1.5]
    # Trajectories of the 4-D states are projected on the first two components.
    states = module.net.trajectory(x[: len(x)])
    first_path = drawn["trajectories"].axes[0].lines[0].get_xydata()
    assert first_path == pytest.approx(
        torch.stack([s[0, :2] for s in states]).detach().numpy(), rel=1e-5
    )


def test_output_figure_draws_the_target_function_on_the_grid(tmp_path: Path) -> None:
    """With SineRegression the target is f on the output grid; with bare loaders, the validation
    points."""
    module = sine_module(layers=2)
    figures = Figures(every_n_epochs=1, kinds=["output"], grid_size=101)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        callbacks=[figures],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=SineRegression(num_points=11))
    target, network = figures.make_figures(trainer, module, epoch=0)["output"].axes[0].lines
    grid = torch.linspace(-5, 5, 101)
    assert target.get_xdata() == pytest.approx(grid.numpy(), abs=1e-6)
    assert target.get_ydata() == pytest.approx(
        (torch.sin(grid) + 0.1 * torch.cos(19 * grid)).numpy(), abs=1e-6
    )
    assert network.get_xdata() == pytest.approx(grid.numpy(), abs=1e-6)
    with torch.no_grad():
        assert network.get_ydata() == pytest.approx(
            module.net(grid[:, None])[:, 0].numpy(), abs=1e-5
        )

    val_x = torch.tensor([[2.0], [-1.0], [0.5]])
    trainer = fit(
        module,
        [figures],
        tmp_path / "loaders",
        loader(*sine_data(11)),
        loader(val_x, val_x.sin()),
        epochs=1,
        logger=False,
    )
    target, _ = figures.make_figures(trainer, module, epoch=0)["output"].axes[0].lines
    assert target.get_xdata().tolist() == [-1.0, 0.5, 2.0]  # the validation points, sorted
    assert target.get_ydata() == pytest.approx(
        [math.sin(-1.0), math.sin(0.5), math.sin(2.0)], abs=1e-6
    )


def test_monitoring_does_not_change_training(tmp_path: Path) -> None:
    """Same seed, shuffled batches: the weights after training are the same with or without
    monitoring."""
    x, y = sine_data()
    weights = []
    for name, callbacks in (("plain", []), ("monitored", all_callbacks(kinds=["output"]))):
        torch.manual_seed(5)
        module = sine_module(layers=2)
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=17, shuffle=True
        )
        fit(module, callbacks, tmp_path / name, data, epochs=2)
        weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert torch.equal(weights[0], weights[1])


# -- construction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: Figures(every_n_epochs=-1), "every_n_epochs"),
        (lambda: Figures(kinds=["output", "bogus"]), "kinds"),
        (lambda: Figures(grid_size=1), "grid_size"),
        (lambda: StabilityMonitor(krylov_dim=0), "krylov_dim"),
        (lambda: StabilityMonitor(max_samples=0), "max_samples"),
        (lambda: SolverStatistics(per_layer="yes"), "per_layer"),
        (lambda: GradientMagnitudes(plot_every_n_epochs=1.5), "plot_every_n_epochs"),
    ],
)
def test_invalid_arguments_are_named(make, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()


def test_yaml_config_builds_the_callbacks() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[pl.Callback])
    config = parser.parse_string("""
callbacks:
  - class_path: irnet.callbacks.SolverStatistics
    init_args: {per_layer: false}
  - class_path: irnet.callbacks.GradientMagnitudes
  - class_path: irnet.callbacks.StabilityMonitor
    init_args: {every_n_epochs: 5, krylov_dim: 8}
  - class_path: irnet.callbacks.Figures
    init_args: {every_n_epochs: 50, kinds: [output, iterations]}
""")
    solver, gradients, stability, figures = parser.instantiate(config).callbacks
    assert isinstance(solver, SolverStatistics) and solver.per_layer is False
    assert isinstance(gradients, GradientMagnitudes)
    assert stability.schedule.every_n_epochs == 5 and stability.krylov_dim == 8
    assert figures.kinds == ["output", "iterations"] and figures.schedule.every_n_epochs == 50


@pytest.mark.slow
def test_ddp_rank_zero_writes_and_nothing_hangs(tmp_path: Path) -> None:
    """Two CPU processes (gloo): every callback runs, rank 0 writes, no collective runs on one rank
    only."""
    callbacks = [
        SolverStatistics(sync_dist=True),
        GradientMagnitudes(),
        StabilityMonitor(every_n_epochs=1, max_samples=4),
        Figures(every_n_epochs=1, kinds=["output"]),
        PerturbationStreams(plot_every_n_epochs=0),
    ]
    trainer = fit(
        sine_module(layers=2),
        callbacks,
        tmp_path,
        loader(*sine_data(), batch_size=13),
        loader(*sine_data(101)),
        epochs=2,
        strategy="ddp_spawn",
        devices=2,
    )
    acc = events(Path(tmp_path) / "tb" / "version_0")
    assert len(scalar(acc, "stability/layer_radius_max")) == 2
    assert len(scalar(acc, "perturbation/amplification")) == 2
    assert set(scalar(acc, "solver/forward_not_converged_epoch")) == {0.0}
    assert (
        len(scalar(acc, "solver/forward_iterations_mean_step")) == 4
    )  # 2 steps per rank and epoch
    assert sorted(p.name for p in (Path(tmp_path) / "tb" / "version_0" / "figures").iterdir()) == [
        "figures_output_epoch0000.png",
        "figures_output_epoch0001.png",
        "perturbation_distance_vs_depth_epoch0001.png",
    ]
    assert trainer.world_size == 2


class StatsProbe(pl.Callback):
    """After the other callbacks' epoch-end passes, the blocks hold the training step's stats."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stats = [(b.forward_stats, b.backward_stats) for b in pl_module.net.blocks]

    def on_train_epoch_end(self, trainer, pl_module):
        now = [(b.forward_stats, b.backward_stats) for b in pl_module.net.blocks]
        assert all(a is b and c is d for (a, c), (b, d) in zip(self.stats, now))
        self.checked += 1


def test_monitoring_passes_leave_the_blocks_statistics(tmp_path: Path) -> None:
    """StabilityMonitor, Figures and PerturbationStreams run the network on other inputs at epoch
    end (rank 0 only under DDP): the statistics must be put back so that every rank holds the
    same."""
    probe = StatsProbe()
    callbacks = [
        StabilityMonitor(every_n_epochs=1, max_samples=4),
        PerturbationStreams(plot_every_n_epochs=0),
        Figures(every_n_epochs=1, kinds=["output", "trajectories"], grid_size=20),
        probe,
    ]
    fit(sine_module(layers=2), callbacks, tmp_path, loader(*sine_data(21)), epochs=2)
    assert probe.checked == 2


def test_reading_a_shuffling_loader_for_a_figure_keeps_its_order() -> None:
    """Figures reads the training loader on rank 0 only: the loader's own generator must not move,
    or the next epoch's order (and, under DDP, the ranks' agreement on it) would change."""
    from irnet.callbacks._data import training_data

    def shuffled(seed: int = 2):
        data = torch.utils.data.TensorDataset(torch.arange(12.0)[:, None], torch.arange(12.0))
        return torch.utils.data.DataLoader(
            data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )

    plain, read = shuffled(), shuffled()
    assert training_data(SimpleNamespace(train_dataloader=read), 8) is not None
    assert [b[1].tolist() for b in read] == [b[1].tolist() for b in plain]
