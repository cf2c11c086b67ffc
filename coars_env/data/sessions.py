"""k-core filtering and the per-user leave-one-out split: InteractionData -> SplitData.

Rules (METHOD.md, "The setting"):

- **k-core** (``k_core``, default 5; 0 disables): users and items with fewer than ``k``
  interactions are removed, repeatedly, until every remaining user and item has ``k``.
  Not applied to datasets that ship their own split (``fixed_targets``, Last.fm): it
  would drop official evaluation users or rewrite their history windows; a note says so.
- **Chronological leave-one-out** (timestamps exist): each user's interactions are
  ordered by timestamp, ties broken by file order (a stable sort; 415 of ML-100K's 943
  users rate their last two movies in the same second). Last = test target, second to
  last = validation target, the rest = training sequence.
- **Seeded random hold-out** (no timestamps, e.g. ML-1M ``interactions.tsv``): two
  interactions per user are drawn with ``seed`` as validation and test targets; the
  training sequence keeps file order. A warning and a note say so.
- **Fixed targets** (``data.fixed_targets``): a listed user's last interactions in file
  order are its targets, ``(valid, test)``; unlisted users are training-only.
- Users left with no training item (fewer than 3 interactions, or only targets) are
  dropped and counted in the notes.

A training sequence never contains its own user's validation or test interaction (the
same item may reappear earlier only if the user really interacted with it twice).
Dense indices follow sorted raw ids.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from coars_env.data.common import ITEM_COLUMNS, InteractionData, SplitData


def k_core_filter(interactions: pd.DataFrame, k: int) -> tuple[pd.DataFrame, int]:
    """Iterative k-core on users and items; returns the kept rows and the rounds run."""
    if k <= 0:
        return interactions, 0
    df = interactions
    rounds = 0
    while True:
        rounds += 1
        user_ok = df["user_id"].map(df["user_id"].value_counts()) >= k
        item_ok = df["item_id"].map(df["item_id"].value_counts()) >= k
        keep = user_ok & item_ok
        if keep.all():
            return df, rounds
        df = df[keep]


def _order_rows(df: pd.DataFrame, data: InteractionData, seed: int) -> tuple[pd.DataFrame, str]:
    """Rows grouped per user, each user's rows in split order (targets last); the mode."""
    if data.fixed_targets is not None:
        return df.sort_values(["user_id", "pos"], kind="stable"), "fixed"
    if data.has_timestamps and df["timestamp"].notna().all():
        return df.sort_values(["user_id", "timestamp", "pos"], kind="stable"), "chronological"
    # Random hold-out: the two rows with the highest random keys become valid, test; the
    # other rows keep file order in front of them.
    rng = np.random.default_rng(seed)
    df = df.assign(key=rng.random(len(df)))
    rank = df.groupby("user_id", sort=False)["key"].rank(method="first", ascending=False)
    df["slot"] = np.select([rank == 1, rank == 2], [2, 1], 0)
    df = df.sort_values(["user_id", "slot", "pos"], kind="stable")
    return df.drop(columns=["key", "slot"]), "random"


def split_leave_one_out(data: InteractionData, *, k_core: int = 5, seed: int = 0) -> SplitData:
    """Filter ``data`` and split it per user into train / valid / test (module docstring)."""
    notes = list(data.notes)
    df = data.interactions[["user_id", "item_id", "rating"]].copy()
    df["timestamp"] = data.interactions["timestamp"]
    df["pos"] = np.arange(len(df), dtype=np.int64)  # file order: the tie-breaker

    if data.fixed_targets is not None and k_core > 0:
        notes.append(f"{data.name}: k-core ({k_core}) not applied: the dataset ships its own split")
    elif k_core > 0:
        before = (df["user_id"].nunique(), df["item_id"].nunique(), len(df))
        df, _ = k_core_filter(df, k_core)
        after = (df["user_id"].nunique(), df["item_id"].nunique(), len(df))
        if after != before:
            notes.append(
                f"{k_core}-core filter removed {before[0] - after[0]} users, "
                f"{before[1] - after[1]} items, {before[2] - after[2]} interactions"
            )

    df, mode = _order_rows(df, data, seed)
    if mode == "random":
        message = (
            f"{data.name}: no (complete) timestamps; validation/test targets are a seeded "
            f"random hold-out (seed {seed}), not the chronological last items"
        )
        warnings.warn(message, stacklevel=2)
        notes.append(message)

    users = df["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    raw_users = users[starts]
    # Per user: how many trailing rows are (valid, test) targets.
    fixed = data.fixed_targets or {}
    items_arr = df["item_id"].to_numpy()
    has_valid = np.zeros(len(starts), dtype=bool)
    has_test = np.zeros(len(starts), dtype=bool)
    if mode == "fixed":
        for j, user in enumerate(raw_users):
            valid_t, test_t = fixed.get(user, (None, None))
            expected = [t for t in (valid_t, test_t) if t is not None]
            got = list(items_arr[ends[j] - len(expected) : ends[j]]) if expected else []
            if got != expected:
                raise ValueError(
                    f"{data.name}: user {user}: fixed targets {expected} are not the user's last "
                    f"interactions in file order (found {got})"
                )
            has_valid[j], has_test[j] = valid_t is not None, test_t is not None
    else:
        has_valid[:] = True
        has_test[:] = True
    n_targets = has_valid.astype(int) + has_test.astype(int)
    n_train = (ends - starts) - n_targets
    keep = n_train >= 1
    if (~keep).any():
        notes.append(
            f"dropped {int((~keep).sum())} users with no training interaction left after "
            "holding out their targets"
        )

    # Dense ids over the kept users' rows.
    kept_rows = np.repeat(keep, ends - starts)
    df = df[kept_rows]
    starts, ends = starts[keep], ends[keep]
    has_valid, has_test, n_train = has_valid[keep], has_test[keep], n_train[keep]
    # Re-base starts/ends onto the filtered frame.
    lengths = ends - starts
    ends = np.cumsum(lengths)
    starts = ends - lengths

    raw_user_ids = df["user_id"].to_numpy()[starts]
    user_order = np.argsort(raw_user_ids, kind="stable")  # dense ids follow sorted raw ids
    raw_item_ids = np.sort(df["item_id"].unique())
    item_dense = pd.Series(np.arange(len(raw_item_ids), dtype=np.int64), index=raw_item_ids)
    dense_items = item_dense.reindex(df["item_id"].to_numpy()).to_numpy()
    ratings = df["rating"].to_numpy(dtype=np.float64)

    train: list[np.ndarray] = []
    train_ratings: list[np.ndarray] = []
    rows: dict[str, list[tuple[int, int, tuple[int, ...]]]] = {"valid": [], "test": []}
    for dense_user, j in enumerate(user_order):
        s, n = int(starts[j]), int(n_train[j])
        seq = dense_items[s : s + n]
        train.append(seq.astype(np.int64))
        train_ratings.append(ratings[s : s + n].copy())
        prefix = tuple(int(i) for i in seq)
        nxt = s + n
        if has_valid[j]:
            valid_item = int(dense_items[nxt])
            rows["valid"].append((dense_user, valid_item, prefix))
            prefix = prefix + (valid_item,)
            nxt += 1
        if has_test[j]:
            rows["test"].append((dense_user, int(dense_items[nxt]), prefix))

    targets = {
        split: pd.DataFrame(r, columns=["user", "target", "prefix"]).astype(
            {"user": "int64", "target": "int64"}
        )
        for split, r in rows.items()
    }
    items = data.items.reindex(raw_item_ids)
    items = items.assign(raw_id=raw_item_ids)[["raw_id", *ITEM_COLUMNS]].reset_index(drop=True)
    items["year"] = items["year"].astype("Int64")
    items[["title", "genres", "summary"]] = items[["title", "genres", "summary"]].fillna("")
    sorted_users = raw_user_ids[user_order]
    users_attr = data.users.reindex(sorted_users)
    users_out = pd.concat(
        [pd.DataFrame({"raw_id": sorted_users}), users_attr.reset_index(drop=True)], axis=1
    )
    return SplitData(
        name=data.name,
        items=items,
        users=users_out,
        train=train,
        train_ratings=train_ratings,
        targets=targets,
        has_ratings=data.has_ratings,
        has_timestamps=data.has_timestamps,
        notes=notes,
    )


def describe(split: SplitData) -> str:
    """A printable summary: sizes, density, split sizes, what the data has, notes."""
    n_train = int(sum(len(s) for s in split.train))
    n_valid = len(split.targets.get("valid", ()))
    n_test = len(split.targets.get("test", ()))
    total = n_train + n_valid + n_test
    density = total / max(1, split.n_users * split.n_items)
    lengths = np.array([len(s) for s in split.train]) if split.train else np.zeros(1)
    lines = [
        f"dataset {split.name}",
        f"  users {split.n_users:,}  items {split.n_items:,}  interactions {total:,}  "
        f"density {density:.4%}",
        f"  train {n_train:,} interactions (per user: min {lengths.min()}, "
        f"median {np.median(lengths):g}, max {lengths.max()})",
        f"  valid {n_valid:,} targets  test {n_test:,} targets",
        f"  ratings: {'yes' if split.has_ratings else 'no'}  "
        f"timestamps: {'yes' if split.has_timestamps else 'no'}",
    ]
    if split.notes:
        lines.append("  notes:")
        lines.extend(f"  - {note}" for note in split.notes)
    return "\n".join(lines)
