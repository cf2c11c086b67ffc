"""Worker of test_data_parallel.py: a tiny CoARS run under torchrun, one process per rank.

Writes ``rank<r>.pt`` in the output folder: the rank's adapter parameters after training
and the sessions it sampled at each step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from envtools import tiny_dialog_data  # noqa: E402
from test_coars_trainer import TINY  # noqa: E402

from coars_agents.coars import CoARSConfig, CoARSTrainer  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    config = CoARSConfig(
        output_dir=out,
        total_steps=2,
        checkpoint_every=1,
        time_limit_minutes=60.0,  # exercises the all-process agreement on stopping
        **TINY,
    )
    trainer = CoARSTrainer(
        config, train_data=tiny_dialog_data(split="train"), eval_data=tiny_dialog_data()
    )
    rank = trainer.accelerator.process_index
    sessions = [trainer.sample_sessions(step) for step in range(config.total_steps)]
    trainer.train()
    adapters = {
        name: p.detach().cpu().clone()
        for name, p in trainer.policy.model.named_parameters()
        if ".lora_" in name
    }
    torch.save(
        {"adapters": adapters, "sessions": sessions, "world": trainer.accelerator.num_processes},
        Path(out) / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
