"""bench/'s share of python_tests' markers: every benchmark that uses a GPU where
there is one is marked `cuda` at collection (python_tests/markers.py), so
`pytest bench/ -m cuda` selects the GPU benchmarks."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python_tests"))

from markers import apply_markers, register_markers  # noqa: E402


def pytest_configure(config):
    register_markers(config)


def pytest_collection_modifyitems(config, items):
    apply_markers(items)
