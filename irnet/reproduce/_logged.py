"""Thresholds on logged metrics, compared in the metrics' own precision.

Lightning logs metrics as float32. An accuracy of exactly 95 of 100 validation points is
0.949999988 in float32, below the float 0.95, so ``acc >= 0.95`` would say it was never
reached. Comparing both sides rounded to float32 counts it (and keeps ``<`` strict for a
value equal to the threshold in float32).
"""

from __future__ import annotations

import torch


def as_logged(threshold: float) -> float:
    """``threshold`` (or a metric's value) rounded to float32, the precision of logged metrics."""
    return float(torch.tensor(threshold, dtype=torch.float32))
