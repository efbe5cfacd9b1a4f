"""MXNet 2.0's LARS API on PyTorch tensors: ``from larsopt import mxnet as lmx``.

The same classes, arguments and numbers as ``mxnet.optimizer`` and ``mxnet.lr_scheduler``
(MXNet 2.0), for code moving from MXNet and for reproducing MXNet (or MLPerf MXNet) runs:

.. code-block:: python

    opt = lmx.LARS(learning_rate=0.1, momentum=0.9, wd=1e-4, eta=0.001,
                   param_idx2name={0: "fc_weight", 1: "fc_bias"})
    updater = lmx.get_updater(opt)
    updater([0, 1], [w.grad for w in weights], weights)     # weights updated in place

Weights, grads and states are torch tensors on any device, or numpy arrays (updated in
place). Deliberate differences from MXNet (its bugs) are listed in docs/mxnet-compatibility.md.

MXNet 1.x's LARS (1.6-1.9: ``eps=0``, momentum correction, ``lazy_update=True``) is
:mod:`larsopt.mxnet.v1`: ``from larsopt.mxnet import v1; v1.LARS(...)``.
"""

from larsopt.mxnet import lr_scheduler
from larsopt.mxnet.errors import MXNetAssertionError, MXNetAssertionTypeError
from larsopt.mxnet.lars import LARS
from larsopt.mxnet.optimizer import Optimizer, create, register
from larsopt.mxnet.updater import Updater, get_updater
from larsopt.mxnet import v1  # noqa: E402,I001 (after the classes it builds on)

__all__ = ["LARS", "MXNetAssertionError", "MXNetAssertionTypeError", "Optimizer", "Updater", "create", "get_updater",
           "lr_scheduler", "register", "v1"]
