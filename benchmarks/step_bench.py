"""Optimizer-step benchmark: larsopt's paths against torch SGD, timm's and pytorch-optimizer's LARS.

The same as ``larsopt bench``; see :mod:`larsopt.bench` for the method. Examples::

    python benchmarks/step_bench.py                       # all parameter sets, float32
    python benchmarks/step_bench.py --sets resnet50 --threads 2 --json step.json
"""

import sys

from larsopt.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
