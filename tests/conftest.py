"""Shared pytest configuration for the project's test suite."""

import sys
from pathlib import Path


_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # test helpers (hf_harness, helpers, ...) import as top-level modules
    sys.path.insert(0, _TESTS_DIR)

from hf_harness import MARKERS  # noqa: E402


def pytest_configure(config):
    # Markers used by transformers' own test mixins (tests/test_transformers_mixins.py, see tests/hf_harness.py).
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
