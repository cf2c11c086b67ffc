"""``Baseline``: a named recommender / user pair plus the env settings it needs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coars_agents.policy import SamplingConfig
from coars_agents.rollout import Agent

if TYPE_CHECKING:
    from coars_agents.evaluate import EvalResult
    from coars_env.data.common import DialogData


def default_sampling(reason_tokens: int) -> SamplingConfig:
    """Greedy decoding with room for the answer template plus a ``reason_tokens`` rationale."""
    return SamplingConfig(greedy=True, max_new_tokens=reason_tokens + 24, seed=0)


@dataclass
class Baseline:
    """A recommender / user pair that needs no training, ready for ``evaluate``.

    Attributes:
        name: label in result tables.
        recommender, user: an :class:`~coars_agents.rollout.LLMAgent`, a scripted callable
            or a built-in name of :func:`coars_agents.evaluate.make_scripted` (``"oracle"``).
        env_overrides: ``EnvConfig`` fields the baseline needs (turn limit, prompt options).
        description: one line on what it is.
    """

    name: str
    recommender: Agent | str
    user: Agent | str
    env_overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def agents(self) -> dict[str, Agent | str]:
        """``{"recommender": ..., "user": ...}`` as ``rollout`` / ``evaluate`` take them."""
        return {"recommender": self.recommender, "user": self.user}

    def evaluate(self, env: str | DialogData | os.PathLike, **kwargs: Any) -> EvalResult:
        """``coars_agents.evaluate.evaluate`` of this pair with its env settings; keyword
        arguments are passed on (``env_overrides`` given here win over the baseline's)."""
        from coars_agents.evaluate import evaluate

        overrides = {**self.env_overrides, **(kwargs.pop("env_overrides", None) or {})}
        kwargs.setdefault("name", self.name)
        return evaluate(env, self.recommender, self.user, env_overrides=overrides, **kwargs)
