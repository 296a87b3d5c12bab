"""Data modules: sizes, shapes, splits, determinism, loaders."""

from __future__ import annotations

import math

import pytest
import torch

from irnet.datamodules import Circles, Digits, Moons, SineRegression, TwoSpirals
from irnet.datamodules.sine import sine_target


def rows(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in x.flatten(1).tolist()}


def test_sine_regression_is_example_1():
    dm = SineRegression()
    x, y = dm.tensors("train")
    assert x.shape == (51, 1) and y.shape == (51, 1)
    assert x[0].item() == -5.0 and x[-1].item() == 5.0
    assert torch.allclose(x[1:] - x[:-1], torch.full((50, 1), 0.2), atol=1e-6)
    assert torch.allclose(y, torch.sin(x) + 0.1 * torch.cos(19 * x), atol=1e-6)
    xv, yv = dm.tensors("val")
    assert xv.shape == (50, 1)
    assert torch.allclose(xv, (x[1:] + x[:-1]) / 2, atol=1e-6)  # the midpoints
    assert yv[0].item() == pytest.approx(math.sin(-4.9) + 0.1 * math.cos(19 * -4.9), abs=1e-6)
    assert torch.equal(dm.tensors("test")[0], xv)
    assert sine_target(torch.tensor([0.0])).item() == pytest.approx(0.1)


def test_toy_sets_are_full_batch_by_default():
    dm = SineRegression()
    batches = list(dm.train_dataloader())
    assert len(batches) == 1 and batches[0][0].shape == (51, 1)
    assert len(list(dm.val_dataloader())) == 1
    assert len(list(TwoSpirals().train_dataloader())) == 1


def test_two_spirals_holds_out_every_other_point():
    dm = TwoSpirals()
    (x, y), (xv, yv) = dm.tensors("train"), dm.tensors("val")
    assert x.shape == (100, 2) and xv.shape == (100, 2)
    assert y.dtype == torch.long and set(y.tolist()) == {0, 1}
    assert (y == 0).sum() == 50 and (yv == 0).sum() == 50
    assert not rows(x) & rows(xv)
    # the arms are point-symmetric: spiral 1 is spiral 0 rotated by π
    assert torch.allclose(x[y == 1], -x[y == 0])
    # along arm 0, each held-out point lies between two consecutive training points
    arm, held = x[y == 0], xv[yv == 0]
    radius = arm.norm(dim=1)
    assert (radius[1:] > radius[:-1]).all()
    between = held[:-1].norm(dim=1)
    assert ((between > radius[:-1]) & (between < radius[1:])).all()
    assert torch.equal(dm.tensors("test")[0], xv)


def test_two_spirals_noise_is_seeded():
    a = TwoSpirals(noise=0.05, seed=1).tensors("train")[0]
    assert torch.equal(a, TwoSpirals(noise=0.05, seed=1).tensors("train")[0])
    assert not torch.equal(a, TwoSpirals(noise=0.05, seed=2).tensors("train")[0])
    assert not torch.equal(a, TwoSpirals().tensors("train")[0])


@pytest.mark.parametrize("cls", [Moons, Circles])
def test_sklearn_toys_split_and_determinism(cls):
    dm = cls(num_samples=200, seed=3)
    sizes = {s: len(dm.dataset(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 120, "val": 40, "test": 40}
    x, y = dm.tensors("train")
    assert x.shape == (120, 2) and x.dtype == torch.float32
    assert set(y.tolist()) == {0, 1}
    all_rows = [rows(dm.tensors(s)[0]) for s in ("train", "val", "test")]
    assert sum(map(len, all_rows)) == 200 and len(set.union(*all_rows)) == 200  # disjoint
    assert torch.equal(x, cls(num_samples=200, seed=3).tensors("train")[0])
    assert not torch.equal(x, cls(num_samples=200, seed=4).tensors("train")[0])


def test_moons_noise_changes_the_points():
    clean = Moons(num_samples=100, noise=0.0).tensors("train")[0]
    radius = (clean - torch.tensor([0.0, 0.0])).norm(dim=1)
    # noise-free moons lie on unit circles centred at (0, 0) and (1, 0.5)
    other = (clean - torch.tensor([1.0, 0.5])).norm(dim=1)
    assert torch.allclose(
        torch.minimum((radius - 1).abs(), (other - 1).abs()), torch.zeros(60), atol=1e-5
    )
    assert not torch.equal(clean, Moons(num_samples=100, noise=0.2).tensors("train")[0])


def test_digits_splits_shapes_and_normalisation():
    flat, image = Digits(seed=0), Digits(flatten=False, seed=0)
    sizes = {s: len(flat.dataset(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    assert sum(sizes.values()) == 1797
    x, y = flat.tensors("train")
    xi, yi = image.tensors("train")
    assert x.shape == (1257, 64) and xi.shape == (1257, 1, 8, 8)
    assert torch.equal(xi.reshape(-1, 64), x) and torch.equal(y, yi)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x.std().item() == pytest.approx(1.0, abs=1e-4)
    assert set(y.tolist()) == set(range(10))
    assert torch.equal(x, Digits(seed=0).tensors("train")[0])
    assert not torch.equal(y, Digits(seed=1).tensors("train")[1])


def test_batched_loaders_shuffle_deterministically():
    first = [b[1] for b in Digits(batch_size=128, seed=5).train_dataloader()]
    again = [b[1] for b in Digits(batch_size=128, seed=5).train_dataloader()]
    assert len(first) == math.ceil(1257 / 128) and first[0].shape == (128,)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = [b[1] for b in Digits(batch_size=128, seed=6).train_dataloader()]
    assert not torch.equal(first[0], other[0])
    val = next(iter(Digits(batch_size=128).val_dataloader()))[1]
    assert torch.equal(val, Digits(batch_size=128).tensors("val")[1][:128])  # no shuffling


def test_predict_loader_serves_the_test_split():
    dm = SineRegression()
    x, _ = next(iter(dm.predict_dataloader()))
    assert torch.equal(x, dm.tensors("test")[0])


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: SineRegression(num_points=1), "num_points"),
        (lambda: SineRegression(low=1.0, high=0.0), "low"),
        (lambda: TwoSpirals(num_points=202), "num_points"),
        (lambda: Moons(val_fraction=1.0), "val_fraction"),
        (lambda: Circles(factor=1.5), "factor"),
        (lambda: Digits(batch_size=0), "batch_size"),
        (lambda: Digits(test_fraction=-0.1), "test_fraction"),
    ],
)
def test_bad_arguments_name_the_argument(build, name):
    with pytest.raises(ValueError, match=name):
        build()
