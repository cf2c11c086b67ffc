"""Trajectory logs: one JSONL file of turn records and episode summaries.

File format (one file, append-only, UTF-8, one JSON object per line)::

    {"kind": "turn", "episode_id": 0, "session_id": 3, ..., "time": 0.0123}
    {"kind": "turn", ...}
    {"kind": "episode", "episode_id": 0, "session_id": 3, "turns": 2, "hit": true, ...}

- ``"kind": "turn"`` lines are the env's turn records exactly as docs/CONTRACTS.md defines
  them (``target`` only when the env reveals it), plus the timing field ``time``.
- ``"kind": "episode"`` lines are written once per finished episode (a turn record with
  ``terminated`` or ``truncated``), right after its last turn; see ``summarize_episode``.

One file (rather than turns.jsonl + episodes.jsonl) keeps the two kinds in the order they
happened and makes "flush at episode end" a single write. Lines are buffered in memory
and written with one ``write`` + ``flush`` per finished episode (or every ``flush_every``
lines), so a process killed at any point leaves every completed episode on disk; at worst
the last line is torn, and ``read_trajectories`` skips it with a warning.

Timing fields (``TIMING_FIELDS``) are the only non-deterministic content: two runs with the
same seeds write identical logs once those fields are dropped.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pettingzoo.utils.wrappers import BaseParallelWrapper

from coars_env.dialog.env import TURN_RECORD_KEY
from coars_env.dialog.rewards import CLICK

# Turn-record fields, in the order of docs/CONTRACTS.md (``target`` is optional).
TURN_FIELDS = (
    "episode_id",
    "session_id",
    "user",
    "turn",
    "rec_text",
    "rec_position",
    "rec_item",
    "rec_format_failure",
    "repeat",
    "user_text",
    "action",
    "score",
    "user_format_failure",
    "score_clamped",
    "hit",
    "q",
    "n_peers_liked",
    "n_peers_disliked",
    "reward_rec",
    "reward_user",
    "mask_rec",
    "mask_user",
    "terminated",
    "truncated",
)

# Episode-summary fields, in the order ``summarize_episode`` writes them.
EPISODE_FIELDS = (
    "episode_id",
    "session_id",
    "user",
    "turns",
    "final_position",
    "final_item",
    "hit",
    "hit_turn",
    "first_turn_hit",
    "clicked",
    "wrong_click",
    "terminated",
    "truncated",
    "rec_format_failures",
    "user_format_failures",
    "repeats",
    "reward_rec",
    "reward_user",
)

# Seconds since the logger was opened, when the line was logged. Logs only, never in infos.
TIMING_FIELDS = ("time",)


def _json_default(value: Any) -> Any:
    """Make numpy scalars and arrays (common in env records) JSON-serialisable."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable in a turn record: {type(value).__name__}")


def summarize_episode(turns: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The episode summary of one episode's turn records (oldest first).

    ``hit`` is the last turn's ``hit`` (the final recommendation is the target: METHOD.md's
    Hit@1); ``hit_turn`` is the first turn whose recommendation hit the target (0: never),
    so "target recommended by turn t" is ``1 <= hit_turn <= t``. ``clicked``: the episode
    ended with a click; ``wrong_click``: ... on a non-target item. Rewards are summed per
    agent over all turns (masks are not applied: they concern training, not outcomes).
    """
    if not turns:
        raise ValueError("summarize_episode needs at least one turn record")
    last = turns[-1]
    hit_turn = next((int(t["turn"]) for t in turns if t["hit"]), 0)
    clicked = int(last["action"]) == CLICK and not last["user_format_failure"]
    summary = {
        "episode_id": last["episode_id"],
        "session_id": last["session_id"],
        "user": last["user"],
        "turns": len(turns),
        "final_position": last["rec_position"],
        "final_item": last["rec_item"],
        "hit": bool(last["hit"]),
        "hit_turn": hit_turn,
        "first_turn_hit": bool(turns[0]["hit"]),
        "clicked": bool(clicked),
        "wrong_click": bool(clicked and not last["hit"]),
        "terminated": bool(last["terminated"]),
        "truncated": bool(last["truncated"]),
        "rec_format_failures": sum(bool(t["rec_format_failure"]) for t in turns),
        "user_format_failures": sum(bool(t["user_format_failure"]) for t in turns),
        "repeats": sum(bool(t["repeat"]) for t in turns),
        "reward_rec": float(sum(float(t["reward_rec"]) for t in turns)),
        "reward_user": float(sum(float(t["reward_user"]) for t in turns)),
    }
    if "target" in last:
        summary["target"] = last["target"]
    return summary


class TrajectoryLogger:
    """Writes turn records and per-episode summaries to one JSONL file (format: module doc).

    Usage::

        with TrajectoryLogger("runs/x/trajectories.jsonl") as logger:
            ...
            logger.log_turns(records)   # the turn records of one env step

    ``flush_every``: buffered lines that force a write even before an episode ends (bounds
    memory when episodes are long or many run in parallel). ``append``: continue an
    existing file (a torn last line from a crash is closed first, so it cannot swallow
    the next record). ``fsync``: also ask the OS to reach the disk at each flush (only
    needed to survive a machine crash; a killed process loses nothing already flushed).

    Episodes are keyed by ``episode_id``, which must be unique within one logger (the
    env numbers its episodes; a vector env must keep them distinct across sub-envs).
    Turns of episodes still running at ``close`` are written, without a summary.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        flush_every: int = 256,
        append: bool = False,
        fsync: bool = False,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self.fsync = fsync
        needs_newline = False
        if append and self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")
        self._buffer: list[str] = []
        # One encoder for all lines (json.dumps with options builds a new one per call).
        self._encoder = json.JSONEncoder(default=_json_default, ensure_ascii=False)
        self._open_episodes: dict[Any, list[Mapping[str, Any]]] = {}
        self._start = time.perf_counter()
        self.n_turns = 0
        self.n_episodes = 0

    # -- writing -------------------------------------------------------------------------
    def log_turn(self, record: Mapping[str, Any]) -> dict[str, Any] | None:
        """Log one turn record; returns the episode summary if this turn ended its episode."""
        summary = self._add(record)
        if summary is not None or len(self._buffer) >= self.flush_every:
            self.flush()
        return summary

    def log_turns(self, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Log the turn records of one (vector) env step with at most one flush.

        Returns the summaries of the episodes that these turns finished.
        """
        summaries = [s for s in (self._add(r) for r in records) if s is not None]
        if summaries or len(self._buffer) >= self.flush_every:
            self.flush()
        return summaries

    def _add(self, record: Mapping[str, Any]) -> dict[str, Any] | None:
        if self._file.closed:
            raise ValueError(f"TrajectoryLogger({str(self.path)!r}) is closed")
        now = round(time.perf_counter() - self._start, 6)
        self._buffer.append(self._line({"kind": "turn", **record, "time": now}))
        self.n_turns += 1
        turns = self._open_episodes.setdefault(record["episode_id"], [])
        turns.append(record)
        if not (record["terminated"] or record["truncated"]):
            return None
        del self._open_episodes[record["episode_id"]]
        summary = summarize_episode(turns)
        self._buffer.append(self._line({"kind": "episode", **summary, "time": now}))
        self.n_episodes += 1
        return summary

    def _line(self, obj: Mapping[str, Any]) -> str:
        return self._encoder.encode(obj) + "\n"

    def flush(self) -> None:
        """Write the buffered lines in one call and hand them to the OS."""
        if self._file.closed:
            return
        if self._buffer:
            self._file.write("".join(self._buffer))
            self._buffer.clear()
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Flush and close (turns of unfinished episodes are kept, without a summary)."""
        if not self._file.closed:
            self.flush()
            self._file.close()
        self._open_episodes.clear()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def __enter__(self) -> TrajectoryLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() still saves the buffer
        try:
            self.close()
        except Exception:
            pass


def read_trajectories(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a log written by ``TrajectoryLogger`` into ``(turns_df, episodes_df)``.

    Lines that are not valid JSON objects (a line torn by a killed process) are skipped
    with one ``RuntimeWarning`` that counts them; they never raise. The ``kind`` column is
    dropped; known columns come first in contract order, any extra ones after them.
    """
    turns: list[dict] = []
    episodes: list[dict] = []
    bad: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            kind = obj.pop("kind", None) if isinstance(obj, dict) else None
            if kind == "turn":
                turns.append(obj)
            elif kind == "episode":
                episodes.append(obj)
            else:
                bad.append(number)
    if bad:
        warnings.warn(
            f"{path}: skipped {len(bad)} unreadable line(s) (first: line {bad[0]}); "
            "a torn last line means the writing process was killed",
            RuntimeWarning,
            stacklevel=2,
        )
    return _frame(turns, TURN_FIELDS), _frame(episodes, EPISODE_FIELDS)


def _frame(rows: list[dict], fields: tuple[str, ...]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    known = [c for c in fields if c in df.columns or not rows]
    extra = [c for c in df.columns if c not in fields]
    return df.reindex(columns=known + extra)


class LoggingWrapper(BaseParallelWrapper):
    """Wraps a ``RecDialogEnv`` (PettingZoo ParallelEnv) and logs every turn record.

    The env puts each turn record in both agents' infos after a user phase
    (``infos[agent]["turn_record"]``); this wrapper passes every call through unchanged
    and hands the records to ``logger``, which writes the episode summary and flushes
    when a record ends its episode. The logger is closed by ``close`` only with
    ``close_logger=True`` (one logger may serve several envs: keep their ``episode_id``
    values distinct, e.g. with ``reset(options={"episode_id": ...})``).
    """

    def __init__(self, env: Any, logger: TrajectoryLogger, *, close_logger: bool = False):
        super().__init__(env)
        self.logger = logger
        self.close_logger = close_logger

    def step(self, actions: dict) -> tuple[dict, dict, dict, dict, dict]:
        result = self.env.step(actions)
        records = turn_records_from_infos(result[4])
        if records:
            self.logger.log_turns(records)
        return result

    def close(self) -> None:
        self.env.close()
        if self.close_logger:
            self.logger.close()


class VectorLoggingWrapper:
    """``LoggingWrapper`` for a ``VectorRecDialogEnv``: logs the turn records of all slots.

    The vector env numbers episodes uniquely (``i + k * num_envs``), so one logger fits.
    A step's records are written with at most one flush. Other attributes are the
    wrapped vector env's.
    """

    def __init__(self, venv: Any, logger: TrajectoryLogger, *, close_logger: bool = False):
        self.venv = venv
        self.logger = logger
        self.close_logger = close_logger

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.venv, name)

    def reset(self, *args: Any, **kwargs: Any) -> Any:
        """Reset the wrapped vector env (nothing is logged before a step)."""
        return self.venv.reset(*args, **kwargs)

    def step(self, replies: Any) -> tuple[list, list, list, list, list]:
        """Step the wrapped vector env and log every finished turn's record."""
        result = self.venv.step(replies)
        records = [r for infos in result[4] for r in turn_records_from_infos(infos)]
        if records:
            self.logger.log_turns(records)
        return result

    def close(self) -> None:
        """Close the vector env, and the logger too when this wrapper owns it."""
        self.venv.close()
        if self.close_logger:
            self.logger.close()


def turn_records_from_infos(infos: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The turn record in one env step's infos (``{agent: info}``), as a list of 0 or 1.

    Both agents' infos carry the same record (one turn per step); it is taken once.
    """
    for info in infos.values():
        record = info.get(TURN_RECORD_KEY)
        if record is not None:
            return [record]
    return []
