"""MovieLens loaders: ML-1M and ML-100K in their official GroupLens layouts.

ML-1M (``ml-1m.zip`` or its extracted folder): ``ratings.dat``
(``UserID::MovieID::Rating::Timestamp``), ``movies.dat`` (``MovieID::Title::Genres``),
``users.dat`` (``UserID::Gender::Age::Occupation::Zip-code``); ``::``-separated, latin-1.
A folder with ``interactions.tsv`` (``user_id``, ``movie_id``; no ratings, no timestamps)
instead of ``ratings.dat`` is also read, with a warning: its file order is not time order,
so the split falls back to a seeded random hold-out. An optional ``movie_summaries.csv``
(Agent4Rec) adds a one-line plot summary per movie; its ``rating`` column is ignored.

ML-100K (``ml-100k.zip`` or its folder): ``u.data`` (tab-separated
``user item rating timestamp``), ``u.item`` (``|``-separated, latin-1: id, title, release
date, video release date, IMDb URL, 19 genre flags), ``u.user``
(``id|age|gender|occupation|zip``).

Titles: MovieLens appends the year, ``"Seven (Se7en) (1995)"``; the item table keeps the
text before the trailing ``(YYYY)`` as it is (``"City of Lost Children, The"``) and puts
the year in ``year``.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from coars_env.data.common import InteractionData
from coars_env.data.download import (
    OFFICIAL_ZIPS,
    DataFormatError,
    DatasetNotFoundError,
    FileSource,
    download_official,
    manual_instructions,
    read_delimited,
    verify_md5,
)

ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def split_title_year(title: str) -> tuple[str, int | None]:
    """``"Seven (Se7en) (1995)"`` -> ``("Seven (Se7en)", 1995)``; no trailing year -> None."""
    text = title.strip()
    match = _TITLE_YEAR.match(text)
    if match is None or not match.group(1):
        return text, None
    return match.group(1), int(match.group(2))


def _split_titles(raw: pd.Series) -> tuple[list[str], list[int | None]]:
    pairs = [split_title_year(t) for t in raw]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ----------------------------------------------------------------------------- locating


def locate(name: str, root: Path, *, marker_files: tuple[str, ...], download: bool) -> FileSource:
    """Files of an official MovieLens dataset under ``root``: folder, zip, or download.

    Order: ``<root>/<name>/`` with any of ``marker_files``; else ``<root>/<name>.zip`` or
    ``<root>/<name>/<name>.zip`` (MD5-checked, read without extracting); else download.
    """
    folder = root / name
    if any((folder / f).is_file() for f in marker_files):
        return FileSource(folder=folder)
    spec = OFFICIAL_ZIPS[name]
    for zip_path in (root / f"{name}.zip", folder / f"{name}.zip"):
        if zip_path.is_file():
            verify_md5(zip_path, spec.md5, source=spec.url)
            return FileSource(zip_path=zip_path, prefix=f"{name}/")
    if not download:
        raise DatasetNotFoundError(
            f"{name} not found: no {' or '.join(marker_files)} in {folder} and no "
            f"{root / (name + '.zip')}. Call with download=True to fetch it from GroupLens, "
            f"or: {manual_instructions(name, root)}"
        )
    return FileSource(folder=download_official(name, root))


# ----------------------------------------------------------------------------- ML-1M


def load_ml1m(source: FileSource) -> InteractionData:
    """ML-1M from an official folder/zip (``ratings.dat``) or a folder with ``interactions.tsv``."""
    notes: list[str] = []
    if source.exists("ratings.dat"):
        inter = read_delimited(
            source.read_bytes("ratings.dat"),
            where=source.where("ratings.dat"),
            sep="::",
            names=["user_id", "item_id", "rating", "timestamp"],
            encoding="latin-1",
            ints=("user_id", "item_id", "timestamp"),
            floats=("rating",),
            fmt="UserID::MovieID::Rating::Timestamp",
        )
        inter["timestamp"] = inter["timestamp"].astype("Int64")
        has_ratings = has_timestamps = True
    elif source.exists("interactions.tsv"):
        inter = read_delimited(
            source.read_bytes("interactions.tsv"),
            where=source.where("interactions.tsv"),
            sep="\t",
            names=["user_id", "item_id"],
            skiprows=1,
            ints=("user_id", "item_id"),
            fmt="user_id<TAB>movie_id",
        )
        inter["rating"] = np.nan
        inter["timestamp"] = pd.array([pd.NA] * len(inter), dtype="Int64")
        has_ratings = has_timestamps = False
        message = (
            f"ml-1m: {source.where('interactions.tsv')} has no ratings and no timestamps; "
            "the leave-one-out split falls back to a seeded random hold-out (file order is "
            "not time order). Use the official ratings.dat for the chronological protocol."
        )
        warnings.warn(message, stacklevel=3)
        notes.append(message)
    else:
        raise DatasetNotFoundError(
            f"ml-1m: neither {source.where('ratings.dat')} nor "
            f"{source.where('interactions.tsv')} exists; get ratings.dat from "
            f"{OFFICIAL_ZIPS['ml-1m'].url}"
        )

    movies = read_delimited(
        source.read_bytes("movies.dat"),
        where=source.where("movies.dat"),
        sep="::",
        names=["item_id", "raw_title", "genres"],
        encoding="latin-1",
        ints=("item_id",),
        fmt="MovieID::Title::Genres",
    )
    titles, years = _split_titles(movies["raw_title"])
    items = pd.DataFrame(
        {
            "title": titles,
            "year": pd.array(years, dtype="Int64"),
            "genres": movies["genres"].str.strip().to_numpy(),
            "summary": "",
        },
        index=pd.Index(movies["item_id"].to_numpy(), name="item_id"),
    )
    _check_unique(items.index, source.where("movies.dat"))
    if source.exists("movie_summaries.csv"):
        items["summary"] = _read_summaries(source, items.index)
        notes.append(
            "ml-1m: plot summaries from movie_summaries.csv (its rating column is ignored)"
        )

    users = pd.DataFrame(
        columns=["gender", "age", "occupation", "zip_code"], index=pd.Index([], name="user_id")
    )
    if source.exists("users.dat"):
        raw = read_delimited(
            source.read_bytes("users.dat"),
            where=source.where("users.dat"),
            sep="::",
            names=["user_id", "gender", "age", "occupation", "zip_code"],
            encoding="latin-1",
            ints=("user_id", "age", "occupation"),
            fmt="UserID::Gender::Age::Occupation::Zip-code",
        )
        occupation = [
            ML1M_OCCUPATIONS[o] if 0 <= o < len(ML1M_OCCUPATIONS) else str(o)
            for o in raw["occupation"]
        ]
        users = raw.set_index("user_id")[["gender", "age", "zip_code"]]
        users.insert(2, "occupation", occupation)
    return finish("ml-1m", inter, items, users, has_ratings, has_timestamps, notes)


def _read_summaries(source: FileSource, index: pd.Index) -> pd.Series:
    """``summary`` per movie id from movie_summaries.csv (a real CSV with quoting)."""
    where = source.where("movie_summaries.csv")
    try:
        frame = pd.read_csv(
            io.BytesIO(source.read_bytes("movie_summaries.csv")),
            usecols=["movie_id", "summary"],
            dtype={"movie_id": "int64", "summary": str},
            keep_default_na=False,
            encoding="utf-8",
            encoding_errors="replace",
        )
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataFormatError(
            f"{where}: {exc}; expected a CSV with columns movie_id, summary"
        ) from exc
    frame = frame.drop_duplicates("movie_id").set_index("movie_id")
    return frame["summary"].str.strip().reindex(index).fillna("")


# ----------------------------------------------------------------------------- ML-100K


def load_ml100k(source: FileSource) -> InteractionData:
    """ML-100K from its official folder or zip (``u.data``, ``u.item``, ``u.user``)."""
    inter = read_delimited(
        source.read_bytes("u.data"),
        where=source.where("u.data"),
        sep="\t",
        names=["user_id", "item_id", "rating", "timestamp"],
        ints=("user_id", "item_id", "timestamp"),
        floats=("rating",),
        fmt="user<TAB>item<TAB>rating<TAB>timestamp",
    )
    inter["timestamp"] = inter["timestamp"].astype("Int64")

    genre_names = list(ML100K_GENRES)
    if source.exists("u.genre"):
        # u.genre lists "name|index"; trust it over the built-in list when present.
        text = source.read_bytes("u.genre").decode("latin-1")
        pairs = [line.rsplit("|", 1) for line in text.splitlines() if line.strip()]
        try:
            genre_names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
        except (ValueError, IndexError) as exc:
            raise DataFormatError(
                f"{source.where('u.genre')}: expected lines 'genre|index'"
            ) from exc
    names = ["item_id", "raw_title", "release_date", "video_date", "url"] + [
        f"g{i}" for i in range(len(genre_names))
    ]
    movies = read_delimited(
        source.read_bytes("u.item"),
        where=source.where("u.item"),
        sep="|",
        names=names,
        encoding="latin-1",
        ints=("item_id",) + tuple(f"g{i}" for i in range(len(genre_names))),
        fmt=f"{len(names)} '|'-separated fields (id|title|release date|video date|URL|"
        f"{len(genre_names)} genre flags)",
    )
    titles, years = _split_titles(movies["raw_title"])
    # Titles without a year (e.g. "unknown"): fall back to the release date's year.
    release_year = pd.to_datetime(
        movies["release_date"], format="%d-%b-%Y", errors="coerce"
    ).dt.year
    years = [
        y if y is not None else (int(r) if pd.notna(r) else None)
        for y, r in zip(years, release_year)
    ]
    flags = movies[[f"g{i}" for i in range(len(genre_names))]].to_numpy()
    genres = [
        # "unknown" is the absence of a genre, not a genre.
        "|".join(g for g, f in zip(genre_names, row) if f and g != "unknown")
        for row in flags
    ]
    items = pd.DataFrame(
        {"title": titles, "year": pd.array(years, dtype="Int64"), "genres": genres, "summary": ""},
        index=pd.Index(movies["item_id"].to_numpy(), name="item_id"),
    )
    _check_unique(items.index, source.where("u.item"))

    users = pd.DataFrame(
        columns=["age", "gender", "occupation", "zip_code"], index=pd.Index([], name="user_id")
    )
    if source.exists("u.user"):
        raw = read_delimited(
            source.read_bytes("u.user"),
            where=source.where("u.user"),
            sep="|",
            names=["user_id", "age", "gender", "occupation", "zip_code"],
            encoding="latin-1",
            ints=("user_id", "age"),
            fmt="user id|age|gender|occupation|zip code",
        )
        users = raw.set_index("user_id")
    return finish("ml-100k", inter, items, users, True, True, [])


# ----------------------------------------------------------------------------- shared


def _check_unique(index: pd.Index, where: str) -> None:
    if not index.is_unique:
        dup = index[index.duplicated()][0]
        raise DataFormatError(f"{where}: item id {dup} appears more than once")


def finish(
    name: str,
    inter: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame,
    has_ratings: bool,
    has_timestamps: bool,
    notes: list[str],
) -> InteractionData:
    """Common tail of every loader: column order, placeholder rows for unknown ids."""
    inter = inter[["user_id", "item_id", "rating", "timestamp"]].reset_index(drop=True)
    inter["rating"] = inter["rating"].astype("float64")
    inter["timestamp"] = inter["timestamp"].astype("Int64")
    missing = pd.Index(inter["item_id"].unique()).difference(items.index)
    if len(missing):
        # Keep the interactions: an unnamed item is better than a silently shorter history.
        filler = pd.DataFrame(
            {
                "title": [f"Item {i}" for i in missing],
                "year": pd.array([pd.NA] * len(missing), dtype="Int64"),
                "genres": "",
                "summary": "",
            },
            index=pd.Index(missing, name=items.index.name),
        )
        items = pd.concat([items, filler])
        notes.append(
            f"{name}: {len(missing)} item ids have interactions but no metadata; titled 'Item <id>'"
        )
    missing_users = pd.Index(inter["user_id"].unique()).difference(users.index)
    if len(missing_users):
        users = users.reindex(users.index.append(missing_users))
    items.index.name = "item_id"
    users.index.name = "user_id"
    items["year"] = items["year"].astype("Int64")
    items["title"] = items["title"].astype(str)
    return InteractionData(
        name=name,
        interactions=inter,
        items=items[["title", "year", "genres", "summary"]],
        users=users,
        has_ratings=has_ratings,
        has_timestamps=has_timestamps,
        notes=notes,
    )
