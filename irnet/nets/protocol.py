"""What irnet relies on in a network: declared, not probed.

Training, the regularisers and the callbacks accept any ``nn.Module`` as
``net``. What they read from it is declared by two protocols:

* :class:`ImplicitNetwork`: the network lists its implicit layers as
  ``blocks`` (solver statistics, failure diagnosis, R_fp);
* :class:`TrajectoryNetwork`: it also exposes its hidden states through
  ``lift``, ``trajectory`` and ``readout`` (R_rnd, R_jac, the figures), and
  can pause its warm starts for auxiliary passes.

:class:`~irnet.nets.ODENet` and :class:`~irnet.nets.ConvODENet` are
trajectory networks; :class:`~irnet.nets.StagedConvODENet` only lists its
blocks (its hidden states change shape between stages).
:func:`find_blocks` is the one way to find a network's implicit layers.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator, Protocol, Sequence, runtime_checkable

from torch import Tensor, nn

from irnet.layer import ImplicitResidualBlock
from irnet.stats import preserved_stats


@runtime_checkable
class ImplicitNetwork(Protocol):
    """A network that lists its implicit layers, first layer first."""

    @property
    def blocks(self) -> Sequence[ImplicitResidualBlock]: ...


@runtime_checkable
class TrajectoryNetwork(ImplicitNetwork, Protocol):
    """An implicit network whose hidden states all have one shape: ``[y(0), y_1, …, y_T]``."""

    def lift(self, x: Tensor) -> Tensor: ...

    def trajectory(self, x: Tensor) -> list[Tensor]: ...

    def readout(self, y: Tensor) -> Tensor: ...

    def warm_start_paused(self) -> AbstractContextManager[None]: ...


def find_blocks(module: nn.Module) -> list[ImplicitResidualBlock]:
    """The implicit layers of ``module`` in depth order.

    ``module.blocks`` for an :class:`ImplicitNetwork`, else ``module.net.blocks``
    (a LightningModule holding one), else every :class:`ImplicitResidualBlock`
    found by walking ``module``.

    >>> from irnet.nets import ODENet
    >>> len(find_blocks(ODENet(in_features=1, out_features=1, layers=3, width=4)))
    3
    """
    for candidate in (module, getattr(module, "net", None)):
        if isinstance(candidate, ImplicitNetwork):
            return list(candidate.blocks)
    return [m for m in module.modules() if isinstance(m, ImplicitResidualBlock)]


@contextmanager
def auxiliary_pass(net: nn.Module) -> Iterator[None]:
    """Run R_rnd's perturbed copies or a monitor's probe through ``net`` without side effects.

    Inside the context the blocks' ``forward_stats``/``backward_stats`` of the
    main pass are kept (:func:`~irnet.stats.preserved_stats`), and a
    :class:`TrajectoryNetwork` with warm starts solves cold and leaves its cache
    alone (inputs that will not come again would only crowd it).
    """
    pause = net.warm_start_paused() if isinstance(net, TrajectoryNetwork) else nullcontext()
    with preserved_stats(find_blocks(net)), pause:
        yield
