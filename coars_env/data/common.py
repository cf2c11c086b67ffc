"""The common in-memory forms every layer of CoARS agrees on.

Data flows one way::

    loader (movielens / recbole / lastfm / synthetic)  -> InteractionData
    sessions.py (k-core, chronological leave-one-out)   -> SplitData
    prepare.py (SASRec candidates, peers, alignment)    -> DialogData (one split)
    coars_env.dialog.env.RecDialogEnv                   <- DialogData

Loaders keep the dataset's own ids (``raw_id``: int or str). From ``SplitData`` on,
users and items are *dense indices* (0..n-1) so that they fit gymnasium spaces and
embedding tables; ``items.raw_id`` maps back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

OPINION_LIKED = 1
OPINION_DISLIKED = -1

ITEM_COLUMNS = ("title", "year", "genres", "summary")


@dataclass
class InteractionData:
    """A dataset as its loader found it, in one common form.

    ``interactions`` columns: ``user_id``, ``item_id`` (the dataset's own ids),
    ``rating`` (float64, NaN when the dataset has none), ``timestamp`` (Int64, <NA> when
    the dataset has none). Row order is file order (it breaks timestamp ties).

    ``items``: indexed by ``item_id``; columns ``title`` (str), ``year`` (Int64, <NA>
    when unknown), ``genres`` (str, ``|``-joined, "" when unknown), ``summary`` (str, ""
    when absent). Titles are not unique; items are identified by id everywhere.

    ``users``: indexed by ``user_id``; whatever attribute columns the dataset has.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    has_ratings: bool
    has_timestamps: bool
    notes: list[str] = field(default_factory=list)
    # Datasets that ship their own split (Last.fm): user_id -> (valid_target, test_target),
    # either may be None. None for datasets split by chronological leave-one-out.
    fixed_targets: dict | None = None


@dataclass(frozen=True)
class Session:
    """One dialogue episode's data: a user, what the agents may see, and the target.

    All item references are dense item indices. ``target`` is the held-out next item;
    it must never reach an agent's observation.
    """

    session_id: int  # position within its split
    user: int  # dense user index
    history: tuple[int, ...]  # visible history, oldest first, at most the window size
    target: int
    candidates: tuple[int, ...]  # 20 distinct items incl. target once, shuffled with `seed`
    seed: int  # per-session seed: every rollout of this session sees the same prompt
    sasrec_top1: int  # SASRec's highest-scored candidate (baseline and optional hint)
    peers: tuple[tuple[int, float], ...]  # (peer user, weight in [0, 1]), most similar first


@dataclass(frozen=True)
class AlignmentCase:
    """User-alignment evaluation set for one user (METHOD.md, "User alignment")."""

    user: int
    history: tuple[int, ...]  # visible history with the held-out positives removed
    items: tuple[int, ...]  # 20 items, shuffled, seeded
    labels: tuple[int, ...]  # 1 = held-out positive, 0 = never-seen negative
    peers: tuple[tuple[int, float], ...] = ()


@dataclass
class SplitData:
    """A dataset after k-core filtering and the leave-one-out split, in dense indices.

    ``items``: index 0..n_items-1; columns ``raw_id`` plus ``ITEM_COLUMNS``.
    ``users``: index 0..n_users-1; column ``raw_id`` plus the loader's attributes.
    ``train[u]``: user u's training items, oldest first (int64); ``train_ratings[u]``
    aligned (float64, NaN when the dataset has no ratings). Only these train SASRec,
    build user representations and give peers their opinions.
    ``targets[split]`` for split in {"valid", "test"}: a DataFrame with columns ``user``,
    ``target`` (dense item) and ``prefix`` (tuple of dense items before the target,
    oldest first: the train sequence, plus the valid target for the test split).
    """

    name: str
    items: pd.DataFrame
    users: pd.DataFrame
    train: list[np.ndarray]
    train_ratings: list[np.ndarray]
    targets: dict[str, pd.DataFrame]
    has_ratings: bool
    has_timestamps: bool
    notes: list[str] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)


@dataclass
class DialogData:
    """Everything an environment needs for one split: sessions, item texts, peers.

    Built by ``coars_env.data.prepare.build_dialog_data``; small ones can be built by
    hand in tests. ``opinions[(user, item)]`` is +1 (liked: rating >= 4, or any
    interaction without ratings) or -1 (disliked: rating <= 2), from training data only.
    ``item_features``: float32 ``[n_items, F]`` for numeric (non-LLM) views, e.g. SASRec
    item embeddings. ``popularity``: training interaction counts per item.
    """

    name: str
    split: str
    sessions: list[Session]
    items: pd.DataFrame  # dense index; raw_id + ITEM_COLUMNS
    opinions: dict[tuple[int, int], int]
    item_features: np.ndarray
    popularity: np.ndarray
    has_ratings: bool
    alignment: list[AlignmentCase] = field(default_factory=list)
    summary: str = ""
    peer_k: int = 20  # at most this many peers with an opinion count towards q_t
    # Numbers behind ``summary`` (e.g. "sasrec_top20_coverage", "alignment_skipped"); see prepare.py.
    stats: dict[str, float] = field(default_factory=dict)

    def title(self, item: int) -> str:
        return str(self.items.at[item, "title"])

    def peer_opinions(self, peers: tuple[tuple[int, float], ...], item: int) -> list[tuple[int, float, int]]:
        """(peer, weight, opinion) for the most similar peers that have an opinion on ``item``."""
        found = []
        for peer, weight in peers:
            opinion = self.opinions.get((peer, item))
            if opinion is not None:
                found.append((peer, weight, opinion))
                if len(found) == self.peer_k:
                    break
        return found

    def peer_score(self, peers: tuple[tuple[int, float], ...], item: int) -> float:
        """q_t of METHOD.md: weight-averaged peer opinion on ``item`` in [-1, 1]; 0 if none."""
        return peer_score(self.peer_opinions(peers, item))


def peer_score(opinions: list[tuple[int, float, int]]) -> float:
    """q = sum w_p o_p / sum w_p with w_p clipped to [0, 1]; 0 when no weight."""
    total = sum(min(max(w, 0.0), 1.0) for _, w, _ in opinions)
    if total <= 0.0:
        return 0.0
    return sum(min(max(w, 0.0), 1.0) * o for _, w, o in opinions) / total
