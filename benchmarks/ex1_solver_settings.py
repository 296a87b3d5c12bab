"""Example 1 with the paper's solvers and with the fast ones, per seed: loss, iterations, time.

The config's network (10 layers, θ = ½, width 100, T = 10, R_fp weight 0.1,
Adam lr 1e-2, full batch of 51 points) in a bare training loop, one thread:

* ``paper``: fixed point from the explicit step, Neumann adjoint (tol 1e-5, 50 iterations);
* ``fast``: warm starts, Anderson (history 3), the Direct adjoint — what
  ``configs/ex1_sine.yaml`` ships.

    python benchmarks/ex1_solver_settings.py --variants paper fast --seeds 0 1 3 --epochs 400

Prints one JSON line per run: final train/val L2 loss, mean forward iterations
per layer (whole run and last 50 epochs) and wall time. Not a test.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from irnet.datamodules import SineRegression  # noqa: E402
from irnet.linear import Direct, Neumann  # noqa: E402
from irnet.module import l2_loss  # noqa: E402
from irnet.nets import ODENet  # noqa: E402
from irnet.regularizers import FixedPointRegularizer  # noqa: E402
from irnet.solvers import Anderson, FixedPoint  # noqa: E402

VARIANTS = {
    "paper": lambda: dict(solver=FixedPoint(1e-5, 50), linear_solver=Neumann(1e-5, 50)),
    "fast": lambda: dict(
        solver=Anderson(1e-5, 50, history=3), linear_solver=Direct(), warm_start=True
    ),
}


def run(variant: str, seed: int, epochs: int) -> dict:
    dm = SineRegression(num_points=51)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    xv, yv = next(iter(dm.val_dataloader()))
    torch.manual_seed(seed)
    net = ODENet(1, 1, layers=10, T=10.0, width=100, theta=0.5, **VARIANTS[variant]())
    r_fp = FixedPointRegularizer(weight=0.1, p=1.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    iterations, start = [], time.perf_counter()
    for _ in range(epochs):
        states = net.trajectory(x)
        loss = l2_loss(net.readout(states[-1]), y) + r_fp.weight * r_fp(net, x, states)
        iterations.append(
            float(
                torch.stack([b.forward_stats.iterations.float().mean() for b in net.blocks]).mean()
            )
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    wall = time.perf_counter() - start
    with torch.no_grad():
        val, train = float(l2_loss(net(xv), yv)), float(l2_loss(net(x), y))
    tail = iterations[-50:]
    return dict(
        variant=variant,
        seed=seed,
        epochs=epochs,
        val=round(val, 4),
        train=round(train, 4),
        iters_mean=round(sum(iterations) / len(iterations), 2),
        iters_last50=round(sum(tail) / len(tail), 2),
        wall_s=round(wall, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=["paper", "fast"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 3])
    parser.add_argument("--epochs", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter(
        "ignore"
    )  # the paper's settings warn about failed solves; the stats count them
    for seed in args.seeds:
        for variant in args.variants:
            print(json.dumps(run(variant, seed, args.epochs)), flush=True)


if __name__ == "__main__":
    main()
