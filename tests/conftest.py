import os

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_environment():
    """Every test starts from the same environment: what a test or the code it runs sets (e.g. the CLI's
    ``SWIN_RUN_VERSION``, which would send the next test's run into the same version folder) is undone after it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
