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


@pytest.fixture
def library_answers_allowed():
    """The checkers accept the library's reference for the length of a test.

    Tests of a checker's logic hold it to the reference and plant bugs in subclasses of
    it; the refusal itself is tested in tests/test_library_answers.py.
    """
    from utils.checks import allow_library_answers

    with allow_library_answers():
        yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped cleanly without it (``pytest -m gpu`` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
