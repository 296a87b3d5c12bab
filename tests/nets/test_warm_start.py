"""Warm starts and the evaluation count of a block: same answers, fewer evaluations; the cache finds
samples as the byte-keyed cache did, with no host read."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from helpers.sync import HostReads
from irnet import ImplicitResidualBlock
from irnet.device_path import forced_path, on_accelerator_path
from irnet.linear import Neumann
from irnet.nets import ODENet, warm_start
from irnet.nets.warm_start import WarmStartCache
from irnet.solvers import FixedPoint

TOL = 1e-10


def _net(warm_start: bool, seed: int = 0) -> ODENet:
    torch.manual_seed(seed)
    return ODENet(
        1,
        1,
        layers=3,
        T=1.5,
        width=16,
        theta=0.5,
        warm_start=warm_start,
        solver=FixedPoint(atol=TOL, max_iter=200),
        linear_solver=Neumann(rtol=TOL, max_iter=200),
    ).double()


def _iterations(net: ODENet) -> torch.Tensor:
    return torch.stack([b.forward_stats.iterations for b in net.blocks])


def _nudge(net: nn.Module, scale: float = 1e-4, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_warm_and_cold_solves_agree_and_warm_takes_fewer_iterations():
    cold, warm = _net(False), _net(True)
    x = torch.linspace(-2, 2, 11, dtype=torch.float64)[:, None]
    warm(x)  # fills the cache
    _nudge(cold), _nudge(warm)
    y_cold, y_warm = cold.trajectory(x), warm.trajectory(x)
    for a, b in zip(y_cold, y_warm):
        # each is within TOL of the layer's fixed point; the map contracts, so they agree
        assert torch.allclose(a, b, atol=1e-8, rtol=0)
    it_cold, it_warm = _iterations(cold), _iterations(warm)
    assert it_warm.float().mean() < 0.9 * it_cold.float().mean()


def test_unchanged_weights_restart_at_the_fixed_point():
    net = _net(True)
    x = torch.randn(7, 1, dtype=torch.float64)
    net(x)
    net(x)
    # the stored y* already meets the tolerance: no iteration is needed
    assert (_iterations(net) == 0).all()


def test_gradients_with_warm_start_match_cold_ones():
    cold, warm = _net(False), _net(True)
    x = torch.randn(9, 1, dtype=torch.float64)
    warm(x)
    _nudge(cold), _nudge(warm)
    for net in (cold, warm):
        net.zero_grad()
        net(x).pow(2).sum().backward()
    for p, q in zip(cold.parameters(), warm.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7, rtol=1e-6)


def test_cache_is_keyed_by_sample_so_order_and_new_samples_are_handled():
    net = _net(True)
    x = torch.randn(6, 1, dtype=torch.float64)
    net(x)
    perm = torch.tensor([5, 3, 0, 1, 4, 2])
    fresh = torch.randn(2, 1, dtype=torch.float64) + 10
    batch = torch.cat([x[perm], fresh])
    net(batch)
    it = _iterations(net)
    assert (it[:, :6] == 0).all()  # known samples, in any order
    assert (it[:, 6:] > 0).all()  # new samples start cold
    assert len(net.warm_start_cache) == 8


def test_new_samples_in_a_warm_batch_start_from_the_explicit_step_as_a_cold_net_does():
    # A sample the cache does not hold must start where a cold solve starts (the explicit
    # step x + F(x)), not from zero or any other guess: then its count and its answer are
    # exactly a cold network's, layer by layer. "It iterates" would not tell the two apart.
    warm, cold = _net(True), _net(False)  # same seed: same weights
    seen = torch.randn(5, 1, dtype=torch.float64)
    warm(seen)
    fresh = torch.randn(3, 1, dtype=torch.float64) + 3.0
    mixed = torch.cat([seen[:2], fresh, seen[2:]])
    new = slice(2, 5)
    y_warm = warm(mixed)
    it_warm = _iterations(warm)
    assert (it_warm[:, :2] == 0).all() and (it_warm[:, 5:] == 0).all()  # the known ones hit
    # The cold net on the same batch (same shapes, so the same arithmetic row by row) ...
    y_cold = cold(mixed)
    assert torch.equal(it_warm[:, new], _iterations(cold)[:, new])
    assert torch.equal(y_warm[new], y_cold[new])
    # ... and on the new samples alone (a 3-row product may round otherwise than an 8-row one).
    y_alone = cold(fresh)
    assert torch.equal(it_warm[:, new], _iterations(cold))
    torch.testing.assert_close(y_warm[new], y_alone, rtol=0, atol=1e-14)


def _known(cache: WarmStartCache, x: torch.Tensor, layers: int = 1) -> list[bool]:
    guesses = cache.lookup(cache.keys(x), layers)
    if guesses is None:
        return [False] * x.shape[0]
    return torch.isfinite(guesses[-1].flatten(1)).all(1).tolist()


def test_cache_evicts_least_recently_used():
    cache = WarmStartCache(capacity=2)
    a, b, c = (torch.tensor([[v]]) for v in (1.0, 2.0, 3.0))
    for x in (a, b, a, c):
        cache.store(cache.keys(x), [torch.ones(1, 2)])
    assert _known(cache, torch.cat([b, a, c])) == [False, True, True]  # "a" was used after "b"


class BytesKeyedCache:
    """The reference: the cache before it lived on the device (an ordered dict of byte keys)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slots: OrderedDict[bytes, int] = OrderedDict()
        self._stores: list = []

    @staticmethod
    def keys(x):
        rows = x.detach().to("cpu").contiguous().flatten(1)
        prefix = f"{rows.dtype}{tuple(x.shape[1:])}".encode()
        flat = rows.view(torch.uint8) if rows.dtype != torch.bool else rows.to(torch.uint8)
        return [prefix + row.numpy().tobytes() for row in flat]

    def lookup(self, keys, layers):
        slots = [self._slots.get(k, -1) for k in keys]
        if all(s < 0 for s in slots) or len(self._stores) != layers:
            return None
        index = torch.tensor(slots)
        guesses = []
        for store in self._stores:
            if store is None:
                guesses.append(None)
                continue
            rows = store[index.clamp_min(0)].clone()
            rows[index < 0] = float("nan")
            guesses.append(rows)
        return guesses

    def store(self, keys, solutions):
        if len(self._stores) != len(solutions):
            self._slots.clear()
            self._stores = [None] * len(solutions)
        slots = torch.tensor([self._slot(k) for k in keys])
        for t, y in enumerate(solutions):
            if y is not None:
                if self._stores[t] is None:
                    self._stores[t] = torch.full(
                        (self.capacity, *y.shape[1:]), float("nan"), dtype=y.dtype
                    )
                self._stores[t][slots] = y.detach().clone()

    def _slot(self, key):
        if key in self._slots:
            self._slots.move_to_end(key)
            return self._slots[key]
        if len(self._slots) < self.capacity:
            slot = len(self._slots)
        else:
            _, slot = self._slots.popitem(last=False)
        self._slots[key] = slot
        return slot

    def state_dict(self):
        used = torch.tensor(list(self._slots.values()), dtype=torch.long)
        return {
            "keys": list(self._slots.keys()),
            "rows": [None if s is None else s[used] for s in self._stores],
        }


def _same_state(a: dict, b: dict) -> bool:
    return (
        a["keys"] == b["keys"]
        and len(a["rows"]) == len(b["rows"])
        and all(
            (r is None and q is None) or (r is not None and q is not None and torch.equal(r, q))
            for r, q in zip(a["rows"], b["rows"])
        )
    )


def _compare_passes(
    cache: WarmStartCache,
    reference: BytesKeyedCache,
    pool: torch.Tensor,
    generator: torch.Generator,
    passes: int,
    largest_batch: int,
) -> None:
    """Random batches of ``pool``'s rows (with duplicates): same guesses and state, pass by pass."""
    for step in range(passes):
        size = int(torch.randint(1, largest_batch + 1, (1,), generator=generator))
        x = pool[torch.randint(0, pool.shape[0], (size,), generator=generator)]
        keys, old_keys = cache.keys(x), reference.keys(x)
        got, want = cache.lookup(keys, 3), reference.lookup(old_keys, 3)
        known = torch.tensor([k in reference._slots for k in old_keys])
        if got is None:
            assert not known.any()
        else:
            assert got[0] is None
            for g, w in zip(got[1:], [None, None] if want is None else want[1:]):
                assert torch.equal(torch.isfinite(g.flatten(1)).all(1), known)
                if w is not None:
                    assert torch.equal(g[known], w[known])
        # a solution is a function of the input (as a solve's is), one layer without a solve
        solutions = [None, x.flatten(1)[:, :2] * step + 1, x.flatten(1)[:, :2] - step]
        cache.store(keys, solutions)
        reference.store(old_keys, solutions)
        assert _same_state(cache.state_dict(), reference.state_dict()), f"pass {step}"


@pytest.mark.parametrize("capacity", [1, 2, 5, 12, 40])
@pytest.mark.parametrize(
    "shape, dtype", [((2,), torch.float32), ((3,), torch.float32), ((1, 2, 3), torch.float64)]
)
def test_same_hits_and_order_as_the_byte_keyed_cache(capacity, shape, dtype):
    """Duplicates in a batch, batches larger than the cache, eviction: as the byte-keyed dict did.

    (12 bytes per float32 row of 3 are padded to two words; 2 float32 fill one word exactly.)
    """
    generator = torch.Generator().manual_seed(capacity)
    pool = torch.randn(20, *shape, generator=generator).to(dtype)
    pool[3] = pool[4]  # two names for one input
    _compare_passes(
        WarmStartCache(capacity),
        BytesKeyedCache(capacity),
        pool,
        generator,
        passes=60,
        largest_batch=2 * capacity + 3,
    )


def test_a_byte_keyed_checkpoint_loads_and_goes_on_the_same_way():
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(15, 2, generator=generator)
    reference = BytesKeyedCache(6)
    _compare_passes(WarmStartCache(6), reference, pool, generator, passes=10, largest_batch=5)
    for capacity in (6, 4):  # a smaller cache keeps the most recent keys
        cache = WarmStartCache(capacity)
        cache.load_state_dict(reference.state_dict())
        state = reference.state_dict()
        assert cache.state_dict()["keys"] == state["keys"][-capacity:]
    cache = WarmStartCache(6)
    cache.load_state_dict(reference.state_dict())
    _compare_passes(cache, reference, pool, generator, passes=20, largest_batch=5)


def test_a_hash_collision_costs_a_miss_never_a_wrong_start(monkeypatch):
    """With every hash equal, only the word-by-word comparison tells inputs apart.

    Each guess is its own input's: a collision costs a miss, never a wrong start.
    """
    monkeypatch.setattr(
        warm_start, "row_hashes", lambda words: torch.zeros(words.shape[0], dtype=torch.int64)
    )
    cache = WarmStartCache(8)
    x = torch.arange(6.0)[:, None]
    for _ in range(3):
        keys = cache.keys(x)
        guesses = cache.lookup(keys, 1)
        if guesses is not None:
            known = torch.isfinite(guesses[0][:, 0])
            assert torch.equal(guesses[0][known], (10 * x)[known])
        cache.store(keys, [10 * x])
    assert 0 < len(cache) < 6  # colliding inputs share one slot: some are missed


def test_a_pass_reads_nothing_on_the_host():
    """Lookup and store of a pass on the accelerator path: no ``.item()``, mask or ``nonzero``."""
    cache = WarmStartCache(16)
    x = torch.randn(10, 3)
    reads = HostReads()
    with forced_path("accelerator"), reads.patched(), reads.counting():
        for shift in (0.0, 0.0, 1.0):  # empty, full hits, all misses with eviction
            keys = cache.keys(torch.cat([x, x[:4]]) + shift)
            cache.lookup(keys, 2)
            cache.store(keys, [None, torch.randn(14, 3)])
    assert reads.count == 0, reads.report()
    assert len(cache) == 16


@pytest.mark.filterwarnings("ignore:Forward solve")  # float32 short of atol 1e-10
def test_the_cache_follows_moves_of_the_network_also_while_paused():
    net = _net(True)
    x = torch.randn(5, 1, dtype=torch.float64)
    net(x)
    with net.warm_start_paused():
        net.float()
    assert {t.dtype for t in net.warm_start_cache.tensors() if t.is_floating_point()} == {
        torch.float32
    }
    net(x.float())  # another input dtype: a fresh start, in float32
    assert _known(net.warm_start_cache, x.float(), 3) == [True] * 5
    net.to("meta")
    assert {t.device.type for t in net.warm_start_cache.tensors()} == {"meta"}


def test_cache_travels_with_the_state_dict():
    net = _net(True)
    x = torch.randn(5, 1, dtype=torch.float64)
    net(x)
    other = _net(True, seed=3)
    other.load_state_dict(net.state_dict())
    other(x)
    assert (_iterations(other) == 0).all()


def test_cache_filled_under_inference_mode_is_writable_in_training():
    net = _net(True)
    x = torch.randn(4, 1, dtype=torch.float64)
    with torch.inference_mode():
        net(x)  # e.g. Lightning's sanity check
    net(x).sum().backward()  # training writes the same store
    assert (_iterations(net) == 0).all()


class _Counting(nn.Module):
    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.3)
        self.calls = 0

    def forward(self, y):
        self.calls += 1
        return torch.tanh(self.lin(y))


def test_block_evaluates_F_once_at_x_and_once_at_the_solution():
    F = _Counting()
    block = ImplicitResidualBlock(F, theta=0.5, solver=FixedPoint(atol=1e-9, max_iter=100))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = block(x)
    forward_calls = F.calls
    y.sum().backward()
    k = int(block.forward_stats.iterations.max())
    # F(x) once; the solve from the explicit step: its residual, then one per iteration;
    # F(y*) once with a graph, which backward reuses: no evaluation in backward.
    assert forward_calls == 1 + (k + 1) + 1
    assert F.calls == forward_calls


def test_paused_warm_start_solves_cold_and_leaves_the_cache_alone():
    net = _net(True)
    x = torch.randn(5, 1, dtype=torch.float64)
    net(x)
    with net.warm_start_paused():
        net(x + 1.0)
        assert (_iterations(net) > 0).all()
    assert len(net.warm_start_cache) == 5
    net(x)
    assert (_iterations(net) == 0).all()


def test_non_finite_input_is_refused_without_a_check_of_its_own():
    block = ImplicitResidualBlock(_Counting(), theta=0.5)
    x = torch.randn(3, 3, dtype=torch.float64)
    x[1, 0] = float("nan")
    if on_accelerator_path(
        x
    ):  # no host read there: the sample comes out NaN (the loss check names it)
        assert block(x)[1].isnan().all()
        return
    with pytest.raises(ValueError, match="NaN or Inf"):
        block(x)
