"""Extra passes through a network that must leave no trace on the main pass."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

from torch import nn

from irnet.stats import preserved_stats


@contextmanager
def auxiliary_pass(net: nn.Module) -> Iterator[None]:
    """Run R_rnd's perturbed copies or a monitor's probe through ``net`` without side effects.

    Inside the context the blocks' ``forward_stats``/``backward_stats`` of the
    main pass are kept (:func:`~irnet.stats.preserved_stats`), and a network
    with warm starts solves cold and leaves its cache alone (inputs that will
    not come again would only crowd it).
    """
    pause = net.warm_start_paused() if hasattr(net, "warm_start_paused") else nullcontext()
    with preserved_stats(getattr(net, "blocks", [])), pause:
        yield


__all__ = ["auxiliary_pass"]
