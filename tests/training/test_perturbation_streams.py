"""PerturbationStreams: owning R_rnd's noise, and ‖y_t − ỹ_t‖ per depth against hand sums."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.callbacks import TinyModule, events, fit, loader, scalar, sine_data
from helpers.training import tiny_odenet
from irnet.analysis.plotting import plot_perturbation_growth
from irnet.callbacks import PerturbationStreams, SolverStatistics
from irnet.module import ImplicitNetModule
from irnet.perturbations import GaussianPerturbation, Perturbation
from irnet.regularizers import PerturbationRegularizer

LAYERS = 3
TAGS = [f"perturbation/layer_{t:02d}" for t in range(LAYERS + 1)]


class Shift(Perturbation):
    """Adds the constant ``c`` to every input and counts its calls."""

    def __init__(self, c: float = 0.2) -> None:
        self.c = c
        self.calls = 0

    def noise(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        self.calls += 1
        return torch.full_like(x, self.c)


def module(
    theta: float = 0.5, r_rnd: Optional[PerturbationRegularizer] = None, seed: int = 0
) -> ImplicitNetModule:
    return ImplicitNetModule(tiny_odenet(LAYERS, 8, theta=theta, seed=seed), r_rnd=r_rnd)


def logged(acc, epoch_index: int = -1) -> list[float]:
    return [scalar(acc, tag)[epoch_index] for tag in TAGS]


# -- tags, values, files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """R_rnd off: the callback runs 2 Gaussian streams itself, every epoch, image every 2nd."""
    root = tmp_path_factory.mktemp("own")
    callback = PerturbationStreams(
        perturbation=GaussianPerturbation(0.1),
        streams=2,
        seed=7,
        plot_every_n_epochs=2,
        max_samples=20,
    )
    trainer = fit(module(), [callback], root, loader(*sine_data()), epochs=3)
    return trainer, callback, events(trainer.logger.log_dir)


def test_tags_are_written_with_finite_values(own_run) -> None:
    trainer, callback, acc = own_run
    for tag in [*TAGS, "perturbation/amplification"]:
        values = scalar(acc, tag)
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), tag
    assert f"perturbation/layer_{LAYERS + 1:02d}" not in acc.Tags()["scalars"]
    assert scalar(acc, "perturbation/amplification") == pytest.approx(
        [last / first for first, last in zip(scalar(acc, TAGS[0]), scalar(acc, TAGS[-1]))], rel=1e-6
    )
    histogram = acc.Histograms("perturbation/distance_over_layers")
    assert len(histogram) == 3 and histogram[-1].histogram_value.num == LAYERS + 1
    assert histogram[-1].histogram_value.sum == pytest.approx(sum(logged(acc)), rel=1e-5)
    assert len(acc.Images("perturbation/distance_vs_depth")) == 2  # epoch 1 and the last, epoch 2
    assert callback.last_distances.tolist() == pytest.approx(logged(acc), rel=1e-6)


def test_png_files_beside_the_logs(own_run) -> None:
    trainer, _, _ = own_run
    directory = Path(trainer.logger.log_dir) / "figures"
    assert sorted(p.name for p in directory.iterdir()) == [
        "perturbation_distance_vs_depth_epoch0001.png",
        "perturbation_distance_vs_depth_epoch0002.png",
    ]
    data = (directory / "perturbation_distance_vs_depth_epoch0002.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_own_streams_equal_a_recomputation_with_the_same_seed(own_run) -> None:
    """Epoch e draws N(0, σ²) streams from a generator seeded by (seed, e), as R_rnd would."""
    trainer, _, acc = own_run
    net = trainer.lightning_module.net
    x = sine_data()[0][:20]
    epoch = 2
    seed = int(np.random.SeedSequence([7, epoch]).generate_state(1, np.uint64)[0] >> 1)
    generator = torch.Generator().manual_seed(seed)
    noisy_x = torch.cat([x + 0.1 * torch.randn(x.shape, generator=generator) for _ in range(2)])
    with torch.no_grad():
        clean, noisy = net.trajectory(x), net.trajectory(noisy_x)
    expected = [float((n - c.repeat(2, 1)).norm(dim=1).mean()) for c, n in zip(clean, noisy)]
    assert logged(acc) == pytest.approx(expected, rel=1e-5)
    assert logged(acc, 0) != pytest.approx(expected, rel=1e-3)  # other weights, other noise


def test_distances_of_an_explicit_network_by_hand(tmp_path: Path) -> None:
    """θ = 0: y_t = y_{t−1} + F_t(y_{t−1}), and a constant shift c moves y_0 = (x, x) by √2 c."""
    shift = Shift(0.2)
    callback = PerturbationStreams(perturbation=shift, streams=3, max_samples=10)
    trainer = fit(module(theta=0.0), [callback], tmp_path, loader(*sine_data()), epochs=1)
    x = sine_data()[0][:10]
    y, y_noisy = torch.cat([x, x], 1), torch.cat([x, x], 1) + 0.2
    expected = [float((y_noisy - y).norm(dim=1).mean())]
    with torch.no_grad():
        for block in trainer.lightning_module.net.blocks:
            y, y_noisy = y + block.F(y), y_noisy + block.F(y_noisy)
            expected.append(float((y_noisy - y).norm(dim=1).mean()))
    acc = events(trainer.logger.log_dir)
    assert expected[0] == pytest.approx(math.sqrt(2) * 0.2, rel=1e-6)
    assert logged(acc) == pytest.approx(expected, rel=1e-5)
    assert scalar(acc, "perturbation/amplification") == [
        pytest.approx(expected[-1] / expected[0], rel=1e-5)
    ]
    assert shift.calls == 3  # one epoch, three streams


# -- R_rnd on: the callback owns its noise ---------------------------------------------------------


def test_regularizer_trains_on_the_callbacks_perturbation(tmp_path: Path) -> None:
    regularizer = PerturbationRegularizer(weight=0.1)  # Gaussian σ = 0.05, one stream, seed 0
    original = regularizer.perturbation
    shift = Shift(0.2)
    callback = PerturbationStreams(perturbation=shift, streams=2, seed=5)
    net = module(r_rnd=regularizer)
    with pytest.warns(UserWarning, match="owns R_rnd's noise"):
        trainer = fit(net, [callback], tmp_path, loader(*sine_data()), epochs=2)
    assert shift.calls == 2 * 2  # two streams in each of two full-batch steps
    acc = events(trainer.logger.log_dir)
    # t = 1…T are what the regulariser measured in the last step; t = 0 is √2 c.
    assert logged(acc)[1:] == pytest.approx(regularizer.last_distances.tolist(), rel=1e-6)
    assert logged(acc)[0] == pytest.approx(math.sqrt(2) * 0.2, rel=1e-6)
    assert len(scalar(acc, "perturbation/amplification")) == 2
    assert net.r_rnd is regularizer  # the fit is over: the regulariser has its own settings back
    assert (regularizer.perturbation, regularizer.streams, regularizer.seed) == (original, 1, 0)


def test_installing_equals_configuring_the_regularizer(tmp_path: Path) -> None:
    """The callback's (perturbation, streams, seed) train exactly as if R_rnd were given them."""
    weights = []
    for name in ("configured", "installed"):
        if name == "configured":
            reg = PerturbationRegularizer(
                weight=0.5, streams=2, seed=3, perturbation=GaussianPerturbation(0.1)
            )
            callbacks = []
        else:
            reg = PerturbationRegularizer(weight=0.5)
            callbacks = [
                PerturbationStreams(perturbation=GaussianPerturbation(0.1), streams=2, seed=3)
            ]
        net = module(r_rnd=reg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fit(net, callbacks, tmp_path / name, loader(*sine_data(), batch_size=17), epochs=2)
        weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_without_settings_it_logs_the_regularizers_own_streams(tmp_path: Path) -> None:
    regularizer = PerturbationRegularizer(weight=0.1, streams=2, perturbation=Shift(0.3))
    callback = PerturbationStreams()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing is replaced, so nothing to warn about
        warnings.filterwarnings(
            "ignore", message=".*(val_dataloader|does not have many workers|LeafSpec)"
        )
        fit(module(r_rnd=regularizer), [callback], tmp_path, loader(*sine_data()), epochs=1)
    assert regularizer.perturbation.calls == 2
    assert callback.last_distances[0] == pytest.approx(math.sqrt(2) * 0.3, rel=1e-6)
    assert callback.last_distances[1:].tolist() == pytest.approx(
        regularizer.last_distances.tolist(), rel=1e-6
    )


# -- monitoring does not change training -----------------------------------------------------------


def test_training_is_identical_with_and_without_the_callback(tmp_path: Path) -> None:
    x, y = sine_data()
    weights = []
    for name, callbacks in (
        ("plain", []),
        ("monitored", [PerturbationStreams(streams=3, plot_every_n_epochs=1)]),
    ):
        torch.manual_seed(5)
        net = module(seed=None)
        data = DataLoader(TensorDataset(x, y), batch_size=17, shuffle=True)
        fit(net, callbacks, tmp_path / name, data, epochs=2)
        weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_solver_statistics_stay_those_of_training(tmp_path: Path) -> None:
    net = module()
    trainer = fit(
        net,
        [SolverStatistics(), PerturbationStreams(streams=3, max_samples=10)],
        tmp_path,
        loader(*sine_data()),
        epochs=1,
    )
    acc = events(trainer.logger.log_dir)
    for t, block in enumerate(net.net.blocks, start=1):
        assert block.forward_stats.iterations.shape == (
            51,
        )  # the training batch, not 3 x 10 streams
        assert scalar(acc, f"solver_layers/forward_iterations_mean/layer_{t}_step") == [
            pytest.approx(float(block.forward_stats.iterations.float().mean()), rel=1e-6)
        ]
    assert net.net.training


# -- absent data -----------------------------------------------------------------------------------


def test_without_a_logger_it_keeps_the_distances_and_writes_the_png(tmp_path: Path) -> None:
    callback = PerturbationStreams(plot_every_n_epochs=0)
    fit(module(), [callback], tmp_path, loader(*sine_data()), epochs=1, logger=False)
    assert (
        callback.last_distances.shape == (LAYERS + 1,)
        and torch.isfinite(callback.last_distances).all()
    )
    assert [p.name for p in (tmp_path / "figures").iterdir()] == [
        "perturbation_distance_vs_depth_epoch0000.png"
    ]


def test_a_network_that_is_not_an_implicit_odenet_is_skipped(tmp_path: Path) -> None:
    callback = PerturbationStreams()
    net = TinyModule(nn.Linear(1, 1))
    with pytest.warns(UserWarning, match="ImplicitODENet"):
        trainer = fit(net, [callback], tmp_path, loader(*sine_data()), epochs=1)
    assert callback.last_distances is None
    assert not [
        t for t in events(trainer.logger.log_dir).Tags()["scalars"] if t.startswith("perturbation")
    ]


# -- construction, YAML, the picture ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"perturbation": 0.05}, "perturbation"),
        ({"streams": 0}, "streams"),
        ({"seed": -1}, "seed"),
        ({"every_n_epochs": -1}, "every_n_epochs"),
        ({"plot_every_n_epochs": 1.5}, "plot_every_n_epochs"),
        ({"max_samples": 0}, "max_samples"),
        ({"histograms": "yes"}, "histograms"),
        ({"save_png": 1}, "save_png"),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PerturbationStreams(**kwargs)


def test_yaml_config_builds_the_callback() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[pl.Callback])
    config = parser.parse_string("""
callbacks:
  - class_path: irnet.callbacks.PerturbationStreams
    init_args:
      perturbation:
        class_path: irnet.perturbations.GaussianPerturbation
        init_args: {sigma: 0.1}
      streams: 4
      every_n_epochs: 5
""")
    (callback,) = parser.instantiate(config).callbacks
    assert (
        isinstance(callback.perturbation, GaussianPerturbation)
        and callback.perturbation.sigma == 0.1
    )
    assert callback.streams == 4 and callback.seed is None and callback.schedule.every_n_epochs == 5


def test_plot_draws_distance_against_depth_on_a_log_scale() -> None:
    fig = plot_perturbation_growth([0.1, 0.2, float("nan"), 0.8], title="epoch 3")
    ax = fig.axes[0]
    curve, reference = ax.lines
    assert curve.get_xdata().tolist() == [0, 1, 3] and curve.get_ydata().tolist() == [0.1, 0.2, 0.8]
    assert list(reference.get_ydata()) == [0.1, 0.1]  # the input perturbation
    assert ax.get_yscale() == "log" and ax.get_title() == "epoch 3"
    with pytest.raises(ValueError, match="distances"):
        plot_perturbation_growth(np.ones((2, 2)))
