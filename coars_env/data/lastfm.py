"""Last.fm (hetrec2011) next-artist data in the LLaRA / AFL preprocessing.

Files in ``<root>/lastfm/``: ``train.tsv`` and ``valid.tsv`` (optional ``test.tsv``) with
a header ``history<TAB>next``: ``history`` is up to 10 space-separated artist ids, oldest
first, ``next`` the true next artist; ``id2name.txt`` maps ``id::name`` (UTF-8).

How the files relate (checked on the released data; 976 + 122 + 122 = 1,220 users, the
8:1:1 *user* split of LLaRA):

- ``train.tsv`` holds the training users' full sequences as sliding windows: a row with an
  empty history starts a new user, and each following row's history is the last (up to
  10) items of that user's sequence so far. 50,800 rows = 976 users. The loader rebuilds
  each sequence (and checks that every window agrees with it).
- ``valid.tsv`` (and ``test.tsv``) hold *other* users, one row each: ``history`` is the
  user's last <= 10 items before the target ``next``. None of the 122 validation rows is a
  continuation of a training user (two short histories of popular artists coincide with
  the end of one training sequence by chance; their targets differ). A validation user's
  sequence is therefore ``history + [next]`` with ``next`` as its fixed validation target;
  items before the window are unknown.

The dataset's own split is kept through ``InteractionData.fixed_targets``: validation
users ``-> (next, None)``, test users ``-> (None, next)``; training users are absent (all
their items are training data). Without ``test.tsv`` the loader (``carve_test=True``,
the default) carves a test split from the training users, seeded: as many users as the
validation file has, each holding out the *last* item of their sequence as test target.
That mirrors the size of LLaRA's test split but is not its test set; results on it are not
comparable with published numbers, and the notes say so. ``carve_test=False`` leaves the
test split empty.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from coars_env.data.common import InteractionData
from coars_env.data.download import DataFormatError, DatasetNotFoundError
from coars_env.data.movielens import finish

FILES = ("train.tsv", "valid.tsv", "id2name.txt")


def _read_rows(path: Path) -> list[tuple[int, list[int], int]]:
    """``(line number, history, next)`` for each data row of a history/next TSV."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip().split("\t") != ["history", "next"]:
        raise DataFormatError(f"{path}, line 1: expected the header 'history<TAB>next'")
    rows = []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        try:
            if len(parts) != 2:
                raise ValueError(f"{len(parts)} tab-separated fields")
            history = [int(x) for x in parts[0].split()]
            target = int(parts[1])
        except ValueError as exc:
            raise DataFormatError(
                f"{path}, line {line_no}: expected '<space-separated artist ids><TAB><artist id>' "
                f"({exc}); got {line!r}"
            ) from exc
        rows.append((line_no, history, target))
    return rows


def _train_sequences(path: Path) -> tuple[list[list[int]], list[int]]:
    """Rebuild each training user's sequence from the sliding windows of train.tsv."""
    sequences: list[list[int]] = []
    first_lines: list[int] = []
    for line_no, history, target in _read_rows(path):
        if not history:
            sequences.append([target])
            first_lines.append(line_no)
            continue
        if not sequences or sequences[-1][-len(history) :] != history:
            raise DataFormatError(
                f"{path}, line {line_no}: history does not continue the current user's sequence "
                f"(each user starts with an empty history and every later window must end "
                f"with that user's previous items)"
            )
        sequences[-1].append(target)
    return sequences, first_lines


def _read_names(path: Path) -> pd.Series:
    names: dict[int, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, name = line.partition("::")
        if not sep or not key.strip().lstrip("-").isdigit():
            raise DataFormatError(f"{path}, line {line_no}: expected 'id::name', got {line!r}")
        names[int(key)] = name.strip()
    return pd.Series(names, dtype=object)


def load_lastfm(folder: str | Path, *, seed: int = 0, carve_test: bool = True) -> InteractionData:
    """Read the LLaRA/AFL Last.fm files in ``folder`` (see the module docstring)."""
    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"lastfm: missing {', '.join(str(folder / f) for f in missing)}. There is no official "
            f"download for this preprocessing: place train.tsv, valid.tsv, id2name.txt (and "
            f"optionally test.tsv) from the LLaRA/AFL Last.fm release in {folder}/ "
            f"(or set COARS_DATA_DIR / data_dir to the folder that contains lastfm/)."
        )
    train, train_lines = _train_sequences(folder / "train.tsv")
    valid = _read_rows(folder / "valid.tsv")
    test_path = folder / "test.tsv"
    test = _read_rows(test_path) if test_path.is_file() else []

    sequences: list[list[int]] = list(train)
    groups = ["train"] * len(train)
    lines = list(train_lines)
    fixed: dict[int, tuple[int | None, int | None]] = {}
    for group, rows in (("valid", valid), ("test", test)):
        for line_no, history, target in rows:
            user = len(sequences)
            sequences.append(history + [target])
            groups.append(group)
            lines.append(line_no)
            fixed[user] = (target, None) if group == "valid" else (None, target)

    notes = [
        f"lastfm: {len(train)} training users rebuilt from {sum(map(len, train))} train.tsv rows; "
        f"{len(valid)} validation users from valid.tsv (separate users: history of <= 10 items "
        "+ target)",
        "lastfm: no ratings and no timestamps; sequence order is the files' order; every "
        "interaction counts as liked",
    ]
    if test:
        notes.append(f"lastfm: {len(test)} test users from test.tsv (the official test split)")
    elif carve_test:
        n_test = min(len(valid) or max(1, len(train) // 10), len(train))
        rng = np.random.default_rng(seed)
        chosen = sorted(int(u) for u in rng.choice(len(train), size=n_test, replace=False))
        for user in chosen:
            fixed[user] = (None, sequences[user][-1])
            groups[user] = "train+test"
        notes.append(
            f"lastfm: no test.tsv; test split CARVED from train.tsv with seed {seed}: {n_test} "
            f"training users hold out their last item. This is not LLaRA/AFL's test set; numbers "
            f"on it are not comparable with published ones (add test.tsv for those)."
        )
    else:
        notes.append("lastfm: no test.tsv; the test split is empty")

    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    inter = pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(len(sequences), dtype=np.int64), lengths),
            "item_id": np.fromiter(
                (i for s in sequences for i in s), dtype=np.int64, count=int(lengths.sum())
            ),
            "rating": np.nan,
            "timestamp": pd.array([pd.NA] * int(lengths.sum()), dtype="Int64"),
        }
    )
    names = _read_names(folder / "id2name.txt")
    items = pd.DataFrame(
        {
            "title": names.to_numpy(),
            "year": pd.array([pd.NA] * len(names), dtype="Int64"),
            "genres": "",
            "summary": "",
        },
        index=pd.Index(names.index.to_numpy(dtype=np.int64), name="item_id"),
    )
    users = pd.DataFrame(
        {"group": groups, "source_line": lines},
        index=pd.Index(np.arange(len(sequences), dtype=np.int64), name="user_id"),
    )
    data = finish("lastfm", inter, items, users, False, False, notes)
    data.fixed_targets = fixed
    return data
