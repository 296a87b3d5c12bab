"""``python -m irnet`` runs the command line (see :mod:`irnet.cli`)."""

from irnet.cli import main

if __name__ == "__main__":
    main()
