"""Tiny hand-built ``DialogData`` for environment tests (no data pipeline needed).

Ten items whose titles have accents, punctuation, moved articles, a title that starts with
a number and one in Japanese; five sessions with six candidates each; peers and opinions
chosen so that q_t values are easy to compute by hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from coars_env.data.common import OPINION_DISLIKED, OPINION_LIKED, DialogData, Session

TITLES = [
    "Amélie (2001)",  # 0
    "Matrix, The (1999)",  # 1
    "Toy Story (1995)",  # 2
    "Toy Story 2 (1999)",  # 3
    "12 Angry Men (1957)",  # 4
    "Café Society",  # 5
    "Björk: Live! — “Vespertine”",  # 6
    "Heat (1995)",  # 7
    "Crouching Tiger, Hidden Dragon (Wo hu cang long) (2000)",  # 8
    "東京物語 (Tokyo Story)",  # 9
]
YEARS = [2001, 1999, 1995, 1999, 1957, None, 2001, 1995, 2000, 1953]
GENRES = [
    "Comedy|Romance",
    "Action|Sci-Fi",
    "Animation|Children's|Comedy",
    "Animation|Children's|Comedy",
    "Drama",
    "",
    "Music",
    "Action|Crime|Thriller",
    "Action|Drama",
    "Drama",
]
SUMMARIES = [
    "A shy waitress in Montmartre decides to change the lives of those around her.",
    "A hacker learns that reality is a simulation.",
    "Toys come to life when nobody watches.",
    "",
    "A jury deliberates over a murder case.",
    "",
    "Live recording; ünïcödé summary with\nnewline and\ttab.",
    "",
    "",
    "老夫婦が東京の子供たちを訪ねる。",
]

# Session i: (user, history, target, candidates in list order, sasrec_top1, peers)
SESSIONS = [
    (0, (2, 4), 3, (7, 3, 1, 5, 0, 9), 1, ((10, 1.0), (11, 0.5), (12, 0.5))),
    (1, (0, 1, 6, 8), 2, (2, 4, 5, 7, 9, 3), 4, ((10, 0.8), (12, 0.2))),
    (2, (9,), 1, (0, 1, 2, 3, 4, 5), 0, ()),
    (3, (3, 7, 2), 8, (8, 6, 0, 1, 9, 5), 6, ((11, 1.0),)),
    (4, (5, 6, 7, 8), 0, (4, 2, 9, 0, 3, 1), 9, ((10, 0.9), (11, 0.9), (12, 0.9))),
]

# (peer user, item) -> opinion. Peers 10, 11, 12 are not session users. In session 0,
# q = 0.5 for item 3 (the target, position 1) and item 0 (position 4), -1 for item 7
# (position 0), 0 for item 1 (position 2: no opinions).
OPINIONS = {
    (10, 3): OPINION_LIKED,
    (11, 3): OPINION_DISLIKED,
    (12, 3): OPINION_LIKED,
    (10, 7): OPINION_DISLIKED,
    (10, 2): OPINION_LIKED,
    (12, 2): OPINION_LIKED,
    (11, 8): OPINION_LIKED,
    (10, 0): OPINION_LIKED,
    (11, 0): OPINION_DISLIKED,
    (12, 0): OPINION_LIKED,
}


def tiny_dialog_data(sessions=SESSIONS, name: str = "tiny-ml", split: str = "test") -> DialogData:
    """A 10-item, 5-session DialogData (6 candidates per session)."""
    items = pd.DataFrame(
        {
            "raw_id": [100 + i for i in range(len(TITLES))],
            "title": TITLES,
            "year": pd.array(YEARS, dtype="Int64"),
            "genres": GENRES,
            "summary": SUMMARIES,
        }
    )
    built = [
        Session(
            session_id=i,
            user=user,
            history=tuple(history),
            target=target,
            candidates=tuple(cands),
            seed=1000 + i,
            sasrec_top1=top1,
            peers=tuple(peers),
        )
        for i, (user, history, target, cands, top1, peers) in enumerate(sessions)
    ]
    return DialogData(
        name=name,
        split=split,
        sessions=built,
        items=items,
        opinions=dict(OPINIONS),
        item_features=np.zeros((len(TITLES), 4), np.float32),
        popularity=np.arange(len(TITLES), dtype=np.int64),
        has_ratings=True,
    )


def play(env, replies, session_id: int = 0, seed: int | None = None):
    """Reset to ``session_id`` and play ``replies`` (alternating recommender / user replies)
    until the episode ends or they run out. Returns (rewards per step, turn records)."""
    env.reset(seed=seed, options={"session_id": session_id})
    rewards = []
    for reply in replies:
        if not env.agents:
            break
        agent = "recommender" if env.phase == 0 else "user"
        _, rew, _, _, _ = env.step({agent: reply})
        rewards.append(rew)
    return rewards, list(env.turn_records)
