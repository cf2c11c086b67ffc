"""Batched multi-turn rollouts: drive B dialogue episodes with two agents in lock-step.

Every turn has a recommender phase and a user phase, in every live episode at once
(``coars_env.vector.VectorRecDialogEnv``), so each phase is ONE batched call of the acting
agent: one ``LLMPolicy.generate`` for an LLM agent, or B calls of a scripted agent on the
structured observation. Any mix works: LLM vs LLM (CoARS, the AFL-style loop), LLM vs the
oracle user, SASRec vs an LLM user, ...

The result is a list of :class:`Episode` records holding everything training needs: per
turn the turn record of the env (parsed actions, rewards, masks, flags) and, for each LLM
side, the chat prompt, prompt ids, generated ids, raw log-probs and the forced-token mask.

Reuse: identical prompts in one phase (several rollouts of the same session) are
prefilled once by ``LLMPolicy`` (shared-prefix KV reuse); the turn-1 recommender prompts of a
group are identical by construction (the candidate order is fixed by the session seed).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from coars_agents.constrained import Template, recommender_template, user_template
from coars_agents.policy import Generation, LLMPolicy, PromptTooLongError, SamplingConfig
from coars_env.dialog.env import RECOMMENDER, TURN_RECORD_KEY, USER
from coars_env.vector import VectorRecDialogEnv

Messages = list[dict[str, str]]
ScriptedAgent = Callable[[Mapping[str, Any]], Any]


@dataclass
class LLMAgent:
    """An LLM playing one side of the dialogue.

    Attributes:
        policy: the shared :class:`LLMPolicy` (one base model, one LoRA adapter per agent).
        role: ``"recommender"`` or ``"user"``.
        adapter: the adapter to act with (``None`` = the base model, e.g. zero-shot/AFL).
        sampling: generation settings (temperature, max new tokens, seed, ...).
        constrained: decode through the answer-format template so the answer always parses
            (essential for small models); ``False`` generates free text.
        reason_tokens: token budget of the rationale in constrained mode.
        exclude_recommended: recommender, constrained mode: never offer a candidate already
            recommended in this session (the env scores a repeat as a miss with the format
            penalty; untrained small models repeat their first pick after a miss). Off by
            default, so that avoiding repeats is left to the agent, as METHOD.md states.
    """

    policy: LLMPolicy
    role: str
    adapter: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    constrained: bool = True
    reason_tokens: int = 24
    exclude_recommended: bool = False

    def __post_init__(self) -> None:
        if self.role not in (RECOMMENDER, USER):
            raise ValueError(f"role must be {RECOMMENDER!r} or {USER!r}, got {self.role!r}")
        self._templates: dict[tuple[int, frozenset[int]], Template] = {}

    def template(self, n_candidates: int, exclude: Collection[int] = ()) -> Template | None:
        """The answer-format template (None when unconstrained), cached per candidate count
        and excluded candidates (1-based; only with ``exclude_recommended``)."""
        if not self.constrained:
            return None
        excluded = frozenset(exclude) if self.exclude_recommended else frozenset()
        key = (n_candidates, excluded)
        if key not in self._templates:
            self._templates[key] = (
                recommender_template(n_candidates, self.reason_tokens, exclude=excluded)
                if self.role == RECOMMENDER
                else user_template(self.reason_tokens)
            )
        return self._templates[key]

    def act(
        self,
        batch: Sequence[Messages],
        *,
        seed: int,
        n_candidates: int = 20,
        recommended: Sequence[Collection[int]] | None = None,
    ) -> list[Generation]:
        """One batched generation; row ``i`` samples with a stream seeded by ``(seed, i)``.

        ``recommended``: per row, the 1-based candidates already recommended in its session
        (used by ``exclude_recommended``)."""
        sampling = SamplingConfig(**{**self.sampling.__dict__, "seed": seed})
        if recommended is not None and self.exclude_recommended:
            constraint = [self.template(n_candidates, r) for r in recommended]
        else:
            constraint = self.template(n_candidates)
        return self.policy.generate(
            batch, adapter=self.adapter, sampling=sampling, constraint=constraint
        )


Agent = LLMAgent | ScriptedAgent


@dataclass
class AgentTurn:
    """What one LLM agent saw and generated in one turn (for scoring and the loss)."""

    turn: int  # 1-based turn number (the user does not act after a recommender format failure)
    messages: Messages  # the student context x
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: torch.Tensor  # raw-distribution log-prob per generated token
    forced: torch.Tensor  # True where a constraint left no choice
    text: str


@dataclass
class Episode:
    """One finished dialogue: the env's turn records plus each LLM side's generations."""

    episode_id: int
    session_id: int
    user: int
    candidates: tuple[int, ...]
    turns: list[dict[str, Any]] = field(default_factory=list)
    recommender: list[AgentTurn] = field(default_factory=list)  # empty for a scripted side
    user_agent: list[AgentTurn] = field(default_factory=list)
    target: int | None = None  # only when the env reveals it (training)

    @property
    def hit(self) -> bool:
        """Hit@1: the final recommendation (click or turn limit) is the target."""
        return bool(self.turns and self.turns[-1]["hit"])

    @property
    def num_turns(self) -> int:
        return len(self.turns)


def fit_prompt(env, policy: LLMPolicy, max_new_tokens: int) -> Messages:
    """The acting agent's prompt, re-rendered shorter until it fits the model's context.

    The documented rule (see ``coars_env.dialog.prompts``): halve the history window (oldest
    items go first) down to one item, then drop the oldest memory turns. The system
    message, the candidates and the current recommendation are never cut, and nothing is
    cut mid-text; if even the shortest prompt does not fit, ``PromptTooLongError``.
    """
    limit = policy.prompt_limit(max_new_tokens)
    history, memory = env.config.max_history_items, env.config.max_memory_turns
    messages = env.messages()
    while len(policy.render(messages)) > limit:
        if history > 1:
            history = max(1, history // 2)
        elif memory > 0:
            memory -= 1
        else:
            raise PromptTooLongError(
                f"the shortest prompt ({len(policy.render(messages))} tokens) exceeds the "
                f"{limit} tokens left by the context minus max_new_tokens ({max_new_tokens})"
            )
        messages = env.messages(max_history=history, max_memory_turns=memory)
    return messages


def rollout(
    venv: VectorRecDialogEnv,
    agents: Mapping[str, Agent],
    *,
    seed: int,
    options: Sequence[dict | None] | dict | None = None,
) -> list[Episode]:
    """Play one episode in every slot of ``venv`` and return the episode records.

    Args:
        venv: the vector env (``autoreset=False``).
        agents: ``{"recommender": agent, "user": agent}``; an agent is an
            :class:`LLMAgent` or a scripted callable on the structured observation.
        seed: reset seed of the vector env; LLM sampling seeds derive from it too, so the
            same seed gives the same episodes.
        options: per-slot reset options, e.g. ``[{"session_id": s}, ...]``.
    """
    if venv.autoreset:
        raise ValueError("rollout() plays exactly one episode per slot: use autoreset=False")
    observations, _ = venv.reset(seed=seed, options=options)
    episodes = []
    for i, env in enumerate(venv.envs):
        s = env.session
        episodes.append(Episode(i, s.session_id, s.user, tuple(s.candidates)))
    phase = 0
    while not venv.all_done:
        role = venv.acting_agent
        agent = agents[role]
        slots = [i for i, needed in enumerate(venv.needs_action) if needed]
        # Live slots that need no reply (a user phase after a recommender format failure)
        # still step and write a turn record: collect records from every live slot.
        live = [i for i, done in enumerate(venv.dones) if not done]
        replies: list[Any] = [None] * venv.num_envs
        # No slot needs a reply in a user phase where every live recommender reply was a
        # format failure (nothing to judge): step with no replies, call no agent.
        if isinstance(agent, LLMAgent) and slots:
            budget = agent.sampling.max_new_tokens
            batch = [fit_prompt(venv.envs[i], agent.policy, budget) for i in slots]
            n_candidates = len(episodes[slots[0]].candidates)
            recommended = None
            if agent.exclude_recommended:
                recommended = [
                    {r["rec_position"] + 1 for r in episodes[i].turns if r["rec_position"] >= 0}
                    for i in slots
                ]
            generations = agent.act(
                batch,
                seed=seed * 1000 + phase,
                n_candidates=n_candidates,
                recommended=recommended,
            )
            for i, messages, gen in zip(slots, batch, generations):
                replies[i] = gen.text
                turn = AgentTurn(
                    venv.envs[i].turn,
                    messages,
                    gen.prompt_ids,
                    gen.completion_ids,
                    gen.logprobs,
                    gen.forced,
                    gen.text,
                )
                (episodes[i].recommender if role == RECOMMENDER else episodes[i].user_agent).append(
                    turn
                )
        else:
            for i in slots:
                replies[i] = agent(observations[i][role])
        observations, _, _, _, infos = venv.step(replies)
        for i in live:
            record = infos[i].get(RECOMMENDER, {}).get(TURN_RECORD_KEY)
            if record is not None:
                episodes[i].turns.append(record)
                if "target" in infos[i][RECOMMENDER]:
                    episodes[i].target = int(infos[i][RECOMMENDER]["target"])
        phase += 1
    return episodes
