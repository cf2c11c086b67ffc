"""Datasets for CoARS: loaders into the common InteractionData form.

``load_interactions(name)`` reads one dataset; ``sessions.split_leave_one_out`` turns it
into train/valid/test. Data root: ``data_dir``, else ``$COARS_DATA_DIR``, else
``$XDG_CACHE_HOME/coars`` (``~/.cache/coars``); each dataset in ``<root>/<name>/``.
See ``datasets/README.md`` for how to get each dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

from coars_env.data.common import InteractionData
from coars_env.data.download import (
    ChecksumError,
    DataFormatError,
    DatasetError,
    DatasetNotFoundError,
    DownloadError,
    default_data_root,
    resolve_data_root,
)

DATASETS = ("synthetic", "ml-100k", "ml-1m", "lastfm", "recbole:<folder>")

__all__ = [
    "DATASETS",
    "ChecksumError",
    "DataFormatError",
    "DatasetError",
    "DatasetNotFoundError",
    "DownloadError",
    "InteractionData",
    "default_data_root",
    "load_interactions",
    "resolve_data_root",
]


def load_interactions(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    download: bool = True,
) -> InteractionData:
    """Load dataset ``name`` (one of :data:`DATASETS`) as :class:`InteractionData`.

    ``seed`` drives what a dataset generates or carves: the synthetic data, and the
    Last.fm test users when there is no ``test.tsv``. ``download`` lets the MovieLens
    loaders fetch the official zip (MD5-checked) when no local copy exists.
    ``recbole:<folder>``: ``folder`` is a path, or a folder name under the data root.
    """
    # Imported here so that `import coars_env.data` stays cheap and cycle-free.
    from coars_env.data import lastfm, movielens, recbole, synthetic

    if name == "synthetic":
        return synthetic.load_synthetic(seed)
    if name.startswith("recbole:"):
        folder = Path(name.split(":", 1)[1]).expanduser()
        if not folder.is_absolute() and not folder.is_dir():
            folder = resolve_data_root(data_dir) / folder
        return recbole.load_recbole(folder, name=name)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    root = resolve_data_root(data_dir)
    if name == "lastfm":
        return lastfm.load_lastfm(root / "lastfm", seed=seed)
    if name == "ml-100k":
        folder = root / "ml-100k"
        # The official layout wins; RecBole's atomic files are the fallback.
        if not (folder / "u.data").is_file() and (folder / "ml-100k.inter").is_file():
            return recbole.load_recbole(folder, name="ml-100k")
        source = movielens.locate("ml-100k", root, marker_files=("u.data",), download=download)
        return movielens.load_ml100k(source)
    source = movielens.locate(
        "ml-1m", root, marker_files=("ratings.dat", "interactions.tsv"), download=download
    )
    return movielens.load_ml1m(source)
