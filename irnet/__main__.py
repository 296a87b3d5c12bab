"""``irnet …`` and ``python -m irnet …``: the studies (``reproduce``), one member of an ensemble
checkpoint (``extract-member``), or LightningCLI (the rest).

The entry point sits above both: the studies run configs through the command line
(:mod:`irnet.reproduce` imports :mod:`irnet.cli`), so the command line does not import them.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``irnet`` on ``argv`` (default ``sys.argv[1:]``); returns exit status 0 on success."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "reproduce":
        from irnet.reproduce import main as reproduce  # imported lazily: it pulls in matplotlib

        reproduce(args[1:])
        return 0
    if args and args[0] == "extract-member":
        from irnet.cli.members import main as extract_member

        extract_member(args[1:])
        return 0
    from irnet.cli import main as cli

    cli(None if argv is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
