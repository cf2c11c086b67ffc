"""AFL-style two-agent loop (Agentic Feedback Loop, arXiv 2410.20027): Reflexion-style memory,
no training.

A recommender agent and a user agent, both the untrained base LLM, talk for up to
``max_rounds`` (5) rounds: the recommender proposes a candidate with a reason, the user agent
accepts (click) or rejects it with its own rationale, and the recommender tries again in the
light of that feedback, until a click or the round limit. All experience lives in text: the
env's dialogue memory already carries every earlier recommendation, its reason, and the
user's action, score and rationale into both agents' next prompts. What AFL adds on top of
that is said in the prompts (``EnvConfig.rec_instruction`` / ``user_instruction``, inserted
into the system messages just before the answer format):

- the recommender is told to reflect on the user's feedback before choosing again
  (:data:`AFL_RECOMMENDER_INSTRUCTION`);
- the user agent is told to judge critically, as this user, and to give the rationale of
  its judgement, so that it is useful feedback (:data:`AFL_USER_INSTRUCTION`).

AFL also feeds the recommender the conventional recommender's top pick: ``sasrec_hint=True``
does that (off by default, so the LLM baselines are compared on the same prompt
information). Differences from the paper: answers follow the env's fixed formats (and, with
``constrained=True``, are decoded through them), so the reflection is written in the
recommender's reason rather than as a separate free-text step; the user agent also sees its
peers' opinions, as every user agent in this env does (``peer_opinions_in_prompt``).
"""

from __future__ import annotations

from coars_agents.baselines.base import Baseline, default_sampling
from coars_agents.policy import LLMPolicy, SamplingConfig
from coars_agents.rollout import LLMAgent
from coars_env.dialog.env import RECOMMENDER, USER

AFL_RECOMMENDER_INSTRUCTION = (
    "Work in a feedback loop: if the user rejected earlier recommendations, first reflect on "
    "its feedback in the conversation (what it did not like and why), then choose a "
    "different candidate that answers that feedback, and say how in your reason."
)
"""The reflection step of AFL's recommender agent (inserted into its system message)."""

AFL_USER_INSTRUCTION = (
    "Judge critically, as this user really would: compare the item with your history, do "
    "not accept it only because the recommender argues for it, and explain in your reason "
    "what fits or does not fit your taste, so the recommender can improve."
)
"""The judging rule of AFL's user agent (inserted into its system message)."""


def afl(
    policy: LLMPolicy,
    *,
    max_rounds: int = 5,
    sampling: SamplingConfig | None = None,
    user_sampling: SamplingConfig | None = None,
    constrained: bool = True,
    reason_tokens: int = 24,
    rec_adapter: str | None = None,
    user_adapter: str | None = None,
    sasrec_hint: bool = False,
    rec_instruction: str = AFL_RECOMMENDER_INSTRUCTION,
    user_instruction: str = AFL_USER_INSTRUCTION,
) -> Baseline:
    """The AFL-style baseline: both agents on ``policy`` (base model unless adapters given).

    Args:
        policy: the LLM playing both agents.
        max_rounds: the turn limit T (AFL: 5).
        sampling: the recommender's decoding (default: greedy, ``reason_tokens + 24`` tokens).
        user_sampling: the user agent's decoding (default: as ``sampling``).
        constrained: decode through the answer templates (every answer parses).
        reason_tokens: token budget of each rationale (the reflection and the feedback).
        rec_adapter, user_adapter: adapters of ``policy`` to act with (None: base model).
        sasrec_hint: show SASRec's top-1 candidate to the recommender (as AFL does).
        rec_instruction, user_instruction: the AFL prompt additions ("" leaves the env's
            plain prompts: a memory loop without the reflection instructions).
    """
    sampling = sampling or default_sampling(reason_tokens)
    llm = {"constrained": constrained, "reason_tokens": reason_tokens}
    recommender = LLMAgent(policy, RECOMMENDER, adapter=rec_adapter, sampling=sampling, **llm)
    user = LLMAgent(policy, USER, adapter=user_adapter, sampling=user_sampling or sampling, **llm)
    return Baseline(
        name="AFL-style" + ("+SASRec hint" if sasrec_hint else ""),
        recommender=recommender,
        user=user,
        env_overrides={
            "max_turns": max_rounds,
            "rec_instruction": rec_instruction,
            "user_instruction": user_instruction,
            "sasrec_hint": sasrec_hint,
        },
        description=f"recommender + user LLM agents, textual memory and reflection, "
        f"up to {max_rounds} rounds, no training",
    )
