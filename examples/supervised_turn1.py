"""A supervised upper bound for turn-1 learning: fine-tune one agent on the right answer.

RL and the self-distilled credit learn the first choice from sampled answers. This example
asks how fast the same recommender adapter learns it from the answer itself: each step
takes the trainer's sessions, renders their turn-1 prompts as a rollout would, and
minimises the negative log-likelihood of the target's answer ("Item: <its number>", tokenised
exactly as constrained decoding produces it, so the loss is on the very decisions that
:meth:`~coars_agents.policy.LLMPolicy.choice_probabilities` measures). Same model, LoRA,
optimizer, learning rate and sessions per step as ``examples/train_coevolve.py``; the
learning curve is the trainer's exact turn-1 ranking on held-out sessions
(``eval/turn1_target_prob`` every ``--rank-every`` steps).

With ``--agent user`` it asks the same of the user agent's first judgement: each session
gives two prompts, the user's turn-1 prompt after the recommender names the target (label
``click``) and after it names a non-target candidate drawn per step and session (label
``skip``); the loss is on the action's tokens. Its curve is the user's exact P(accept) after a
hit and after a miss on held-out sessions (:func:`coars_agents.evaluate.turn1_user_judgements`,
``eval/user_accept_gap``: 0 for a user who cannot tell them apart).

``--train-pool N`` restricts training to N sessions and ranks the recommender on them too:
whether it can fit labels it has seen, beside whether it generalises.

If even this does not move the held-out curve within N steps, a reward or credit design, with
a weaker signal per session, is unlikely to: the data or the model limit it first. Training
only: it reads the targets of training sessions (not an agent for evaluation).

    python examples/supervised_turn1.py                  # SmolLM2, 12 steps, CPU: ~15 min
    python examples/supervised_turn1.py --agent user     # the user agent's judgement
    python examples/supervised_turn1.py --steps 200 --mixed-precision bf16   # a GPU
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal as OneOf

import numpy as np
import torch
import tyro

from coars_agents.coars import CoARSConfig, CoARSTrainer
from coars_agents.constrained import Choice, Literal, compile_template
from coars_agents.evaluate import (
    hit_miss_pairs,
    select_sessions,
    turn1_user_judgements,
    user_judgement_metrics,
    user_turn1_prompts,
)
from coars_agents.rollout import LLMAgent, fit_prompt
from coars_env.dialog.config import EnvConfig
from coars_env.dialog.env import RECOMMENDER, USER
from coars_env.vector import VectorRecDialogEnv

USER_LABELS = {"hit": "click", "miss": "skip"}
"""The user agent's supervised action after the recommender names the target / a non-target."""


@dataclass
class Args:
    """Command line of examples/supervised_turn1.py."""

    steps: int = 12
    """Optimizer steps (each on ``train.sessions_per_step`` sessions' turn-1 targets)."""
    agent: OneOf["recommender", "user"] = "recommender"
    """Which agent's adapter learns: the recommender names the target, or the user judges a
    hit (``click``) and a miss (``skip``) of each session."""
    train_pool: int = 0
    """Train on only this many training sessions (a seeded subset; 0: all of them), and with
    every ranking also log the recommender's fit on them (``fit/turn1_target_prob``): a
    memorisation check. A model that cannot raise P(target) on a few dozen sessions it sees
    again and again has an optimization problem, not a data problem."""
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


def answer_ids(agent: LLMAgent, n_candidates: int, option: int | str) -> tuple[list[int], int]:
    """The agent's answer up to its first choice, ``option`` (the recommender's candidate
    number, the user's action), and the literal after it, as token ids that constrained
    decoding produces; and how many leading ids were forced (no choice)."""
    vocab = agent.policy.vocab
    steps = compile_template(agent.template(n_candidates), vocab)
    forced: list[int] = []
    for i, step in enumerate(steps):
        if isinstance(step.seg, Choice):
            chosen = vocab.encode(step.prefix + str(option))
            # The next literal's tokens: its first one ends a number that a longer one extends
            # ("1" vs "12"), a decision the loss must see.
            after = steps[i + 1].tokens if isinstance(steps[i + 1].seg, Literal) else ()
            return forced + list(chosen) + list(after), len(forced)
        forced += list(step.tokens)
    raise ValueError(f"the {agent.role} template has no choice")


def recommender_batch(
    trainer: CoARSTrainer, venv: VectorRecDialogEnv, sessions: list[int], step: int
) -> tuple[list[list[int]], list[list[int]], int]:
    """Turn-1 prompts of ``sessions`` (rendered as a rollout would) and their targets'
    answers, with the answers' forced-prefix length."""
    agent, data = trainer.agents(greedy=False)[RECOMMENDER], trainer.train_data
    venv.reset(seed=trainer.config.seed + step, options=[{"session_id": s} for s in sessions])
    prompts, answers, n_forced = [], [], 0
    for env, session_id in zip(venv.envs, sessions):
        session = data.sessions[session_id]
        prompts.append(
            agent.policy.render(fit_prompt(env, agent.policy, agent.sampling.max_new_tokens))
        )
        ids, n_forced = answer_ids(
            agent, len(session.candidates), session.candidates.index(session.target) + 1
        )
        answers.append(ids)
    return prompts, answers, n_forced


def user_batch(
    trainer: CoARSTrainer, env_config: EnvConfig, sessions: list[int], step: int
) -> tuple[list[list[int]], list[list[int]], int]:
    """The user's turn-1 prompts after a hit and after a miss (a non-target drawn from
    ``(seed, step, session)``) of each session, and the labelled answers."""
    cfg, agent, data = trainer.config, trainer.agents(greedy=False)[USER], trainer.train_data
    pairs = hit_miss_pairs(data, sessions, cfg.seed, step)
    prompts, _ = user_turn1_prompts(agent, data, env_config, pairs, cfg.eval_batch_size)
    (hit, n_forced), (miss, _) = (answer_ids(agent, 0, USER_LABELS[k]) for k in ("hit", "miss"))
    return prompts, [hit, miss] * len(sessions), n_forced


def training_pool(trainer: CoARSTrainer, size: int) -> list[int]:
    """The ``size`` training sessions of ``--train-pool`` (the trainer's seeded subset)."""
    n = len(trainer.train_data.sessions)
    if not 0 < size <= n:
        raise ValueError(f"train_pool must be in 1..{n} (the training sessions), got {size}")
    return select_sessions(n, size, trainer.config.seed)


def pool_sessions(trainer: CoARSTrainer, pool: list[int], step: int) -> list[int]:
    """A step's sessions drawn from ``pool`` without replacement, a function of (seed, step)."""
    rng = np.random.default_rng((trainer.config.seed, step))
    size = min(trainer.config.sessions_per_step, len(pool))
    return [pool[i] for i in rng.choice(len(pool), size=size, replace=False)]


def rank(trainer: CoARSTrainer, agent: str, pool: list[int] | None = None) -> dict[str, float]:
    """The held-out curve of ``agent``: the recommender's turn-1 ranking, or the user's
    P(accept) after a hit and after a miss (``eval/user_accept_*``) on the same sessions.
    With a training ``pool``, also the recommender's ranking of those sessions (``fit/*``)."""
    if agent == RECOMMENDER:
        out = trainer.rank_turn1()
        if pool:  # the same seeded subset as training_pool, so exactly the pool
            fit = trainer.rank_turn1(len(pool), data=trainer.train_data)
            out.update({k.replace("eval/", "fit/"): v for k, v in fit.items()})
        return out
    cfg, data = trainer.config, trainer.eval_data
    sessions = select_sessions(
        len(data.sessions), min(cfg.eval_sessions, len(data.sessions)), cfg.seed
    )
    env_config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)
    judged = turn1_user_judgements(
        trainer.agents(greedy=True)[USER],
        data,
        env_config,
        sessions,
        cfg.eval_batch_size,
        seed=cfg.seed,
    )
    return {f"eval/{k}": v for k, v in user_judgement_metrics(judged).items()}


def train_supervised(
    trainer: CoARSTrainer, steps: int, agent: str = RECOMMENDER, train_pool: int = 0
) -> list[dict[str, float]]:
    """``steps`` supervised steps of ``agent``'s adapter (one process), its held-out curve
    (:func:`rank`) from step 0 on, logged to ``metrics.jsonl`` in the ``output_dir``; with
    ``train_pool``, on that many training sessions only (see ``Args.train_pool``). With the
    config's ``time_limit_minutes``, it stops after the step that passes the limit and ranks
    there, so the curve ends where the training did."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    pool = training_pool(trainer, train_pool) if train_pool else None
    if agent not in trainer.optimizers:
        raise ValueError(
            f"{agent!r} has no optimizer: the trainer trains {trainer.config.trained_agents}"
        )
    cfg = trainer.config
    policy, optimizer = trainer.policy, trainer.optimizers[agent]
    data = trainer.train_data
    env_config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)
    params = policy.trainable_parameters(agent)
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

    log({"step": 0.0, **rank(trainer, agent, pool)})
    venvs: dict[int, VectorRecDialogEnv] = {}
    started = time.monotonic()
    for step in range(1, steps + 1):
        start = time.perf_counter()
        sessions = (
            trainer.sample_sessions(step) if pool is None else pool_sessions(trainer, pool, step)
        )
        if agent == USER:
            prompts, answers, n_forced = user_batch(trainer, env_config, sessions, step)
        else:
            if len(sessions) not in venvs:  # one env per batch size, built once
                venvs[len(sessions)] = VectorRecDialogEnv(data, env_config, len(sessions))
            prompts, answers, n_forced = recommender_batch(
                trainer, venvs[len(sessions)], sessions, step
            )
        optimizer.zero_grad()
        total = 0.0
        for i in range(0, len(prompts), cfg.micro_batch_size):
            with trainer.accelerator.autocast():
                logprobs = policy.score(
                    prompts[i : i + cfg.micro_batch_size],
                    answers[i : i + cfg.micro_batch_size],
                    adapter=agent,
                    requires_grad=True,
                )
                # Mean NLL over each answer's chosen part, averaged over the step's prompts.
                nll = -torch.stack([lp[n_forced:].mean() for lp in logprobs]).sum() / len(prompts)
            trainer.accelerator.backward(nll)
            total += float(nll.detach())
        if cfg.max_grad_norm > 0:
            trainer.accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        row = {"step": float(step), "loss": total, "seconds": time.perf_counter() - start}
        limit = cfg.time_limit_minutes
        out_of_time = bool(limit) and time.monotonic() - started > 60 * limit
        if cfg.rank_every and (step % cfg.rank_every == 0 or step == steps or out_of_time):
            row.update(rank(trainer, agent, pool))
        log(row)
        if out_of_time:
            print(f"time limit of {limit} minutes reached after step {step} of {steps}")
            break
    return history


def main(args: Args) -> list[dict[str, float]]:
    trainer = CoARSTrainer(args.train)
    history = train_supervised(trainer, args.steps, args.agent, args.train_pool)
    first, last = history[0], history[-1]
    log = Path(args.train.output_dir) / "metrics.jsonl"
    if "eval/user_accept_gap" in last:
        print(
            "held-out user P(accept | hit) - P(accept | miss): "
            f"{first['eval/user_accept_gap']:.3f} -> {last['eval/user_accept_gap']:.3f} "
            f"(SE {last['eval/user_accept_gap_se']:.3f}) after {last['step']:.0f} supervised steps "
            f"(0: no discrimination); log: {log}"
        )
    if "fit/turn1_target_prob" in last:
        print(
            f"turn-1 P(target) on the {args.train_pool} training sessions: "
            f"{first['fit/turn1_target_prob']:.3f} -> {last['fit/turn1_target_prob']:.3f}"
        )
    if "eval/turn1_target_prob" in last:
        chance = 1 / len(trainer.eval_data.sessions[0].candidates)
        print(
            f"held-out turn-1 P(target): {first['eval/turn1_target_prob']:.3f} -> "
            f"{last['eval/turn1_target_prob']:.3f} after {last['step']:.0f} supervised steps "
            f"(paired gain {last['eval/turn1_target_prob_gain']:+.3f}, "
            f"SE {last['eval/turn1_target_prob_gain_se']:.3f}; chance {chance:.3f}); log: {log}"
        )
    return history


if __name__ == "__main__":
    main(tyro.cli(Args, config=(tyro.conf.OmitArgPrefixes,)))
