"""What the spectral window costs a training step (docs/contraction.md).

Example 1's shape (10 layers, width 100, θ = 1, bounded initialisation, Anderson + Direct,
Adam lr 1e-3, the 51 points of sin on [−5, 5]): two networks from one seed, without and with
``stability_limits: [0.5, 0.9, 1.1]``, trained alternately in one process on one torch thread.
Printed: the median CPU time per step over steps 10–59 of each, their ratio, and the mean
forward iterations per layer at the end.

    python benchmarks/bench_spectral_window.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import statistics  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

from irnet.linear import Direct  # noqa: E402
from irnet.nets import ODENet  # noqa: E402
from irnet.solvers import Anderson  # noqa: E402

STEPS, SKIPPED = 60, 10
LIMITS = [0.5, 0.9, 1.1]


def make(limits: Optional[list[float]]) -> ODENet:
    torch.manual_seed(0)
    return ODENet(
        layers=10,
        width=100,
        theta=1.0,
        init="bounded",
        stability_limits=limits,
        solver=Anderson(),
        linear_solver=Direct(),
    )


def main() -> None:
    torch.set_num_threads(1)
    x = torch.linspace(-5, 5, 51).unsqueeze(1)
    target = torch.sin(x)
    nets = {"without": make(None), f"with {LIMITS}": make(LIMITS)}
    optimisers = {k: torch.optim.Adam(n.parameters(), lr=1e-3) for k, n in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(STEPS):
        for name, net in nets.items():  # alternately: both see the same machine load
            start = time.process_time()
            optimisers[name].zero_grad()
            (net(x) - target).pow(2).mean().backward()
            optimisers[name].step()
            times[name].append(time.process_time() - start)
    medians = {k: statistics.median(v[SKIPPED:]) for k, v in times.items()}
    for name, net in nets.items():
        iterations = torch.stack([b.forward_stats.iterations.float().mean() for b in net.blocks])
        print(
            f"{name:22s} median {1000 * medians[name]:6.1f} ms per step, "
            f"{float(iterations.mean()):.2f} forward iterations per layer"
        )
    without, with_window = medians.values()
    print(f"ratio with / without: {with_window / without:.2f}")


if __name__ == "__main__":
    main()
