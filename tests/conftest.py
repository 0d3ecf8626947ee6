import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py, tests/helpers


@pytest.fixture
def seed():
    """A fresh seed per test, printed so that a failure can be replayed."""
    s = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {s}")
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
    return s


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
