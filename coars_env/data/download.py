"""Finding, downloading and verifying dataset files.

Where data lives: ``data_dir`` if given, else ``$COARS_DATA_DIR``, else a per-user cache
(``$XDG_CACHE_HOME/coars`` or ``~/.cache/coars``). Each dataset has its own folder
``<root>/<name>/`` (``ml-1m``, ``ml-100k``, ``lastfm``).

Only the two MovieLens archives have an official download (GroupLens). They are fetched
with urllib into a temporary file next to the destination, checked against the published
MD5, renamed into place with ``os.replace`` (so a crash never leaves a half-written zip
under the final name) and extracted. The fetch function is a parameter so that every path
can be tested without a network.

All errors name the file concerned and say what to do.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


class DatasetError(Exception):
    """Base class of all dataset errors raised by coars_env.data."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset's files are not where they should be (and could not be downloaded)."""


class DownloadError(DatasetError, OSError):
    """A download failed (no network, HTTP error, truncated transfer)."""


class ChecksumError(DatasetError, ValueError):
    """A file's MD5 differs from the published one."""


class DataFormatError(DatasetError, ValueError):
    """A file does not have the expected format (the message names file and line)."""


@dataclass(frozen=True)
class OfficialZip:
    """An official dataset archive: where to get it and how to recognise it."""

    name: str  # dataset name, also the archive's top-level folder
    url: str
    md5: str
    files: tuple[str, ...]  # the files the loader needs, inside <name>/


OFFICIAL_ZIPS: dict[str, OfficialZip] = {
    "ml-1m": OfficialZip(
        name="ml-1m",
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        md5="c4d9eecfca2ab87c1945afe126590906",
        files=("ratings.dat", "movies.dat", "users.dat"),
    ),
    "ml-100k": OfficialZip(
        name="ml-100k",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        md5="0e33842e24a9c977be4e0107933c0723",
        files=("u.data", "u.item", "u.user"),
    ),
}

Fetch = Callable[[str, Path], None]


def default_data_root() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/coars`` or ``~/.cache/coars``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "coars"


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$COARS_DATA_DIR``, else :func:`default_data_root`."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("COARS_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return default_data_root()


# ----------------------------------------------------------------------------- download


def fetch_url(url: str, dest: Path, *, timeout: float = 60.0) -> None:
    """Default fetcher: stream ``url`` into ``dest`` with urllib; raise DownloadError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, out, length=1 << 20)
            got = out.tell()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"could not download {url}: {reason}") from exc
    # A dropped connection can end the stream early without an exception.
    if expected is not None and expected.isdigit() and int(expected) != got:
        raise DownloadError(f"download of {url} was truncated: got {got} of {expected} bytes")


def md5sum(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: str | os.PathLike, expected: str, *, source: str = "") -> None:
    """Raise ChecksumError naming ``path`` when its MD5 is not ``expected``."""
    actual = md5sum(path)
    if actual != expected.lower():
        size = os.path.getsize(path)
        where = f" (from {source})" if source else ""
        raise ChecksumError(
            f"checksum mismatch for {path}{where}: expected MD5 {expected}, got {actual} "
            f"({size} bytes). The file is corrupt, truncated or not the official archive. "
            f"Delete it, then download it again"
            + (f" from {source}" if source else "")
            + f" (by hand if needed) and place it at {path}, after checking its MD5."
        )


def download_file(
    url: str, dest: str | os.PathLike, *, md5: str | None, fetch: Fetch | None = None
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``md5`` before the rename.

    The data go to a temporary file in ``dest``'s folder; only a complete, verified file
    is moved to ``dest`` (``os.replace``). ``fetch(url, path)`` defaults to :func:`fetch_url`.
    """
    dest = Path(dest)
    fetch = fetch or fetch_url
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise DownloadError(
            f"cannot write into {dest.parent} ({exc}); choose a writable data_dir or set "
            f"COARS_DATA_DIR to a writable folder"
        ) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fetch(url, tmp)
        actual = md5sum(tmp)
        if md5 is not None and actual != md5.lower():
            raise ChecksumError(
                f"downloaded {dest.name} from {url} has the wrong checksum: expected MD5 "
                f"{md5}, got {actual} ({tmp.stat().st_size} bytes); nothing was saved. "
                f"Retry later; if it persists, download {url} by hand, check its MD5 and "
                f"place it at {dest}."
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def check_zip(path: str | os.PathLike) -> None:
    """Raise DataFormatError when ``path`` is not a complete, readable zip archive."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DataFormatError(
            f"{path} is not a readable zip archive ({exc}); it is probably truncated. "
            f"Delete it and download it again."
        ) from exc
    if bad is not None:
        raise DataFormatError(
            f"{path}: member {bad} is corrupt (CRC error); delete the zip and download it again."
        )


def extract_zip(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Extract ``path`` into ``root``; members must stay inside ``root``.

    Extraction goes to a temporary folder first; its top-level entries are then moved
    into ``root`` one by one (merging into an existing dataset folder).
    """
    root = Path(root)
    check_zip(path)
    with zipfile.ZipFile(path) as zf:
        inside = root.resolve()
        for member in zf.namelist():
            if not (root / member).resolve().is_relative_to(inside):
                raise DataFormatError(f"{path}: member {member!r} would be written outside {root}")
        with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
            zf.extractall(tmp)
            for entry in Path(tmp).iterdir():
                _move_into(entry, root / entry.name)


def _move_into(src: Path, dest: Path) -> None:
    if src.is_dir() and dest.is_dir():
        for child in src.iterdir():
            _move_into(child, dest / child.name)
    else:
        os.replace(src, dest)


def download_official(name: str, root: str | os.PathLike, *, fetch: Fetch | None = None) -> Path:
    """Download, verify and extract an official MovieLens zip; return ``<root>/<name>``."""
    spec = OFFICIAL_ZIPS[name]
    root = Path(root)
    zip_path = root / f"{name}.zip"
    try:
        download_file(spec.url, zip_path, md5=spec.md5, fetch=fetch)
    except DownloadError as exc:
        raise DownloadError(f"{exc}\n{manual_instructions(name, root)}") from exc
    extract_zip(zip_path, root)
    return root / name


def manual_instructions(name: str, root: Path) -> str:
    """How to put a dataset in place by hand."""
    spec = OFFICIAL_ZIPS.get(name)
    if spec is None:
        return f"Place the dataset's files in {root / name}/."
    return (
        f"Without network access, download {spec.url} (MD5 {spec.md5}) elsewhere and either "
        f"place it at {root / (name + '.zip')} or extract it so that "
        f"{root / name / spec.files[0]} exists (needs {', '.join(spec.files)}). "
        f"Set COARS_DATA_DIR or pass data_dir to use another folder."
    )


# ----------------------------------------------------------------------------- reading


class FileSource:
    """Files of one dataset, in a folder or inside a zip's ``<prefix>/`` folder."""

    def __init__(self, folder: Path | None = None, zip_path: Path | None = None, prefix: str = ""):
        if (folder is None) == (zip_path is None):
            raise ValueError("give exactly one of folder and zip_path")
        self.folder = folder
        self.zip_path = zip_path
        self.prefix = prefix
        self._names: set[str] = set()
        if zip_path is not None:
            check_zip(zip_path)
            with zipfile.ZipFile(zip_path) as zf:
                self._names = set(zf.namelist())

    def exists(self, name: str) -> bool:
        if self.folder is not None:
            return (self.folder / name).is_file()
        return self.prefix + name in self._names

    def where(self, name: str) -> str:
        """How to name this file in messages."""
        if self.folder is not None:
            return str(self.folder / name)
        return f"{self.zip_path}:{self.prefix}{name}"

    def read_bytes(self, name: str) -> bytes:
        if not self.exists(name):
            raise DatasetNotFoundError(f"missing file {self.where(name)}")
        if self.folder is not None:
            return (self.folder / name).read_bytes()
        with zipfile.ZipFile(self.zip_path) as zf:
            return zf.read(self.prefix + name)


def read_delimited(
    data: bytes,
    *,
    where: str,
    sep: str,
    names: list[str],
    encoding: str = "utf-8",
    skiprows: int = 0,
    ints: tuple[str, ...] = (),
    floats: tuple[str, ...] = (),
    fmt: str = "",
) -> pd.DataFrame:
    """Parse a delimited text file fast, with errors that name the file and line.

    Other separators (MovieLens ``::``, ``|``) are rewritten to a tab first so that pandas'
    C parser can be used (its python engine is ~20x slower on ML-1M). Quotes are
    not special (titles contain ``"``). Every non-blank line after ``skiprows`` must have
    ``len(names)`` fields; ``ints``/``floats`` columns must parse fully; other columns stay
    ``str``. ``fmt`` describes the expected line format for messages.
    """
    expected = f"expected {fmt}" if fmt else f"expected {len(names)} fields"
    if sep != "\t":
        if b"\t" in data:
            # A tab would become a field separator after the rewrite.
            line_no = data[: data.index(b"\t")].count(b"\n") + 1
            raise DataFormatError(f"{where}, line {line_no}: unexpected tab character; {expected}")
        data = data.replace(sep.encode(encoding), b"\t")
    lines = _Lines(data, skiprows)
    shown_sep = sep if sep != "\t" else None
    bad = np.flatnonzero(lines.tabs != len(names) - 1)
    if len(bad):
        row = int(bad[0])
        got = int(lines.tabs[row]) + 1
        raise DataFormatError(
            f"{where}, line {lines.line_no(row)}: {got} fields, {expected}; "
            f"got {lines.text(row, encoding, shown_sep)!r}"
        )
    numeric = set(ints) | set(floats)
    try:
        df = pd.read_csv(
            io.BytesIO(data),
            sep="\t",
            header=None,
            names=names,
            skiprows=skiprows,
            dtype={c: str for c in names if c not in numeric},
            keep_default_na=False,
            quoting=3,  # csv.QUOTE_NONE
            encoding=encoding,
            engine="c",
            skip_blank_lines=True,
        )
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataFormatError(f"{where}: {exc}; {expected}") from exc
    for col in ints + floats:
        values = df[col]
        if not pd.api.types.is_numeric_dtype(values):
            values = pd.to_numeric(values, errors="coerce")
        problem = values.isna().to_numpy()
        what = f"column {col!r} is not a number"
        if not problem.any() and col in ints:
            problem = (values != values.round()).to_numpy()
            what = f"column {col!r} is not an integer"
        if problem.any():
            row = int(problem.nonzero()[0][0])
            raise DataFormatError(
                f"{where}, line {lines.line_no(row)}: {what}; {expected}; "
                f"got {lines.text(row, encoding, shown_sep)!r}"
            )
        df[col] = values.astype("int64" if col in ints else "float64")
    return df


class _Lines:
    """Line boundaries and tab counts of the non-blank lines of a text (vectorised)."""

    def __init__(self, data: bytes, skiprows: int):
        self.data = data
        arr = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(arr == 10)
        if len(arr) and arr[-1] != 10:
            ends = np.append(ends, len(arr))
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        tab_cum = np.concatenate([[0], np.cumsum(arr == 9)])
        numbers = np.arange(1, len(ends) + 1)
        # Blank (or whitespace/CR-only) lines are skipped by the parser too.
        length = ends - starts
        blank = length == 0
        short = np.flatnonzero((length > 0) & (length <= 2))
        for i in short:
            blank[i] = not data[starts[i] : ends[i]].strip()
        keep = ~blank & (numbers > skiprows)
        self.starts, self.ends, self.numbers = starts[keep], ends[keep], numbers[keep]
        self.tabs = tab_cum[self.ends] - tab_cum[self.starts]

    def line_no(self, row: int) -> int:
        return int(self.numbers[row])

    def text(self, row: int, encoding: str, sep: str | None) -> str:
        line = self.data[self.starts[row] : self.ends[row]].decode(encoding, errors="replace")
        return line.rstrip("\r").replace("\t", sep) if sep else line.rstrip("\r")
