"""Shared pytest configuration for the project's test suite."""

import sys
from pathlib import Path

import pytest
import torch


_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # test helpers (hf_harness, helpers, ...) import as top-level modules
    sys.path.insert(0, _TESTS_DIR)

from hf_harness import MARKERS  # noqa: E402


def pytest_configure(config):
    # Markers used by transformers' own test mixins (tests/test_transformers_mixins.py, see tests/hf_harness.py).
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models train faster that way on 2 shared cores, and bit-exact
    comparisons must not depend on how a reduction is split. The previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded_rng():
    """Every test starts from the same global RNG state, so a run does not depend on which tests ran before."""
    torch.manual_seed(0)
