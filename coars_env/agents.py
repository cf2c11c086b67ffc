"""Built-in scripted agents: baselines, test opponents, the "other side" of single-agent views.

Every agent is a callable on the *structured* observation of docs/CONTRACTS.md (the dict
with ``phase``, ``turn``, ``history``, ``candidates``, ``recommended``, ``responses``,
``scores``, ``peer``) and returns a *structured* action:

- recommenders return an ``int`` candidate position (0..19 with 20 candidates);
- users return ``{"action": code, "score": float}`` (CLICK=0, STAR=1, SKIP=2, DISLIKE=3)
  with the score inside the action's interval.

None of them reads ``messages``, so they cost no prompt rendering. Agents with
randomness own a ``numpy`` generator seeded at construction; ``reset(seed)`` reseeds it
(the single-agent wrappers call it from their own ``reset(seed=...)``), so a fixed seed
gives a fixed sequence of actions.

Which session is this? The observation does not carry the session id (agents must not
see the target). Agents that need per-session data that is not in the observation (the
SASRec top-1 pick; the target, for the privileged ``OracleUser``) find the session in
``DialogData`` by its candidate set (20 items, shuffled per session, so in practice
unique), using the visible history to break ties (``SessionIndex``), unless they are
given a lookup: the single-agent wrappers pass the env's current session
(``RecDialogEnv.session``), which is exact.

``make_scripted(name, role, data)`` builds one by name (``SCRIPTED_RECOMMENDERS``,
``SCRIPTED_USERS``); ``play_episode(env, recommender, user)`` plays one episode with two
such policies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from coars_env.data.common import DialogData, Session
from coars_env.dialog.env import RECOMMENDER, TURN_RECORD_KEY, USER
from coars_env.dialog.parsing import SCORE_INTERVALS, clamp_score
from coars_env.dialog.rewards import CLICK, DISLIKE, SKIP, STAR

__all__ = [
    "CLICK",
    "SCRIPTED_RECOMMENDERS",
    "SCRIPTED_USERS",
    "DISLIKE",
    "GenreRecommender",
    "SCORE_INTERVALS",
    "SKIP",
    "STAR",
    "HistorySimilarity",
    "OracleUser",
    "PopularityRecommender",
    "RandomRecommender",
    "SASRecRecommender",
    "SessionIndex",
    "TargetRecommender",
    "make_scripted",
    "play_episode",
]

Observation = Mapping[str, Any]


def _recommended_positions(obs: Observation) -> set[int]:
    """Candidate positions already recommended in this episode (whatever the phase)."""
    return {int(p) for p in np.asarray(obs["recommended"]).ravel() if p >= 0}


def _open_positions(obs: Observation) -> np.ndarray:
    """Positions not recommended yet; all positions once every candidate was tried."""
    n = len(obs["candidates"])
    done = _recommended_positions(obs)
    open_ = np.array([p for p in range(n) if p not in done], dtype=np.int64)
    return open_ if open_.size else np.arange(n, dtype=np.int64)


def _visible_history(obs: Observation) -> np.ndarray:
    h = np.asarray(obs["history"], dtype=np.int64).ravel()
    return h[h >= 0]


class SessionIndex:
    """Finds the ``Session`` behind an observation, from its candidate set and history."""

    def __init__(self, data: DialogData) -> None:
        self._by_candidates: dict[frozenset[int], list[Session]] = {}
        for session in data.sessions:
            self._by_candidates.setdefault(frozenset(session.candidates), []).append(session)

    def lookup(self, obs: Observation) -> Session | None:
        """The session whose candidates (and, among several, history) match ``obs``."""
        key = frozenset(int(c) for c in np.asarray(obs["candidates"]).ravel())
        found = self._by_candidates.get(key, [])
        if len(found) > 1:
            # The env may show a shorter history window than the session holds: compare
            # the visible history with the end of each session's history.
            visible = tuple(int(i) for i in _visible_history(obs))
            n = len(visible)
            found = [s for s in found if tuple(s.history[-n:] if n else ()) == visible] or found
        return found[0] if found else None


class HistorySimilarity:
    """Cosine similarity of items to the mean of a history, on ``DialogData.item_features``."""

    def __init__(self, data: DialogData) -> None:
        features = np.asarray(data.item_features, dtype=np.float64)
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        self.unit = features / np.where(norms > 0, norms, 1.0)

    def __call__(self, history: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Similarity in [-1, 1] of each of ``items`` to the history (0 with no history)."""
        if len(history) == 0:
            return np.zeros(len(items))
        profile = self.unit[history].mean(axis=0)
        norm = np.linalg.norm(profile)
        if norm == 0:
            return np.zeros(len(items))
        return self.unit[items] @ (profile / norm)


class RandomRecommender:
    """Recommends a uniformly random candidate it has not recommended in this episode."""

    def __init__(self, seed: int | None = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (``seed`` reseeds a random agent; others ignore it)."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def __call__(self, obs: Observation) -> int:
        return int(self.rng.choice(_open_positions(obs)))


class PopularityRecommender:
    """Recommends the most popular (training interactions) not-yet-recommended candidate.

    Ties go to the lower candidate position, so it is deterministic.
    """

    def __init__(self, data: DialogData) -> None:
        self.popularity = np.asarray(data.popularity, dtype=np.float64)

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (``seed`` reseeds a random agent; others ignore it)."""
        pass

    def __call__(self, obs: Observation) -> int:
        open_ = _open_positions(obs)
        candidates = np.asarray(obs["candidates"], dtype=np.int64)
        scores = self.popularity[candidates[open_]]
        return int(open_[int(np.argmax(scores))])


class GenreRecommender:
    """Content baseline: the open candidate whose genres the visible history shares most.

    A candidate's score is the sum, over its genres (``items["genres"]``, "|"-separated), of
    the share of visible history items that carry that genre; the highest open candidate
    wins, ties going to the earlier position (candidates are shuffled per session, so that
    is a seeded random tie-break). Never repeats while a candidate is left. Deterministic.
    On the synthetic dataset this is the "learnable signal" of its docstring made explicit:
    what a recommender that only matched genres would reach.
    """

    def __init__(self, data: DialogData) -> None:
        values = data.items["genres"] if "genres" in data.items else [None] * len(data.items)
        self.genres = [
            frozenset(g for g in v.split("|") if g) if isinstance(v, str) else frozenset()
            for v in values
        ]

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (deterministic: nothing to reset)."""

    def scores(self, history: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Each candidate's genre score against ``history`` (item ids)."""
        counts: dict[str, int] = {}
        for item in history.tolist():
            for genre in self.genres[item]:
                counts[genre] = counts.get(genre, 0) + 1
        n = max(1, len(history))
        return np.array(
            [sum(counts.get(g, 0) for g in self.genres[c]) / n for c in candidates.tolist()]
        )

    def __call__(self, obs: Observation) -> int:
        candidates = np.asarray(obs["candidates"], dtype=np.int64)
        open_ = _open_positions(obs)
        scores = self.scores(_visible_history(obs), candidates[open_])
        return int(open_[int(np.argmax(scores))])  # argmax: first of the ties


class SASRecRecommender:
    """SASRec's top-1 candidate first, then the candidates most similar to the history.

    Turn 1 recommends ``Session.sasrec_top1`` (the single-shot SASRec baseline);
    ``DialogData`` keeps only SASRec's top pick, so later turns rank the remaining
    candidates by the cosine similarity of their ``item_features`` (SASRec item
    embeddings in prepared data) to the mean of the visible history. For an unknown
    session every turn uses the similarity ranking. Deterministic.

    The session comes from ``session_lookup(obs)`` when given (the single-agent wrappers
    pass the env's current session), else from ``DialogData`` through ``SessionIndex``.
    """

    def __init__(
        self,
        data: DialogData,
        session_lookup: Callable[[Observation], Session | None] | None = None,
    ) -> None:
        self.lookup = session_lookup or SessionIndex(data).lookup
        self.similarity = HistorySimilarity(data)

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (``seed`` reseeds a random agent; others ignore it)."""
        pass

    def __call__(self, obs: Observation) -> int:
        candidates = np.asarray(obs["candidates"], dtype=np.int64)
        open_ = _open_positions(obs)
        session = self.lookup(obs)
        if session is not None:
            top = np.flatnonzero(candidates == session.sasrec_top1)
            if top.size and int(top[0]) in set(open_.tolist()):
                return int(top[0])
        sims = self.similarity(_visible_history(obs), candidates[open_])
        return int(open_[int(np.argmax(sims))])


class TargetRecommender:
    """Privileged: names the target (found by ``SessionIndex``, or ``target_lookup``) with
    probability ``target_prob`` on each turn until it was recommended, else a uniformly
    random other open candidate.

    ``target_prob = 1`` (the ``"oracle"`` recommender) is Hit@1 = 1 against the oracle user:
    a sanity check and an upper bound. ``target_prob = 0.5`` (``"balanced"``) shows a user
    agent hits and misses in equal numbers whatever the session: a partner to train the user
    agent against, under which always accepting and always rejecting earn the same average
    interaction reward (METHOD.md's ``R_user``, without the mask), so only telling hits from
    misses pays. Once the target was recommended (or cannot be found), the first open
    candidate. Seeded: ``reset(seed)`` reseeds the coin and the choice of non-target.
    """

    def __init__(
        self,
        data: DialogData,
        target_prob: float = 1.0,
        seed: int | None = 0,
        target_lookup: Callable[[Observation], int] | None = None,
    ) -> None:
        if not 0.0 <= target_prob <= 1.0:
            raise ValueError(f"target_prob must be in [0, 1], got {target_prob}")
        self.index = SessionIndex(data)
        self.target_prob = target_prob
        self.target_lookup = target_lookup
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (``seed`` reseeds the random choices)."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def _target(self, obs: Observation) -> int | None:
        if self.target_lookup is not None:
            return int(self.target_lookup(obs))
        session = self.index.lookup(obs)
        return None if session is None else session.target

    def __call__(self, obs: Observation) -> int:
        candidates = [int(c) for c in np.asarray(obs["candidates"]).ravel()]
        done = _recommended_positions(obs)
        target = self._target(obs)
        if target is None or target not in candidates or candidates.index(target) in done:
            return next((p for p in range(len(candidates)) if p not in done), 0)
        position = candidates.index(target)
        if self.target_prob >= 1.0:  # no draw: the deterministic oracle
            return position
        others = [p for p in range(len(candidates)) if p not in done and p != position]
        if not others or self.rng.random() < self.target_prob:
            return position
        return int(others[int(self.rng.integers(len(others)))])


class OracleUser:
    """A privileged scripted user: clicks the target, and only the target.

    Any other recommendation gets star, skip or dislike from a preference value
    ``v = peer_weight * q_t + (1 - peer_weight) * sim`` in [-1, 1], where ``q_t`` is the
    observation's peer score and ``sim`` the cosine similarity of the item to the visible
    history (``item_features``): star if ``v > threshold``, dislike if ``v < -threshold``,
    skip otherwise. The score is ``0.5 + 0.5 * v`` clamped into the action's interval
    (click: 1.0). A recommender format failure (position -1) is skipped. Deterministic.

    The target comes from ``target_lookup(obs)`` when given (e.g. a closure over the env's
    current session), else from ``DialogData`` through ``SessionIndex``. It never enters
    the observation: this agent is privileged by construction, for tests and baselines.
    """

    def __init__(
        self,
        data: DialogData,
        target_lookup: Callable[[Observation], int] | None = None,
        *,
        peer_weight: float = 0.5,
        threshold: float = 0.2,
    ) -> None:
        self.index = SessionIndex(data)
        self.similarity = HistorySimilarity(data)
        self.target_lookup = target_lookup
        self.peer_weight = peer_weight
        self.threshold = threshold

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (``seed`` reseeds a random agent; others ignore it)."""
        pass

    def target(self, obs: Observation) -> int:
        """The session's target item, read from the observation's session id."""
        if self.target_lookup is not None:
            return int(self.target_lookup(obs))
        session = self.index.lookup(obs)
        if session is None:
            raise KeyError(
                "OracleUser: no session of its DialogData has these candidates; "
                "pass target_lookup= to give it the target another way"
            )
        return session.target

    def __call__(self, obs: Observation) -> dict[str, Any]:
        turn = int(np.asarray(obs["turn"]).item())
        position = int(np.asarray(obs["recommended"]).ravel()[turn - 1])
        if position < 0:
            return {"action": SKIP, "score": 0.5}
        item = int(np.asarray(obs["candidates"]).ravel()[position])
        if item == self.target(obs):
            return {"action": CLICK, "score": 1.0}
        q = float(np.asarray(obs["peer"]).ravel()[0])
        sim = float(self.similarity(_visible_history(obs), np.array([item]))[0])
        v = self.peer_weight * q + (1.0 - self.peer_weight) * sim
        if v > self.threshold:
            action = STAR
        elif v < -self.threshold:
            action = DISLIKE
        else:
            action = SKIP
        score, _ = clamp_score(action, 0.5 + 0.5 * v)
        return {"action": action, "score": float(score)}


SCRIPTED_RECOMMENDERS = ("random", "popularity", "genre", "sasrec", "oracle", "balanced")
"""Built-in scripted recommenders by name (:func:`make_scripted`)."""
SCRIPTED_USERS = ("oracle",)
"""Built-in scripted users by name (:func:`make_scripted`)."""


def make_scripted(
    name: str, role: str, data: DialogData, seed: int = 0
) -> Callable[[Observation], Any]:
    """The built-in scripted agent ``name`` for ``role``: recommenders ``random``,
    ``popularity``, ``genre``, ``sasrec``, ``oracle`` (:class:`TargetRecommender`) and
    ``balanced`` (the target with probability 1/2); user ``oracle`` (:class:`OracleUser`).
    ``seed`` seeds the random ones."""
    if role == RECOMMENDER:
        makers: dict[str, Callable[[], Callable[[Observation], Any]]] = {
            "random": lambda: RandomRecommender(seed),
            "popularity": lambda: PopularityRecommender(data),
            "genre": lambda: GenreRecommender(data),
            "sasrec": lambda: SASRecRecommender(data),
            "oracle": lambda: TargetRecommender(data),
            "balanced": lambda: TargetRecommender(data, target_prob=0.5, seed=seed),
        }
    elif role == USER:
        makers = {"oracle": lambda: OracleUser(data)}
    else:
        raise ValueError(f"role must be {RECOMMENDER!r} or {USER!r}, got {role!r}")
    if name not in makers:
        raise ValueError(
            f"unknown scripted {role} {name!r}; built-ins: {', '.join(makers)} "
            "(or pass an LLMAgent / a callable)"
        )
    return makers[name]()


def play_episode(
    env: Any,
    recommender: Callable[[Observation], Any],
    user: Callable[[Observation], Any],
    *,
    seed: int | None = None,
    options: dict | None = None,
) -> list[dict[str, Any]]:
    """Play one episode of a ``RecDialogEnv`` (or a wrapper of one) with two policies.

    Each policy is called with its own observation when it acts (the user is not asked
    after a recommender format failure: nothing to judge). Returns the episode's turn
    records, as the env put them in the infos.
    """
    obs, _ = env.reset(seed=seed, options=options)
    records: list[dict[str, Any]] = []
    while env.agents:
        acting = env.acting_agent
        if acting == RECOMMENDER:
            actions = {acting: recommender(obs[acting])}
        elif acting == USER:
            actions = {acting: user(obs[acting])}
        else:
            actions = {}
        obs, _, _, _, infos = env.step(actions)
        record = infos[USER].get(TURN_RECORD_KEY)
        if record is not None:
            records.append(record)
    return records
