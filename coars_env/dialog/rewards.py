"""The per-turn interaction rewards and training masks of METHOD.md, as pure functions.

- recommender: ``R_rec = (2*hit - 1) * (0.5 + 0.5*s) * D_t``
- user:        ``R_user = (2*hit - 1) * (2*s - 1) * (1 - alpha * q * (2*s - 1))``
- ``D_t = gamma**(t-1)`` for hits, 1 for misses (ours); turns are numbered from 1.

Worked values (tests check them): ``reward_rec(True, 3, 0.9) == 0.7695``,
``reward_rec(False, 1, 0.2) == -0.6``, ``reward_user(True, 0.9, 0.5) == 0.768``,
``reward_user(False, 0.2, 0.5) == 0.618``, ``reward_user(h, 0.5, q) == 0``.

``turn_outcome`` composes them with format failures, repeats and masks; the environment
only calls it. Everything here is plain Python floats (no numpy) so it is cheap per step.
"""

from __future__ import annotations

from typing import NamedTuple

# Action codes (docs/CONTRACTS.md). parsing.py re-exports them with their names.
CLICK, STAR, SKIP, DISLIKE = 0, 1, 2, 3
POSITIVE_ACTIONS = frozenset((CLICK, STAR))


def stage_factor(hit: bool, t: int, gamma: float = 0.9) -> float:
    """``D_t``: ``gamma**(t-1)`` for a hit at turn ``t`` (1-based), 1 for a miss."""
    if t < 1:
        raise ValueError(f"turns are numbered from 1, got t={t}")
    return gamma ** (t - 1) if hit else 1.0


def reward_rec(hit: bool, t: int, s: float, *, gamma: float = 0.9) -> float:
    """Recommender reward of one turn: ``(2*hit - 1) * (0.5 + 0.5*s) * D_t``."""
    sign = 1.0 if hit else -1.0
    return sign * (0.5 + 0.5 * s) * stage_factor(hit, t, gamma)


def reward_user(hit: bool, s: float, q: float, *, alpha: float = 0.1) -> float:
    """User reward of one turn: ``(2*hit - 1) * (2*s - 1) * (1 - alpha*q*(2*s - 1))``.

    ``q`` in [-1, 1] is the weighted peer opinion on the recommended item (0 without peers).
    """
    sign = 1.0 if hit else -1.0
    centered = 2.0 * s - 1.0
    return sign * centered * (1.0 - alpha * q * centered)


def is_miss_positive(hit: bool, action: int) -> bool:
    """A miss the user still accepted (star or click): the data may just not record it."""
    return (not hit) and action in POSITIVE_ACTIONS


class TurnOutcome(NamedTuple):
    """Rewards and masks of one turn (mask 1.0 = the turn is used to train that agent)."""

    reward_rec: float
    reward_user: float
    mask_rec: float
    mask_user: float


def turn_outcome(
    *,
    hit: bool,
    t: int,
    action: int,
    s: float,
    q: float,
    rec_failure: bool = False,
    repeat: bool = False,
    user_failure: bool = False,
    alpha: float = 0.1,
    gamma: float = 0.9,
    format_penalty: float = -0.5,
    exclude_miss_positive: str = "user",
) -> TurnOutcome:
    """Both agents' rewards and masks for one turn, from what happened in it.

    Args:
        hit: the recommended item is the target (the caller passes False for a repeat and
            for a recommender format failure: both count as misses).
        t: turn number, from 1.
        action: the user's action code (-1 when the user had nothing to judge because the
            recommender's reply was a format failure). For a user format failure pass SKIP.
        s: the user's acceptance score in [0, 1] (0.5 for a user format failure). For a
            recommender format failure the recommender's reward uses ``s = 0`` whatever is
            passed here.
        q: peer opinion on the recommended item in [-1, 1].
        rec_failure / repeat / user_failure: what went wrong this turn.

    Rules (METHOD.md; *ours* where the paper is silent):
        - recommender format failure: ``R_rec = R_rec(miss, s=0) + penalty``; the user had
          nothing to judge: ``R_user = 0`` and ``mask_user = 0``.
        - repeat: a miss for the recommender plus the penalty. The user judged a real
          item, but "hit" was overridden by rule, so its turn is not a fair label:
          ``mask_user = 0`` (the reward is still computed, with hit = False).
        - user format failure: a skip with ``s = 0.5`` (so ``R_user = penalty``).
        - miss-but-positive (miss and star/click): ``mask_user = 0``; also
          ``mask_rec = 0`` when ``exclude_miss_positive == "both"``; neither mask when it
          is ``"none"`` (the ablation of the mask).
        - no mask removes a penalty: an agent that was penalised this turn has mask 1.
    """
    if rec_failure:
        r_rec = reward_rec(False, t, 0.0, gamma=gamma) + format_penalty
        return TurnOutcome(r_rec, 0.0, 1.0, 0.0)

    hit = hit and not repeat
    r_rec = reward_rec(hit, t, s, gamma=gamma)
    r_user = reward_user(hit, s, q, alpha=alpha)
    mask_rec = mask_user = 1.0
    if is_miss_positive(hit, action) and exclude_miss_positive != "none":
        mask_user = 0.0
        if exclude_miss_positive == "both":
            mask_rec = 0.0
    if repeat:
        r_rec += format_penalty
        mask_rec = 1.0
        mask_user = 0.0
    if user_failure:
        r_user += format_penalty
        mask_user = 1.0
    return TurnOutcome(r_rec, r_user, mask_rec, mask_user)
