"""The exception raised where MXNet used ``assert``."""


class MXNetAssertionError(ValueError, AssertionError):
    """A check that MXNet makes with ``assert``, raised with MXNet's message.

    It subclasses both ``ValueError`` (what a bad argument raises in Python) and
    ``AssertionError`` (what MXNet raised), so code written against either keeps working, and
    unlike an ``assert`` it is not removed by ``python -O``.
    """
