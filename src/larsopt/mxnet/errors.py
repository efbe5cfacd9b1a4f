"""The exceptions raised where MXNet used ``assert``."""


class MXNetAssertionError(ValueError, AssertionError):
    """A check that MXNet makes with ``assert``, raised with MXNet's message.

    It subclasses both ``ValueError`` (what a bad argument raises in Python) and
    ``AssertionError`` (what MXNet raised), so code written against either keeps working, and
    unlike an ``assert`` it is not removed by ``python -O``.
    """


class MXNetAssertionTypeError(MXNetAssertionError, TypeError):
    """A check of an argument's type that MXNet makes with ``assert`` (``isinstance(max_update,
    int)``): a ``TypeError``, as any wrong type, and an :class:`MXNetAssertionError`."""
