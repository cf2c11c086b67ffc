"""Zero-shot single recommender agent: one recommendation, no dialogue, no training.

The base LLM (or any adapter) sees the user's history and the candidates once and names one
item: the env runs with ``max_turns=1``, so Hit@1 = turn-1 Hit@1 = "the single
recommendation is the target". There is no user agent in this baseline: the user side is
the scripted oracle user by default (it clicks only the target, so the click rate equals
Hit@1 and the wrong-click rate is 0); ``user="llm"`` puts the same base LLM with the plain
user prompt there instead (its judgement changes only the click rates, and ``evaluate``
then also reports its alignment F1: the "zero-shot user agent").
"""

from __future__ import annotations

from typing import Literal

from coars_agents.baselines.base import Baseline, default_sampling
from coars_agents.policy import LLMPolicy, SamplingConfig
from coars_agents.rollout import LLMAgent
from coars_env.dialog.env import RECOMMENDER, USER


def zero_shot(
    policy: LLMPolicy,
    *,
    user: Literal["oracle", "llm"] = "oracle",
    sampling: SamplingConfig | None = None,
    constrained: bool = True,
    reason_tokens: int = 24,
    adapter: str | None = None,
    sasrec_hint: bool = False,
) -> Baseline:
    """The zero-shot baseline on ``policy``'s base model (or ``adapter``).

    Args:
        policy: the LLM.
        user: ``"oracle"`` (scripted, default) or ``"llm"`` (the same LLM, plain prompt).
        sampling: decoding settings (default: greedy, ``reason_tokens + 24`` new tokens).
        constrained: decode through the answer template (every answer parses).
        reason_tokens: token budget of the rationale.
        adapter: act with this adapter of ``policy`` (None: the base model).
        sasrec_hint: show SASRec's top-1 candidate in the prompt (as AFL does).
    """
    if user not in ("oracle", "llm"):
        raise ValueError(f"user must be 'oracle' or 'llm', got {user!r}")
    sampling = sampling or default_sampling(reason_tokens)
    llm = {"sampling": sampling, "constrained": constrained, "reason_tokens": reason_tokens}
    recommender = LLMAgent(policy, RECOMMENDER, adapter=adapter, **llm)
    user_agent = LLMAgent(policy, USER, adapter=adapter, **llm) if user == "llm" else "oracle"
    return Baseline(
        name="zero-shot" + ("+SASRec hint" if sasrec_hint else ""),
        recommender=recommender,
        user=user_agent,
        env_overrides={"max_turns": 1, "sasrec_hint": sasrec_hint},
        description="one recommendation by the untrained LLM, no dialogue",
    )
