"""A small synthetic movie dataset, generated from a seed, with a learnable taste signal.

It is the embedded default (no download) and the fast test dataset: with the defaults
(600 users, 240 items, 20-40 interactions per user) it is built in well under a second,
and the same seed always gives the same data.

Generative process (``seed`` drives one ``numpy.random.default_rng``):

1. **Items.** 8 genres (Action, Comedy, Horror, Romance, Sci-Fi, Western, Fantasy,
   Mystery) x 3 eras (classic 1950-1979, modern 1980-1999, recent 2000-2023), equally
   many items each; item ids are shuffled so they reveal nothing. Each item gets a
   readable, genre-flavoured title ("The Haunted Crypt", "The Quantum Nebula"), a year in
   its era, its genre (30% also get a second genre, listed after the first), a mild
   popularity factor (log-normal, sigma 0.5) and a one-line summary built from genre
   templates ("A tense western in which a lone ranger ...").
2. **Users.** Each user has a *primary* genre (uniform), with probability 0.6 a
   *secondary* favourite genre, and a favourite era (uniform). Users carry no attribute
   columns: the tastes are latent (:func:`generate_synthetic` returns them separately, for
   tests and analysis) and must be inferred from the history.
3. **History.** ``L ~ U[min_len, max_len]`` interactions per user; the first ``L - 3``
   items are drawn without replacement with weight ``popularity x genre x era``, genre
   weight 8 for the primary genre, 4 for the secondary favourite, 1 otherwise, era weight
   2.5 for the favourite era. About half of a history is the primary genre, the rest
   spread thinly (single other genres ~5-7% each).
4. **Targets.** The last three items (under chronological leave-one-out: the training
   sessions' target, then validation, then test) are always unseen items of the user's
   *primary* genre, drawn with era weight 4 (so ~2/3 from the favourite era). This is the
   learnable signal: the user's dominant genre (and era) in the history titles/genres
   predicts the target, while a random negative shares the primary genre only 1 time in 8.
   The training target follows the rule too, so that training sessions teach what held-out
   sessions test (until session 7 only the last two did: a training target then shared the
   history's dominant genre in 31% of sessions, against 72% for validation;
   ``taste_targets=2`` rebuilds that version).
5. **Ratings** (1-5) follow the same taste: mean 4.5 for the primary genre, 3.8 for the
   secondary, 2.4 otherwise, +0.4 in the favourite era, Gaussian noise (sd 0.7), rounded
   and clipped; so "liked" (>= 4) opinions agree with the taste.
6. **Timestamps** are strictly increasing per user (gaps of 1 minute to days), from 2021.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from coars_env.data.common import InteractionData

GENRES = ("Action", "Comedy", "Horror", "Romance", "Sci-Fi", "Western", "Fantasy", "Mystery")
ERAS = ((1950, 1979), (1980, 1999), (2000, 2023))
ERA_NAMES = ("classic", "modern", "recent")

# Per genre ("|"-separated lists): title adjectives and nouns (no word shared across
# genres), and the parts of the one-line summary.
_VOCAB_TEXT: dict[str, dict[str, str]] = {
    "Action": {
        "adj": "Iron|Burning|Rogue|Final|Steel|Savage|Relentless|Crimson|Bulletproof|Last",
        "noun": "Strike|Protocol|Fury|Vendetta|Siege|Showdown|Extraction|Payback|Convoy|Target",
        "who": (
            "a disgraced soldier|an ex-special-forces driver|a rookie bodyguard|a retired hitman"
        ),
        "what": (
            "fights through a city under siege|races to stop a hijacked convoy"
            "|takes revenge on a ruthless cartel|must rescue hostages from a skyscraper"
        ),
        "tone": "explosive|high-octane|relentless",
    },
    "Comedy": {
        "adj": "Crazy|Awkward|Lucky|Clumsy|Wacky|Accidental|Big|Goofy|Unlikely|Totally Normal",
        "noun": (
            "Wedding|Roommates|Vacation|Neighbours|Road Trip|Reunion|Bachelor Party|Mix-Up"
            "|Weekend|Talent Show"
        ),
        "who": (
            "a pair of mismatched best friends|a hapless substitute teacher"
            "|an overconfident wedding planner|a family of lovable misfits"
        ),
        "what": (
            "turns a simple errand into total chaos"
            "|accidentally swaps lives with a stranger for a week"
            "|tries to win a small-town talent show|survives the most awkward holiday ever"
        ),
        "tone": "hilarious|light-hearted|zany",
    },
    "Horror": {
        "adj": "Haunted|Cursed|Bleeding|Hollow|Screaming|Rotten|Midnight|Forsaken|Sinister|Undying",
        "noun": "Crypt|Asylum|Shadows|Graveyard|Possession|Ritual|Cellar|Curse|Nightmare|Bones",
        "who": (
            "a group of students|a grieving widow|a paranormal investigator"
            "|a family in a remote farmhouse"
        ),
        "what": (
            "awakens something evil beneath the house|is hunted by a demon after dark"
            "|uncovers a cult's blood ritual|cannot escape a cursed asylum"
        ),
        "tone": "terrifying|gruesome|chilling",
    },
    "Romance": {
        "adj": "Sweet|Endless|Secret|Tender|Summer|Eternal|Stolen|Parisian|Moonlit|Forgotten",
        "noun": (
            "Kiss|Promise|Love Letter|Heart|Embrace|Serenade|Engagement|Valentine|Honeymoon"
            "|Sweetheart"
        ),
        "who": (
            "a shy bookseller|a former high-school sweetheart|a busy surgeon|a travelling violinist"
        ),
        "what": (
            "falls in love over one unforgettable summer"
            "|rediscovers an old love after years apart|finds romance in the streets of Paris"
            "|writes love letters to a stranger"
        ),
        "tone": "heartwarming|tender|bittersweet",
    },
    "Sci-Fi": {
        "adj": "Quantum|Stellar|Cyber|Orbital|Galactic|Android|Neon|Binary|Interstellar|Atomic",
        "noun": (
            "Nebula|Starship|Colony|Singularity|Paradox|Mainframe|Station|Wormhole|Signal|Clone"
        ),
        "who": (
            "a starship engineer|a rogue android|the lone survivor of a deep-space colony"
            "|a time-travelling physicist"
        ),
        "what": (
            "decodes an alien signal from beyond the galaxy"
            "|must stop a rogue AI from taking over"
            "|travels through a wormhole to save humanity"
            "|discovers the colony is a simulation"
        ),
        "tone": "mind-bending|futuristic|cerebral",
    },
    "Western": {
        "adj": "Dusty|Lone|Outlaw|Rattlesnake|Six-Gun|Desert|Wild|High Noon|Copper|Drifting",
        "noun": "Canyon|Sheriff|Ranch|Stagecoach|Saloon|Trail|Gunslinger|Mesa|Posse|Bounty",
        "who": "a lone ranger|a retired gunslinger|a frontier sheriff|a young cattle rancher",
        "what": (
            "must defend a frontier town from outlaws"
            "|rides across the desert to collect a bounty|faces a ruthless gang at high noon"
            "|protects a stagecoach through hostile canyons"
        ),
        "tone": "gritty|sun-baked|rugged",
    },
    "Fantasy": {
        "adj": "Enchanted|Dragon|Elven|Crystal|Shadowed|Mystic|Runed|Golden|Fae|Ancient",
        "noun": "Kingdom|Sorcerer|Quest|Throne|Amulet|Prophecy|Citadel|Grimoire|Realm|Wand",
        "who": (
            "a young sorcerer's apprentice|an exiled elven princess"
            "|a farm boy chosen by prophecy|a band of dwarves and wizards"
        ),
        "what": (
            "sets out to destroy a cursed amulet|battles a dragon to reclaim the throne"
            "|journeys across an enchanted realm|must fulfil an ancient prophecy"
        ),
        "tone": "magical|epic|enchanting",
    },
    "Mystery": {
        "adj": (
            "Missing|Locked|Hidden|Vanishing|Unsolved|Foggy|Whispering|Crooked|Seventh|Secretive"
        ),
        "noun": "Clue|Alibi|Witness|Manor|Case File|Inspector|Cipher|Testament|Suspect|Detective",
        "who": "a retired detective|an amateur sleuth|a small-town inspector|a journalist",
        "what": (
            "investigates a murder in a locked manor|follows a trail of cryptic clues"
            "|must find who vanished from the night train"
            "|uncovers the secret in a dead man's will"
        ),
        "tone": "twisting|suspenseful|puzzling",
    },
}
_VOCAB = {g: {k: tuple(v.split("|")) for k, v in d.items()} for g, d in _VOCAB_TEXT.items()}

_GENRE_WORD = {
    "Action": "action thriller",
    "Comedy": "comedy",
    "Horror": "horror story",
    "Romance": "romance",
    "Sci-Fi": "science-fiction tale",
    "Western": "western",
    "Fantasy": "fantasy adventure",
    "Mystery": "mystery",
}


def _titles(rng: np.random.Generator, genre: str, n: int) -> list[str]:
    """``n`` distinct "The <Adj> <Noun>" titles of a genre (sequels beyond 100)."""
    vocab = _VOCAB[genre]
    combos = [f"The {a} {b}" for a in vocab["adj"] for b in vocab["noun"]]
    order = rng.permutation(len(combos))
    out = []
    for k in range(n):
        title = combos[order[k % len(combos)]]
        sequel = k // len(combos)
        out.append(title if sequel == 0 else f"{title} {sequel + 1}")
    return out


def _summary(rng: np.random.Generator, genre: str) -> str:
    vocab = _VOCAB[genre]
    tone = vocab["tone"][rng.integers(len(vocab["tone"]))]
    who = vocab["who"][rng.integers(len(vocab["who"]))]
    what = vocab["what"][rng.integers(len(vocab["what"]))]
    article = "An" if tone[0] in "aeiou" else "A"
    return f"{article} {tone} {_GENRE_WORD[genre]} in which {who} {what}."


def generate_synthetic(
    seed: int = 0,
    *,
    n_users: int = 600,
    n_items: int = 240,
    min_len: int = 20,
    max_len: int = 40,
    taste_targets: int = 3,
) -> tuple[InteractionData, pd.DataFrame]:
    """The dataset and its users' latent tastes (``primary``, ``secondary``, ``era``) per user.

    ``taste_targets``: how many of each user's last items are drawn as targets (step 4 of
    the module docstring): 3 covers the training, validation and test targets."""
    n_genres = len(GENRES)
    if n_items < 2 * n_genres * len(ERAS):
        raise ValueError(f"n_items must be at least {2 * n_genres * len(ERAS)}")
    if not 1 <= taste_targets < min_len <= max_len:
        raise ValueError("need 1 <= taste_targets < min_len <= max_len")
    rng = np.random.default_rng(seed)

    # Items: position k -> genre k % 8, era (k // 8) % 3; ids shuffled afterwards.
    genre = np.arange(n_items) % n_genres
    era = (np.arange(n_items) // n_genres) % len(ERAS)
    item_ids = rng.permutation(n_items) + 1
    titles: list[str] = [""] * n_items
    for g, name in enumerate(GENRES):
        positions = np.flatnonzero(genre == g)
        for pos, title in zip(positions, _titles(rng, name, len(positions))):
            titles[pos] = title
    years = np.array([rng.integers(ERAS[e][0], ERAS[e][1] + 1) for e in era])
    second = np.where(
        rng.random(n_items) < 0.3, (genre + rng.integers(1, n_genres, n_items)) % n_genres, -1
    )
    genres = [GENRES[g] + (f"|{GENRES[s]}" if s >= 0 else "") for g, s in zip(genre, second)]
    summaries = [_summary(rng, GENRES[g]) for g in genre]
    popularity = rng.lognormal(0.0, 0.5, n_items)
    items = pd.DataFrame(
        {
            "title": titles,
            "year": pd.array(years, dtype="Int64"),
            "genres": genres,
            "summary": summaries,
        },
        index=pd.Index(item_ids, name="item_id"),
    ).sort_index()

    # Users: latent tastes.
    primary = rng.integers(0, n_genres, n_users)
    has_second = rng.random(n_users) < 0.6
    secondary = np.where(has_second, (primary + rng.integers(1, n_genres, n_users)) % n_genres, -1)
    fav_era = rng.integers(0, len(ERAS), n_users)
    lengths = rng.integers(min_len, max_len + 1, n_users)

    users_col, items_col, ratings, stamps = [], [], [], []
    start = pd.Timestamp("2021-01-01").value // 10**9
    for u in range(n_users):
        genre_w = np.where(genre == primary[u], 8.0, np.where(genre == secondary[u], 4.0, 1.0))
        era_w = np.where(era == fav_era[u], 2.5, 1.0)
        weights = popularity * genre_w * era_w
        history = rng.choice(
            n_items, size=lengths[u] - taste_targets, replace=False, p=weights / weights.sum()
        )
        # Targets: unseen primary-genre items, favourite era weighted x4.
        pool = np.setdiff1d(np.flatnonzero(genre == primary[u]), history)
        if len(pool) < taste_targets:
            raise ValueError(
                f"user {u + 1}: {len(pool)} unseen items of their genre left for "
                f"{taste_targets} targets; use more items or shorter histories"
            )
        tw = popularity[pool] * np.where(era[pool] == fav_era[u], 4.0, 1.0)
        targets = rng.choice(pool, size=taste_targets, replace=False, p=tw / tw.sum())
        seq = np.concatenate([history, targets])
        mean = np.where(
            genre[seq] == primary[u], 4.5, np.where(genre[seq] == secondary[u], 3.8, 2.4)
        )
        mean = mean + 0.4 * (era[seq] == fav_era[u])
        rating = np.clip(np.rint(mean + rng.normal(0.0, 0.7, len(seq))), 1, 5)
        gaps = rng.exponential(2 * 86400.0, len(seq)).astype(np.int64) + 60
        t0 = start + int(rng.integers(0, 365 * 86400))
        users_col.append(np.full(len(seq), u + 1))
        items_col.append(item_ids[seq])
        ratings.append(rating)
        stamps.append(t0 + np.cumsum(gaps))

    inter = pd.DataFrame(
        {
            "user_id": np.concatenate(users_col).astype(np.int64),
            "item_id": np.concatenate(items_col).astype(np.int64),
            "rating": np.concatenate(ratings).astype(np.float64),
            "timestamp": pd.array(np.concatenate(stamps), dtype="Int64"),
        }
    )
    user_index = pd.Index(np.arange(1, n_users + 1), name="user_id")
    tastes = pd.DataFrame(
        {
            "primary": [GENRES[g] for g in primary],
            "secondary": [GENRES[g] if g >= 0 else "" for g in secondary],
            "era": [ERA_NAMES[e] for e in fav_era],
        },
        index=user_index,
    )
    data = InteractionData(
        name="synthetic",
        interactions=inter,
        items=items,
        users=pd.DataFrame(index=user_index),
        has_ratings=True,
        has_timestamps=True,
        notes=[
            f"synthetic: generated with seed {seed} ({n_users} users, {n_items} items); each "
            f"user's last {taste_targets} items are unseen items of their primary genre (see "
            "coars_env/data/synthetic.py)"
        ],
    )
    return data, tastes


def load_synthetic(seed: int = 0, **kwargs: int) -> InteractionData:
    """The synthetic dataset (module docstring); ``kwargs`` as in :func:`generate_synthetic`."""
    return generate_synthetic(seed, **kwargs)[0]
