"""REINFORCE recommender on the numeric CoARS view: a classic (non-LLM) RL agent in one file.

The recommender is a linear-bilinear scorer over the 20 candidates of the numeric
recommender view (``gymnasium.make("coars/RecDialogRecommender-synthetic-v0",
numeric=True)``): each candidate ``c`` with item features ``x_c`` (the SASRec item
embeddings of ``DialogData.item_features``) gets the logit

    logit_c = w . x_c  +  x_c^T U V^T h  +  x_c^T P r

where ``h`` is the mean feature vector of the visible history, ``r`` the mean feature
vector of the candidates already recommended (and rejected) in this episode, and
``w, U, V, P`` are learned (``U, V``: a rank-``bilinear_rank`` bilinear form; ``P``:
rank ``feedback_rank``). Candidates recommended earlier in the episode are masked out
(a repeat is a miss with a penalty). The policy is a softmax over the logits, trained with
REINFORCE (Williams, 1992): the loss of a batch of episodes is
``-(G_t - b_t) * log pi(a_t | s_t)``, with ``G_t`` the undiscounted return-to-go of the
recommender's reward (METHOD.md's ``R_rec``) and ``b_t`` the batch mean of ``G_t`` at turn
``t`` (a per-turn baseline), minus an entropy bonus.

Training plays the oracle user (``coars_env.agents.OracleUser``: clicks the target only)
on the ``train`` split; evaluation plays every session of a held-out split (``valid`` by
default) once, with the greedy policy, before and after training, next to a random
recommender that never repeats (chance Hit@1 = 5/20 = 0.25 over 5 turns). Hit@1 comes with
a 95% Wilson interval (``coars_env.metrics``).

Outputs in ``output_dir``: ``train_log.csv`` (one row per update: episodes so far, mean
return, training hit rate, entropy, loss), ``learning_curve.png`` (``--plot``) and
``results.json``.

Run (synthetic data, ~1 min on a laptop CPU once its data is cached)::

    python examples/reinforce_recommender.py
    python examples/reinforce_recommender.py --total-episodes 1500 --no-plot   # CI scale
    python examples/reinforce_recommender.py --env-id coars/RecDialogRecommender-ml100k-v0

What the features carry (synthetic data): candidates are the target plus the 19 items
SASRec ranks highest, so the negatives are popular, history-like items and the target
tends to be the least popular candidate. SASRec embeddings encode popularity almost
linearly, so the linear term ``w . x_c`` does most of the work; the bilinear terms add
the user's taste (they matter little on synthetic data: ``--bilinear-rank 0
--feedback-rank 0`` scores about the same).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium
import numpy as np
import torch
import tyro
from torch import nn
from tqdm.auto import tqdm

import coars_env  # noqa: F401  (registers the coars/... Gymnasium ids)
from coars_env.logs import summarize_episode
from coars_env.metrics import Estimate, random_recommender_hit_rate, recommendation_metrics

# Evaluated policies: results key -> printed label.
POLICIES = {
    "random": "random recommender",
    "before": "REINFORCE, untrained",
    "after": "REINFORCE, trained",
}


@dataclass
class Config:
    """Options of the REINFORCE recommender example (every field is a CLI flag)."""

    env_id: str = "coars/RecDialogRecommender-synthetic-v0"
    """Gymnasium id of the numeric recommender view (any ``coars/RecDialogRecommender-*-v0``)."""
    seed: int = 0
    """Seeds the data, the environments, the policy's initialisation and its sampling."""
    total_episodes: int = 6000
    """Training episodes (dialogues) against the oracle user on the train split."""
    batch_episodes: int = 32
    """Episodes per policy-gradient update."""
    learning_rate: float = 0.05
    """Adam learning rate."""
    weight_decay: float = 1e-4
    """Adam (L2) weight decay on every parameter."""
    entropy_coef: float = 0.01
    """Weight of the entropy bonus (keeps the policy exploring early on)."""
    bilinear_rank: int = 8
    """Rank of the candidate-history bilinear term (0 disables it)."""
    feedback_rank: int = 4
    """Rank of the candidate-rejected-items bilinear term (0 disables it)."""
    max_turns: int = 5
    """Turns per dialogue (METHOD.md's T)."""
    eval_split: Literal["valid", "test"] = "valid"
    """Held-out split for evaluation: ``valid`` or ``test`` (never trained on)."""
    eval_sessions: int = 0
    """Evaluate on the first this-many sessions of ``eval_split`` (0: all of them)."""
    output_dir: str = "runs/reinforce_recommender"
    """Where ``train_log.csv``, ``results.json`` and the learning curve go."""
    plot: bool = True
    """Save ``learning_curve.png`` (needs matplotlib)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    torch_threads: int = 1
    """Torch CPU threads (1 is fastest for this tiny model and keeps runs reproducible)."""


class CandidateScorer(nn.Module):
    """Scores each candidate from its features, the history and the rejected items."""

    def __init__(self, n_features: int, bilinear_rank: int, feedback_rank: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1, bias=False)
        self.history_u = nn.Linear(n_features, bilinear_rank, bias=False)
        self.history_v = nn.Linear(n_features, bilinear_rank, bias=False)
        self.rejected_u = nn.Linear(n_features, feedback_rank, bias=False)
        self.rejected_v = nn.Linear(n_features, feedback_rank, bias=False)
        # Zero output at initialisation: the untrained policy is uniform over open candidates.
        for layer in (self.linear, self.history_v, self.rejected_v):
            nn.init.zeros_(layer.weight)

    def forward(
        self,
        candidates: torch.Tensor,
        history: torch.Tensor,
        rejected: torch.Tensor,
        open_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``[B, C]`` (``-inf`` at already recommended candidates).

        Args:
            candidates: ``[B, C, F]`` candidate features.
            history: ``[B, F]`` mean feature of the visible history.
            rejected: ``[B, F]`` mean feature of the candidates recommended so far (zeros
                at turn 1).
            open_mask: ``[B, C]`` True where the candidate was not recommended yet.
        """
        logits = self.linear(candidates).squeeze(-1)
        logits = logits + (self.history_u(candidates) * self.history_v(history)[:, None]).sum(-1)
        logits = logits + (self.rejected_u(candidates) * self.rejected_v(rejected)[:, None]).sum(-1)
        return logits.masked_fill(~open_mask, -math.inf)


def encode(obs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The policy's inputs from one numeric observation: (candidates ``[C, F]``, history
    mean ``[F]``, rejected-items mean ``[F]``, open-candidate mask ``[C]``)."""
    candidates = np.asarray(obs["candidates"], np.float32)
    mask = np.asarray(obs["history_mask"], np.float32)
    history = (np.asarray(obs["history"], np.float32) * mask[:, None]).sum(0) / max(mask.sum(), 1)
    recommended = np.asarray(obs["recommended"], bool)
    rejected = candidates[recommended].mean(0) if recommended.any() else np.zeros_like(history)
    return candidates, history, rejected, ~recommended


def as_batch(inputs: list[tuple[np.ndarray, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack a list of ``encode`` outputs into batched tensors."""
    return tuple(torch.from_numpy(np.stack(column)) for column in zip(*inputs))


def make_env(cfg: Config, split: str, **overrides: Any) -> gymnasium.Env:
    """The numeric recommender view on ``split``, with the oracle user; ``overrides`` are
    ``EnvConfig`` / ``DataConfig`` fields for ``coars_env.make``."""
    return gymnasium.make(
        cfg.env_id, split=split, seed=cfg.seed, numeric=True, max_turns=cfg.max_turns, **overrides
    )


def run_episode(
    env: gymnasium.Env,
    choose: Any,
    *,
    seed: int | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[list[tuple[np.ndarray, ...]], list[int], list[float], list[dict[str, Any]]]:
    """Play one episode; ``choose(inputs) -> position`` picks each recommendation.

    Returns the per-turn policy inputs, actions, rewards and turn records.
    """
    obs, _ = env.reset(seed=seed, options=options)
    inputs, actions, rewards, records = [], [], [], []
    done = False
    while not done:
        x = encode(obs)
        action = int(choose(x))
        obs, reward, terminated, truncated, info = env.step(action)
        inputs.append(x)
        actions.append(action)
        rewards.append(float(reward))
        records.append(info["turn_record"])
        done = terminated or truncated
    return inputs, actions, rewards, records


def evaluate(env: gymnasium.Env, choose: Any, n_sessions: int) -> dict[str, Estimate]:
    """Play sessions ``0..n_sessions-1`` once each; ``recommendation_metrics`` of them."""
    episodes = []
    for session_id in range(n_sessions):
        _, _, _, records = run_episode(env, choose, options={"session_id": session_id})
        episodes.append(summarize_episode([{**r, "episode_id": session_id} for r in records]))
    return recommendation_metrics(episodes)


def greedy(policy: CandidateScorer):
    """The greedy (argmax) policy of ``policy``, as a ``choose`` function."""

    def choose(x: tuple[np.ndarray, ...]) -> int:
        with torch.no_grad():
            logits = policy(*as_batch([x]))[0]
        return int(torch.argmax(logits))

    return choose


def sampler(policy: CandidateScorer, generator: torch.Generator):
    """The stochastic policy of ``policy`` (training), as a ``choose`` function."""

    def choose(x: tuple[np.ndarray, ...]) -> int:
        with torch.no_grad():
            probs = torch.softmax(policy(*as_batch([x]))[0], dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    return choose


def random_recommender(seed: int):
    """A uniformly random not-yet-recommended candidate (``coars_env.agents.RandomRecommender``
    on the numeric view), as a ``choose`` function."""
    rng = np.random.default_rng(seed)

    def choose(x: tuple[np.ndarray, ...]) -> int:
        return int(rng.choice(np.flatnonzero(x[3])))

    return choose


def reinforce_loss(
    policy: CandidateScorer,
    batch: list[tuple[list[tuple[np.ndarray, ...]], list[int], list[float]]],
    entropy_coef: float,
) -> tuple[torch.Tensor, float]:
    """REINFORCE loss of a batch of episodes, with a per-turn mean baseline.

    Returns (loss, mean policy entropy over the batch's turns).
    """
    inputs, actions, returns, turns = [], [], [], []
    for episode_inputs, episode_actions, episode_rewards in batch:
        to_go = np.cumsum(episode_rewards[::-1])[::-1]  # undiscounted return-to-go
        inputs += episode_inputs
        actions += episode_actions
        returns += to_go.tolist()
        turns += list(range(len(episode_rewards)))
    returns_t = torch.tensor(returns, dtype=torch.float32)
    turns_t = torch.tensor(turns)
    baseline = torch.zeros_like(returns_t)
    for t in turns_t.unique():
        at_t = turns_t == t
        baseline[at_t] = returns_t[at_t].mean()
    advantages = returns_t - baseline

    logits = policy(*as_batch(inputs))
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(1, torch.tensor(actions)[:, None]).squeeze(1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs.masked_fill(probs == 0, 0.0)).sum(-1)
    loss = -(advantages * chosen).mean() - entropy_coef * entropy.mean()
    return loss, float(entropy.mean().detach())


def plot_curve(rows: list[dict[str, float]], path: Path) -> None:
    """Learning curve: mean training return and hit rate per update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = [r["episodes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(episodes, [r["mean_return"] for r in rows], label="mean return (R_rec)")
    ax.plot(episodes, [r["hit_rate"] for r in rows], label="training Hit@1")
    ax.set_xlabel("training episodes")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: Config, env_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, evaluate before/after against a random recommender; returns the results.

    ``env_overrides``: extra ``EnvConfig`` / ``DataConfig`` fields for both environments
    (programmatic only; e.g. the tests' small SASRec and temporary cache).
    """
    env_overrides = env_overrides or {}
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    train_env = make_env(cfg, "train", **env_overrides)
    eval_env = make_env(cfg, cfg.eval_split, **env_overrides)
    n_eval = len(eval_env.unwrapped.data.sessions)
    n_eval = min(cfg.eval_sessions, n_eval) if cfg.eval_sessions > 0 else n_eval
    n_features = train_env.observation_space["candidates"].shape[-1]

    policy = CandidateScorer(n_features, cfg.bilinear_rank, cfg.feedback_rank)
    optimizer = torch.optim.Adam(
        policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    generator = torch.Generator().manual_seed(cfg.seed)

    results: dict[str, Any] = {"config": asdict(cfg), "eval_sessions": n_eval}
    results["random"] = evaluate(eval_env, random_recommender(cfg.seed), n_eval)
    results["before"] = evaluate(eval_env, greedy(policy), n_eval)

    rows: list[dict[str, float]] = []
    start = time.perf_counter()
    train_env.reset(seed=cfg.seed)  # seeds the session stream; later resets continue it
    choose = sampler(policy, generator)
    bar = tqdm(total=cfg.total_episodes, desc="REINFORCE", disable=not cfg.progress)
    done_episodes = 0
    while done_episodes < cfg.total_episodes:
        batch, returns, hits = [], [], []
        for _ in range(min(cfg.batch_episodes, cfg.total_episodes - done_episodes)):
            inputs, actions, rewards, records = run_episode(train_env, choose)
            batch.append((inputs, actions, rewards))
            returns.append(sum(rewards))
            hits.append(bool(records[-1]["hit"]))
        loss, entropy = reinforce_loss(policy, batch, cfg.entropy_coef)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done_episodes += len(batch)
        rows.append(
            {
                "update": len(rows) + 1,
                "episodes": done_episodes,
                "mean_return": float(np.mean(returns)),
                "hit_rate": float(np.mean(hits)),
                "entropy": entropy,
                "loss": loss.item(),
            }
        )
        bar.update(len(batch))
        bar.set_postfix(ret=f"{rows[-1]['mean_return']:+.3f}", hit=f"{rows[-1]['hit_rate']:.2f}")
    bar.close()
    results["train_seconds"] = time.perf_counter() - start

    results["after"] = evaluate(eval_env, greedy(policy), n_eval)
    with open(out / "train_log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["update"])
        writer.writeheader()
        writer.writerows(rows)
    if cfg.plot and rows:
        plot_curve(rows, out / "learning_curve.png")

    chance = random_recommender_hit_rate(20, cfg.max_turns)
    print(f"\nHeld-out {cfg.eval_split} sessions: {n_eval} (oracle user, {cfg.max_turns} turns)")
    print(f"{'policy':<22} {'Hit@1 [95% CI]':<32} turn-1 Hit@1")
    for name, label in POLICIES.items():
        m = results[name]
        print(f"{label:<22} {m['hit@1']!s:<32} {m['turn1_hit@1'].mean:.3f}")
    print(f"(chance Hit@1 of a never-repeating random recommender: {chance:.2f})")
    print(f"training: {cfg.total_episodes} episodes in {results['train_seconds']:.1f}s")

    summary = {"config": results["config"], "eval_sessions": n_eval}
    summary.update({name: {k: v._asdict() for k, v in results[name].items()} for name in POLICIES})
    summary["train_seconds"] = results["train_seconds"]
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    results["train_log"] = rows
    results["policy"] = policy
    train_env.close()
    eval_env.close()
    return results


if __name__ == "__main__":
    main(tyro.cli(Config))
