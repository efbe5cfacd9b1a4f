"""larsopt: LARS (layer-wise adaptive rate scaling) for PyTorch, exact and fast.

* :class:`larsopt.LARS`: a ``torch.optim.Optimizer``.
* :func:`larsopt.param_groups`: groups with independent trust-ratio and weight-decay exclusion.
* :func:`larsopt.functional.lars`: the functional core every front-end calls.
"""

from larsopt.optim import LARS
from larsopt.param_groups import param_groups

__version__ = "0.1.0"

__all__ = ["LARS", "param_groups", "__version__"]
