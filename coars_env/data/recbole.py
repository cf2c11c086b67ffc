"""RecBole atomic files: ``<name>.inter``, optional ``<name>.item`` and ``<name>.user``.

Each file is tab-separated text whose header names every column as ``field:type``, type
one of ``token``, ``token_seq``, ``float``, ``float_seq`` (sequences are space-separated).
Columns are mapped to the common form by name:

- interactions: user (``user_id``), item (``item_id``), ``rating``, ``timestamp``
  (the first name of each list below that exists);
- items: title (``movie_title``, ``title``, ...), year (``release_year``, ``year``),
  genres (``class``, ``genre``, ...; a token_seq becomes ``|``-joined), summary;
- users: every column except the id, as text.

Row order of ``.inter`` is kept (it breaks timestamp ties). ``/work/shared/datasets``'s
``ml-100k`` folder is in this format, as shipped in the RecBole source distribution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from coars_env.data.common import InteractionData
from coars_env.data.download import DataFormatError, DatasetNotFoundError, read_delimited
from coars_env.data.movielens import finish

TYPES = ("token", "token_seq", "float", "float_seq")
USER_FIELDS = ("user_id", "uid", "user")
ITEM_FIELDS = (
    "item_id",
    "iid",
    "item",
    "movie_id",
    "business_id",
    "artist_id",
    "track_id",
    "book_id",
)
RATING_FIELDS = ("rating", "score", "stars")
TIMESTAMP_FIELDS = ("timestamp", "time", "ts")
TITLE_FIELDS = (
    "movie_title",
    "title",
    "item_name",
    "name",
    "book_title",
    "artist_name",
    "track_name",
)
YEAR_FIELDS = ("release_year", "year")
GENRE_FIELDS = ("class", "genre", "genres", "categories", "category", "tags")
SUMMARY_FIELDS = ("summary", "description", "plot", "overview")
# Placeholders RecBole's ML-100K uses for missing values (sic).
MISSING = {"", "unknown", "unkonwn", "nan", "none", "null"}


def find_atomic_files(folder: Path) -> tuple[Path, Path | None, Path | None]:
    """``(inter, item or None, user or None)`` in ``folder``; named after the folder if possible."""
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"RecBole folder {folder} does not exist; it must contain <name>.inter "
            f"(and optionally <name>.item, <name>.user) in RecBole's atomic-file format"
        )
    inter = folder / f"{folder.name}.inter"
    if not inter.is_file():
        found = sorted(folder.glob("*.inter"))
        if len(found) != 1:
            raise DatasetNotFoundError(
                f"{folder}: expected exactly one RecBole interaction file ({folder.name}.inter); "
                f"found {[p.name for p in found] or 'none'}"
            )
        inter = found[0]
    stem = inter.with_suffix("")
    item = stem.with_suffix(".item")
    user = stem.with_suffix(".user")
    return inter, item if item.is_file() else None, user if user.is_file() else None


def read_atomic(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """One atomic file as str columns named by field, plus ``{field: type}``."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        # Some older conversions are latin-1; read them rather than fail.
        encoding = "latin-1"
    header = data.split(b"\n", 1)[0].decode(encoding).rstrip("\r").split("\t")
    fields: dict[str, str] = {}
    for col in header:
        name, sep, kind = col.rpartition(":")
        if not sep or not name or kind not in TYPES:
            raise DataFormatError(
                f"{path}, line 1: header column {col!r} is not 'name:type' with type one of {TYPES}"
            )
        fields[name] = kind
    if len(fields) != len(header):
        raise DataFormatError(f"{path}, line 1: duplicate column names in header {header}")
    frame = read_delimited(
        data, where=str(path), sep="\t", names=list(fields), encoding=encoding, skiprows=1
    )
    return frame, fields


def _first(fields: dict[str, str], options: tuple[str, ...]) -> str | None:
    return next((f for f in options if f in fields), None)


def _number(frame: pd.DataFrame, col: str, path: Path, kind: str) -> pd.Series:
    values = pd.to_numeric(frame[col].str.strip(), errors="coerce")
    bad = values.isna() & ~frame[col].str.strip().str.lower().isin(MISSING)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataFormatError(
            f"{path}, data row {row + 1}: {kind} {frame[col].iloc[row]!r} is not a number"
        )
    return values


def _ids(values: pd.Series) -> pd.Series:
    """Token ids: integers when every id is an integer (MovieLens), else strings."""
    as_int = pd.to_numeric(values, errors="coerce")
    if as_int.notna().all() and (as_int == as_int.round()).all():
        return as_int.astype("int64")
    return values.astype(str)


def load_recbole(folder: str | Path, name: str | None = None) -> InteractionData:
    """Read the atomic files in ``folder`` into :class:`InteractionData`."""
    folder = Path(folder)
    inter_path, item_path, user_path = find_atomic_files(folder)
    name = name or f"recbole:{folder.name}"
    frame, fields = read_atomic(inter_path)
    user_col = _first(fields, USER_FIELDS)
    item_col = _first(fields, ITEM_FIELDS)
    if user_col is None or item_col is None:
        raise DataFormatError(
            f"{inter_path}, line 1: need a user column (one of {USER_FIELDS}) and an item "
            f"column (one of {ITEM_FIELDS}); header has {list(fields)}"
        )
    rating_col = _first(fields, RATING_FIELDS)
    time_col = _first(fields, TIMESTAMP_FIELDS)
    inter = pd.DataFrame(
        {"user_id": _ids(frame[user_col].str.strip()), "item_id": _ids(frame[item_col].str.strip())}
    )
    inter["rating"] = _number(frame, rating_col, inter_path, "rating") if rating_col else np.nan
    if time_col:
        ts = _number(frame, time_col, inter_path, "timestamp")
        inter["timestamp"] = ts.round().astype("Int64")
    else:
        inter["timestamp"] = pd.array([pd.NA] * len(inter), dtype="Int64")
    has_ratings = rating_col is not None and bool(inter["rating"].notna().any())
    has_timestamps = time_col is not None and bool(inter["timestamp"].notna().any())
    notes = [f"{name}: RecBole atomic files in {folder}"]
    if not has_timestamps:
        notes.append(f"{name}: no timestamps; the split falls back to a seeded random hold-out")

    items = pd.DataFrame(
        columns=["title", "year", "genres", "summary"], index=pd.Index([], name="item_id")
    )
    if item_path is not None:
        items = _read_items(item_path, item_col, inter["item_id"].dtype)
        if items.index.dtype != inter["item_id"].dtype:
            inter["item_id"] = inter["item_id"].astype(str)
    users = pd.DataFrame(index=pd.Index([], name="user_id"))
    if user_path is not None:
        raw, ufields = read_atomic(user_path)
        if user_col not in ufields:
            raise DataFormatError(
                f"{user_path}, line 1: no {user_col!r} column; header has {list(ufields)}"
            )
        raw.index = pd.Index(_ids(raw[user_col].str.strip()), name="user_id")
        users = raw.drop(columns=[user_col])
    return finish(name, inter, items, users, has_ratings, has_timestamps, notes)


def _read_items(path: Path, item_col: str, id_dtype: np.dtype) -> pd.DataFrame:
    raw, fields = read_atomic(path)
    if item_col not in fields:
        raise DataFormatError(f"{path}, line 1: no {item_col!r} column; header has {list(fields)}")
    ids = _ids(raw[item_col].str.strip())
    if ids.dtype != id_dtype:
        # Integer ids in one file, text in the other: compare them as text.
        ids = ids.astype(str)
    title_col = _first(fields, TITLE_FIELDS)
    year_col = _first(fields, YEAR_FIELDS)
    genre_col = _first(fields, GENRE_FIELDS)
    summary_col = _first(fields, SUMMARY_FIELDS)
    titles = raw[title_col].str.strip() if title_col else ids.map(lambda i: f"Item {i}")
    if year_col:
        years = pd.to_numeric(raw[year_col].str.strip(), errors="coerce")  # "unkonwn" -> NA
        years = years.where(years == years.round()).astype("Int64").array
    else:
        years = pd.array([pd.NA] * len(raw), dtype="Int64")
    if genre_col:
        sep = " " if fields[genre_col] == "token_seq" else None
        genres = [
            "|".join(
                g for g in (v.split(sep) if sep else [v.strip()]) if g and g.lower() not in MISSING
            )
            for v in raw[genre_col]
        ]
    else:
        genres = [""] * len(raw)
    summary = raw[summary_col].str.strip().to_numpy() if summary_col else ""
    items = pd.DataFrame(
        {
            "title": np.asarray(titles, dtype=object),
            "year": years,
            "genres": genres,
            "summary": summary,
        },
        index=pd.Index(ids.to_numpy(), name="item_id"),
    )
    if not items.index.is_unique:
        raise DataFormatError(
            f"{path}: item id {items.index[items.index.duplicated()][0]} appears more than once"
        )
    return items
