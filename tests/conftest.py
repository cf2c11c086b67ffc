"""Shared fixtures: the real-data folder (``COARS_DATA_DIR``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def data_dir() -> Path:
    """The shared real datasets; tests that need them skip when COARS_DATA_DIR is unset."""
    root = os.environ.get("COARS_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.skip("COARS_DATA_DIR is not set to a folder with the real datasets")
    return Path(root)
