"""Data parallel training: two CPU processes (torchrun, gloo) keep identical adapters.

The trainer does not wrap the model in DDP (two adapters share one base and are switched
between passes); it all-reduces the LoRA gradients itself. This checks that it does: after
three steps on different sessions per process (two, then one more in a second ``train()``
call), both processes hold bitwise-equal adapters that moved from their (shared)
initialisation, and only the main process wrote logs. It
also checks ``min_trained_turns`` across processes: each process carries its own turns
through a checkpoint, and the decision to update counts the turns of all processes.
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


needs_torchrun = pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not found",
)


def run_workers(out: Path, *args: str, port: int) -> None:
    """The worker on two CPU processes under torchrun."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(WORKER), str(out)]
    done = subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@needs_torchrun
def test_two_processes_train_on_different_sessions_and_stay_in_sync(tmp_path):
    run_workers(tmp_path, port=29533)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["sessions"] != ranks[1]["sessions"]  # each process has its own data
    a, b = ranks[0]["adapters"], ranks[1]["adapters"]
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert any(a[name].abs().sum() > 0 for name in a if ".lora_B." in name)  # B started at 0
    logged = pd.read_json(tmp_path / "metrics.jsonl", lines=True)
    assert ranks[0]["steps"] == ranks[1]["steps"] == [[1, 2], [3]]  # train() called twice
    assert logged["step"].tolist() == [1, 2, 3]  # the main process alone writes the log


@pytest.mark.slow
@needs_torchrun
def test_min_trained_turns_counts_and_carries_the_turns_of_every_process(tmp_path):
    run_workers(tmp_path, "wait", port=29534)
    waited = [torch.load(tmp_path / f"wait{r}.pt", weights_only=False) for r in (0, 1)]
    # Phase 1 (unreachable minimum): nothing moved, each process carried its own turns.
    for rank in waited:
        assert all(torch.equal(rank["before"][n], rank["after"][n]) for n in rank["before"])
        assert [m["recommender/updated"] for m in rank["history"]] == [0.0, 0.0]
        carried = [m["recommender/carried_turns"] for m in rank["history"]]
        assert 0 < carried[0] < carried[1] == len(rank["pending"])
    assert waited[0]["pending"] != waited[1]["pending"]  # different sessions per process
    saved = torch.load(
        tmp_path / "checkpoints" / "step_000002" / "pending_turns.pt", weights_only=False
    )
    for rank, own in zip(waited, saved, strict=True):
        assert [(s.session_id, s.completion_ids) for s in own["recommender"]] == rank["pending"]
    # Phase 2: a minimum that each process alone stays below (its new turns <= 2 sessions x
    # 2 turns = 4, while the other process carries >= 2 per step) but their sum reaches.
    minimum = sum(len(rank["pending"]) for rank in waited) + 3
    run_workers(tmp_path, "resume", str(minimum), port=29535)
    resumed = [torch.load(tmp_path / f"resume{r}.pt", weights_only=False) for r in (0, 1)]
    trained = [rank["last"]["recommender/trained_turns"] for rank in resumed]
    for before, after, own in zip(waited, resumed, trained, strict=True):
        assert after["loaded"] == before["pending"]  # each process resumed with its own
        assert len(before["pending"]) < own < minimum
        assert after["last"]["recommender/updated"] == 1.0
        assert after["last"]["recommender/carried_turns"] == 0.0
    assert sum(trained) >= minimum
    a, b = resumed[0]["after"], resumed[1]["after"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], waited[0]["before"][n]) for n in a)
    assert not (tmp_path / "checkpoints" / "step_000003" / "pending_turns.pt").exists()
