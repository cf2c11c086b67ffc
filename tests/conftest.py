"""Shared fixtures: the real-data folder (``COARS_DATA_DIR``), one torch thread, a
counter of ``LLMPolicy.generate`` calls."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture
def data_dir() -> Path:
    """The shared real datasets; tests that need them skip when COARS_DATA_DIR is unset."""
    root = os.environ.get("COARS_DATA_DIR")
    if not root or not Path(root).is_dir():
        pytest.skip("COARS_DATA_DIR is not set to a folder with the real datasets")
    return Path(root)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run much faster single-threaded (a busy 2-core CPU thrashes with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generate_calls(monkeypatch) -> list[int]:
    """Batch size of every ``LLMPolicy.generate`` call made by the test, in order."""
    from coars_agents.policy import LLMPolicy

    calls: list[int] = []
    original = LLMPolicy.generate

    def counting(self, batch_of_messages, **kwargs):
        calls.append(len(batch_of_messages))
        return original(self, batch_of_messages, **kwargs)

    monkeypatch.setattr(LLMPolicy, "generate", counting)
    return calls
