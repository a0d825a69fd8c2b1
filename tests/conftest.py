import os
import tempfile

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
# the kernels timed and chosen in this run (swin.models.ops) are cached in a file of the run's own, shared by the
# processes the tests start
os.environ.setdefault("SWIN_KERNEL_CACHE", os.path.join(tempfile.mkdtemp(prefix="swin-kernels-"), "kernels.json"))
# one kernel path for the suite, oneDNN's (the custom ops): the timed choice costs each new model and input kind
# eight extra forwards and backwards (about a third of the model tests' time) and would pick per machine which path
# the tests check; tests/models/test_ops.py and the piecewise test of test_swin.py run the choice itself ("auto")
os.environ.setdefault("SWIN_KERNELS", "onednn")


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
