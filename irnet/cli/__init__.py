"""The command line: ``irnet fit|validate|test|predict --config …`` (LightningCLI for irnet).

* :mod:`~irnet.cli.app`: the LightningCLI subclass, its defaults and :func:`main`;
* :mod:`~irnet.cli.members`: ``irnet extract-member``, one member of an ensemble checkpoint as a
  single network's;
* :mod:`~irnet.cli.nulls`: rewriting of arguments before jsonargparse reads them;
* :mod:`~irnet.cli.checks`: checks of configs, checkpoints and strategies before a run;
* :mod:`~irnet.cli.errors`: every mistake as one line naming the key (exit status 2);
* :mod:`~irnet.cli.threads`: torch's threads per process (``--threads``);
* :mod:`~irnet.cli.quiet`: Lightning's notices that tell an irnet user nothing, held back.
"""

from irnet.cli.app import IrnetCLI, LastCheckpoint, console_main, main, run_name

__all__ = ["IrnetCLI", "LastCheckpoint", "console_main", "main", "run_name"]
