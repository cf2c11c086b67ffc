"""A supervised upper bound for turn-1 learning: fine-tune the recommender on the target.

RL and the self-distilled credit learn the first choice from sampled answers. This example
asks how fast the same recommender adapter learns it from the answer itself: each step
takes the trainer's sessions, renders their turn-1 prompts as a rollout would, and
minimises the negative log-likelihood of the target's answer ("Item: <its number>", tokenised
exactly as constrained decoding produces it, so the loss is on the very decisions that
:meth:`~coars_agents.policy.LLMPolicy.choice_probabilities` measures). Same model, LoRA,
optimizer, learning rate and sessions per step as ``examples/train_coevolve.py``; the
learning curve is the trainer's exact turn-1 ranking on held-out sessions
(``eval/turn1_target_prob`` every ``--rank-every`` steps).

If even this does not raise the held-out P(target) within N steps, a reward or credit design,
with a weaker signal per session, is unlikely to: the data or the model limit it first. Training
only: it reads the targets of training sessions (not a recommender for evaluation).

    python examples/supervised_turn1.py                  # SmolLM2, 12 steps, CPU: ~15 min
    python examples/supervised_turn1.py --steps 200 --mixed-precision bf16   # a GPU
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

from coars_agents.coars import CoARSConfig, CoARSTrainer
from coars_agents.constrained import Choice, Literal, compile_template
from coars_agents.rollout import LLMAgent, fit_prompt
from coars_env.dialog.config import EnvConfig
from coars_env.dialog.env import RECOMMENDER
from coars_env.vector import VectorRecDialogEnv


@dataclass
class Args:
    """Command line of examples/supervised_turn1.py."""

    steps: int = 12
    """Optimizer steps (each on ``train.sessions_per_step`` sessions' turn-1 targets)."""
    train: CoARSConfig = field(
        default_factory=lambda: CoARSConfig(
            sessions_per_step=16,
            learning_rate=5e-4,
            reason_tokens=4,
            micro_batch_size=4,
            rank_every=4,
            eval_sessions=40,
            eval_batch_size=20,
            tensorboard=False,
            output_dir="runs/supervised_turn1",
        )
    )
    """Model, LoRA, optimizer, data and ranking settings (the trainer's fields; its rollout,
    reward and credit fields play no part). Defaults: the GPU comparisons' lr 5e-4 and 16
    sessions per step; micro-batches of 4 prompts keep a CPU under 12 GB."""


def answer_ids(agent: LLMAgent, n_candidates: int, number: int) -> tuple[list[int], int]:
    """The recommender's answer naming candidate ``number`` up to the rationale, as token ids
    that constrained decoding produces, and how many leading ids were forced (no choice)."""
    vocab = agent.policy.vocab
    steps = compile_template(agent.template(n_candidates), vocab)
    forced: list[int] = []
    for i, step in enumerate(steps):
        if isinstance(step.seg, Choice):
            option = vocab.encode(step.prefix + str(number))
            # The next literal's tokens: its first one ends a number that a longer one extends
            # ("1" vs "12"), a decision the loss must see.
            after = steps[i + 1].tokens if isinstance(steps[i + 1].seg, Literal) else ()
            return forced + list(option) + list(after), len(forced)
        forced += list(step.tokens)
    raise ValueError("the recommender template has no choice")


def train_supervised(trainer: CoARSTrainer, steps: int) -> list[dict[str, float]]:
    """``steps`` supervised steps of the trainer's recommender adapter (one process), the
    turn-1 ranking from step 0 on, logged to ``metrics.jsonl`` in its ``output_dir``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = trainer.config
    policy, optimizer = trainer.policy, trainer.optimizers[RECOMMENDER]
    agent = trainer.agents(greedy=False)[RECOMMENDER]
    data = trainer.train_data
    env_config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)
    params = policy.trainable_parameters(RECOMMENDER)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "metrics.jsonl"
    log_path.unlink(missing_ok=True)  # a rerun starts over: no resume for a probe
    history: list[dict[str, float]] = []

    def log(row: dict[str, float]) -> None:  # row by row, so a killed probe keeps its curve
        history.append(row)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print({k: round(v, 4) for k, v in row.items()}, flush=True)

    log({"step": 0.0, **trainer.rank_turn1()})
    venvs: dict[int, VectorRecDialogEnv] = {}
    for step in range(1, steps + 1):
        start = time.perf_counter()
        sessions = trainer.sample_sessions(step)
        if len(sessions) not in venvs:  # one env per batch size, built once
            venvs[len(sessions)] = VectorRecDialogEnv(data, env_config, len(sessions))
        venv = venvs[len(sessions)]
        venv.reset(seed=cfg.seed + step, options=[{"session_id": s} for s in sessions])
        prompts, answers, n_forced = [], [], 0
        for env, session_id in zip(venv.envs, sessions):
            session = data.sessions[session_id]
            prompts.append(policy.render(fit_prompt(env, policy, agent.sampling.max_new_tokens)))
            ids, n_forced = answer_ids(
                agent, len(session.candidates), session.candidates.index(session.target) + 1
            )
            answers.append(ids)
        optimizer.zero_grad()
        total = 0.0
        for i in range(0, len(prompts), cfg.micro_batch_size):
            with trainer.accelerator.autocast():
                logprobs = policy.score(
                    prompts[i : i + cfg.micro_batch_size],
                    answers[i : i + cfg.micro_batch_size],
                    adapter=RECOMMENDER,
                    requires_grad=True,
                )
                # Mean NLL over each answer's chosen part, averaged over the step's sessions.
                nll = -torch.stack([lp[n_forced:].mean() for lp in logprobs]).sum() / len(prompts)
            trainer.accelerator.backward(nll)
            total += float(nll.detach())
        if cfg.max_grad_norm > 0:
            trainer.accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        row = {"step": float(step), "loss": total, "seconds": time.perf_counter() - start}
        if cfg.rank_every and (step % cfg.rank_every == 0 or step == steps):
            row.update(trainer.rank_turn1())
        log(row)
    return history


def main(args: Args) -> list[dict[str, float]]:
    trainer = CoARSTrainer(args.train)
    history = train_supervised(trainer, args.steps)
    first, last = history[0], history[-1]
    if "eval/turn1_target_prob" in last:
        chance = 1 / len(trainer.eval_data.sessions[0].candidates)
        print(
            f"held-out turn-1 P(target): {first['eval/turn1_target_prob']:.3f} -> "
            f"{last['eval/turn1_target_prob']:.3f} after {args.steps} supervised steps "
            f"(chance {chance:.3f}); log: {Path(args.train.output_dir) / 'metrics.jsonl'}"
        )
    return history


if __name__ == "__main__":
    main(tyro.cli(Args, config=(tyro.conf.OmitArgPrefixes,)))
