"""A tiny hand-built DialogData (24 items, 5 sessions, 2 alignment cases) for fast tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from coars_env.data.common import AlignmentCase, DialogData, Session

N_ITEMS = 24
N_CANDIDATES = 20
GENRES = ("Drama", "Comedy", "Action", "Horror")


def tiny_items() -> pd.DataFrame:
    """Items 0..23: titles "Movie 0".."Movie 23", a genre each, a one-line summary."""
    rows = [
        {
            "raw_id": 100 + i,
            "title": f"Movie {i}",
            "year": 1990 + i,
            "genres": GENRES[i % len(GENRES)],
            "summary": f"A {GENRES[i % len(GENRES)].lower()} film, number {i}.",
        }
        for i in range(N_ITEMS)
    ]
    items = pd.DataFrame(rows)
    items["year"] = items["year"].astype("Int64")
    return items


def tiny_dialog_data(seed: int = 0) -> DialogData:
    """5 sessions (users 0..4) with 20 shuffled candidates each, peers, opinions, features.

    Session s: history = 4 items, target = item 4*s + 4 (never in the history), SASRec top-1
    = a non-target candidate for even s and the target for odd s (so both cases occur).
    """
    rng = np.random.default_rng(seed)
    sessions = []
    for s in range(5):
        history = tuple(int(i) for i in (np.arange(4) + 3 * s) % N_ITEMS)
        target = (4 * s + 4 + 12) % N_ITEMS
        while target in history:
            target = (target + 1) % N_ITEMS
        others = [i for i in range(N_ITEMS) if i != target and i not in history]
        negatives = rng.choice(others, size=N_CANDIDATES - 1, replace=False)
        candidates = [target, *map(int, negatives)]
        rng.shuffle(candidates)
        top1 = target if s % 2 else int(negatives[0])
        peers = tuple((p, round(1.0 - 0.2 * abs(p - s), 2)) for p in range(5) if p != s)
        sessions.append(
            Session(
                session_id=s,
                user=s,
                history=history,
                target=target,
                candidates=tuple(candidates),
                seed=1000 + s,
                sasrec_top1=top1,
                peers=peers,
            )
        )
    # Every user liked its history items; peers disagree on a few items.
    opinions: dict[tuple[int, int], int] = {}
    for session in sessions:
        for item in session.history:
            opinions[(session.user, item)] = 1
        opinions[(session.user, (session.target + 1) % N_ITEMS)] = -1
    item_features = rng.normal(size=(N_ITEMS, 8)).astype(np.float32)
    popularity = np.array([(7 * i) % 11 + 1 for i in range(N_ITEMS)], dtype=np.int64)
    alignment = []
    for user in (0, 1):
        history = sessions[user].history[:2]
        positives = [i for i in range(N_ITEMS) if i not in sessions[user].history][:10]
        seen = set(positives) | set(sessions[user].history)
        negatives = [i for i in range(N_ITEMS) if i not in seen][:10]
        items = positives + negatives
        labels = [1] * 10 + [0] * 10
        order = rng.permutation(len(items))
        alignment.append(
            AlignmentCase(
                user=user,
                history=tuple(history),
                items=tuple(int(items[k]) for k in order),
                labels=tuple(int(labels[k]) for k in order),
                peers=sessions[user].peers,
            )
        )
    return DialogData(
        name="tiny",
        split="test",
        sessions=sessions,
        items=tiny_items(),
        opinions=opinions,
        item_features=item_features,
        popularity=popularity,
        has_ratings=True,
        alignment=alignment,
        summary="tiny hand-built data for tests",
    )


def turn_record(episode_id: int, turn: int, **fields) -> dict:
    """A hand-built turn record (docs/CONTRACTS.md schema) with neutral defaults.

    Defaults: a miss that the user skipped with score 0.4, no failures, rewards computed
    elsewhere (0.0), not the last turn. Override any field by keyword.
    """
    record = {
        "episode_id": episode_id,
        "session_id": episode_id % 5,
        "user": episode_id % 5,
        "turn": turn,
        "rec_text": f"Item: {turn}\nReason: because",
        "rec_position": turn - 1,
        "rec_item": 100 + turn,
        "rec_format_failure": False,
        "repeat": False,
        "user_text": "Action: skip\nScore: 0.4\nReason: meh",
        "action": 2,
        "score": 0.4,
        "user_format_failure": False,
        "score_clamped": False,
        "hit": False,
        "q": 0.0,
        "n_peers_liked": 0,
        "n_peers_disliked": 0,
        "reward_rec": 0.0,
        "reward_user": 0.0,
        "mask_rec": 1,
        "mask_user": 1,
        "terminated": False,
        "truncated": False,
    }
    unknown = set(fields) - set(record) - {"target"}
    if unknown:
        raise KeyError(f"unknown turn-record fields {sorted(unknown)}")
    record.update(fields)
    return record


def hand_built_episodes() -> list[list[dict]]:
    """Four episodes with known outcomes (see tests/test_metrics.py for the numbers).

    A: turn-1 hit, clicked.                       hit, hit_turn 1, 1 turn
    B: three misses, the third wrongly clicked.   wrong click, 3 turns
    C: target recommended at turn 2 but skipped, then misses up to the turn limit (5):
       final recommendation misses, hit_turn 2, truncated.
    D: recommender format failure at turn 1, then a clicked hit at turn 2.
    """
    a = [
        turn_record(
            0, 1, hit=True, action=0, score=0.9, reward_rec=0.95, reward_user=0.8, terminated=True
        )
    ]
    b = [
        turn_record(1, 1, reward_rec=-0.7, reward_user=0.2),
        turn_record(1, 2, action=1, score=0.6, reward_rec=-0.8, reward_user=-0.2, mask_user=0),
        turn_record(
            1,
            3,
            action=0,
            score=0.8,
            reward_rec=-0.9,
            reward_user=-0.6,
            mask_user=0,
            terminated=True,
        ),
    ]
    c = [
        turn_record(2, 1, reward_rec=-0.7, reward_user=0.2),
        turn_record(2, 2, hit=True, reward_rec=0.63, reward_user=-0.2),
        turn_record(2, 3, reward_rec=-0.7, reward_user=0.2),
        turn_record(2, 4, action=3, score=0.1, reward_rec=-0.55, reward_user=0.8),
        turn_record(2, 5, reward_rec=-0.7, reward_user=0.2, truncated=True),
    ]
    # As the env writes it: no recommendation, so the user's action is -1 (not judged).
    d = [
        turn_record(
            3,
            1,
            rec_format_failure=True,
            rec_position=-1,
            rec_item=-1,
            action=-1,
            score=0.0,
            user_text="",
            reward_rec=-1.0,
            reward_user=0.0,
            mask_user=0,
        ),
        turn_record(
            3, 2, hit=True, action=0, score=1.0, reward_rec=0.9, reward_user=1.0, terminated=True
        ),
    ]
    return [a, b, c, d]
