"""One warm-start cache for a checkpoint of several processes: their samples, merged by key.

Under distributed training each process solves its own part of every batch, so
its :class:`~irnet.nets.warm_start.WarmStartCache` holds the fixed points of its own
samples, and rank 0 alone writes the checkpoint. Saved as they are, the
checkpoint would hold rank 0's samples only, and every process would resume
with them: the others would start cold. :func:`merge_warm_starts` (called by
the module on every process when a checkpoint is made) gathers the caches on
rank 0 and puts their union in the checkpoint, so every process, on load,
finds its own samples whichever part it holds — the cache is keyed by each
sample's network input, so a merged cache serves any split of the data.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from irnet.nets.warm_start import WarmStartCache


def merged_state(states: Sequence[Optional[dict]], capacity: int) -> dict:
    """The union of several caches' states (``WarmStartCache.state_dict`` format), at most
    ``capacity`` keys.

    Keys are taken most recent first, in turns (the most recent of every state,
    then the second most recent of every state, …): the processes step
    together, so keys at the same depth were used at about the same time. A key
    held by several states keeps its row from the first state that gives it at
    its most recent turn (the lower rank at equal depth). The result is in LRU
    order (oldest first), as :meth:`~irnet.nets.warm_start.WarmStartCache.load_state_dict`
    expects. A layer that holds rows in some states but none in another gets NaN
    rows (unknown: those samples start cold) for the keys of the latter.
    """
    states = [s for s in states if s is not None]
    order = _recent_first(states, capacity)[::-1]
    layers = max((len(s["rows"]) for s in states), default=0)
    return {
        "keys": [states[r]["keys"][i] for r, i in order],
        "rows": [_layer_rows(states, order, t) for t in range(layers)],
    }


def _recent_first(states: Sequence[dict], capacity: int) -> list[tuple[int, int]]:
    """``(state, position)`` of the kept keys, most recent first, each key once."""
    seen: set[bytes] = set()
    order: list[tuple[int, int]] = []
    depth = max((len(s["keys"]) for s in states), default=0)
    for back in range(1, depth + 1):
        for r, state in enumerate(states):
            keys = state["keys"]
            if back > len(keys) or keys[-back] in seen:
                continue
            seen.add(keys[-back])
            order.append((r, len(keys) - back))
            if len(order) == capacity:
                return order
    return order


def _layer_rows(states: Sequence[dict], order: list[tuple[int, int]], t: int) -> Optional[Tensor]:
    """Layer ``t``'s rows for the kept keys, taken from the state each key came from."""
    tables = [s["rows"][t] if t < len(s["rows"]) else None for s in states]
    like = next((table for table in tables if table is not None), None)
    if like is None:
        return None
    rows = like.new_full((len(order), *like.shape[1:]), float("nan"))
    for r, table in enumerate(tables):
        picked = [(j, i) for j, (source, i) in enumerate(order) if source == r]
        if table is None or not picked:
            continue
        where, index = zip(*picked)
        rows[torch.tensor(where)] = table[torch.tensor(index)].to(rows.dtype)
    return rows


def merge_warm_starts(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Put the union of every process's warm-start caches into ``state_dict`` (on rank 0; in place).

    A collective: every process calls it at the same point (the module's
    ``on_save_checkpoint``). ``state_dict`` is ``module``'s, where each
    submodule's cache is saved in its ``<name>._extra_state["warm_start"]``.
    """
    for name, sub in module.named_modules():
        cache = getattr(sub, "warm_start_cache", None)
        if not isinstance(cache, WarmStartCache):
            continue
        key = f"{name}._extra_state" if name else "_extra_state"
        extra = state_dict.get(key)
        mine = extra.get("warm_start") if isinstance(extra, dict) else None
        gathered = _gather_on_rank_zero(mine)
        if gathered is not None and isinstance(extra, dict):
            state_dict[key] = {**extra, "warm_start": merged_state(gathered, cache.capacity)}


def _gather_on_rank_zero(obj: Any) -> Optional[list[Any]]:
    """``obj`` of every process, by rank, on rank 0 (``None`` elsewhere)."""
    rank = torch.distributed.get_rank()
    gathered: Optional[list[Any]] = (
        [None] * torch.distributed.get_world_size() if rank == 0 else None
    )
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered
