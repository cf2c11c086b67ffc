"""Dataset loaders: exact official formats on small fixtures, download errors, real counts."""

from __future__ import annotations

import dataclasses
import hashlib
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from coars_env.data import (
    DATASETS,
    ChecksumError,
    DataFormatError,
    DatasetNotFoundError,
    DownloadError,
    download,
    load_interactions,
    resolve_data_root,
)
from coars_env.data.lastfm import load_lastfm
from coars_env.data.movielens import split_title_year
from coars_env.data.synthetic import generate_synthetic

# ----------------------------------------------------------------------------- fixtures
# Written in each dataset's exact official format (bytes, so encodings are explicit).

ML1M_RATINGS = (
    "1::1193::5::978300760\n"
    "1::661::3::978302109\n"
    "1::914::3::978301968\n"
    "2::1193::4::978298413\n"
    "2::73::5::978299000\n"
)
ML1M_MOVIES = (
    "73::Misérables, Les (1995)::Drama|Musical\n"
    "47::Seven (Se7en) (1995)::Crime|Thriller\n"
    "29::City of Lost Children, The (1995)::Adventure|Sci-Fi\n"
    "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
    "914::My Fair Lady (1964)::Musical|Romance\n"
    "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
    '3030::"Great Race, The" (1965)::Comedy\n'
)
ML1M_USERS = "1::F::1::10::48067\n2::M::56::16::70072\n"


def write_ml1m(root: Path, ratings: str = ML1M_RATINGS) -> Path:
    folder = root / "ml-1m"
    folder.mkdir(parents=True)
    (folder / "ratings.dat").write_bytes(ratings.encode("latin-1"))
    (folder / "movies.dat").write_bytes(ML1M_MOVIES.encode("latin-1"))
    (folder / "users.dat").write_bytes(ML1M_USERS.encode("latin-1"))
    return folder


def ml100k_item_line(item: int, title: str, date: str, genres: set[int]) -> str:
    flags = "|".join("1" if g in genres else "0" for g in range(19))
    return f"{item}|{title}|{date}||http://us.imdb.com/x|{flags}\n"


def write_ml100k(root: Path) -> Path:
    folder = root / "ml-100k"
    folder.mkdir(parents=True)
    # User 1 rates 3 then 2 at the same second: file order must break the tie.
    (folder / "u.data").write_bytes(b"1\t3\t4\t881250949\n1\t2\t5\t881250949\n2\t1\t1\t881250000\n")
    items = (
        ml100k_item_line(1, "Toy Story (1995)", "01-Jan-1995", {3, 4, 5})
        + ml100k_item_line(2, "Misérables, Les (1995)", "01-Jan-1995", {8, 12})
        + ml100k_item_line(3, "unknown", "", {0})
    )
    (folder / "u.item").write_bytes(items.encode("latin-1"))
    (folder / "u.user").write_bytes(b"1|24|M|technician|85711\n2|53|F|other|94043\n")
    return folder


def write_lastfm(root: Path, *, test: bool = False) -> Path:
    folder = root / "lastfm"
    folder.mkdir(parents=True)
    # User A: 0 1 2 3 4 ; user B: 5 6 7 0 8 (windows of at most 3 here).
    rows = ["", "0", "0 1", "0 1 2", "1 2 3", "", "5", "5 6", "5 6 7", "6 7 0"]
    nexts = [0, 1, 2, 3, 4, 5, 6, 7, 0, 8]
    train = "history\tnext\n" + "".join(f"{h}\t{n}\n" for h, n in zip(rows, nexts))
    (folder / "train.tsv").write_text(train, encoding="utf-8")
    (folder / "valid.tsv").write_text("history\tnext\n2 3 4\t9\n", encoding="utf-8")
    if test:
        (folder / "test.tsv").write_text("history\tnext\n7 8\t1\n", encoding="utf-8")
    names = "".join(f"{i}::Artist {i}\n" for i in range(10)).replace("Artist 2", "Café Del Mar")
    (folder / "id2name.txt").write_text(names, encoding="utf-8")
    return folder


def make_zip(path: Path, folder: Path, prefix: str) -> str:
    """Zip ``folder``'s files under ``prefix/``; return the archive's MD5."""
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{prefix}/{f.name}")
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def official_md5(monkeypatch):
    """Pretend a local test zip is the official archive (set its MD5)."""

    def set_md5(name: str, md5: str) -> None:
        spec = dataclasses.replace(download.OFFICIAL_ZIPS[name], md5=md5)
        monkeypatch.setitem(download.OFFICIAL_ZIPS, name, spec)

    return set_md5


# ----------------------------------------------------------------------------- MovieLens


@pytest.mark.parametrize(
    "raw, title, year",
    [
        ("Toy Story (1995)", "Toy Story", 1995),
        ("Seven (Se7en) (1995)", "Seven (Se7en)", 1995),
        ("City of Lost Children, The (1995)", "City of Lost Children, The", 1995),
        ("Slingshot, The (Kådisbellan ) (1993)", "Slingshot, The (Kådisbellan )", 1993),
        ("unknown", "unknown", None),
        ("1900 (Novecento)", "1900 (Novecento)", None),
    ],
)
def test_split_title_year(raw, title, year):
    assert split_title_year(raw) == (title, year)


def test_ml1m_official_folder(tmp_path):
    write_ml1m(tmp_path)
    data = load_interactions("ml-1m", tmp_path, download=False)
    assert data.has_ratings and data.has_timestamps
    inter = data.interactions
    assert list(inter.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert inter["item_id"].tolist() == [1193, 661, 914, 1193, 73]  # file order kept
    assert inter["rating"].dtype == np.float64 and inter["timestamp"].dtype == "Int64"
    assert inter["timestamp"].iloc[0] == 978300760
    items = data.items
    assert items.loc[73, "title"] == "Misérables, Les"  # latin-1 accents decoded
    assert items.loc[47, ["title", "year"]].tolist() == ["Seven (Se7en)", 1995]
    assert items.loc[29, "title"] == "City of Lost Children, The"
    assert items.loc[3030, "title"] == '"Great Race, The"'  # quotes are not CSV quoting
    assert items.loc[661, "genres"] == "Animation|Children's|Musical"
    assert len(items) == 7 and items.loc[73, "summary"] == ""
    assert data.users.loc[1, "occupation"] == "K-12 student"
    assert data.users.loc[2, "age"] == 56


def test_ml1m_interactions_tsv_warns_and_summaries(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "interactions.tsv").write_text("user_id\tmovie_id\n1\t73\n1\t47\n2\t29\n")
    (folder / "movies.dat").write_bytes(ML1M_MOVIES.encode("latin-1"))
    (folder / "movie_summaries.csv").write_text(
        "movie_id,title,genres,rating,summary\n"
        '73,MisÃ©rables,Drama,8.5,"A man, once a convict, seeks redemption."\n'
        "47,Seven,Crime,N/A? unclear,Two detectives hunt a killer.\n",
        encoding="utf-8",
    )
    with pytest.warns(UserWarning, match="random hold-out"):
        data = load_interactions("ml-1m", tmp_path, download=False)
    assert not data.has_ratings and not data.has_timestamps
    assert data.interactions["rating"].isna().all() and data.interactions["timestamp"].isna().all()
    assert any("random hold-out" in n for n in data.notes)
    assert data.items.loc[73, "title"] == "Misérables, Les"  # from movies.dat, not the CSV
    assert data.items.loc[73, "summary"] == "A man, once a convict, seeks redemption."
    assert data.items.loc[47, "summary"] == "Two detectives hunt a killer."
    assert data.items.loc[29, "summary"] == ""
    assert "rating" not in data.items.columns


def test_ml1m_malformed_line_names_file_and_line(tmp_path):
    write_ml1m(tmp_path, ratings="1::1193::5::978300760\n1::661::3::978302109\n1::914::3\n")
    with pytest.raises(
        DataFormatError, match=r"ratings\.dat, line 3: 3 fields.*UserID::MovieID::Rating::Timestamp"
    ):
        load_interactions("ml-1m", tmp_path, download=False)
    (tmp_path / "ml-1m" / "ratings.dat").write_text("1::1193::5::978300760\n1::abc::3::978302109\n")
    with pytest.raises(
        DataFormatError, match=r"ratings\.dat, line 2: column 'item_id' is not a number"
    ):
        load_interactions("ml-1m", tmp_path, download=False)


def test_ml1m_from_zip(tmp_path, official_md5):
    src = write_ml1m(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    official_md5("ml-1m", make_zip(root / "ml-1m.zip", src, "ml-1m"))
    data = load_interactions("ml-1m", root, download=False)
    assert len(data.interactions) == 5 and data.items.loc[73, "title"] == "Misérables, Les"


def test_ml1m_zip_with_wrong_checksum(tmp_path):
    src = write_ml1m(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    actual = make_zip(root / "ml-1m.zip", src, "ml-1m")
    with pytest.raises(ChecksumError) as err:
        load_interactions("ml-1m", root, download=False)
    message = str(err.value)
    assert str(root / "ml-1m.zip") in message
    assert "c4d9eecfca2ab87c1945afe126590906" in message and actual in message
    assert "download" in message.lower()


def test_ml100k_official_layout(tmp_path):
    write_ml100k(tmp_path)
    data = load_interactions("ml-100k", tmp_path, download=False)
    assert data.name == "ml-100k" and data.has_ratings and data.has_timestamps
    assert data.interactions["item_id"].tolist() == [3, 2, 1]
    assert data.items.loc[1, ["title", "year", "genres"]].tolist() == [
        "Toy Story",
        1995,
        "Animation|Children's|Comedy",
    ]
    assert data.items.loc[2, "title"] == "Misérables, Les"
    assert data.items.loc[2, "genres"] == "Drama|Musical"
    assert data.items.loc[3, "title"] == "unknown" and pd.isna(data.items.loc[3, "year"])
    assert data.items.loc[3, "genres"] == ""  # the "unknown" genre flag means no genre
    assert data.users.loc[2, "occupation"] == "other"


def test_ml100k_recbole_atomic_fallback(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t3\t4\t881250949\n1\t2\t5\t881250949\n"
    )
    (folder / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "2\tMisérables, Les\t1995\tDrama Musical\n3\tunkonwn\tunkonwn\tunknown\n",
        encoding="utf-8",
    )
    (folder / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\n1\t24\tM\n")
    data = load_interactions("ml-100k", tmp_path, download=False)
    assert data.name == "ml-100k"
    assert data.interactions["timestamp"].tolist() == [881250949, 881250949]
    assert data.items.loc[2, ["title", "year", "genres"]].tolist() == [
        "Misérables, Les",
        1995,
        "Drama|Musical",
    ]
    assert pd.isna(data.items.loc[3, "year"]) and data.items.loc[3, "genres"] == ""
    assert data.users.loc[1, "gender"] == "M"


# ----------------------------------------------------------------------------- RecBole


def test_recbole_generic_folder(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "books.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\tb1\t4.5\t100\nu1\tb2\t2\t90\nu2\tb1\t5\t50\n"
    )
    (folder / "books.item").write_text(
        "item_id:token\ttitle:token_seq\tgenre:token_seq\temb:float_seq\n"
        "b1\tThe Name, of the Rose\tmystery history\t0.1 0.2\n"
    )
    data = load_interactions(f"recbole:{folder}")
    assert data.name == "recbole:" + str(folder)
    assert data.interactions["user_id"].tolist() == ["u1", "u1", "u2"]
    assert data.interactions["rating"].tolist() == [4.5, 2.0, 5.0]
    assert data.items.loc["b1", ["title", "genres"]].tolist() == [
        "The Name, of the Rose",
        "mystery|history",
    ]
    assert data.items.loc["b2", "title"] == "Item b2"  # no metadata: placeholder, noted
    assert any("no metadata" in n for n in data.notes)
    # Relative folder names resolve under the data root.
    assert len(load_interactions("recbole:books", tmp_path).interactions) == 3


def test_recbole_bad_header_and_missing(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "x.inter").write_text("user_id\titem_id:token\n1\t2\n")
    with pytest.raises(DataFormatError, match=r"x\.inter, line 1: header column 'user_id'"):
        load_interactions(f"recbole:{folder}")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_interactions(f"recbole:{tmp_path / 'nope'}")


# ----------------------------------------------------------------------------- Last.fm


def test_lastfm_rebuilds_users_and_fixed_targets(tmp_path):
    write_lastfm(tmp_path)
    data = load_interactions("lastfm", tmp_path, seed=0)
    seqs = data.interactions.groupby("user_id", sort=False)["item_id"].apply(list)
    assert seqs[0] == [0, 1, 2, 3, 4] and seqs[1] == [5, 6, 7, 0, 8]
    assert seqs[2] == [2, 3, 4, 9]  # the validation user: history + next
    assert data.users["group"].tolist()[2] == "valid"
    assert data.fixed_targets[2] == (9, None)
    assert data.items.loc[2, "title"] == "Café Del Mar"
    assert not data.has_ratings and not data.has_timestamps
    # No test.tsv: one training user (as many as valid users) holds out its last item.
    carved = [u for u, (v, t) in data.fixed_targets.items() if t is not None]
    assert len(carved) == 1 and data.fixed_targets[carved[0]] == (None, seqs[carved[0]][-1])
    assert any("CARVED" in n for n in data.notes)


def test_lastfm_carving_is_seeded_and_optional(tmp_path):
    write_lastfm(tmp_path)
    picks = {
        seed: sorted(
            u
            for u, (_, t) in load_lastfm(tmp_path / "lastfm", seed=seed).fixed_targets.items()
            if t is not None
        )
        for seed in range(6)
    }
    assert picks[0] == sorted(
        u
        for u, (_, t) in load_lastfm(tmp_path / "lastfm", seed=0).fixed_targets.items()
        if t is not None
    )
    assert (
        len({tuple(p) for p in picks.values()}) == 2
    )  # both training users get picked by some seed
    none = load_lastfm(tmp_path / "lastfm", carve_test=False)
    assert all(t is None for _, t in none.fixed_targets.values())
    assert any("test split is empty" in n for n in none.notes)


def test_lastfm_with_test_file(tmp_path):
    write_lastfm(tmp_path, test=True)
    data = load_interactions("lastfm", tmp_path)
    assert data.fixed_targets[3] == (None, 1)
    assert data.users.loc[3, "group"] == "test"
    assert sum(t is not None for _, t in data.fixed_targets.values()) == 1  # nothing carved


def test_lastfm_inconsistent_window_and_missing(tmp_path):
    folder = write_lastfm(tmp_path)
    (folder / "train.tsv").write_text("history\tnext\n\t0\n0\t1\n0 7\t2\n")
    with pytest.raises(DataFormatError, match=r"train\.tsv, line 4: history does not continue"):
        load_interactions("lastfm", tmp_path)
    (folder / "train.tsv").write_text("history\tnext\n\t0\n0\tx\n")
    with pytest.raises(DataFormatError, match=r"train\.tsv, line 3"):
        load_interactions("lastfm", tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"place train\.tsv, valid\.tsv, id2name\.txt"):
        load_interactions("lastfm", tmp_path / "empty")


# ----------------------------------------------------------------------------- download


def test_download_checksum_failure_saves_nothing(tmp_path):
    fake = tmp_path / "fake.zip"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t1\t5\t1\n")

    def fetch(url: str, dest: Path) -> None:
        dest.write_bytes(fake.read_bytes())

    root = tmp_path / "root"
    with pytest.raises(ChecksumError) as err:
        download.download_official("ml-100k", root, fetch=fetch)
    message = str(err.value)
    assert "ml-100k.zip" in message and "0e33842e24a9c977be4e0107933c0723" in message
    assert hashlib.md5(fake.read_bytes()).hexdigest() in message
    assert str(root / "ml-100k.zip") in message  # where to place a manual download
    assert list(root.iterdir()) == []  # no partial or unverified file left behind


def test_download_success_is_extracted_and_loaded(tmp_path, monkeypatch, official_md5):
    src = write_ml100k(tmp_path / "src")
    archive = tmp_path / "official.zip"
    official_md5("ml-100k", make_zip(archive, src, "ml-100k"))
    calls = []

    def fetch(url: str, dest: Path) -> None:
        calls.append(url)
        dest.write_bytes(archive.read_bytes())

    monkeypatch.setattr(download, "fetch_url", fetch)
    root = tmp_path / "root"
    data = load_interactions("ml-100k", root, download=True)
    assert calls == ["https://files.grouplens.org/datasets/movielens/ml-100k.zip"]
    assert (root / "ml-100k" / "u.data").is_file() and len(data.interactions) == 3
    assert not list(root.glob("*.part"))
    load_interactions("ml-100k", root, download=True)  # second call: no new download
    assert len(calls) == 1


def test_download_network_unavailable(tmp_path, monkeypatch):
    def fetch(url: str, dest: Path) -> None:
        raise DownloadError(
            f"could not download {url}: [Errno -3] Temporary failure in name resolution"
        )

    monkeypatch.setattr(download, "fetch_url", fetch)
    with pytest.raises(DownloadError) as err:
        load_interactions("ml-1m", tmp_path, download=True)
    message = str(err.value)
    assert "Without network access" in message and str(tmp_path / "ml-1m.zip") in message
    assert "ratings.dat" in message


def test_fetch_url_reports_unreachable_host(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("Network is unreachable")

    monkeypatch.setattr(download.urllib.request, "urlopen", refuse)
    with pytest.raises(
        DownloadError,
        match="could not download http://example.invalid/x.zip: Network is unreachable",
    ):
        download.fetch_url("http://example.invalid/x.zip", tmp_path / "x.zip")


def test_truncated_zip(tmp_path, official_md5):
    src = write_ml1m(tmp_path / "src")
    full = tmp_path / "full.zip"
    make_zip(full, src, "ml-1m")
    root = tmp_path / "root"
    root.mkdir()
    truncated = root / "ml-1m.zip"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(
        DataFormatError, match=r"ml-1m\.zip is not a readable zip archive.*truncated"
    ):
        download.extract_zip(truncated, root)
    # Through the loader: the checksum catches it first and names the file.
    with pytest.raises(ChecksumError, match=r"ml-1m\.zip"):
        load_interactions("ml-1m", root, download=False)
    official_md5("ml-1m", hashlib.md5(truncated.read_bytes()).hexdigest())
    with pytest.raises(DataFormatError, match="truncated"):
        load_interactions("ml-1m", root, download=False)


def test_missing_folder_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_interactions("ml-1m", tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "ml-1m") in message and "download=True" in message
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in message


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError, match="valid names: synthetic, ml-100k, ml-1m, lastfm, recbole:<folder>"
    ):
        load_interactions("movielens")
    assert DATASETS == ("synthetic", "ml-100k", "ml-1m", "lastfm", "recbole:<folder>")


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("COARS_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv("COARS_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root() == tmp_path / "xdg" / "coars"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_root() == Path.home() / ".cache" / "coars"


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_taste_targets_and_bad_settings():
    data, tastes = generate_synthetic(0, n_users=50, taste_targets=2)
    primary = data.items["genres"].str.split("|").str[0]
    last = data.interactions.groupby("user_id")["item_id"].agg(list)
    assert all((primary[items[-2:]] == tastes.loc[u, "primary"]).all() for u, items in last.items())
    # The third-last item is an ordinary history draw: off the primary genre for some users.
    assert any(primary[items[-3]] != tastes.loc[u, "primary"] for u, items in last.items())
    with pytest.raises(ValueError, match="taste_targets"):
        generate_synthetic(0, taste_targets=0)
    with pytest.raises(ValueError, match="unseen items of their genre left"):
        generate_synthetic(0, n_users=5, min_len=40, max_len=40, taste_targets=25)


def test_synthetic_is_deterministic_per_seed():
    a, b, c = (load_interactions("synthetic", seed=s) for s in (0, 0, 1))
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not a.interactions.equals(c.interactions)
    assert a.items["title"].is_unique and a.items["title"].str.startswith("The ").all()
    assert 500 <= a.interactions["user_id"].nunique() <= 600 and len(a.items) == 240
    lengths = a.interactions.groupby("user_id").size()
    assert lengths.between(20, 40).all()
    # Strictly increasing timestamps per user: chronological order is unambiguous.
    assert (a.interactions.groupby("user_id")["timestamp"].diff().dropna() > 0).all()


def test_synthetic_carries_a_learnable_taste_signal():
    data, tastes = generate_synthetic(0)
    primary = data.items["genres"].str.split("|").str[0]
    hits, same_genre_negatives = 0, []
    rng = np.random.default_rng(0)
    for user, group in data.interactions.groupby("user_id"):
        seq = group["item_id"].to_numpy()
        target_genre = primary[seq[-1]]
        # The training, validation and test targets all follow the latent taste.
        assert (primary[seq[-3:]] == tastes.loc[user, "primary"]).all()
        assert len(set(seq)) == len(seq)  # targets are unseen items
        hits += primary[seq[:-3]].value_counts().idxmax() == target_genre  # visible in history
        negatives = rng.choice(np.setdiff1d(data.items.index, seq), 19, replace=False)
        same_genre_negatives.append((primary[negatives] == target_genre).sum())
    assert hits / len(tastes) > 0.85
    assert np.mean(same_genre_negatives) < 3  # most random negatives are off-taste
    liked = data.interactions["rating"] >= 4
    in_taste = (
        primary[data.interactions["item_id"]].to_numpy()
        == tastes.loc[data.interactions["user_id"], "primary"].to_numpy()
    )
    assert liked[in_taste].mean() > 0.8 and liked[~in_taste].mean() < 0.5


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_ml100k_counts(data_dir):
    data = load_interactions("ml-100k", data_dir, download=False)
    inter = data.interactions
    assert (
        len(inter) == 100_000
        and inter["user_id"].nunique() == 943
        and inter["item_id"].nunique() == 1682
    )
    assert data.has_ratings and data.has_timestamps
    assert data.items.loc[1, ["title", "year"]].tolist() == ["Toy Story", 1995]
    assert data.items.loc[11, "title"] == "Seven (Se7en)"
    # Every title/year matches the file row with the same id (no index misalignment).
    raw = pd.read_csv(
        data_dir / "ml-100k" / "ml-100k.item", sep="\t", dtype=str, quoting=3, keep_default_na=False
    )
    raw.columns = [c.split(":")[0] for c in raw.columns]
    raw = raw.set_index(raw["item_id"].astype(int))
    assert (data.items.loc[raw.index, "title"] == raw["movie_title"]).all()
    years = pd.to_numeric(raw["release_year"], errors="coerce")
    assert (
        data.items.loc[raw.index, "year"].astype("float64").fillna(-1) == years.fillna(-1)
    ).all()


@pytest.mark.slow
def test_real_ml1m_counts_and_speed(data_dir):
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="random hold-out"):
        data = load_interactions("ml-1m", data_dir, download=False)
    elapsed = time.perf_counter() - start
    inter = data.interactions
    assert (
        len(inter) == 1_000_209
        and inter["user_id"].nunique() == 6040
        and inter["item_id"].nunique() == 3706
    )
    assert len(data.items) == 3883 and data.items["summary"].ne("").sum() > 3800
    assert data.items.loc[1, ["title", "year"]].tolist() == ["Toy Story", 1995]
    assert elapsed < 20, f"loading ML-1M took {elapsed:.1f}s"


@pytest.mark.slow
def test_real_lastfm_counts(data_dir):
    data = load_interactions("lastfm", data_dir)
    groups = data.users["group"]
    assert groups.isin(["train", "train+test"]).sum() == 976 and (groups == "valid").sum() == 122
    assert len(data.items) == 4606
    train_users = groups.index[groups != "valid"]
    assert data.interactions["user_id"].isin(train_users).sum() == 50_800  # one row per item
    valid = pd.read_csv(
        data_dir / "lastfm" / "valid.tsv", sep="\t", dtype=str, keep_default_na=False
    )
    valid_targets = [v for v, _ in data.fixed_targets.values() if v is not None]
    assert valid_targets == valid["next"].astype(int).tolist()
