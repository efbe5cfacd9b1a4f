"""The ``larsopt`` command: ``larsopt train``, ``larsopt compare``, ``larsopt bench``.

``main`` returns the exit code: 0 done, 2 bad input (one line on stderr, nothing written),
3 the run diverged (a loss that is not finite), 4 an output file could not be written, 130
stopped by Ctrl-C and 143 by SIGTERM (``train`` saves a checkpoint first).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from larsopt.cli.errors import OUTPUT_EXIT_CODE, USAGE_EXIT_CODE, OutputError, UsageError

__all__ = ["main", "UsageError"]

INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


def _bench(argv: list[str]) -> int:
    """Hand over to ``larsopt.bench.main``, imported only when asked for."""
    try:
        from larsopt import bench
    except ModuleNotFoundError as error:
        if error.name != "larsopt.bench":
            raise
        print("larsopt bench: this installation has no larsopt.bench module (benchmarks are not available "
              "in this version)", file=sys.stderr)
        return USAGE_EXIT_CODE
    code = bench.main(argv)
    return 0 if code is None else int(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``larsopt`` command line with ``argv`` (default ``sys.argv[1:]``)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return _bench(arguments[1:])
    from larsopt.cli.options import build_parser

    # Under torchrun every process runs this; errors reach rank 0 (the processes agree on them)
    # and only rank 0 prints them.
    speaks = _torchrun_rank() == 0
    try:
        parser = build_parser()
        args = parser.parse_args(arguments)
        if args.command is None:
            parser.print_help()
            return USAGE_EXIT_CODE
        if args.command == "train":
            from larsopt.cli import train

            return train.command(args)
        from larsopt.cli import compare

        return compare.command(args)
    except UsageError as error:
        if speaks:
            print(f"larsopt: error: {error}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except OutputError as error:
        if speaks:
            print(f"larsopt: error: {error}", file=sys.stderr)
        return OUTPUT_EXIT_CODE
    except KeyboardInterrupt as error:
        if speaks:
            print("larsopt: interrupted", file=sys.stderr)
        return getattr(error, "exit_code", INTERRUPTED_EXIT_CODE)


def _torchrun_rank() -> int:
    """This process's rank under torchrun, 0 outside it (from the environment: no torch import)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
