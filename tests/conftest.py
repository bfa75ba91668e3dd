import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors), so CI covers them.
# The variable is read when a kernel is decorated, i.e. when a kernels/ module is first imported:
# this runs before any test module imports one. On a GPU machine the compiled kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The fuzz tests draw the same examples on every run (a failure found once is found again and
# CI cannot fail by luck); HYPOTHESIS_RANDOM=1 explores new ones.
try:
    from hypothesis import settings as _hypothesis_settings
    _hypothesis_settings.register_profile("nanolora", derandomize=not os.environ.get("HYPOTHESIS_RANDOM"))
    _hypothesis_settings.load_profile("nanolora")
except ImportError:
    pass

# train.py and export.py are scripts at the repo root, not part of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is available; elsewhere they are skipped, not failed.

    With CUDA, the tests of modules that pick their device (DEVICE = "cuda" there: the kernel
    tests, which run interpreted on the CPU and compiled on a GPU, with bf16 cases added) are
    GPU tests too, so that `pytest -m gpu` on a GPU machine runs them."""
    if torch.cuda.is_available():
        for item in items:
            if getattr(getattr(item, "module", None), "DEVICE", None) == "cuda":
                item.add_marker(pytest.mark.gpu)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_cpu_thread(monkeypatch):
    """torch on one CPU thread for the whole test, whatever the run's thread policy wants."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # cpu_threads.py leaves the count alone
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    yield
    monkeypatch.undo()
    torch.set_num_threads(threads)
