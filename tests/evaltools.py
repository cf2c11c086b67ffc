"""Shared by test_evaluate.py and test_baselines.py: the synthetic env, built once per process.

``coars_env`` builds the synthetic dataset through the real pipeline (SASRec training, peers,
alignment sets); a tiny SASRec and a temporary cache keep that to seconds, and every test
module of one pytest process reuses the cached build.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from typing import Any

import torch

import coars_env
from coars_agents.models import tiny_test_model
from coars_agents.policy import LLMPolicy
from coars_env.data.common import DialogData

_CACHE = tempfile.mkdtemp(prefix="coars-eval-tests-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

SYNTHETIC_DATA: dict[str, Any] = {
    "sasrec": {"hidden": 16, "blocks": 1, "heads": 1, "max_len": 16, "epochs": 1, "seed": 1},
    "progress": False,
    "alignment_users": 4,
    "cache_dir": _CACHE,
}
"""DataConfig overrides of the test build (``data_overrides=`` of ``evaluate``)."""

SHORT_PROMPTS: dict[str, Any] = {"max_summary_chars": 0, "max_history_items": 3}
"""EnvConfig overrides that keep prompts near 1000 tokens of the tiny test tokenizer."""


@functools.cache
def synthetic(split: str = "test") -> DialogData:
    """The synthetic ``DialogData`` of ``split`` (built once, then from the cache)."""
    return coars_env.load_dialog_data("RecDialog-synthetic", split, 0, **SYNTHETIC_DATA)


def tiny_policy(seed: int = 0) -> LLMPolicy:
    """A small random LLM with a context long enough for the env's prompts."""
    model, tokenizer = tiny_test_model(
        seed, hidden_size=64, num_layers=2, max_position_embeddings=4096, dtype=torch.float32
    )
    return LLMPolicy(model, tokenizer)
