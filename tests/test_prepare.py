"""prepare.py: candidates, peers, opinions, q_t, alignment sets and the cache."""

from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from coars_env.data.common import OPINION_DISLIKED, OPINION_LIKED, DialogData, SplitData
from coars_env.data.prepare import (
    SPLITS,
    DataConfig,
    PreparedData,
    build_splits,
    opinions_from_training,
    prepare,
    session_seed,
    train_sasrec,
)
from coars_env.data.sasrec import SASRec, SASRecConfig

N_USERS, N_ITEMS = 36, 80
FEW_LIKED_USERS = (0, 1)  # rated everything 3: no liked item, so no alignment case
TINY_SASREC = SASRecConfig(
    hidden=16, blocks=1, heads=1, max_len=16, epochs=2, batch_size=16, seed=1, num_threads=1
)


def small_split(seed: int = 0) -> SplitData:
    """36 users, 80 items, 14-24 training items each, distinct per user, ratings 1-5.

    Validation and test targets are items the user has not had in training, so a session's
    target can never be an opinion of its own user.
    """
    rng = np.random.default_rng(seed)
    train, ratings, rows = [], [], {"valid": [], "test": []}
    for user in range(N_USERS):
        n = int(rng.integers(14, 25))
        items = rng.choice(N_ITEMS, size=n + 2, replace=False).astype(np.int64)
        train.append(items[:n])
        r = rng.integers(1, 6, size=n).astype(np.float64)
        if user in FEW_LIKED_USERS:
            r[:] = 3.0
        else:
            r[-12:] = np.where(rng.random(12) < 0.9, 5.0, r[-12:])  # enough liked items
        ratings.append(r)
        prefix = tuple(int(i) for i in items[:n])
        rows["valid"].append((user, int(items[n]), prefix))
        rows["test"].append((user, int(items[n + 1]), prefix + (int(items[n]),)))
    item_frame = pd.DataFrame(
        {
            "raw_id": np.arange(N_ITEMS),
            "title": [f"Movie {i}" for i in range(N_ITEMS)],
            "year": pd.array([2000] * N_ITEMS, dtype="Int64"),
            "genres": "Drama",
            "summary": "",
        }
    )
    targets = {k: pd.DataFrame(v, columns=["user", "target", "prefix"]) for k, v in rows.items()}
    return SplitData(
        name="small", items=item_frame, users=pd.DataFrame({"raw_id": np.arange(N_USERS)}),
        train=train, train_ratings=ratings, targets=targets, has_ratings=True, has_timestamps=True,
    )


def config(**changes) -> DataConfig:
    base = DataConfig(
        dataset="small", n_peers=10, peer_k=5, alignment_users=20, sasrec=TINY_SASREC,
        progress=False, use_cache=False,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def split() -> SplitData:
    return small_split()


@pytest.fixture(scope="module")
def model(split) -> SASRec:
    return SASRec(split.n_items, TINY_SASREC).fit(split, progress=False)


@pytest.fixture(scope="module")
def prepared(split, model) -> PreparedData:
    return build_splits(config(), split, model)


@pytest.fixture(scope="module")
def prepared_random(split, model) -> PreparedData:
    return build_splits(config(candidate_mode="random"), split, model)


def known_items(split: SplitData, user: int) -> set[int]:
    known = {int(i) for i in split.train[user]}
    for frame in split.targets.values():
        known.update(int(t) for t in frame.loc[frame["user"] == user, "target"])
    return known


def prefix_of(split: SplitData, name: str, user: int) -> tuple[int, ...]:
    if name == "train":
        return tuple(int(i) for i in split.train[user][:-1])
    frame = split.targets[name]
    return tuple(frame.loc[frame["user"] == user, "prefix"].iloc[0])


# ------------------------------------------------------------------------ sessions


@pytest.mark.parametrize("mode", ["sasrec", "random"])
def test_candidate_sets(split, prepared, prepared_random, mode) -> None:
    data = prepared if mode == "sasrec" else prepared_random
    for name in SPLITS:
        dialog = data.split(name)
        assert dialog.split == name and len(dialog.sessions) == N_USERS
        for j, s in enumerate(dialog.sessions):
            assert s.session_id == j
            assert len(s.candidates) == 20 and len(set(s.candidates)) == 20
            assert s.candidates.count(s.target) == 1
            assert s.sasrec_top1 in s.candidates
            negatives = set(s.candidates) - {s.target}
            prefix = prefix_of(split, name, s.user)
            assert s.history == prefix[-10:]
            if mode == "sasrec":
                assert not negatives & set(prefix)  # no history (or earlier) item as a negative
            else:
                assert not negatives & known_items(split, s.user)  # never interacted


def test_sasrec_negatives_are_the_top_ranked_unseen_items(split, model, prepared) -> None:
    for s in prepared.test.sessions[:10]:
        prefix = prefix_of(split, "test", s.user)
        scores = model.score([prefix])[0]
        scores[list(prefix)] = -torch.inf
        scores[s.target] = -torch.inf
        expected = set(scores.topk(19).indices.tolist())
        assert set(s.candidates) - {s.target} == expected
        cand_scores = model.score([prefix])[0][list(s.candidates)]
        assert s.sasrec_top1 == s.candidates[int(cand_scores.argmax())]


def test_sasrec_coverage_is_reported(split, model, prepared) -> None:
    covered = []
    for s in prepared.test.sessions:
        prefix = prefix_of(split, "test", s.user)
        scores = model.score([prefix])[0]
        scores[list(prefix)] = -torch.inf
        covered.append(s.target in scores.topk(20).indices.tolist())
    stats = prepared.test.stats
    assert stats["sasrec_top20_coverage"] == pytest.approx(np.mean(covered))
    assert f"{stats['sasrec_top20_coverage']:.3f}" in prepared.test.summary
    assert "dataset small" in prepared.summary or "small" in prepared.summary


def test_sessions_deterministic_and_seeded(split, model, prepared) -> None:
    again = build_splits(config(), split, model)
    for name in SPLITS:
        assert again.split(name).sessions == prepared.split(name).sessions
        assert again.split(name).alignment == prepared.split(name).alignment
    s = prepared.valid.sessions[3]
    assert s.seed == session_seed(0, "valid", s.user)
    # The shuffle is the session seed's permutation of (negatives in rank order, target).
    prefix = prefix_of(split, "valid", s.user)
    scores = model.score([prefix])[0]
    scores[list(prefix)] = -torch.inf
    scores[s.target] = -torch.inf
    ordered = np.append(scores.topk(19).indices.numpy(), s.target)
    perm = np.random.default_rng(s.seed).permutation(20)
    assert s.candidates == tuple(int(i) for i in ordered[perm])
    # Another seed: other session seeds, other orders, same candidate sets (sasrec mode).
    other = build_splits(config(seed=5), split, model)
    assert [x.seed for x in other.valid.sessions] != [x.seed for x in prepared.valid.sessions]
    assert [set(x.candidates) for x in other.valid.sessions] == [set(x.candidates) for x in prepared.valid.sessions]
    assert [x.candidates for x in other.valid.sessions] != [x.candidates for x in prepared.valid.sessions]
    # Seeds differ across splits for the same user.
    assert prepared.train.sessions[0].seed != prepared.valid.sessions[0].seed


def test_random_candidates_deterministic(split, model, prepared_random) -> None:
    again = build_splits(config(candidate_mode="random"), split, model)
    assert again.test.sessions == prepared_random.test.sessions
    other = build_splits(config(candidate_mode="random", seed=9), split, model)
    assert [set(s.candidates) for s in other.test.sessions] != [set(s.candidates) for s in prepared_random.test.sessions]


def test_train_sessions_use_training_sequences(split, prepared) -> None:
    for s in prepared.train.sessions:
        assert s.target == int(split.train[s.user][-1])
        assert s.history == tuple(int(i) for i in split.train[s.user][-11:-1])


# --------------------------------------------------------------------- peers, q_t


def test_peers(prepared, model, split) -> None:
    for name in SPLITS:
        for s in prepared.split(name).sessions:
            users = [p for p, _ in s.peers]
            ws = [w for _, w in s.peers]
            assert len(s.peers) == 10 and s.user not in users and len(set(users)) == 10
            assert all(0.0 <= w <= 1.0 for w in ws)
            assert ws == sorted(ws, reverse=True)
    # The peers of a session are the most cosine-similar other users, from the visible
    # history's representation (not the full prefix) against training sequences.
    s = prepared.test.sessions[4]
    query = torch.nn.functional.normalize(model.encode([s.history]), dim=1)[0]
    pool = torch.nn.functional.normalize(model.encode(split.train), dim=1)
    cos = pool @ query
    cos[s.user] = -torch.inf
    expected = cos.topk(10).indices.tolist()
    assert [p for p, _ in s.peers] == expected
    assert [w for _, w in s.peers] == pytest.approx(cos[expected].clamp(0, 1).tolist(), abs=1e-5)


def test_opinions_from_training_only(split, prepared) -> None:
    expected = {}
    for user, (items, ratings) in enumerate(zip(split.train, split.train_ratings)):
        for item, rating in zip(items, ratings):
            if rating >= 4:
                expected[(user, int(item))] = OPINION_LIKED
            elif rating <= 2:
                expected[(user, int(item))] = OPINION_DISLIKED
    assert prepared.test.opinions == expected
    assert opinions_from_training(split) == expected
    for name in ("valid", "test"):
        for s in prepared.split(name).sessions:
            assert (s.user, s.target) not in prepared.split(name).opinions


def test_opinions_without_ratings(split) -> None:
    unrated = dataclasses.replace(split, has_ratings=False)
    opinions = opinions_from_training(unrated)
    assert len(opinions) == sum(len(s) for s in split.train)
    assert set(opinions.values()) == {OPINION_LIKED}


def test_q_exact_on_hand_built_case(prepared) -> None:
    dialog = DialogData(
        name="hand", split="test", sessions=[], items=prepared.test.items,
        opinions={(1, 7): 1, (2, 7): -1, (3, 7): 1, (4, 7): -1, (5, 8): 1},
        item_features=np.zeros((80, 2), np.float32), popularity=np.zeros(80, np.int64),
        has_ratings=True, peer_k=3,
    )
    peers = ((9, 1.0), (1, 0.9), (2, 0.5), (5, 0.4), (3, 0.2), (4, 0.1))
    # Peers with an opinion on 7, most similar first: 1 (+1, .9), 2 (-1, .5), 3 (+1, .2); 4 is past peer_k.
    assert dialog.peer_score(peers, 7) == pytest.approx((0.9 - 0.5 + 0.2) / 1.6)
    assert dialog.peer_score(peers, 8) == pytest.approx(1.0)
    assert dialog.peer_score(peers, 99) == 0.0
    assert dialog.peer_score(((1, 0.0), (2, 0.0)), 7) == 0.0  # zero weight: no information
    # On prepared data: q recomputed by hand from the session's peers and the opinions.
    data = prepared.test
    for s in data.sessions[:10]:
        for item in s.candidates:
            found = [(w, data.opinions[(p, item)]) for p, w in s.peers if (p, item) in data.opinions]
            found = found[: data.peer_k]
            total = sum(w for w, _ in found)
            want = sum(w * o for w, o in found) / total if total > 0 else 0.0
            assert data.peer_score(s.peers, item) == pytest.approx(want)


def test_features_and_popularity(split, model, prepared) -> None:
    assert prepared.test.item_features.dtype == np.float32
    assert np.array_equal(prepared.test.item_features, model.item_embeddings())
    counts = np.bincount(np.concatenate(split.train), minlength=N_ITEMS)
    assert np.array_equal(prepared.train.popularity, counts)


# ------------------------------------------------------------------------ alignment


def test_alignment_sets(split, model, prepared) -> None:
    assert prepared.train.alignment == []
    for name in ("valid", "test"):
        data = prepared.split(name)
        cases = data.alignment
        assert len(cases) == 20
        assert data.stats["alignment_kept"] == 20
        assert data.stats["alignment_skipped_few_liked"] == len(FEW_LIKED_USERS)
        assert data.stats["alignment_eligible"] == N_USERS - len(FEW_LIKED_USERS)
        assert "2 skipped" in data.summary
        for case in cases:
            assert case.user not in FEW_LIKED_USERS
            seq, ratings = split.train[case.user], split.train_ratings[case.user]
            liked = [int(i) for i, r in zip(seq, ratings) if r >= 4]
            positives = [i for i, label in zip(case.items, case.labels) if label == 1]
            negatives = [i for i, label in zip(case.items, case.labels) if label == 0]
            assert len(case.items) == 20 and len(set(case.items)) == 20
            assert sorted(positives) == sorted(liked[-10:])  # the last 10 liked items
            assert len(negatives) == 10 and not set(negatives) & known_items(split, case.user)
            assert not set(case.history) & set(positives)  # removed from the visible history
            rest = [int(i) for i in seq if int(i) not in positives]
            assert case.history == tuple(rest[-10:])
            assert case.user not in [p for p, _ in case.peers] and len(case.peers) == 10
        # Shuffled: positives and negatives interleave (not all 1s then all 0s) somewhere.
        assert any(list(c.labels) != sorted(c.labels, reverse=True) for c in cases)
        # Exact construction: negatives, then the shuffle, from the case's own seeded generator.
        for case in cases[:3]:
            rng = np.random.default_rng(session_seed(0, name, case.user, stream=2))
            free = np.setdiff1d(np.arange(N_ITEMS), sorted(known_items(split, case.user)))
            negatives = rng.choice(free, size=10, replace=False)
            liked = [int(i) for i, r in zip(split.train[case.user], split.train_ratings[case.user]) if r >= 4]
            ordered = np.concatenate([liked[-10:], negatives])
            labels = np.r_[np.ones(10), np.zeros(10)]
            perm = rng.permutation(20)
            assert case.items == tuple(int(i) for i in ordered[perm])
            assert case.labels == tuple(int(v) for v in labels[perm])
    # Deterministic given the seed (the module fixture was built twice in
    # test_sessions_deterministic_and_seeded), different for another seed.
    other = build_splits(config(seed=3), split, model)
    assert [c.items for c in other.test.alignment] != [c.items for c in prepared.test.alignment]


def test_alignment_respects_the_limit_and_can_be_disabled(split, model) -> None:
    few = build_splits(config(alignment_users=5), split, model)
    assert len(few.test.alignment) == 5
    assert {c.user for c in few.test.alignment} <= {c.user for c in build_splits(config(alignment_users=100), split, model).test.alignment}
    none = build_splits(config(alignment_users=0), split, model)
    assert none.test.alignment == []


# ---------------------------------------------------------------------------- cache


def test_cache_roundtrip_and_corruption(split, tmp_path) -> None:
    cfg = config(use_cache=True, cache_dir=str(tmp_path))
    started = time.perf_counter()
    first = prepare(cfg, split_data=split)
    build_seconds = time.perf_counter() - started
    assert not first.from_cache
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["prepared", "sasrec"]
    started = time.perf_counter()
    second = prepare(cfg, split_data=split)
    load_seconds = time.perf_counter() - started
    assert second.from_cache and load_seconds < build_seconds
    for name in SPLITS:
        assert second.split(name).sessions == first.split(name).sessions
        assert second.split(name).alignment == first.split(name).alignment
        assert second.split(name).opinions == first.split(name).opinions
        assert second.split(name).summary == first.split(name).summary
    # A different config is a different cache entry; SASRec weights are reused.
    prepare(dataclasses.replace(cfg, n_peers=5), split_data=split)
    assert len(list(tmp_path.glob("prepared-*.pkl"))) == 2
    assert len(list(tmp_path.glob("sasrec-*.pt"))) == 1

    # A corrupt prepared file is rebuilt with a warning, with identical contents.
    (pickled,) = [p for p in tmp_path.glob("prepared-*.pkl") if p.stat().st_mtime_ns == min(q.stat().st_mtime_ns for q in tmp_path.glob("prepared-*.pkl"))]
    pickled.write_bytes(pickled.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = prepare(cfg, split_data=split)
    assert not rebuilt.from_cache
    assert rebuilt.test.sessions == first.test.sessions
    assert prepare(cfg, split_data=split).from_cache  # and the rebuilt file is good again

    # A corrupt SASRec file is retrained (deterministically: same sessions).
    (weights,) = tmp_path.glob("sasrec-*.pt")
    weights.write_bytes(b"garbage")
    for p in tmp_path.glob("prepared-*.pkl"):
        p.unlink()
    with pytest.warns(UserWarning, match="retraining"):
        retrained = prepare(cfg, split_data=split)
    assert retrained.test.sessions == first.test.sessions
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cache_key_follows_the_data(split, tmp_path) -> None:
    cfg = config(use_cache=True, cache_dir=str(tmp_path))
    prepare(cfg, split_data=split)
    changed = small_split(seed=1)
    assert not prepare(cfg, split_data=changed).from_cache


def test_train_sasrec_rejects_a_model_for_other_data(split, tmp_path) -> None:
    path = tmp_path / "m.pt"
    SASRec(split.n_items + 1, TINY_SASREC).save(path)
    with pytest.warns(UserWarning, match="retraining"):
        model = train_sasrec(TINY_SASREC, split, path, progress=False)
    assert model.n_items == split.n_items


def test_random_holdout_detection_and_shuffled_sasrec() -> None:
    from coars_env.data.common import InteractionData
    from coars_env.data.prepare import effective_sasrec_config, is_random_holdout
    from coars_env.data.sessions import split_leave_one_out

    rng = np.random.default_rng(0)
    rows = [(u, int(i)) for u in range(6) for i in rng.choice(30, size=8, replace=False)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id"])
    items = pd.DataFrame(
        {"title": [f"M{i}" for i in range(30)], "year": pd.array([pd.NA] * 30, dtype="Int64"), "genres": "", "summary": ""},
        index=pd.Index(range(30), name="item_id"),
    )
    users = pd.DataFrame(index=pd.Index(range(6), name="user_id"))

    def split_of(timestamps: bool) -> SplitData:
        data = InteractionData(
            name="toy",
            interactions=frame.assign(
                rating=np.nan,
                timestamp=pd.array(np.arange(len(frame)) if timestamps else [pd.NA] * len(frame), dtype="Int64"),
            ),
            items=items, users=users, has_ratings=False, has_timestamps=timestamps,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return split_leave_one_out(data, k_core=0, seed=0)

    unordered, ordered = split_of(False), split_of(True)
    assert is_random_holdout(unordered) and not is_random_holdout(ordered)
    assert effective_sasrec_config(config(), unordered).shuffle_sequences
    assert not effective_sasrec_config(config(), ordered).shuffle_sequences
    assert not effective_sasrec_config(config(shuffle_unordered=False), unordered).shuffle_sequences


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        DataConfig(candidate_mode="popular")
    assert DataConfig(sasrec={"hidden": 32}).sasrec.hidden == 32


def test_build_dialog_data_end_to_end_synthetic(tmp_path) -> None:
    from coars_env.data.prepare import build_dialog_data

    cfg = DataConfig(
        dataset="synthetic", sasrec=TINY_SASREC, cache_dir=str(tmp_path), progress=False,
        alignment_users=10,
    )
    test = build_dialog_data(cfg, "test")
    assert test.split == "test" and len(test.sessions) > 100
    assert "sasrec" in test.summary and "alignment" in test.summary
    assert build_dialog_data(cfg, "test").sessions == test.sessions  # from the cache
