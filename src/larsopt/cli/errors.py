"""The errors the command line turns into one line on stderr and an exit code."""

USAGE_EXIT_CODE = 2
DIVERGED_EXIT_CODE = 3
OUTPUT_EXIT_CODE = 4


class UsageError(Exception):
    """Bad input (an option, a data path, an output folder): reported as one line, exit code 2.

    Raised before anything is written, so a run that fails this way leaves every file as it was.
    """


class OutputError(Exception):
    """An output file could not be written once the run had started (a full disk, a quota, a
    folder made read-only): one line, exit code 4. What the run saved before stays valid."""
