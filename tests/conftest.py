"""Markers for the whole suite, applied in one place: everything under tests/parallel is `parallel`."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{os.sep}parallel{os.sep}" in str(item.fspath):
            item.add_marker(pytest.mark.parallel)
