"""Baselines that need no training (METHOD.md, "Baselines").

- :func:`zero_shot`: a single recommender agent, one recommendation (``max_turns=1``);
- :func:`afl`: the AFL-style Reflexion loop (recommender + user LLM agents, textual memory
  and reflection prompts, up to 5 rounds).

Each returns a :class:`Baseline` (the two agents plus the env settings they need) that runs
on any dataset with any model::

    policy = LLMPolicy.from_pretrained("smollm2")
    result = afl(policy).evaluate("RecDialog-ml100k", n_sessions=200)
    print(result.markdown())

The other baselines of METHOD.md live elsewhere: SASRec top-1 and the random / popularity
recommenders are scripted agents (``coars_agents.evaluate``: ``"sasrec"``, ``"random"``,
``"popularity"``); the outcome-only RL recommender and the CoARS ablations are options of
the trainer (``coars_agents.coars.CoARSConfig``).
"""

from coars_agents.baselines.afl import AFL_RECOMMENDER_INSTRUCTION, AFL_USER_INSTRUCTION, afl
from coars_agents.baselines.base import Baseline, default_sampling
from coars_agents.baselines.zero_shot import zero_shot

__all__ = [
    "AFL_RECOMMENDER_INSTRUCTION",
    "AFL_USER_INSTRUCTION",
    "Baseline",
    "afl",
    "default_sampling",
    "zero_shot",
]
