"""``python -m irnet`` runs the command line (see :mod:`irnet.cli`)."""

import sys

from irnet.cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
