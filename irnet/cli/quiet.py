"""Notices of Lightning's that tell an irnet user nothing, held back while the command runs.

* Lightning's advertisements, logged through ``rank_zero_info``: for litlogger ("💡 Tip: For
  seamless cloud logging …", on every run whose Trainer has no LitLogger) and for litmodels
  (where the Trainer adds a ModelCheckpoint of its own; irnet's checkpoint callbacks make that
  rare);
* torch's FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated", raised inside
  Lightning's own pytree helper (``pytorch_lightning.utilities._pytree``) when it wraps a
  loop's dataloaders: Lightning's to change, nothing the user can act on.

Nothing else is held back: Lightning's other lines, every other warning (Lightning's, torch's,
irnet's, and this one where other code raises it) and irnet's own output pass. Lightning has
no switch for the advertisements; its documented way to shape its console output is Python's
logging, so a :class:`logging.Filter` on the logger that emits the tips drops those records.
Both filters hold only inside :func:`quiet_notices`, around the command line's run: a program
that imports irnet keeps Lightning's output as it was.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Iterator

# the loggers Lightning's rank_zero_info writes to (pytorch_lightning, or the unified lightning
# package, sets lightning_utilities' rank-zero logger to one of these on import)
TIP_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
PYTREE_MESSAGE = re.escape("`isinstance(treespec, LeafSpec)` is deprecated")
PYTREE_MODULE = r"(pytorch_lightning|lightning\.pytorch)\.utilities\._pytree$"


class LightningTips(logging.Filter):
    """Drops Lightning's advertisements for litlogger and litmodels; passes every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        advert = "litlogger" in message or "litmodels" in message
        return not (message.startswith("💡 Tip:") and advert)


@contextlib.contextmanager
def quiet_notices() -> Iterator[None]:
    """Hold back Lightning's tips and its pytree deprecation warning inside the block.

    The warning filter comes first among the process's filters while the block runs and the
    previous filters are restored afterwards (:class:`warnings.catch_warnings`); the logging
    filter is removed again.
    """
    tip = LightningTips()
    loggers = [logging.getLogger(name) for name in TIP_LOGGERS]
    for logger in loggers:
        logger.addFilter(tip)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=PYTREE_MESSAGE, category=FutureWarning, module=PYTREE_MODULE
            )
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(tip)
