"""k-core filter and the per-user leave-one-out split (sessions.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from coars_env.data import load_interactions
from coars_env.data.common import ITEM_COLUMNS, InteractionData, SplitData
from coars_env.data.sessions import describe, k_core_filter, split_leave_one_out


def make_data(
    rows: list[tuple], *, timestamps: bool = True, fixed: dict | None = None, name: str = "toy"
) -> InteractionData:
    """InteractionData from ``(user, item, rating, timestamp)`` rows in file order."""
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    inter["rating"] = inter["rating"].astype("float64")
    inter["timestamp"] = inter["timestamp"].astype("Int64")
    ids = sorted(inter["item_id"].unique())
    items = pd.DataFrame(
        {"title": [f"Movie {i}" for i in ids], "year": pd.array([2000] * len(ids), dtype="Int64"),
         "genres": "Drama", "summary": ""},
        index=pd.Index(ids, name="item_id"),
    )  # fmt: skip
    user_ids = sorted(inter["user_id"].unique())
    users = pd.DataFrame(
        {"age": [20 + k for k in range(len(user_ids))]}, index=pd.Index(user_ids, name="user_id")
    )
    return InteractionData(name, inter, items, users, True, timestamps, [], fixed)


def user_rows(split: SplitData, raw_user) -> tuple[list, dict]:
    """(train raw items, {split: (raw target, raw prefix)}) of one user."""
    dense = int(np.flatnonzero(split.users["raw_id"].to_numpy() == raw_user)[0])
    raw = split.items["raw_id"].to_numpy()
    out = {}
    for name, frame in split.targets.items():
        row = frame[frame["user"] == dense]
        if len(row):
            out[name] = (raw[row["target"].iloc[0]], [raw[i] for i in row["prefix"].iloc[0]])
    return [raw[i] for i in split.train[dense]], out


def test_chronological_leave_one_out():
    # User 1's file order is not time order.
    rows = [
        (1, 10, 5, 300),
        (1, 11, 4, 100),
        (1, 12, 3, 200),
        (1, 13, 2, 400),
        (2, 10, 1, 50),
        (2, 12, 5, 60),
        (2, 14, 4, 70),
    ]
    split = split_leave_one_out(make_data(rows), k_core=0)
    train, targets = user_rows(split, 1)
    assert train == [11, 12]  # oldest first
    assert targets["valid"] == (10, [11, 12])
    assert targets["test"] == (13, [11, 12, 10])  # test prefix = train + valid target
    assert split.train_ratings[0].tolist() == [4.0, 3.0]
    assert split.n_users == 2 and split.n_items == 5


def test_ties_are_broken_by_file_order():
    # Items 30 and 20 share the last second; 30 comes first in the file, so 20 is the test target.
    rows = [(1, 40, 4, 10), (1, 30, 4, 99), (1, 20, 4, 99), (1, 50, 4, 5)]
    split = split_leave_one_out(make_data(rows), k_core=0)
    train, targets = user_rows(split, 1)
    assert train == [50, 40] and targets["valid"][0] == 30 and targets["test"][0] == 20
    # Reversing the file order of the tied rows swaps valid and test.
    rows[1], rows[2] = rows[2], rows[1]
    _, targets = user_rows(split_leave_one_out(make_data(rows), k_core=0), 1)
    assert targets["valid"][0] == 20 and targets["test"][0] == 30


def test_dense_indices_and_attributes():
    rows = [
        (7, 300, 4, 1),
        (7, 100, 4, 2),
        (7, 200, 4, 3),
        (3, 100, 4, 1),
        (3, 300, 4, 2),
        (3, 200, 4, 3),
    ]
    split = split_leave_one_out(make_data(rows), k_core=0)
    assert split.users["raw_id"].tolist() == [3, 7] and split.users["age"].tolist() == [20, 21]
    assert split.items["raw_id"].tolist() == [100, 200, 300]
    assert list(split.items.columns) == ["raw_id", *ITEM_COLUMNS]
    assert split.items["title"].tolist() == ["Movie 100", "Movie 200", "Movie 300"]
    assert split.train[1].dtype == np.int64 and split.train[1].tolist() == [2]  # user 7: item 300
    for frame in split.targets.values():
        assert list(frame.columns) == ["user", "target", "prefix"]


def test_k_core_is_iterative_and_can_be_disabled():
    # Items 1-3 are seen by users A, B, C; item 9 only by user D. With k=3, D (3 items incl. 9)
    # survives the first round on users but item 9 (1 user) goes; then D has 2 items and goes.
    rows = []
    for u in "ABC":
        rows += [(u, i, 4, t) for t, i in enumerate([1, 2, 3])]
    rows += [("D", 1, 4, 0), ("D", 2, 4, 1), ("D", 9, 4, 2)]
    data = make_data(rows)
    kept, rounds = k_core_filter(data.interactions, 3)
    assert sorted(kept["user_id"].unique()) == ["A", "B", "C"] and rounds == 3
    split = split_leave_one_out(data, k_core=3)
    assert split.n_users == 3 and 9 not in split.items["raw_id"].tolist()
    assert any("3-core filter removed 1 users, 1 items, 3 interactions" in n for n in split.notes)
    assert split_leave_one_out(data, k_core=0).n_users == 4


def test_short_users_are_dropped_and_counted():
    rows = [(1, 1, 4, 1), (1, 2, 4, 2), (1, 3, 4, 3), (2, 1, 4, 1), (2, 2, 4, 2), (3, 1, 4, 1)]
    split = split_leave_one_out(make_data(rows), k_core=0)
    assert split.users["raw_id"].tolist() == [1]
    assert any("dropped 2 users" in n for n in split.notes)


def test_random_hold_out_without_timestamps():
    rows = [(u, i, np.nan, None) for u in (1, 2, 3) for i in range(u, u + 8)]
    data = make_data(rows, timestamps=False)
    with pytest.warns(UserWarning, match="seeded random hold-out"):
        a = split_leave_one_out(data, k_core=0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = split_leave_one_out(data, k_core=0, seed=0)
        others = [split_leave_one_out(data, k_core=0, seed=s) for s in range(1, 6)]
    assert any("random hold-out" in n for n in a.notes)
    assert a.targets["test"]["target"].tolist() == b.targets["test"]["target"].tolist()
    assert any(
        o.targets["test"]["target"].tolist() != a.targets["test"]["target"].tolist() for o in others
    )
    for u in range(3):
        seq = a.train[u].tolist()
        assert seq == sorted(seq)  # the rest keeps file order
        valid = a.targets["valid"]["target"].iloc[u]
        test = a.targets["test"]["target"].iloc[u]
        assert len(seq) == 6 and valid not in seq and test not in seq and valid != test


def test_fixed_targets_are_respected():
    rows = [(0, i, np.nan, None) for i in (1, 2, 3, 4)] + [(1, i, np.nan, None) for i in (2, 3, 5)]
    rows += [(2, i, np.nan, None) for i in (1, 4, 6)]
    data = make_data(rows, timestamps=False, fixed={1: (5, None), 2: (None, 6)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random hold-out warning for a fixed split
        split = split_leave_one_out(data)  # default k_core=5 is not applied
    assert any("not applied" in n for n in split.notes)
    train, targets = user_rows(split, 0)
    assert train == [1, 2, 3, 4] and targets == {}
    train, targets = user_rows(split, 1)
    assert train == [2, 3] and targets == {"valid": (5, [2, 3])}
    train, targets = user_rows(split, 2)
    assert train == [1, 4] and targets == {"test": (6, [1, 4])}
    bad = make_data(rows, timestamps=False, fixed={1: (3, None)})
    with pytest.raises(ValueError, match="user 1: fixed targets"):
        split_leave_one_out(bad)


def test_synthetic_split_has_no_target_leak():
    split = split_leave_one_out(load_interactions("synthetic", seed=3))
    assert split.n_users == 600 and split.n_items == 240
    for frame in split.targets.values():
        assert len(frame) == 600
        for user, target, prefix in frame.itertuples(index=False):
            assert target not in split.train[user].tolist() and target not in prefix
    text = describe(split)
    assert (
        "users 600" in text
        and "items 240" in text
        and "ratings: yes" in text
        and "valid 600" in text
    )


def test_describe_lists_notes():
    rows = [(u, i, np.nan, None) for u in (1, 2) for i in range(5)]
    with pytest.warns(UserWarning):
        split = split_leave_one_out(make_data(rows, timestamps=False), k_core=0)
    text = describe(split)
    assert "timestamps: no" in text and "random hold-out" in text and "train 6 interactions" in text


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_ml100k_chronological_with_ties(data_dir):
    data = load_interactions("ml-100k", data_dir, download=False)
    split = split_leave_one_out(data, k_core=0)
    assert split.n_users == 943 and split.n_items == 1682
    assert len(split.targets["test"]) == 943 and sum(map(len, split.train)) == 100_000 - 2 * 943
    inter = data.interactions.assign(pos=np.arange(len(data.interactions)))
    # Expected test/valid: max timestamp, ties -> later file position.
    ordered = inter.sort_values(["user_id", "timestamp", "pos"])
    last_two = ordered.groupby("user_id").tail(2)
    tied = last_two.groupby("user_id")["timestamp"].nunique().eq(1).sum()
    assert tied == 415
    expected_test = ordered.groupby("user_id")["item_id"].last()
    raw_items = split.items["raw_id"].to_numpy()
    raw_users = split.users["raw_id"].to_numpy()
    got = dict(
        zip(raw_users[split.targets["test"]["user"]], raw_items[split.targets["test"]["target"]])
    )
    assert got == expected_test.to_dict()
    for user, target, prefix in split.targets["valid"].itertuples(index=False):
        assert list(prefix) == split.train[user].tolist()
        assert target not in prefix  # ML-100K has no repeated (user, item) ratings
    for user, target, prefix in split.targets["test"].itertuples(index=False):
        assert target not in prefix and prefix[:-1] == tuple(split.train[user].tolist())


@pytest.mark.slow
def test_real_lastfm_split(data_dir):
    split = split_leave_one_out(load_interactions("lastfm", data_dir))
    assert split.n_users == 1098 and split.n_items == 4606
    assert len(split.targets["valid"]) == 122 and len(split.targets["test"]) == 122
    for frame in split.targets.values():
        for user, target, prefix in frame.itertuples(index=False):
            assert target not in split.train[user].tolist()  # artists never repeat within a user
            assert list(prefix) == split.train[user].tolist()
    # Validation prefixes are exactly the valid.tsv histories.
    valid = pd.read_csv(
        data_dir / "lastfm" / "valid.tsv", sep="\t", dtype=str, keep_default_na=False
    )
    raw_items = split.items["raw_id"].to_numpy()
    histories = [[int(raw_items[i]) for i in p] for p in split.targets["valid"]["prefix"]]
    assert histories == [[int(x) for x in h.split()] for h in valid["history"]]


@pytest.mark.slow
def test_real_ml1m_random_hold_out(data_dir):
    with pytest.warns(UserWarning):
        split = split_leave_one_out(load_interactions("ml-1m", data_dir, download=False))
    assert split.n_users == 6040 and len(split.targets["test"]) == 6040
    assert split.n_items <= 3706 and not split.has_timestamps
