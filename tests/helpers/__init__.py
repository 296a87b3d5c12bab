"""Shared test helpers: problems with known answers, tiny networks, DDP runs, host-read counters."""
