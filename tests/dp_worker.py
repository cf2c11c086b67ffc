"""Worker of test_data_parallel.py: a tiny CoARS run under torchrun, one process per rank.

``python dp_worker.py OUT`` writes ``rank<r>.pt`` in OUT: the rank's adapter parameters after
training and the sessions it sampled at each step. The modes ``wait`` and ``resume MIN``
check ``min_trained_turns`` across processes (see :func:`wait` and :func:`resume`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from envtools import tiny_dialog_data  # noqa: E402
from test_coars_trainer import TINY  # noqa: E402

from coars_agents.coars import CoARSConfig, CoARSTrainer  # noqa: E402
from coars_env.dialog.env import RECOMMENDER  # noqa: E402

CARRY = dict(train_agents="recommender", checkpoint_every=1)  # the min_trained_turns phases


def make_trainer(out: str, **overrides) -> CoARSTrainer:
    config = CoARSConfig(output_dir=out, **{**TINY, **overrides})
    return CoARSTrainer(
        config, train_data=tiny_dialog_data(split="train"), eval_data=tiny_dialog_data()
    )


def adapters(trainer: CoARSTrainer) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().cpu().clone()
        for name, p in trainer.policy.model.named_parameters()
        if ".lora_" in name
    }


def sync(out: str) -> None:
    """Two steps on different sessions per process, then a second ``train()`` call for a
    third step (the first call must leave the process group up)."""
    trainer = make_trainer(
        out,
        total_steps=2,
        checkpoint_every=1,
        time_limit_minutes=60.0,  # exercises the all-process agreement on stopping
    )
    rank = trainer.accelerator.process_index
    sessions = [trainer.sample_sessions(step) for step in range(3)]
    first = trainer.train()
    trainer.config.total_steps = 3
    second = trainer.train()
    torch.save(
        {
            "adapters": adapters(trainer),
            "sessions": sessions,
            "world": trainer.accelerator.num_processes,
            "steps": [[m["step"] for m in call] for call in (first, second)],
        },
        Path(out) / f"rank{rank}.pt",
    )
    trainer.accelerator.end_training()


def wait(out: str) -> None:
    """``min_trained_turns`` across processes, phase 1: two recommender-only steps with an
    unreachable minimum, so each process carries its own turns into the checkpoint."""
    trainer = make_trainer(out, total_steps=2, min_trained_turns=10**6, **CARRY)
    before = adapters(trainer)
    history = trainer.train()
    torch.save(
        {
            "before": before,
            "after": adapters(trainer),
            "history": [{k: m[k] for k in m if k.startswith(f"{RECOMMENDER}/")} for m in history],
            "pending": [(s.session_id, s.completion_ids) for s in trainer.pending[RECOMMENDER]],
        },
        Path(out) / f"wait{trainer.accelerator.process_index}.pt",
    )


def resume(out: str, minimum: str) -> None:
    """Phase 2: resume phase 1's run for one step with ``min_trained_turns=minimum``."""
    trainer = make_trainer(out, total_steps=3, min_trained_turns=int(minimum), **CARRY)
    trainer.load_checkpoint(trainer.checkpoint_dirs()[-1])
    loaded = [(s.session_id, s.completion_ids) for s in trainer.pending[RECOMMENDER]]
    (last,) = trainer.train()
    torch.save(
        {"loaded": loaded, "last": last, "after": adapters(trainer)},
        Path(out) / f"resume{trainer.accelerator.process_index}.pt",
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode = sys.argv[2] if len(sys.argv) > 2 else "sync"
    {"sync": sync, "wait": wait, "resume": resume}[mode](sys.argv[1], *sys.argv[3:])
