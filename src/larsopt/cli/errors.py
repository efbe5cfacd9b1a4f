"""The error the command line turns into exit code 2 and one line on stderr."""


class UsageError(Exception):
    """Bad input (an option, a data path, an output folder): reported as one line, exit code 2.

    Raised before anything is written, so a run that fails this way leaves every file as it was.
    """
