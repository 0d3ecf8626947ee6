import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py, tests/helpers


@pytest.fixture
def seed():
    """A fresh seed per test, printed so that a failure can be replayed: TEST_SEED=<seed>
    pytest <test id> runs it again with that seed."""
    s = int(os.environ.get("TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"random seed: {s}")
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)
    return s


@pytest.fixture(scope="package")
def run_shared_dir(tmp_path_factory):
    """A folder shared by the pytest-xdist workers of this run and by no other run (the
    parent of the basetemp is /tmp/pytest-of-USER without xdist: results computed there by
    an earlier run, with other code, would be reused)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
