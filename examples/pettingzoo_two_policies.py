"""Two hand-written policies through the plain PettingZoo parallel API.

The env is made from PettingZoo's own registry (``pettingzoo.make("parallel",
"coars/RecDialog-synthetic-v0")``; ``import coars_env`` registers the ids) and driven by
the standard parallel loop::

    observations, infos = env.reset(seed=...)
    while env.agents:
        actions = {agent: policy[agent](observations[agent]) for agent in env.agents}
        observations, rewards, terminations, truncations, infos = env.step(actions)

Every step one agent acts and the other waits: ``observation["phase"]`` says who (0: the
recommender, 1: the user), and the waiting agent's action is ignored (these policies
return ``None`` then). The two policies are written here, against the structured
observation of docs/CONTRACTS.md, and answer in the two forms the env accepts:

- ``PopularityTextRecommender`` answers in **text**, the same interface an LLM uses
  (``"Item: <number 1-20>\\nReason: ..."``, parsed by ``coars_env.dialog.parsing``): the
  most popular candidate (training interactions) not recommended yet. It can print the
  chat prompt (``observation["messages"]``) an LLM would have received.
- ``PeerRuleUser`` (default) answers with a **structured** action ``{"action": code,
  "score": s}``: it follows the peers' opinion on the recommended item (``observation["peer"]``
  = (q_t, n_liked, n_disliked)): click if ``q_t >= click_threshold``, star / skip / dislike
  below; ``--user random`` plays a seeded random user instead.

Neither policy sees the target, so the scores measure how well a popularity recommender
does against a user who trusts its peers; the Hit@1 (final recommendation is the target)
comes from the env's turn records (``infos[agent]["turn_record"]``) through
``coars_env.metrics``.

Run::

    python examples/pettingzoo_two_policies.py --episodes 200
    python examples/pettingzoo_two_policies.py --user random --show-prompt
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pettingzoo
import tyro

import coars_env  # noqa: F401  (registers coars/RecDialog-*-v0 with PettingZoo)
from coars_env.dialog.env import RECOMMENDER, TURN_RECORD_KEY, USER
from coars_env.dialog.parsing import SCORE_INTERVALS
from coars_env.dialog.rewards import CLICK, DISLIKE, SKIP, STAR
from coars_env.logs import summarize_episode
from coars_env.metrics import random_recommender_hit_rate, recommendation_metrics


@dataclass
class Config:
    """Options of the two-policy PettingZoo example (every field is a CLI flag)."""

    env_id: str = "coars/RecDialog-synthetic-v0"
    """PettingZoo id (``coars/RecDialog-<synthetic|ml100k|ml1m|lastfm>-v0``)."""
    split: Literal["train", "valid", "test"] = "test"
    """Data split whose sessions are played."""
    seed: int = 0
    """Data seed and reset seed (episodes draw sessions from it); seeds the random user."""
    episodes: int = 200
    """Episodes (dialogues) to play."""
    max_turns: int = 5
    """Turns per dialogue."""
    user: Literal["peer", "random"] = "peer"
    """The user policy: ``peer`` (follows the peers' opinion) or ``random``."""
    click_threshold: float = 0.6
    """Peer user: click when the peer opinion q_t is at least this."""
    show_prompt: bool = False
    """Print the recommender's first chat prompt (what an LLM would read)."""
    show_transcript: bool = True
    """Print the transcript of the first episode (``render_mode="ansi"``)."""


Observation = Mapping[str, Any]


class PopularityTextRecommender:
    """The most popular candidate not recommended yet, answered as text."""

    def __init__(self, popularity: np.ndarray, show_prompt: bool = False) -> None:
        self.popularity = np.asarray(popularity, dtype=np.float64)
        self.show_prompt = show_prompt

    def __call__(self, obs: Observation) -> str | None:
        if obs["phase"] != 0:  # the user's turn: nothing to say
            return None
        if self.show_prompt and obs["messages"]:
            for message in obs["messages"]:
                print(f"--- {message['role']} ---\n{message['content']}")
            self.show_prompt = False
        candidates = np.asarray(obs["candidates"])
        tried = {int(p) for p in obs["recommended"] if p >= 0}
        open_positions = [p for p in range(len(candidates)) if p not in tried]
        best = max(open_positions, key=lambda p: (self.popularity[candidates[p]], -p))
        # Candidate numbers in text are 1-based (the prompt lists them as 1..20).
        return f"Item: {best + 1}\nReason: the most popular candidate I have not suggested yet."


class PeerRuleUser:
    """Judges a recommendation by its peers' opinion q_t in [-1, 1] (structured reply)."""

    def __init__(self, click_threshold: float = 0.6) -> None:
        self.click_threshold = click_threshold

    def __call__(self, obs: Observation) -> dict[str, float] | None:
        turn = int(obs["turn"])
        if obs["phase"] != 1 or obs["recommended"][turn - 1] < 0:
            return None  # the recommender's turn, or its reply could not be read
        q = float(obs["peer"][0])
        if q >= self.click_threshold:
            action = CLICK
        elif q > 0.2:
            action = STAR
        elif q > -0.2:
            action = SKIP
        else:
            action = DISLIKE
        low, high = SCORE_INTERVALS[action]
        score = float(np.clip(0.5 + 0.5 * q, low + 1e-3, high))  # inside the action's interval
        return {"action": action, "score": score}


class RandomUser:
    """A uniformly random action with a random score inside its interval (seeded)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs: Observation) -> dict[str, float] | None:
        turn = int(obs["turn"])
        if obs["phase"] != 1 or obs["recommended"][turn - 1] < 0:
            return None
        action = int(self.rng.integers(4))
        low, high = SCORE_INTERVALS[action]
        return {"action": action, "score": float(self.rng.uniform(low + 1e-3, high))}


def main(cfg: Config, env_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Play ``cfg.episodes`` episodes; print and return Hit@1 and the reward totals.

    ``env_overrides``: extra ``EnvConfig`` / ``DataConfig`` fields for the env
    (programmatic only; e.g. the tests' small SASRec and temporary cache).
    """
    env = pettingzoo.make(
        "parallel",
        cfg.env_id,
        split=cfg.split,
        seed=cfg.seed,
        max_turns=cfg.max_turns,
        render_mode="ansi",
        **(env_overrides or {}),
    )
    data = env.unwrapped.data
    user = PeerRuleUser(cfg.click_threshold) if cfg.user == "peer" else RandomUser(cfg.seed)
    policies = {
        RECOMMENDER: PopularityTextRecommender(data.popularity, cfg.show_prompt),
        USER: user,
    }

    totals = {agent: 0.0 for agent in env.possible_agents}
    summaries = []
    for episode in range(cfg.episodes):
        # Seed the first reset only: later resets continue the env's session stream.
        observations, infos = env.reset(seed=cfg.seed if episode == 0 else None)
        records = []
        while env.agents:
            actions = {agent: policies[agent](observations[agent]) for agent in env.agents}
            observations, rewards, terminations, truncations, infos = env.step(actions)
            for agent, reward in rewards.items():
                totals[agent] += reward
            if TURN_RECORD_KEY in infos[RECOMMENDER]:  # after each user phase
                records.append(infos[RECOMMENDER][TURN_RECORD_KEY])
        summaries.append(summarize_episode(records))
        if episode == 0 and cfg.show_transcript:
            print(env.render())
    env.close()

    metrics = recommendation_metrics(summaries)
    chance = random_recommender_hit_rate(len(data.sessions[0].candidates), cfg.max_turns)
    print(f"\n{cfg.episodes} episodes of {cfg.env_id} ({cfg.split}), user={cfg.user}")
    print(f"Hit@1        {metrics['hit@1']}  (random recommender: {chance:.2f})")
    print(f"turn-1 Hit@1 {metrics['turn1_hit@1']}")
    print(f"click rate   {metrics['click_rate']}; wrong clicks {metrics['wrong_click_rate']}")
    print(f"avg turns    {metrics['avg_turns']}")
    for agent in env.possible_agents:
        mean = totals[agent] / cfg.episodes
        print(f"reward {agent:<11} total {totals[agent]:+9.3f}  per episode {mean:+.4f}")
    return {"metrics": metrics, "reward_totals": totals, "episodes": summaries}


if __name__ == "__main__":
    main(tyro.cli(Config))
