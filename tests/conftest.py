"""Shared fixtures."""

import pytest
import torch
from hypothesis import settings

# The same examples on every run: a CI failure can be reproduced, and CI never fails on a draw.
# (`--hypothesis-profile=explore` draws new examples locally.)
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread, then restore the previous count.

    The optimizer tests step tiny tensors many times; on a loaded machine with few cores the
    thread pool's hand-offs cost far more than the arithmetic (seconds instead of milliseconds)
    and make the run time depend on whatever else runs. Results do not depend on it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Put torch's thread count back after each test (``larsopt train --threads`` and the kernel
    tests set it for the whole process)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
