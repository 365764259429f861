"""Shared pytest setup: the `slow` marker and a fixed seed per test.

Keep this file small; fixtures that several test files need may be appended below.
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU (still runs in CI)")


@pytest.fixture(autouse=True)
def _seed_torch():
    """Each test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    yield
