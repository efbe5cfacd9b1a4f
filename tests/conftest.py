"""Shared fixtures."""

import pytest
import torch


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
