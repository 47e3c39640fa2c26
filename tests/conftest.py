import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from backends_under_test import PROFILES  # noqa: E402


@pytest.fixture(params=PROFILES, ids=lambda p: p.id)
def prof(request):
    """The backend profile a contract test runs against (see backends_under_test.py)."""
    return request.param


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if not PROFILES:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
