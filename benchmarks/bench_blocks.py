"""Time and memory of implicit residual blocks on the paper's eq. 11 network.

A stack of ``--layers`` blocks (default 100) on a 2-dimensional input lifted to
the state ``y(0) = (x, x)`` in R⁴, each with

    F_t(y) = h · γ2_t relu(γ1_t y + b_t),   width 100, h = T / layers, T = 10,

γ's standard normal divided by the square root of the spectral radius of
γ2_t γ1_t and b_t = 0 (the initialisation of the paper's Example 1), a batch of
51 points, tolerance 1e-5 and at most 50 iterations per layer (the paper's
settings). Every configuration runs on the same weights and data, side by side:

* explicit ResNet (θ = 0) — the baseline of every ratio;
* θ = 0.5 with each forward solver and the Neumann backward;
* θ = 0.5, fixed point, with the GMRES and Direct backward;
* θ = 0.5, fixed point, unrolled backward (differentiating the iterations);
* with ``--fixed-k K``: fixed point + Neumann with ``fixed_count=True`` (no stopping
  tests) and the floor (K evaluations of F and K vector–Jacobian products alone);
* torchdeq's fixed-point and Anderson solvers with its implicit (IFT) backward
  on the same map ``z ↦ y + (1−θ)F(y) + θF(z)`` (optional: ``pip install irnet[bench]``).

Reported per configuration: median wall time of the training forward (graph
built, parameters require grad) and of forward + backward, the activation
memory saved for backward that is still alive after the forward pass
(``torch.autograd.graph.saved_tensors_hooks`` packing into holders tracked by a
``weakref.WeakSet``; unique storages, parameters excluded), the mean solver
iterations per layer and sample, evaluations of F per layer, and the share of
(layer, sample) forward solves that missed the tolerance.

Usage::

    python benchmarks/bench_blocks.py                 # the full table (a few minutes)
    python benchmarks/bench_blocks.py --quick         # 20 layers, 2 repeats, seconds
    python benchmarks/bench_blocks.py --layers 100 --repeats 7 --threads 2
    python benchmarks/bench_blocks.py --preset block-speed  # one block, K = 30: floor, torchdeq

Not a test: nothing here asserts; see ``docs/benchmarks.md`` for a recorded run.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported; --threads sets the pool later

import argparse
import platform
import re
import statistics
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch  # noqa: E402
import torch.nn.functional as Fn
from torch import Tensor, nn

from irnet import ConvergenceWarning, ImplicitResidualBlock
from irnet.linear import GMRES, Direct, Neumann
from irnet.solvers import Anderson, FixedPoint, GradientDescent, NonlinearCG

# -- the network of eq. 11 -------------------------------------------------------------------------


class Eq11Residual(nn.Module):
    """``F(y) = h · γ2 relu(γ1 y + b)``, normalised so that ρ(γ2 γ1) = 1 at initialisation."""

    def __init__(self, dim: int, width: int, h: float, gen: torch.Generator) -> None:
        super().__init__()
        g1 = torch.randn(width, dim, generator=gen, dtype=torch.float64)
        g2 = torch.randn(dim, width, generator=gen, dtype=torch.float64)
        rho = torch.linalg.eigvals(g2 @ g1).abs().max().sqrt()
        self.gamma1 = nn.Parameter((g1 / rho).float())
        self.gamma2 = nn.Parameter((g2 / rho).float())
        self.bias = nn.Parameter(torch.zeros(width))
        self.h = h
        self.calls = 0  # evaluations of F (each on the whole batch)

    def forward(self, y: Tensor) -> Tensor:
        self.calls += 1
        return self.h * Fn.linear(torch.relu(Fn.linear(y, self.gamma1, self.bias)), self.gamma2)


def make_residuals(
    layers: int, width: int, horizon: float, seed: int, state: int = 4
) -> nn.ModuleList:
    gen = torch.Generator().manual_seed(seed)
    return nn.ModuleList(Eq11Residual(state, width, horizon / layers, gen) for _ in range(layers))


def make_input(batch: int, state: int = 4, seed: int = 0) -> Tensor:
    """The input, lifted to ``(x, x)`` in R^state by the networks.

    State 4: ``batch`` points on the curve (s, sin s), s equally spaced in
    [-5, 5]. Other even states: standard normal points in R^(state/2).
    """
    if state == 4:
        s = torch.linspace(-5, 5, batch)
        return torch.stack([s, torch.sin(s)], dim=1)
    if state < 2 or state % 2:
        raise ValueError(f"state must be an even integer >= 2, got {state}")
    return torch.randn(batch, state // 2, generator=torch.Generator().manual_seed(seed + 1))


# -- the configurations ----------------------------------------------------------------------------


class IrnetNet(nn.Module):
    """``(x, x)`` through one :class:`ImplicitResidualBlock` per residual function."""

    def __init__(self, residuals, theta, solver, linear_solver, backward="implicit") -> None:
        super().__init__()
        # One solver object shared by all blocks (the network warns once, not per layer).
        self.blocks = nn.ModuleList(
            ImplicitResidualBlock(F, theta, solver, linear_solver, backward) for F in residuals
        )

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([x, x], dim=1)
        for block in self.blocks:
            y = block(y)
        return y

    def forward_iterations(self) -> tuple[float, float]:
        """Mean iterations per (layer, sample) and the share that did not converge."""
        stats = [b.forward_stats for b in self.blocks]
        iters = torch.stack([s.iterations.float() for s in stats])
        failed = torch.stack([~s.converged for s in stats]).float()
        return float(iters.mean()), float(failed.mean())

    def backward_iterations(self) -> Optional[float]:
        stats = [b.backward_stats for b in self.blocks if b.backward_stats is not None]
        if not stats:
            return None
        return float(torch.stack([s.iterations.float() for s in stats]).mean())


class TorchdeqNet(nn.Module):
    """The same network with torchdeq solving ``z = y + (1−θ)F(y) + θF(z)`` in each layer."""

    def __init__(self, residuals, theta: float, f_solver: str, tol: float, max_iter: int) -> None:
        super().__init__()
        from torchdeq import get_deq

        self.residuals = residuals
        self.theta = theta
        self.tol = tol
        # Forward: absolute per-sample ‖z − g(z)‖ like irnet; backward: torchdeq's
        # fixed-point iteration on the adjoint (a Neumann series) with a relative stop.
        self.deq = get_deq(
            f_solver=f_solver,
            f_max_iter=max_iter,
            f_tol=tol,
            f_stop_mode="abs",
            b_solver="fixed_point_iter",
            b_max_iter=max_iter,
            b_tol=tol,
            b_stop_mode="rel",
            ift=True,
        )
        self._forward_steps: list[Tensor] = []
        self._forward_failed: list[Tensor] = []
        self._backward_steps: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self._forward_steps, self._forward_failed, self._backward_steps = [], [], []
        y = torch.cat([x, x], dim=1)
        theta = self.theta
        for F in self.residuals:
            c = y if theta == 1 else y + (1 - theta) * F(y)
            z, info = self.deq(
                lambda z, c=c, F=F: c + theta * F(z),
                y,
                backward_writer=lambda info: self._backward_steps.append(info["nstep"].float()),
            )
            self._forward_steps.append(info["nstep"].float())
            self._forward_failed.append((info["abs_lowest"] > self.tol).float())
            y = z[-1]
        return y

    def forward_iterations(self) -> tuple[float, float]:
        return (
            float(torch.stack(self._forward_steps).mean()),
            float(torch.stack(self._forward_failed).mean()),
        )

    def backward_iterations(self) -> Optional[float]:
        if not self._backward_steps:
            return None
        return float(torch.stack(self._backward_steps).mean())


class FloorNet(nn.Module):
    """The least work of an implicit layer at K iterations, with no solver logic around it.

    Per layer: K evaluations of F — K−1 applications of ``z ↦ c + θF(z)`` without
    a graph, then ``c + θF(z)`` once with its graph — and K vector–Jacobian
    products — K−1 terms of the Neumann series ``Σ (θ J_F(z)ᵀ)ⁱ`` on that
    graph (a gradient hook), then the one backward through it that reaches the
    parameters and the input. No residuals, norms, masks, statistics or
    stopping tests. For θ < 1 the explicit part ``c = y + (1−θ)F(y)`` adds one
    evaluation and one product, as it does for every implicit row.
    """

    def __init__(self, residuals, theta: float, k: int) -> None:
        super().__init__()
        self.residuals, self.theta, self.k = residuals, theta, k

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([x, x], dim=1)
        for F in self.residuals:
            y = self._layer(F, y)
        return y

    def _layer(self, F: nn.Module, y: Tensor) -> Tensor:
        theta = self.theta
        c = y if theta == 1 else y + (1 - theta) * F(y)
        with torch.no_grad():
            z = c.detach()
            for _ in range(self.k - 1):
                z = c + theta * F(z)
        leaf = z.requires_grad_()
        fz = F(leaf)
        out = c + theta * fz
        if out.requires_grad:
            out.register_hook(lambda grad: self._neumann(fz, leaf, grad))
        return out

    def _neumann(self, fz: Tensor, leaf: Tensor, grad: Tensor) -> Tensor:
        g, term = grad, grad
        for _ in range(self.k - 1):
            (term,) = torch.autograd.grad(fz, leaf, term, retain_graph=True)
            term = self.theta * term
            g = g + term
        return g

    def forward_iterations(self) -> tuple[float, float]:
        return float(self.k), float("nan")

    def backward_iterations(self) -> Optional[float]:
        return float(self.k)


@dataclass
class Config:
    name: str
    build: Callable[[nn.ModuleList], nn.Module]
    skip: Optional[str] = None


FIXED_K_TOL = 1e-30  # "tolerance" of the fixed-K rows: never met, so all K iterations are taken


def configurations(
    tol: float, max_iter: int, theta: float, with_torchdeq: bool, fixed_k: Optional[int] = None
) -> list[Config]:
    """The rows; with ``fixed_k`` every solver takes exactly K iterations, and a floor row is
    added."""
    if fixed_k is not None:
        tol, max_iter = FIXED_K_TOL, fixed_k

    def irnet(
        solver_fn,
        linear_fn=lambda: Neumann(rtol=tol, max_iter=max_iter),
        backward="implicit",
        th=theta,
    ):
        return lambda residuals: IrnetNet(residuals, th, solver_fn(), linear_fn(), backward)

    fp = lambda: FixedPoint(atol=tol, max_iter=max_iter)  # noqa: E731
    configs = [
        Config("explicit ResNet (θ = 0)", irnet(fp, th=0.0)),
        Config("FixedPoint + Neumann", irnet(fp)),
        Config("Anderson + Neumann", irnet(lambda: Anderson(atol=tol, max_iter=max_iter))),
        Config(
            "GradientDescent + Neumann", irnet(lambda: GradientDescent(atol=tol, max_iter=max_iter))
        ),
        Config(
            "NonlinearCG (FR) + Neumann",
            irnet(lambda: NonlinearCG(atol=tol, max_iter=max_iter, beta="fletcher-reeves")),
        ),
        Config(
            "NonlinearCG (PR) + Neumann",
            irnet(lambda: NonlinearCG(atol=tol, max_iter=max_iter, beta="polak-ribiere")),
        ),
        Config("FixedPoint + GMRES", irnet(fp, lambda: GMRES(rtol=tol, max_iter=max_iter))),
        Config("FixedPoint + Direct", irnet(fp, lambda: Direct(rtol=tol))),
        Config("FixedPoint, unrolled backward", irnet(fp, backward="unrolled")),
        Config(
            "FixedPoint + Neumann, fixed count",
            irnet(
                lambda: FixedPoint(atol=tol, max_iter=max_iter, fixed_count=True),
                lambda: Neumann(rtol=tol, max_iter=max_iter, fixed_count=True),
            ),
            skip=None if fixed_k is not None else "needs --fixed-k",
        ),
        Config(
            "floor: K F-evals + K VJPs" + (f" (K = {fixed_k})" if fixed_k else ""),
            lambda residuals: FloorNet(residuals, theta, fixed_k),
            skip=None if fixed_k is not None else "needs --fixed-k",
        ),
    ]
    reason = None
    if not with_torchdeq:
        reason = "--no-torchdeq"
    else:
        try:
            import torchdeq  # noqa: F401
        except Exception as exc:  # not installed, or an incompatible build
            reason = (
                f"torchdeq unavailable ({type(exc).__name__}: {exc}); pip install 'irnet[bench]'"
            )
    for solver in ("fixed_point_iter", "anderson"):
        configs.append(
            Config(
                f"torchdeq {solver} + IFT",
                lambda residuals, s=solver: TorchdeqNet(
                    residuals, theta, s, 0.0 if fixed_k is not None else tol, max_iter
                ),
                skip=reason,
            )
        )
    return configs


# -- measuring -------------------------------------------------------------------------------------


class _Packed:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def saved_activation_bytes(net: nn.Module, x: Tensor) -> tuple[int, Tensor]:
    """Bytes saved for backward and still alive after ``net(x)``.

    Each packed tensor goes into a holder tracked by a ``WeakSet``: holders of
    transient graphs (line searches, backward-only products) die with them.
    Storages are counted once; parameters (resident anyway) are not counted.
    """
    holders: weakref.WeakSet[_Packed] = weakref.WeakSet()

    def pack(t: Tensor) -> _Packed:
        holder = _Packed(t)
        holders.add(holder)
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.tensor):
        y = net(x)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}
    for holder in list(holders):
        storage = holder.tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            seen[ptr] = storage.nbytes()
    return sum(seen.values()), y


@dataclass
class Result:
    name: str
    forward_ms: float = float("nan")
    train_ms: float = float("nan")
    saved_bytes: int = 0
    f_iters: float = float("nan")
    f_failed: float = float("nan")
    f_calls: float = float("nan")
    b_iters: Optional[float] = None
    skip: Optional[str] = None


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set by main()


def timed_ms(fn: Callable[[], None]) -> float:
    start = clock()
    fn()
    return (clock() - start) * 1e3


class Runner:
    """One configuration: its network, its timings and its measurements."""

    def __init__(self, config: Config, residuals: nn.ModuleList, x: Tensor) -> None:
        self.result = Result(config.name, skip=config.skip)
        self.residuals, self.x = residuals, x
        self.net = None if config.skip else config.build(residuals)
        self.forward_times: list[float] = []
        self.train_times: list[float] = []

    def forward(self) -> None:
        self.net(self.x)

    def train_step(self) -> None:
        self.net.zero_grad(set_to_none=True)
        self.net(self.x).square().mean().backward()

    def time_once(self) -> None:
        if self.net is not None:
            self.forward_times.append(timed_ms(self.forward))
            self.train_times.append(timed_ms(self.train_step))

    def measure(self) -> None:
        """Saved bytes, iterations and F evaluations of one training step."""
        if self.net is None:
            return
        r = self.result
        for F in self.residuals:
            F.calls = 0
        r.saved_bytes, y = saved_activation_bytes(self.net, self.x)
        r.f_calls = sum(F.calls for F in self.residuals) / len(self.residuals)
        r.f_iters, r.f_failed = self.net.forward_iterations()
        y.square().mean().backward()
        r.b_iters = self.net.backward_iterations()
        r.forward_ms = statistics.median(self.forward_times)
        r.train_ms = statistics.median(self.train_times)


def run_all(
    configs: list[Config],
    residuals: nn.ModuleList,
    x: Tensor,
    repeats: int,
    log: Callable[[str], None],
) -> list[Result]:
    """Warm up every configuration, then time them in interleaved rounds.

    Round r times every configuration once, so a slow spell of a shared machine
    hits all rows alike instead of whichever configuration ran during it; each
    time is the median over rounds.
    """
    runners = [Runner(c, residuals, x) for c in configs]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for runner in runners:
            if runner.net is not None:
                runner.train_step()  # warm-up
        for round_ in range(repeats):
            for runner in runners:
                runner.time_once()
            log(f"#   round {round_ + 1}/{repeats} done")
        for runner in runners:
            runner.measure()
    for message in sorted(
        {
            str(w.message).split(" did not")[0]
            for w in caught
            if issubclass(w.category, ConvergenceWarning)
        }
    ):
        log(f"#   ConvergenceWarning: {message} did not converge for some samples")
    return [runner.result for runner in runners]


# -- reporting -------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.+)", f.read())
            if match:
                cpu = match.group(1).strip()
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op thread(s), Python {platform.python_version()}"
    )


def load_average() -> str:
    """The 1-minute load average: other processes on the machine disturb the timings."""
    try:
        return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


def table(results: list[Result], baseline: Result) -> str:
    def ratio(value: float, base: float) -> str:
        return f"{value / base:.2f}×" if base > 0 and value == value else "—"

    lines = [
        "| configuration | forward ms | ×expl. | fwd+bwd ms | ×expl. | saved KiB | ×expl. "
        "| fwd iters | F calls/layer | fwd not conv. | bwd iters |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.skip:
            lines.append(f"| {r.name} | skipped: {r.skip} |||||||||| ")
            continue
        b_iters = "—" if r.b_iters is None else f"{r.b_iters:.1f}"
        lines.append(
            f"| {r.name} | {r.forward_ms:.1f} | {ratio(r.forward_ms, baseline.forward_ms)} "
            f"| {r.train_ms:.1f} | {ratio(r.train_ms, baseline.train_ms)} "
            f"| {r.saved_bytes / 1024:.0f} | {ratio(r.saved_bytes, baseline.saved_bytes)} "
            f"| {r.f_iters:.1f} | {r.f_calls:.1f} | {percent(r.f_failed)} | {b_iters} |"
        )
    return "\n".join(lines)


def percent(share: float) -> str:
    return "—" if share != share else f"{100 * share:.1f}%"


def reference_table(results: list[Result]) -> Optional[str]:
    """fwd+bwd (and forward) of every row over the floor row and torchdeq's fixed-point row."""
    refs = [
        next((r for r in results if not r.skip and r.name.startswith(prefix)), None)
        for prefix in ("floor", "torchdeq fixed_point_iter")
    ]
    if all(ref is None for ref in refs):
        return None

    def over(value: float, ref: Optional[Result], attr: str) -> str:
        base = getattr(ref, attr) if ref is not None else float("nan")
        return f"{value / base:.2f}×" if base > 0 and value == value else "—"

    lines = [
        "| configuration | fwd+bwd ms | fwd+bwd / floor | fwd+bwd / torchdeq fp "
        "| forward / floor | forward / torchdeq fp |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.skip:
            lines.append(
                f"| {r.name} | {r.train_ms:.2f} | {over(r.train_ms, refs[0], 'train_ms')} "
                f"| {over(r.train_ms, refs[1], 'train_ms')} "
                f"| {over(r.forward_ms, refs[0], 'forward_ms')} "
                f"| {over(r.forward_ms, refs[1], 'forward_ms')} |"
            )
    return "\n".join(lines)


PRESETS = {
    # One block's speed at a fixed iteration count against the floor and torchdeq: one layer,
    # θ = 1, K = 30 fixed-point iterations and 30 Neumann terms.
    "block-speed": dict(
        layers=1,
        theta=1.0,
        fixed_k=30,
        batch=128,
        state=64,
        width=256,
        threads=1,
        horizon=0.5,
        only=r"^FixedPoint \+ Neumann|^floor|^torchdeq fixed_point_iter",
    ),
}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=100, help="blocks in the stack (100)")
    parser.add_argument("--width", type=int, default=100, help="hidden width of each F (100)")
    parser.add_argument(
        "--state",
        type=int,
        default=4,
        help="state dimension (even; 4 = the paper's lifted 2-D input)",
    )
    parser.add_argument(
        "--fixed-k",
        type=int,
        default=None,
        metavar="K",
        help="every solver takes exactly K iterations (forward) and K terms "
        "(backward): tolerance 1e-30 (torchdeq: 0); adds the rows of the "
        "floor and of fixed point + Neumann with fixed_count=True",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="block-speed: 1 block, θ = 1, K = 30, batch 128, state 64, width 256, "
        "h = 0.5, 1 thread; rows fixed point + Neumann (tolerance never met, "
        "and fixed count), floor, torchdeq "
        "(explicit flags after it do not override it)",
    )
    parser.add_argument("--batch", type=int, default=51, help="batch size (51)")
    parser.add_argument("--horizon", type=float, default=10.0, help="T; h = T / layers (10)")
    parser.add_argument("--theta", type=float, default=0.5, help="θ of the implicit rows (0.5)")
    parser.add_argument("--tol", type=float, default=1e-5, help="solver tolerance (1e-5)")
    parser.add_argument("--max-iter", type=int, default=50, help="iterations per layer (50)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions; median (5)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="wall: elapsed time; cpu: CPU time of this process, which leaves out the time "
        "other processes hold the core (a shared machine). auto: cpu with 1 thread, "
        "else wall (CPU time would add up the threads)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="regex: run matching rows (+ baseline)")
    parser.add_argument("--no-torchdeq", action="store_true", help="skip the torchdeq rows")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 20 layers, 2 repeats (overrides --layers/--repeats)",
    )
    args = parser.parse_args(argv)
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    if args.fixed_k is not None and args.fixed_k < 1:
        raise ValueError(f"--fixed-k must be an integer >= 1, got {args.fixed_k}")
    if args.quick:
        args.layers, args.repeats = min(args.layers, 20), 2

    global clock
    if args.clock == "auto":
        args.clock = "cpu" if args.threads == 1 else "wall"
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    residuals = make_residuals(args.layers, args.width, args.horizon, args.seed, args.state)
    x = make_input(args.batch, args.state, args.seed)

    configs = configurations(
        args.tol, args.max_iter, args.theta, not args.no_torchdeq, args.fixed_k
    )
    if args.only:
        configs = [configs[0]] + [c for c in configs[1:] if re.search(args.only, c.name)]
    print(f"# machine: {machine()}; {load_average()}")
    solve = (
        f"tol {args.tol}, max_iter {args.max_iter}"
        if args.fixed_k is None
        else f"exactly K = {args.fixed_k} iterations and adjoint terms (tol {FIXED_K_TOL:g})"
    )
    print(
        f"# network: {args.layers} layers, state {args.state}, width {args.width}, "
        f"batch {args.batch}, h = {args.horizon}/{args.layers}, θ = {args.theta}, {solve}, "
        f"float32, {args.clock} time, median of {args.repeats} interleaved rounds"
    )
    start = time.perf_counter()
    results = run_all(configs, residuals, x, args.repeats, lambda line: print(line, flush=True))
    for result in results:
        if result.skip:
            print(f"#   {result.name}: skipped ({result.skip})")
    print(f"# total {time.perf_counter() - start:.0f} s; {load_average()}\n")
    print(table(results, results[0]))
    refs = reference_table(results) if args.fixed_k is not None else None  # equal K only
    if refs:
        print("\n" + refs)


if __name__ == "__main__":
    main()
