"""Make the figures shown in ``docs/monitoring.md`` from a short real training run.

    .venv/bin/python docs/make_figures.py            # about two minutes on two CPU cores
    .venv/bin/python docs/make_figures.py --epochs 600 --keep-logs runs/docs

Trains the paper's Example 1 network (``ODENet``: 10 layers, θ = 0.5, width
100, T = 10, ReLU, fixed-point forward, Neumann backward) on
f(x) = sin x + 0.1 cos 19x with ``ImplicitNetModule`` and ``SineRegression``,
all four monitoring callbacks on, and copies the last PNGs the callbacks wrote
to ``docs/img/``. Adam's learning rate is 1e-3: with the paper's 1e-2 and this
seed the solves stop converging within a few epochs and the loss stalls (the
monitors show it: ``solver/forward_not_converged`` jumps to every sample,
``stability/neumann_divergent_layers`` to every layer).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from irnet.callbacks import Figures, GradientMagnitudes, SolverStatistics, StabilityMonitor
from irnet.datamodules import SineRegression
from irnet.module import ImplicitNetModule
from irnet.nets import ODENet

IMAGES = {  # PNG written by a callback → name in docs/img/
    "figures_output": "sine_output.png",
    "figures_trajectories": "sine_trajectories.png",
    "figures_iterations": "sine_iterations.png",
    "gradients_norm_vs_layer": "sine_gradients.png",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--keep-logs", type=Path, default=None, help="write the logs here and keep them"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    args = parser.parse_args()

    pl.seed_everything(0)
    net = ODENet(in_features=1, out_features=1, layers=10, T=10.0, width=100, theta=0.5)
    module = ImplicitNetModule(net, loss="l2", lr=args.lr)
    root = args.keep_logs or Path(tempfile.mkdtemp(prefix="irnet-docs-"))
    logger = TensorBoardLogger(str(root), name="sine", version=0)
    callbacks = [
        SolverStatistics(per_layer=False),
        GradientMagnitudes(per_layer=False, plot_every_n_epochs=0, save_png=True),
        StabilityMonitor(every_n_epochs=0),
        Figures(every_n_epochs=0),  # 0: draw once, after the last epoch
    ]
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=SineRegression())

    args.out.mkdir(parents=True, exist_ok=True)
    figures = Path(logger.log_dir) / "figures"
    for prefix, name in IMAGES.items():
        (latest,) = sorted(figures.glob(f"{prefix}_epoch*.png"))[-1:]
        shutil.copyfile(latest, args.out / name)
        print(f"{latest} -> {args.out / name}")
    if args.keep_logs is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
