"""Data parallel training: two CPU processes (torchrun, gloo) keep identical adapters.

The trainer does not wrap the model in DDP (two adapters share one base and are switched
between passes); it all-reduces the LoRA gradients itself. This checks that it does: after
two steps on different sessions per process, both processes hold bitwise-equal adapters
that moved from their (shared) initialisation, and only the main process wrote logs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

WORKER = Path(__file__).resolve().parent / "dp_worker.py"


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not found",
)
def test_two_processes_train_on_different_sessions_and_stay_in_sync(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(WORKER),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["sessions"] != ranks[1]["sessions"]  # each process has its own data
    a, b = ranks[0]["adapters"], ranks[1]["adapters"]
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert any(a[name].abs().sum() > 0 for name in a if ".lora_B." in name)  # B started at 0
    logged = pd.read_json(tmp_path / "metrics.jsonl", lines=True)
    assert logged["step"].tolist() == [1, 2]  # the main process alone writes the log
