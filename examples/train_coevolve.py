"""Train a recommender and a user LLM agent together with CoARS, then compare before/after.

Default (the README's main job): the embedded synthetic dataset (no download; every user
prefers one or two genres and the held-out next item is from a preferred genre, so a
recommender can learn to match candidates to the history) and the offline
SmolLM2-135M-Instruct, with the CPU preset (constrained decoding, short rationales, T=3).

    python examples/train_coevolve.py                       # CPU preset, a few minutes
    python examples/train_coevolve.py --total-steps 200 --sessions-per-step 16
    python examples/train_coevolve.py --env-id RecDialog-ml100k --model smollm2
    # Paper scale on GPUs (see README "Paper-scale setting"):
    accelerate launch --config_file configs/accelerate/ddp.yaml examples/train_coevolve.py \\
        --env-id RecDialog-ml1m --model Qwen/Qwen2.5-1.5B-Instruct --max-turns 5 \\
        --sessions-per-step 32 --rollouts-per-session 4 --reason-tokens 64 \\
        --max-new-tokens 96 --mixed-precision bf16 --total-steps 500 --eval-every 50
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import tyro

from coars_agents.coars import CoARSConfig, CoARSTrainer


@dataclass
class Args:
    """Command line of examples/train_coevolve.py."""

    train: CoARSConfig = field(
        default_factory=lambda: CoARSConfig(total_steps=4, eval_alignment_users=2)
    )
    """The trainer's configuration (every field is a flag). The example's own defaults make
    the README's main job a few minutes on a CPU: 4 steps, alignment F1 on 2 users."""
    final_eval_sessions: int = 8
    """Held-out sessions for the before/after table (8: a smoke check of the whole loop,
    not a measurement; use 300+ to measure, as tests/test_learning.py does)."""


def main(args: Args) -> dict[str, dict[str, float]]:
    trainer = CoARSTrainer(args.train)
    resumed = args.train.resume and bool(trainer.checkpoint_dirs())
    before = None if resumed else trainer.evaluate(args.final_eval_sessions, use_adapters=False)
    if before is not None:
        print(f"before training: {before}", flush=True)
    trainer.train()
    after = trainer.evaluate(args.final_eval_sessions)
    rows = [
        ("Hit@1 vs oracle user", "eval/oracle/hit@1"),
        ("turn-1 Hit@1 vs oracle user", "eval/oracle/turn1_hit@1"),
        ("turn-1 P(target) (expected turn-1 Hit@1)", "eval/turn1_target_prob"),
        ("Hit@1 vs LLM user", "eval/llm/hit@1"),
        ("wrong-click rate (LLM user)", "eval/llm/wrong_click_rate"),
        ("recommender format failures", "eval/oracle/rec_format_failure_rate"),
        ("user format failures", "eval/llm/user_format_failure_rate"),
        ("user alignment F1", "eval/llm/user_f1"),
    ]
    print(f"\nHeld-out {args.train.eval_split} sessions: {int(after['eval/sessions'])}")
    print("| metric | before | after |\n|---|---|---|")
    for label, key in rows:
        b = "-" if before is None else f"{before.get(key, math.nan):.3f}"
        print(f"| {label} | {b} | {after.get(key, math.nan):.3f} |")
    print(f"\nLogs and checkpoints: {args.train.output_dir}")
    trainer.accelerator.end_training()  # with several processes: releases the process group
    return {"before": before or {}, "after": after}


if __name__ == "__main__":
    main(tyro.cli(Args, config=(tyro.conf.OmitArgPrefixes,)))
