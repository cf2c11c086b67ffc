"""Evaluation metrics (METHOD.md, "Evaluation protocol"): pure functions on records.

Inputs are turn records / episode summaries (docs/CONTRACTS.md, ``coars_env.logs``) as
pandas DataFrames or lists of dicts; ``episodes_from_turns`` derives the summaries when
only turns are at hand.

Confidence intervals (95% by default, ``z = 1.96``):

- proportions (Hit@1, click rate, ...) use the **Wilson score interval**, which stays
  inside [0, 1] and behaves at p = 0 or 1 and small n, where the normal approximation
  collapses to a zero-width interval;
- means of unbounded quantities (average turns, rewards) use the **normal
  approximation** ``mean +- z * s / sqrt(n)`` with the sample standard deviation
  (``ddof=1``); with fewer than two values the bounds are NaN.

Format-failure and repeat rates are per *turn* (failures / turns played; for the user, /
turns it was asked to judge); episode-level rates are per *episode*. User alignment pools every judged item of every
evaluated user (micro average) into one precision / recall / F1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from coars_env.data.common import AlignmentCase, DialogData, peer_score
from coars_env.dialog import parsing, prompts
from coars_env.dialog.config import EnvConfig
from coars_env.dialog.env import RecDialogEnv
from coars_env.dialog.rewards import POSITIVE_ACTIONS
from coars_env.logs import summarize_episode

ACCEPT_ACTIONS = POSITIVE_ACTIONS  # METHOD.md: click or star = accept


class Estimate(NamedTuple):
    """A point estimate with its confidence interval and the sample size."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}] (n={self.n})"


# -- intervals -----------------------------------------------------------------------------
def mean_ci(values: Iterable[float], *, z: float = 1.96) -> Estimate:
    """Mean with a normal-approximation interval (NaN bounds for n < 2, all NaN for n = 0)."""
    x = np.asarray(list(values), dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Estimate(mean, math.nan, math.nan, n)
    half = z * float(x.std(ddof=1)) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


def proportion_ci(successes: int, n: int, *, z: float = 1.96) -> Estimate:
    """Proportion ``successes / n`` with its Wilson score interval (all NaN for n = 0)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # Clamp the float noise at the exact ends (p = 0 gives center == half).
    return Estimate(p, max(0.0, center - half), min(1.0, center + half), n)


def _proportion(flags: Iterable[Any], *, z: float = 1.96) -> Estimate:
    flags = [bool(f) for f in flags]
    return proportion_ci(sum(flags), len(flags), z=z)


# -- records -------------------------------------------------------------------------------
def as_frame(records: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """A DataFrame of records, whether given as one or as a list of dicts."""
    if isinstance(records, pd.DataFrame):
        return records
    return pd.DataFrame(list(records))


def episodes_from_turns(turns: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Episode summaries (``coars_env.logs.summarize_episode``) of the finished episodes.

    Turns are grouped by ``episode_id`` and ordered by ``turn``; episodes whose last turn
    is neither terminated nor truncated (cut off by an interrupted run) are left out.
    """
    df = as_frame(turns)
    rows = []
    if len(df):
        for _, group in df.sort_values(["episode_id", "turn"]).groupby("episode_id", sort=True):
            records = group.to_dict("records")
            if records[-1]["terminated"] or records[-1]["truncated"]:
                rows.append(summarize_episode(records))
    return pd.DataFrame(rows)


# -- recommendation ------------------------------------------------------------------------
def recommendation_metrics(
    episodes: pd.DataFrame | Sequence[Mapping[str, Any]], *, z: float = 1.96
) -> dict[str, Estimate]:
    """Headline metrics of a set of episode summaries.

    - ``hit@1``: the final recommendation (click or turn limit) is the target;
    - ``turn1_hit@1``: the first recommendation is the target (compare with SASRec top-1);
    - ``avg_turns``: turns per episode (normal interval);
    - ``click_rate``: episodes ended by a click; ``wrong_click_rate``: ... on a non-target;
    - ``rec_format_failure_rate``, ``repeat_rate``: per turn; ``user_format_failure_rate``:
      per turn the user judged (turns without a recommender format failure);
    - ``reward_rec``, ``reward_user``: summed reward per episode (normal interval).
    """
    df = as_frame(episodes)
    if len(df) == 0:
        raise ValueError("recommendation_metrics needs at least one episode")
    n_turns = int(df["turns"].sum())
    # The user is not asked after a recommender format failure: it cannot fail then.
    n_judged = n_turns - int(df["rec_format_failures"].sum())
    return {
        "hit@1": _proportion(df["hit"], z=z),
        "turn1_hit@1": _proportion(df["first_turn_hit"], z=z),
        "avg_turns": mean_ci(df["turns"], z=z),
        "click_rate": _proportion(df["clicked"], z=z),
        "wrong_click_rate": _proportion(df["wrong_click"], z=z),
        "rec_format_failure_rate": proportion_ci(
            int(df["rec_format_failures"].sum()), n_turns, z=z
        ),
        "user_format_failure_rate": proportion_ci(
            int(df["user_format_failures"].sum()), n_judged, z=z
        ),
        "repeat_rate": proportion_ci(int(df["repeats"].sum()), n_turns, z=z),
        "reward_rec": mean_ci(df["reward_rec"], z=z),
        "reward_user": mean_ci(df["reward_user"], z=z),
    }


def hit_rate_by_turn(
    episodes: pd.DataFrame | Sequence[Mapping[str, Any]], max_turns: int = 5, *, z: float = 1.96
) -> pd.DataFrame:
    """Cumulative hit rate: the share of episodes whose target was recommended by turn t.

    Uses ``hit_turn`` (first hitting turn, 0 = never). An episode that ended before turn t
    without a hit counts as a miss at t. Columns: ``turn``, ``hit_rate``, ``low``,
    ``high``, ``n``; one row per t = 1..max_turns.
    """
    df = as_frame(episodes)
    hit_turn = df["hit_turn"].to_numpy(dtype=np.int64) if len(df) else np.zeros(0, np.int64)
    rows = []
    for t in range(1, max_turns + 1):
        est = proportion_ci(int(((hit_turn >= 1) & (hit_turn <= t)).sum()), len(hit_turn), z=z)
        rows.append({"turn": t, "hit_rate": est.mean, "low": est.low, "high": est.high, "n": est.n})
    return pd.DataFrame(rows, columns=["turn", "hit_rate", "low", "high", "n"])


def metrics_table(metrics: Mapping[str, Estimate]) -> pd.DataFrame:
    """Metrics as a printable table: one row per metric, columns mean / low / high / n."""
    return pd.DataFrame(
        [{"metric": k, **v._asdict()} for k, v in metrics.items()],
        columns=["metric", "mean", "low", "high", "n"],
    ).set_index("metric")


# -- chance references ---------------------------------------------------------------------
def random_recommender_hit_rate(n_candidates: int = 20, max_turns: int = 5) -> float:
    """Hit@1 of a never-repeating random recommender against a user who clicks only the
    target: the target is among the first ``max_turns`` of a random order (5/20 = 0.25)."""
    return min(max_turns, n_candidates) / n_candidates


def random_turn1_hit_rate(n_candidates: int = 20) -> float:
    """Turn-1 Hit@1 of a random recommender (1/20 = 0.05)."""
    return 1.0 / n_candidates


def always_accept_f1(positive_fraction: float = 0.5) -> float:
    """F1 of a user agent that accepts everything: precision = p, recall = 1 (0.667 at 1:1)."""
    p = positive_fraction
    return 2 * p / (1 + p) if p > 0 else 0.0


CHANCE = {
    "hit@1": random_recommender_hit_rate(),
    "turn1_hit@1": random_turn1_hit_rate(),
    "alignment_f1": always_accept_f1(),
}


# -- user alignment ------------------------------------------------------------------------
def alignment_metrics(accepts: Iterable[Any], labels: Iterable[Any]) -> dict[str, float]:
    """Precision, recall and F1 of accept decisions against labels (1 = real positive).

    Zero denominators give 0 (no accepts: precision 0; no positives: recall 0), as
    scikit-learn's ``zero_division=0``. Also returns ``accuracy``, ``accept_rate`` and the
    confusion counts ``tp``, ``fp``, ``fn``, ``tn`` and ``n``.
    """
    a = np.asarray([bool(x) for x in accepts])
    y = np.asarray([bool(x) for x in labels])
    if a.shape != y.shape:
        raise ValueError(f"{a.size} decisions for {y.size} labels")
    tp = int((a & y).sum())
    fp = int((a & ~y).sum())
    fn = int((~a & y).sum())
    tn = int((~a & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = int(a.size)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": (tp + tn) / n if n else math.nan,
        "accept_rate": (tp + fp) / n if n else math.nan,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "n": n,
    }


def alignment_observation(
    env: RecDialogEnv, case: AlignmentCase, position: int, *, rec_reason: str = ""
) -> dict[str, Any]:
    """The user agent's observation for judging ``case.items[position]``, as the env shows it.

    A turn-1 user phase with an empty dialogue memory: ``history`` is the case's history
    (the held-out positives removed; the most recent ``env.history_len`` items),
    ``candidates`` the case's items (``history`` and ``candidates`` fit the env's
    observation space when the case's sizes match its sessions'), ``recommended[0] = position``, ``peer`` the peers'
    opinions on the item, and ``messages`` the user prompt rendered by
    ``coars_env.dialog.prompts.user_messages`` with ``env``'s settings. ``rec_reason`` is
    the recommender's stated reason ("" = none: the item is shown without one).
    """
    data, cfg = env.data, env.config
    item = int(case.items[position])
    opinions = data.peer_opinions(case.peers, item)
    liked = sum(1 for _, _, o in opinions if o > 0)
    history = np.full(env.history_len, -1, np.int64)
    visible = case.history[-env.history_len :]
    history[: len(visible)] = visible
    recommended = np.full(env.max_turns, -1, np.int64)
    recommended[0] = position
    messages = prompts.user_messages(
        env.catalog,
        history=case.history,  # the prompt applies max_history_items, as the env does
        memory=[],
        turn=1,
        max_turns=env.max_turns,
        item=item,
        rec_reason=rec_reason,
        peers=(liked, len(opinions) - liked) if cfg.peer_opinions_in_prompt else None,
        item_noun=env.item_noun,
        max_history=cfg.max_history_items,
        max_memory_turns=cfg.max_memory_turns,
        max_chars=cfg.max_prompt_chars,
        max_reason_chars=cfg.max_rationale_chars,
        charset=env.charset,
        instruction=cfg.user_instruction,
    )
    return {
        "phase": 1,
        "turn": 1,
        "history": history,
        "candidates": np.asarray(case.items, np.int64),
        "recommended": recommended,
        "responses": np.full(env.max_turns, -1, np.int64),
        "scores": np.zeros(env.max_turns, np.float32),
        "peer": np.array([peer_score(opinions), liked, len(opinions) - liked], np.float32),
        "messages": tuple(messages),
    }


class AlignmentResult(NamedTuple):
    """``evaluate_user_alignment``'s output: pooled metrics and one row per judged item."""

    metrics: dict[str, float]
    decisions: pd.DataFrame


def evaluate_user_alignment(
    user_policy: Callable[[Any], Any],
    data: DialogData,
    *,
    config: EnvConfig | None = None,
    max_cases: int | None = None,
    rec_reason: str = "",
    batched: bool = False,
) -> AlignmentResult:
    """Run any user policy over ``data.alignment`` and score its accept decisions.

    ``user_policy`` gets ``alignment_observation(...)`` for one item (the structured user
    observation plus its ``messages`` prompt) and returns a reply in any form the env
    accepts from the user: text (``Action: star\\nScore: 0.6\\nReason: ...``), a dict
    ``{"action": code or name, "score": s}`` or an action code; it is read by
    ``coars_env.dialog.parsing.parse_user``, so an unreadable reply is a format failure,
    i.e. a skip (a reject). With ``batched=True`` the policy is called once with the list
    of all observations and returns a list of replies (for batched LLM generation).

    ``config`` sets the prompt options (``EnvConfig``; default as the env's). Accept =
    click or star. Returns the pooled (micro) ``alignment_metrics`` plus
    ``format_failure_rate`` and ``n_users``, and a DataFrame with columns ``user``,
    ``item``, ``position``, ``label``, ``action``, ``score``, ``accept``,
    ``format_failure``.
    """
    cases = list(data.alignment[:max_cases] if max_cases is not None else data.alignment)
    if not cases:
        raise ValueError(f"DialogData {data.name}/{data.split} has no alignment cases")
    env = RecDialogEnv(data, config, render_prompts=False)
    jobs = [(case, p) for case in cases for p in range(len(case.items))]
    observations = [alignment_observation(env, c, p, rec_reason=rec_reason) for c, p in jobs]
    if batched:
        replies = list(user_policy(observations))
        if len(replies) != len(observations):
            raise ValueError(f"batched policy returned {len(replies)} replies for {len(jobs)}")
    else:
        replies = [user_policy(obs) for obs in observations]
    rows = []
    for (case, position), reply in zip(jobs, replies):
        parsed = parsing.parse_user(reply)
        rows.append(
            {
                "user": case.user,
                "item": int(case.items[position]),
                "position": position,
                "label": int(case.labels[position]),
                "action": parsed.action,
                "score": parsed.score,
                "accept": parsed.action in ACCEPT_ACTIONS,
                "format_failure": parsed.format_failure,
            }
        )
    decisions = pd.DataFrame(rows)
    metrics = alignment_metrics(decisions["accept"], decisions["label"])
    metrics["format_failure_rate"] = float(decisions["format_failure"].mean())
    metrics["n_users"] = len(cases)
    return AlignmentResult(metrics, decisions)
