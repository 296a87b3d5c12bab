"""Warm starts: each sample's previous fixed points, to start the next solve near its answer.

Between two optimiser steps the weights move a little, so a sample's fixed
point ``y*_t`` of layer t moves a little too; starting the solve there instead
of at the explicit step takes fewer iterations to reach the same tolerance.
The cache is keyed by the *network input* of each sample (its bytes), so it
needs nothing from the data pipeline: a full-batch data set finds every sample
of the last epoch; shuffled mini-batches find each sample's last visit; a new
or perturbed input is a miss and starts cold. Entries are evicted least
recently used beyond ``capacity`` samples.

Where the fixed-point map is a contraction the answer does not depend on the
start (the solve stops at the same tolerance around the unique fixed point);
where it is not, a warm start may settle on another fixed point than a cold
one would — switch it off there.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import Tensor

from irnet.validation import check_int


class WarmStartCache:
    """Per-sample store of every layer's last fixed point, keyed by the sample's network input.

    Args:
        capacity: the most samples kept (least recently used are dropped).
    """

    def __init__(self, capacity: int = 8192) -> None:
        self.capacity = check_int("capacity", capacity, 1)
        self._slots: OrderedDict[bytes, int] = OrderedDict()
        self._stores: list[Optional[Tensor]] = []

    def __len__(self) -> int:
        return len(self._slots)

    @staticmethod
    def keys(x: Tensor) -> list[bytes]:
        """One key per sample: its dtype, shape and bytes."""
        rows = x.detach().to("cpu").contiguous().flatten(1)
        prefix = f"{rows.dtype}{tuple(x.shape[1:])}".encode()
        flat = rows.view(torch.uint8) if rows.dtype != torch.bool else rows.to(torch.uint8)
        return [prefix + row.numpy().tobytes() for row in flat]

    def lookup(self, keys: Sequence[bytes], layers: int) -> Optional[list[Optional[Tensor]]]:
        """Previous fixed points of these samples, one tensor per layer; NaN rows where unknown.

        Returns ``None`` when no sample is known (nothing to gain).
        """
        slots = [self._slots.get(k, -1) for k in keys]
        if all(s < 0 for s in slots) or len(self._stores) != layers:
            return None
        index = torch.tensor(slots)
        guesses = []
        for store in self._stores:
            if store is None:
                guesses.append(None)
                continue
            rows = store[index.clamp_min(0).to(store.device)].clone()
            rows[(index < 0).to(store.device)] = float("nan")
            guesses.append(rows)
        return guesses

    def store(self, keys: Sequence[bytes], solutions: Sequence[Optional[Tensor]]) -> None:
        """Remember each sample's fixed point of every layer (``None`` for layers without a solve)."""
        if len(self._stores) != len(solutions):
            self.clear()
            self._stores = [None] * len(solutions)
        slots = torch.tensor([self._slot(k) for k in keys])
        # The store must stay an ordinary tensor when Lightning validates under
        # inference mode, so it can still be written in training afterwards.
        with torch.inference_mode(False), torch.no_grad():
            for t, y in enumerate(solutions):
                if y is None:
                    continue
                store = self._ensure_store(t, y)
                store[slots.to(store.device)] = y.detach().clone().to(store.dtype)

    def _slot(self, key: bytes) -> int:
        if key in self._slots:
            self._slots.move_to_end(key)
            return self._slots[key]
        if len(self._slots) < self.capacity:
            slot = len(self._slots)
        else:
            _, slot = self._slots.popitem(last=False)
        self._slots[key] = slot
        return slot

    def _ensure_store(self, t: int, y: Tensor) -> Tensor:
        store = self._stores[t]
        shape = (self.capacity, *y.shape[1:])
        if store is None or store.shape != shape or store.device != y.device:
            store = torch.full(shape, float("nan"), dtype=y.dtype, device=y.device)
            self._stores[t] = store
        return store

    def clear(self) -> None:
        """Forget everything (e.g. after loading other weights)."""
        self._slots.clear()
        self._stores = []

    def state_dict(self) -> dict:
        """Keys in LRU order and the used rows of every layer's store (for checkpoints)."""
        used = torch.tensor(list(self._slots.values()), dtype=torch.long)
        return {
            "keys": list(self._slots.keys()),
            "rows": [None if s is None else s[used.to(s.device)].cpu() for s in self._stores],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (slots are renumbered in LRU order)."""
        self.clear()
        keys, rows = state["keys"], state["rows"]
        for i, key in enumerate(keys[-self.capacity:]):
            self._slots[key] = i
        offset = max(0, len(keys) - self.capacity)
        self._stores = [None] * len(rows)
        for t, r in enumerate(rows):
            if r is not None and len(keys):
                store = self._ensure_store(t, r)
                store[: len(self._slots)] = r[offset:]
