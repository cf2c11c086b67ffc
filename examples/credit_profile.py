"""Where the self-distilled credit goes: the teacher-student gap token by token.

Rolls out one training batch exactly as the trainer's step ``--step`` would (same sessions,
same seeds, same adapters), scores every generated token of one agent under the student
context x and the teacher context x + d, and writes one row per trained token: the token, the
KL between the teacher's and the student's whole next-token distributions there (the dense
credit's term), both log-probs of the generated token and the credit A = clip(log pi_T -
log pi_S, -1, 1) (METHOD.md's sampled credit). For the recommender it also records, at the
answer (its first chosen token, the candidate number), the teacher's and the student's
probability of the target among the candidate numbers.

Why: a credit term can only teach what it puts weight on. With 4-token rationales the answer
token held a third of the KL at weight 1/4.8, and the rest sat on rationale tokens where the
teacher, having read the target's title in d, wants it named
(docs/results/synthetic_h200_rec_oracle.md).

    python examples/credit_profile.py                          # SmolLM2, 32 sessions, CPU: ~3 min
    python examples/credit_profile.py --model tiny --sessions-per-step 4   # seconds
    python examples/credit_profile.py --checkpoint runs/x/checkpoints/step_000040 ...  # trained

Prints a per-turn summary and writes ``credit_profile.csv`` (per token) to ``--output-dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
import tyro

from coars_agents.coars import CoARSConfig, CoARSTrainer
from coars_agents.credit import credit_advantages, distillation_divergence
from coars_env.dialog.env import RECOMMENDER, USER


@dataclass
class Args:
    train: CoARSConfig = field(
        default_factory=lambda: CoARSConfig(
            model="smollm2",
            env_id="RecDialog-synthetic",
            num_candidates=4,
            history_items=5,
            max_turns=1,
            reason_tokens=4,
            sessions_per_step=32,
            rollouts_per_session=1,
            train_agents="recommender",
            user_partner="oracle",
            teacher="base",
            output_dir="runs/credit_profile",
            tensorboard=False,
        )
    )
    """The trainer settings whose rollouts and teacher are profiled (``--teacher``,
    ``--answer-hint``, ``--reason-tokens`` ... change what the credit sees)."""
    agent: Literal["recommender", "user"] = "recommender"
    """Whose generated tokens to profile (it must be one the config trains)."""
    checkpoint: str = ""
    """A checkpoint folder of a run with the same settings (``<output_dir>/checkpoints/
    step_000040``): profile its adapters, with its hindsight memory; empty: fresh adapters."""
    step: int | None = None
    """Which training step's batch (0-based) to roll out, as the trainer would with its
    current memory; None: the next one (0 for fresh adapters, the checkpoint's step)."""


def credit_profile(trainer: CoARSTrainer, agent: str = RECOMMENDER, step: int = 0) -> pd.DataFrame:
    """One row per trained token of ``agent`` in the trainer's batch of ``step``: ``turn_id``
    (a running index of the agent's turns), ``session_id``, ``turn``, ``position`` (index
    among the turn's trained tokens), ``token``, ``is_answer`` (the first trained token),
    ``kl`` (forward KL(teacher || student) of the next-token distributions), ``teacher_logprob``
    / ``student_logprob`` of the generated token, ``credit`` (A) and ``turn_mask``; for the
    recommender, ``teacher_p_target`` / ``student_p_target`` at the answer (the target's
    share of the candidate numbers' probability, NaN elsewhere; numbers 1-9 are one token for
    the tokenizers we use). The teacher is the one the config trains with (``teacher``). The
    trainer is left as it was: its next step sees the same batch."""
    cfg, policy = trainer.config, trainer.policy
    if agent not in cfg.trained_agents:
        raise ValueError(f"{agent!r} is not trained by this config ({cfg.trained_agents})")
    episodes = trainer.rollout_batch(step)
    # build_samples records these episodes as the sessions' earlier trajectories (the
    # hindsight memory): put it back, so that profiling leaves the trainer as it found it.
    memory = dict(trainer.memory)
    samples = [s for s in trainer.build_samples(episodes) if s.agent == agent]
    trainer.memory = memory
    # The same order as build_samples: per episode, this agent's turns.
    turns = [
        (ep, turn)
        for ep in episodes
        for turn in (ep.recommender if agent == RECOMMENDER else ep.user_agent)
    ]
    tokenizer = policy.tokenizer
    rows: list[dict] = []
    for start in range(0, len(samples), cfg.micro_batch_size):
        chunk = samples[start : start + cfg.micro_batch_size]
        completions = [s.completion_ids for s in chunk]
        with torch.no_grad():
            teacher = trainer.score_teacher(agent, chunk, full_distributions=True)
            student = policy.score(
                [s.student_ids for s in chunk], completions, adapter=agent, full_distributions=True
            )
        for i, (sample, t_dist, s_dist) in enumerate(zip(chunk, teacher, student)):
            ep, turn = turns[start + i]
            t_dist, s_dist = t_dist.float(), s_dist.float()
            mask = sample.loss_mask
            kl = distillation_divergence(t_dist[None], s_dist[None], mask[None])[0]
            ids = torch.tensor(sample.completion_ids, dtype=torch.long)
            t_lp = t_dist.gather(-1, ids[:, None])[:, 0]
            s_lp = s_dist.gather(-1, ids[:, None])[:, 0]
            credit = credit_advantages(t_lp[None], s_lp[None], mask[None])[0]
            chosen = mask.nonzero()[:, 0].tolist()
            p_target = {}
            if agent == RECOMMENDER and chosen:
                numbers = [
                    tokenizer.encode(str(k), add_special_tokens=False)[0]
                    for k in range(1, len(ep.candidates) + 1)
                ]
                target = ep.candidates.index(ep.target)
                for name, dist in (("teacher", t_dist), ("student", s_dist)):
                    probs = dist[chosen[0]].exp()[numbers]
                    p_target[name] = float(probs[target] / probs.sum())
            turn_id = start + i
            for position, j in enumerate(chosen):
                rows.append(
                    {
                        "turn_id": turn_id,
                        "session_id": ep.session_id,
                        "turn": turn.turn,
                        "position": position,
                        "token": tokenizer.decode([sample.completion_ids[j]]),
                        "is_answer": position == 0,
                        "kl": float(kl[j]),
                        "teacher_logprob": float(t_lp[j]),
                        "student_logprob": float(s_lp[j]),
                        "credit": float(credit[j]),
                        "turn_mask": sample.turn_mask,
                        "teacher_p_target": p_target.get("teacher", float("nan"))
                        if position == 0
                        else float("nan"),
                        "student_p_target": p_target.get("student", float("nan"))
                        if position == 0
                        else float("nan"),
                    }
                )
    return pd.DataFrame(rows)


def summarise(profile: pd.DataFrame) -> dict[str, float]:
    """Per-turn means: trained tokens per turn, the KL at the answer and per other token, the
    answer's share of the KL, and the teacher's and student's P(target) at the answer."""
    per_turn = profile.groupby("turn_id")
    answers = profile[profile["is_answer"]]
    rest = profile[~profile["is_answer"]]
    return {
        "turns": float(per_turn.ngroups),
        "tokens_per_turn": float(per_turn.size().mean()),
        "mean_kl_per_token": float(profile["kl"].mean()),
        "answer_kl": float(answers["kl"].mean()),
        "other_kl_per_token": float(rest["kl"].mean()) if len(rest) else float("nan"),
        "answer_share_of_kl": float(answers["kl"].sum() / max(profile["kl"].sum(), 1e-12)),
        "answer_weight_in_turn_mean": float((1.0 / per_turn.size()).mean()),
        "mean_abs_credit": float(profile["credit"].abs().mean()),
        "teacher_p_target": float(answers["teacher_p_target"].mean()),
        "student_p_target": float(answers["student_p_target"].mean()),
    }


def main(args: Args) -> dict[str, float]:
    trainer = CoARSTrainer(args.train)
    if args.checkpoint:
        trainer.load_checkpoint(args.checkpoint)
    step = trainer.step if args.step is None else args.step
    profile = credit_profile(trainer, USER if args.agent == "user" else RECOMMENDER, step)
    out = Path(args.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    profile.to_csv(out / "credit_profile.csv", index=False)
    summary = summarise(profile)
    for name, value in summary.items():
        print(f"{name:>28}: {value:.4f}")
    print(f"per token: {out / 'credit_profile.csv'}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args, config=(tyro.conf.OmitArgPrefixes,)))
