"""CoARS environments: recommender-user dialogues over real recommendation data.

Make an environment by id (data built through ``coars_env.data.prepare``)::

    import coars_env
    env = coars_env.make("RecDialog-ml1m", split="test", seed=0, max_turns=5)
    venv = coars_env.make_vector("RecDialog-synthetic", num_envs=64, render_prompts=False)

or directly from a ``DialogData``: ``coars_env.RecDialogEnv(data, EnvConfig(...))``.

The same ids are registered in PettingZoo's own registry (``pettingzoo.register`` /
``pettingzoo.make``, present in PettingZoo 1.27; skipped on releases without one;
nothing is monkeypatched) under the ``coars`` namespace, version 0::

    pettingzoo.make("parallel", "coars/RecDialog-ml1m-v0", split="test", seed=0)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pettingzoo
from gymnasium.utils import seeding

from coars_env.dialog.config import EnvConfig
from coars_env.dialog.env import RECOMMENDER, TURN_RECORD_KEY, USER, RecDialogEnv
from coars_env.vector import VectorRecDialogEnv

__all__ = [
    "ENV_IDS",
    "RECOMMENDER",
    "TURN_RECORD_KEY",
    "USER",
    "EnvConfig",
    "RecDialogEnv",
    "VectorRecDialogEnv",
    "list_envs",
    "load_dialog_data",
    "make",
    "make_vector",
]

# env id -> dataset name of coars_env.data.load_interactions.
ENV_IDS: dict[str, str] = {
    "RecDialog-ml1m": "ml-1m",
    "RecDialog-ml100k": "ml-100k",
    "RecDialog-lastfm": "lastfm",
    "RecDialog-synthetic": "synthetic",  # embedded default: generated in code, no files
}
PETTINGZOO_NAMESPACE = "coars"
PETTINGZOO_VERSION = 0
# DataConfig's field for the dataset name (the first of these that it has).
_DATASET_FIELDS = ("dataset", "name", "dataset_name")


def list_envs() -> list[str]:
    """The registered environment ids."""
    return list(ENV_IDS)


def _resolve_id(env_id: str) -> str:
    """Accept ``RecDialog-ml1m``, ``coars/RecDialog-ml1m`` and ``coars/RecDialog-ml1m-v0``."""
    name = env_id.split("/", 1)[1] if env_id.startswith(f"{PETTINGZOO_NAMESPACE}/") else env_id
    if name.endswith(f"-v{PETTINGZOO_VERSION}"):
        name = name[: -len(f"-v{PETTINGZOO_VERSION}")]
    if name not in ENV_IDS:
        raise ValueError(f"unknown env id {env_id!r}; registered: {', '.join(ENV_IDS)}")
    return name


def _split_overrides(overrides: dict[str, Any], data_fields: tuple[str, ...]) -> tuple[dict, dict]:
    env_fields = EnvConfig.field_names()
    env_kw = {k: v for k, v in overrides.items() if k in env_fields}
    data_kw = {k: v for k, v in overrides.items() if k in data_fields and k not in env_fields}
    unknown = sorted(set(overrides) - set(env_kw) - set(data_kw))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown}. EnvConfig fields: {', '.join(env_fields)}. "
            f"DataConfig fields: {', '.join(data_fields)}."
        )
    return env_kw, data_kw


def _data_config_fields() -> tuple[str, ...]:
    from coars_env.data.prepare import DataConfig  # lazy: heavy (SASRec, torch)

    return tuple(f.name for f in dataclasses.fields(DataConfig))


def load_dialog_data(
    env_id: str,
    split: str = "test",
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    **data_overrides: Any,
):
    """The ``DialogData`` behind ``env_id`` (``build_dialog_data`` with its DataConfig)."""
    from coars_env.data.prepare import DataConfig, build_dialog_data

    fields = _data_config_fields()
    dataset_field = next((f for f in _DATASET_FIELDS if f in fields), None)
    if dataset_field is None:
        raise TypeError(f"DataConfig has none of the fields {_DATASET_FIELDS} for the dataset name")
    kwargs = {dataset_field: ENV_IDS[_resolve_id(env_id)], **data_overrides}
    if "seed" in fields:
        kwargs.setdefault("seed", seed)
    return build_dialog_data(DataConfig(**kwargs), split, data_dir=data_dir)


def make(
    env_id: str,
    split: str = "test",
    seed: int = 0,
    *,
    data_dir: str | os.PathLike | None = None,
    render_mode: str | None = None,
    **overrides: Any,
) -> RecDialogEnv:
    """Build the ``RecDialogEnv`` of ``env_id`` on ``split`` ("train", "valid", "test").

    ``overrides`` are ``EnvConfig`` or ``DataConfig`` field names (anything else raises a
    ``TypeError`` listing both). ``seed`` is the data seed (``DataConfig.seed``: synthetic
    data, carved splits) and seeds the env's ``np_random``, so a first ``reset()`` without
    a seed is reproducible too.
    """
    env_kw, data_kw = _split_overrides(overrides, _data_config_fields())
    data = load_dialog_data(env_id, split, seed, data_dir, **data_kw)
    env = RecDialogEnv(data, EnvConfig(**env_kw), render_mode=render_mode)
    env.np_random, env.np_random_seed = seeding.np_random(seed)
    return env


def make_vector(
    env_id: str,
    num_envs: int,
    split: str = "test",
    seed: int = 0,
    *,
    autoreset: bool = False,
    data_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> VectorRecDialogEnv:
    """``num_envs`` episodes of ``env_id`` in lock-step (``coars_env.vector``); overrides as
    for ``make``. Pass the base seed to ``reset(seed=...)``."""
    env_kw, data_kw = _split_overrides(overrides, _data_config_fields())
    data = load_dialog_data(env_id, split, seed, data_dir, **data_kw)
    return VectorRecDialogEnv(data, EnvConfig(**env_kw), num_envs, autoreset=autoreset)


def _register_with_pettingzoo() -> None:
    # pyproject allows older PettingZoo releases, which have no registry: skip there.
    if not hasattr(pettingzoo, "register") or not hasattr(pettingzoo, "parallel_registry"):
        return
    for env_id in ENV_IDS:
        full_id = f"{PETTINGZOO_NAMESPACE}/{env_id}-v{PETTINGZOO_VERSION}"
        if full_id not in pettingzoo.parallel_registry:
            pettingzoo.register(
                "parallel", full_id, entry_point="coars_env:make", kwargs={"env_id": env_id}
            )


_register_with_pettingzoo()

# Single-agent Gymnasium views: gymnasium.make("coars/RecDialogRecommender-ml1m-v0"), ...
from coars_env.wrappers import register_gymnasium_envs  # noqa: E402

register_gymnasium_envs()
