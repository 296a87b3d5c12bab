"""Argument checks and the every-N-epochs schedule shared by the monitoring callbacks."""

from __future__ import annotations

from irnet._misc import check_int


def check_bool(name: str, value: bool) -> bool:
    """A real ``bool`` (YAML ``true``/``false``), not a number or a string."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


class EveryNEpochs:
    """Decides when an every-N-epochs callback acts, and remembers whether the last epoch was done.

    Args:
        name: the argument's name, for the error message.
        every_n_epochs: act after epochs N−1, 2N−1, … (0-based); 0 means never
            during training (only at the end, if ``at_end``).
    """

    def __init__(self, name: str, every_n_epochs: int) -> None:
        self.every_n_epochs = check_int(name, every_n_epochs, 0)
        self.last_epoch: int | None = None  # last epoch seen at its end
        self.done_epoch: int | None = None  # last epoch acted on

    def due(self, epoch: int) -> bool:
        """Note that ``epoch`` ended; whether to act on it."""
        self.last_epoch = epoch
        return self.every_n_epochs > 0 and (epoch + 1) % self.every_n_epochs == 0

    def mark(self, epoch: int) -> None:
        """Record that ``epoch`` was acted on."""
        self.done_epoch = epoch

    def pending_at_end(self) -> bool:
        """Whether the last epoch ended without being acted on (act once more at the end)."""
        return self.last_epoch is not None and self.done_epoch != self.last_epoch

    def reset(self) -> None:
        """Forget the epochs seen (a new fit)."""
        self.last_epoch = self.done_epoch = None
