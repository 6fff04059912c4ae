"""Fixtures shared by the unit tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one PyTorch thread, then restore the setting.

    The tiny models' ops are a few microseconds each; on a small or shared CPU a second
    thread costs more in synchronisation than it gains.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
