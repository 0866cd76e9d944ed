"""The ``nnshrink`` console script: imports the command line, so that Ctrl-C even while it loads
ends with one line and exit status 130 instead of a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from nnshrink.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
