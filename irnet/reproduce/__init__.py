"""``python -m irnet reproduce ex1|ex2|stability|robustness|digits_theta|mnist_theta|seeds``:
the paper's studies, end to end (``seeds``: one config over many seeds,
:mod:`irnet.reproduce.seeds`; ``digits_theta``: θ's effect on robustness over step and depth,
:mod:`irnet.reproduce.digits_theta`; ``mnist_theta``: the authors' MNIST set-up,
:mod:`irnet.reproduce.mnist_theta`).

Each study trains its grid of configurations × seeds on the CPU (one worker
process per core), then writes into ``--out`` (default ``reproduce/<study>``):
``summary.md`` (the command, machine, time taken and tables), ``results.json``
(every cell's numbers) and PNG figures. TensorBoard logs of every training run
go to ``--log-dir`` (default ``runs/reproduce/<study>``). ``--tiny`` runs a
minute-sized version (for smoke tests); ``--seeds`` and ``--epochs`` override
a study's defaults. See docs/REPORT.md for what the full studies found.
"""

from irnet.reproduce._command import STUDIES, main, parser

__all__ = ["STUDIES", "main", "parser"]
