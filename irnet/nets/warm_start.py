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

Everything happens on the input's device, with no host read (on a GPU each one
waits for every queued kernel), the same way on the CPU:

* **Finding a sample.** Each input row's bytes are read as 64-bit words and
  hashed (:func:`row_hashes`); the pass's hashes are looked up among the
  stored ones by a sort and a binary search, once per pass, and every match is
  confirmed by comparing the stored input row word for word, so a hash
  collision (odds about 2⁻⁶³ per pair) can cost a miss, never a wrong start.
* **Recency.** Each slot holds the stamp of its last use (a running count of
  the rows seen). A pass's new inputs take the least recently used slots
  (``topk``), the batch's most recent input first (a reversed cumulative
  sum), and only while the slot is older than the input: the cache then keeps
  exactly the ``capacity`` most recently used inputs, which is what an LRU
  dictionary fed the batch row by row keeps (duplicates in a batch count once,
  at their last position).
* **One copy for all layers.** The stores of all layers are one tensor of
  shape ``(layers, capacity + 1, …)``: a pass gathers every layer's guesses
  in one indexing and writes every layer's fixed points in one
  ``index_copy_``. Rows that must not be written go to the extra last slot,
  which nothing reads.

The cache's tensors follow the network: :meth:`WarmStartCache.apply` moves them
with the network's ``_apply`` (``net.to(device)``, ``.double()``), and
:meth:`WarmStartCache.load_state_dict` builds them on the device given (the
parameters'), since Lightning restores a checkpoint before it moves the model.
The checkpoint format is the byte-keyed one of earlier versions: keys (each the
input's dtype, per-sample shape and bytes) in LRU order, and each layer's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as Fn

from irnet._misc import check_int
from irnet.device_path import on_accelerator_path

# splitmix64's constants, as signed 64-bit integers (torch has no uint64 arithmetic)
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
_POSITIVE = (1 << 63) - 1


def _shift_right(x: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 words (torch's ``>>`` on signed integers is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser: a bijection of 64-bit words that spreads every input bit."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def row_words(rows: Tensor) -> Tensor:
    """Each row's bytes as int64 words, zero-padded to whole words: ``(batch, bytes)`` uint8 →
    ``(batch, words)``."""
    pad = -rows.shape[1] % 8
    if pad or rows.storage_offset() % 8:  # a fresh, aligned copy
        rows = Fn.pad(rows, (0, pad)) if pad else rows.clone()
    return rows.view(torch.int64)


def row_hashes(words: Tensor) -> Tensor:
    """A hash in ``[0, 2⁶³)`` of each row of int64 words (each word mixed with its position)."""
    position = torch.arange(1, words.shape[1] + 1, dtype=torch.int64, device=words.device) * _GOLDEN
    return _mix(_mix(words + position).sum(1)) & _POSITIVE


def _last_occurrences(hashes: Tensor) -> Tensor:
    """Whether each row is the last of the batch with its hash (a duplicate counts once, there)."""
    ordered, order = torch.sort(hashes, stable=True)
    last = torch.ones_like(ordered, dtype=torch.bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    return torch.empty_like(last).index_put_((order,), last)


@dataclass
class Keys:
    """A batch's inputs as the cache knows them, on the input's device.

    Attributes:
        signature: the inputs' dtype and per-sample shape (the prefix of the
            checkpoint's byte keys); inputs of another signature never match.
        words: ``(batch, words)`` int64, each input row's bytes.
        hashes: ``(batch,)`` int64, :func:`row_hashes` of ``words``.
        found: ``(cache version, hit, slot)`` of the pass's lookup, reused by its store.
    """

    signature: str
    words: Tensor
    hashes: Tensor
    found: Optional[tuple[int, Tensor, Tensor]] = None


class WarmStartCache:
    """Per-sample store of every layer's last fixed point, keyed by the sample's network input.

    Args:
        capacity: the most samples kept (least recently used are dropped).
    """

    def __init__(self, capacity: int = 8192) -> None:
        self.capacity = check_int("capacity", capacity, 1)
        self._version = 0
        self.clear()

    def clear(self) -> None:
        """Forget everything (e.g. after loading other weights)."""
        self._signature: Optional[str] = None
        self._layers: Optional[tuple[bool, ...]] = None  # which layers have a store
        self._words: Optional[Tensor] = None  # (capacity + 1, words) int64: each slot's input
        self._hashes: Optional[Tensor] = None  # (capacity + 1,) int64; −1 for an empty slot
        self._stamps: Optional[Tensor] = None  # (capacity + 1,) int64: last use; < 0 if empty
        self._stores: Optional[Tensor] = None  # (stored layers, capacity + 1, …)
        self._clock = 0  # rows seen so far: the next row's stamp
        self._used: Optional[int] = 0  # slots in use (a prefix) where known (the CPU path reads)
        self._version += 1

    def __len__(self) -> int:
        """Samples held (a host read: for tests and reports, not for the training loop)."""
        return 0 if self._stamps is None else int((self._stamps[: self.capacity] >= 0).sum())

    @staticmethod
    def keys(x: Tensor) -> Keys:
        """One key per sample: its dtype, shape and bytes, read on its device."""
        rows = x.detach().flatten(1)
        rows = (rows.to(torch.uint8) if rows.dtype == torch.bool else rows).contiguous()
        words = row_words(rows.view(torch.uint8))
        return Keys(f"{x.dtype}{tuple(x.shape[1:])}", words, row_hashes(words))

    def lookup(self, keys: Keys, layers: int) -> Optional[list[Optional[Tensor]]]:
        """Previous fixed points of these samples, one tensor per layer; NaN rows where unknown.

        Returns ``None`` when the cache holds nothing for such a network and input.
        """
        if self._stores is None or len(self._layers) != layers or keys.signature != self._signature:
            return None
        hit, slot = self._find(keys)
        guesses = self._stores.index_select(1, slot)  # one gather for every layer
        known = hit.view(1, -1, *[1] * (guesses.dim() - 2))
        guesses = torch.where(
            known, guesses, torch.full((), float("nan"), dtype=guesses.dtype, device=guesses.device)
        )
        rows = iter(guesses.unbind(0))
        return [next(rows) if stored else None for stored in self._layers]

    def store(self, keys: Keys, solutions: Sequence[Optional[Tensor]]) -> None:
        """Remember each sample's fixed point of every layer (``None`` for layers without a solve).

        The layers' states share one shape (the blocks of an :class:`~irnet.nets.ImplicitODENet`
        keep the lifted state's), so that they stack into one store.
        """
        layers = tuple(y is not None for y in solutions)
        if layers != self._layers or keys.signature != self._signature:
            self.clear()  # another network or kind of input: nothing stored applies
        if not any(layers):
            return  # no layer solves: nothing to gain
        # The cache must stay ordinary tensors when Lightning validates under
        # inference mode, so that training can still write it afterwards.
        with torch.inference_mode(False), torch.no_grad():
            if self._stamps is None:
                self._allocate(keys, layers, next(y for y in solutions if y is not None))
            region = self._region(keys.hashes.shape[0])
            write, stamps = self._assign(keys, *self._find(keys), region)
            self._stamps.index_put_((write,), stamps)
            self._hashes.index_put_((write,), keys.hashes)
            self._words.index_put_((write,), keys.words)
            ys = torch.stack([y.detach() for y in solutions if y is not None])
            self._stores.index_copy_(1, write, ys.to(self._stores.dtype))
            # The CPU path reads how many slots are in use (free there), so that the next
            # pass sorts and ranks those instead of the whole capacity.
            on_host = not on_accelerator_path(keys.hashes)
            self._used = int((self._stamps[:region] >= 0).sum()) if on_host else None
        self._clock += keys.hashes.shape[0]
        self._version += 1

    def _region(self, rows: int) -> int:
        """The first slots a pass of ``rows`` inputs can touch: those in use and room for new ones.

        New inputs take the lowest empty slots first (empty slots' stamps grow
        with their index, all below any use), so the used slots stay a prefix.
        """
        return self.capacity if self._used is None else min(self.capacity, self._used + rows)

    def _allocate(self, keys: Keys, layers: tuple[bool, ...], like: Tensor) -> None:
        rows, device = self.capacity + 1, keys.words.device
        self._signature, self._layers = keys.signature, layers
        self._words = torch.zeros(rows, keys.words.shape[1], dtype=torch.int64, device=device)
        self._hashes = torch.full((rows,), -1, dtype=torch.int64, device=device)
        # empty: lowest taken first
        self._stamps = torch.arange(rows, dtype=torch.int64, device=device) - rows
        self._stores = torch.full(
            (sum(layers), rows, *like.shape[1:]), float("nan"), dtype=like.dtype, device=like.device
        )

    def _find(self, keys: Keys) -> tuple[Tensor, Tensor]:
        """Each sample's slot and whether it is there (once per pass: the lookup's answer is
        kept)."""
        if keys.found is not None and keys.found[0] == self._version:
            return keys.found[1], keys.found[2]
        used = self.capacity if self._used is None else max(1, self._used)
        known, order = torch.sort(self._hashes[:used])  # empty slots (−1) sort first, never match
        at = torch.searchsorted(known, keys.hashes).clamp_max(used - 1)
        slot = order[at]
        hit = (known[at] == keys.hashes) & (self._words[slot] == keys.words).all(1)
        keys.found = (self._version, hit, slot)
        return hit, slot

    def _assign(self, keys: Keys, hit: Tensor, slot: Tensor, region: int) -> tuple[Tensor, Tensor]:
        """The slot each row writes (``capacity``: none) and its stamp; the most recent inputs stay.

        A known input keeps its slot; the new ones, most recent first, take the
        least recently used slots while those are older than they are (a slot
        of a known input used earlier in the batch included: then the batch
        holds more distinct inputs than the cache, and the earliest are dropped).
        """
        rows, capacity = keys.hashes.shape[0], self.capacity
        stamps = torch.arange(rows, dtype=torch.int64, device=slot.device) + self._clock
        last = _last_occurrences(keys.hashes)
        kept = hit & last
        recent = self._stamps.index_put((torch.where(kept, slot, capacity),), stamps)
        k = min(rows, region)
        victim_stamps, victims = torch.topk(recent[:region], k, largest=False)  # oldest first
        new = last & ~hit
        rank = new.flip(0).cumsum(0).flip(0) - 1  # 0 for the batch's last new input
        at = rank.clamp(0, k - 1)
        taken = new & (rank < k) & (victim_stamps[at] < stamps)
        target = torch.where(taken, victims[at], capacity)
        lost = torch.zeros_like(recent, dtype=torch.bool).index_put_(
            (target,), torch.ones_like(taken)
        )
        # a known input whose slot went to a newer one is dropped
        write = torch.where(kept & ~lost[slot], slot, capacity)
        return torch.where(taken, target, write), stamps

    def keep_members(self, index: Tensor, members: int) -> None:
        """Keep the members ``index`` of an ensemble's rows (each stored row holds one input's
        states of all ``members``, member-major: :mod:`irnet.nets.ensemble`)."""
        if self._stores is None:
            return
        layers, slots = self._stores.shape[:2]
        stores = self._stores.view(layers, slots, members, -1)
        self._stores = stores.index_select(2, index.to(stores.device)).reshape(layers, slots, -1)
        self._version += 1

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Move every tensor as ``nn.Module._apply`` moves the network's: device, and the stores'
        dtype.

        The index tensors keep their integer dtype whatever ``fn`` does to it.
        """
        if self._stamps is None:
            return
        with torch.inference_mode(False), torch.no_grad():
            self._stores = fn(self._stores)
            for name in ("_words", "_hashes", "_stamps"):
                t = getattr(self, name)
                moved = fn(t)
                setattr(self, name, moved if moved.dtype == t.dtype else t.to(moved.device))
        self._version += 1

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache holds (to check where they live)."""
        return [t for t in (self._words, self._hashes, self._stamps, self._stores) if t is not None]

    def state_dict(self) -> dict:
        """Keys in LRU order and the used rows of every layer's store (for checkpoints)."""
        if self._stamps is None:
            return {"keys": [], "rows": []}
        stamps = self._stamps[: self.capacity].cpu()
        order = stamps.argsort()
        order = order[stamps[order] >= 0]
        nbytes = _row_bytes(self._signature)
        raw = self._words.cpu()[order].view(torch.uint8)[:, :nbytes]
        prefix = self._signature.encode()
        stored = iter(self._stores.index_select(1, order.to(self._stores.device)).cpu().unbind(0))
        return {
            "keys": [prefix + row.numpy().tobytes() for row in raw],
            "rows": [next(stored).clone() if s else None for s in self._layers],
        }

    def load_state_dict(
        self,
        state: dict,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Restore what :meth:`state_dict` saved, on ``device`` with stores of ``dtype`` (default:
        the rows').

        Slots are renumbered in LRU order; beyond ``capacity`` the least recently
        used keys are dropped, and so are keys of another signature than the
        most recent one (a cache holds one kind of input at a time).
        """
        self.clear()
        keys, rows = list(state["keys"]), list(state["rows"])
        layers = tuple(r is not None for r in rows)
        if not keys or not any(layers):
            return
        prefix = keys[-1][: keys[-1].index(b")") + 1]
        nbytes = len(keys[-1]) - len(prefix)
        keep = [
            i for i, k in enumerate(keys) if len(k) == len(prefix) + nbytes and k.startswith(prefix)
        ]
        keep = keep[-self.capacity :]
        raw = torch.frombuffer(
            bytearray(b"".join(keys[i][len(prefix) :] for i in keep)), dtype=torch.uint8
        )
        index = torch.tensor(keep, dtype=torch.long)
        values = torch.stack([r[index] for r in rows if r is not None])
        device = values.device if device is None else device
        words = row_words(raw.view(len(keep), nbytes)).to(device)
        keys_now = Keys(prefix.decode(), words, row_hashes(words))
        with torch.inference_mode(False), torch.no_grad():
            values = values.to(device=device, dtype=dtype or values.dtype)
            self._allocate(keys_now, layers, values[0])
            slots = torch.arange(len(keep), device=device)
            self._words[: len(keep)] = words
            self._hashes[: len(keep)] = keys_now.hashes
            self._stamps[: len(keep)] = slots
            self._stores[:, : len(keep)] = values
        self._clock = self._used = len(keep)


def _row_bytes(signature: str) -> int:
    """Bytes of one input row of ``signature`` (e.g. ``"torch.float32(2,)"`` → 8)."""
    name, _, shape = signature.partition("(")
    dims = [int(d) for d in shape.rstrip(")").split(",") if d.strip()]
    count = 1
    for d in dims:
        count *= d
    return count * getattr(torch, name.removeprefix("torch.")).itemsize
