"""Trajectory logs: round trip, crash safety (SIGKILL mid-run), torn lines, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tinydata import hand_built_episodes, tiny_dialog_data, turn_record

from coars_env.agents import OracleUser, RandomRecommender, play_episode
from coars_env.dialog.env import RecDialogEnv
from coars_env.logs import (
    EPISODE_FIELDS,
    TIMING_FIELDS,
    TURN_FIELDS,
    LoggingWrapper,
    TrajectoryLogger,
    VectorLoggingWrapper,
    read_trajectories,
    summarize_episode,
)
from coars_env.vector import VectorRecDialogEnv

TESTS = Path(__file__).parent


def _write_all(path: Path, **kwargs) -> list[dict]:
    summaries = []
    with TrajectoryLogger(path, **kwargs) as logger:
        for turns in hand_built_episodes():
            for record in turns:
                summary = logger.log_turn(record)
            summaries.append(summary)
    return summaries


def test_round_trip(tmp_path):
    path = tmp_path / "run" / "trajectories.jsonl"
    summaries = _write_all(path)
    turns, episodes = read_trajectories(path)
    expected_turns = [r for ep in hand_built_episodes() for r in ep]
    assert list(turns.columns) == [*TURN_FIELDS, *TIMING_FIELDS]
    assert turns.drop(columns=list(TIMING_FIELDS)).to_dict("records") == expected_turns
    assert list(episodes.columns) == [*EPISODE_FIELDS, *TIMING_FIELDS]
    assert episodes.drop(columns=list(TIMING_FIELDS)).to_dict("records") == summaries
    assert summaries == [summarize_episode(ep) for ep in hand_built_episodes()]
    kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    # Episodes of 1, 3, 5 and 2 turns, each followed by its summary.
    expected = [*["turn"] * 1, "episode", *["turn"] * 3, "episode", *["turn"] * 5, "episode"]
    assert kinds == [*expected, "turn", "turn", "episode"]


def test_numpy_values_and_target_are_logged(tmp_path):
    path = tmp_path / "t.jsonl"
    record = turn_record(
        7,
        1,
        rec_item=np.int64(5),
        score=np.float32(0.25),
        hit=np.bool_(True),
        target=np.int64(5),
        terminated=True,
        action=0,
    )
    with TrajectoryLogger(path) as logger:
        summary = logger.log_turn(record)
    assert summary["target"] == 5 and summary["hit"] is True
    turns, episodes = read_trajectories(path)
    assert turns.loc[0, "rec_item"] == 5 and turns.loc[0, "score"] == 0.25
    assert episodes.loc[0, "target"] == 5


def test_empty_log_has_the_columns(tmp_path):
    path = tmp_path / "empty.jsonl"
    TrajectoryLogger(path).close()
    turns, episodes = read_trajectories(path)
    assert len(turns) == 0 and "hit" in turns.columns and "hit_turn" in episodes.columns


def test_flushes_at_episode_end_only(tmp_path):
    path = tmp_path / "t.jsonl"
    logger = TrajectoryLogger(path, flush_every=1000)
    logger.log_turn(turn_record(0, 1))
    assert path.read_text() == ""  # buffered: one unfinished episode
    logger.log_turn(turn_record(0, 2, truncated=True))
    assert len(path.read_text().splitlines()) == 3  # two turns + the summary
    logger.log_turn(turn_record(1, 1))
    logger.close()
    turns, episodes = read_trajectories(path)
    assert len(turns) == 3 and len(episodes) == 1  # unfinished episode: turns, no summary
    with pytest.raises(ValueError, match="is closed"):
        logger.log_turn(turn_record(2, 1))
    with pytest.raises(ValueError):
        TrajectoryLogger(tmp_path / "x.jsonl", flush_every=0)


def test_flush_every_bounds_the_buffer(tmp_path):
    path = tmp_path / "t.jsonl"
    with TrajectoryLogger(path, flush_every=2) as logger:
        logger.log_turn(turn_record(0, 1))
        logger.log_turn(turn_record(0, 2))
        assert len(path.read_text().splitlines()) == 2


def test_torn_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "t.jsonl"
    _write_all(path)
    with open(path, "a") as f:
        f.write('{"kind": "turn", "episode_id": 9, "tur')
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable line"):
        turns, episodes = read_trajectories(path)
    assert len(turns) == 11 and len(episodes) == 4
    # Appending after the crash closes the torn line first: the new episode survives.
    with TrajectoryLogger(path, append=True) as logger:
        logger.log_turn(turn_record(9, 1, terminated=True, action=0, hit=True))
    with pytest.warns(RuntimeWarning):
        turns, episodes = read_trajectories(path)
    assert len(turns) == 12 and list(episodes["episode_id"]) == [0, 1, 2, 3, 9]


_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from tinydata import tiny_dialog_data
    from coars_env.agents import OracleUser, RandomRecommender, play_episode
    from coars_env.dialog.env import RecDialogEnv
    from coars_env.logs import LoggingWrapper, TrajectoryLogger

    data = tiny_dialog_data()
    logger = TrajectoryLogger({path!r}, flush_every=100_000)
    env = LoggingWrapper(RecDialogEnv(data, render_prompts=False), logger)
    recommender, user = RandomRecommender(0), OracleUser(data)
    episode_id = 0
    while True:
        play_episode(env, recommender, user, options={{"episode_id": episode_id}})
        print(episode_id, flush=True)  # the episode ended: it is on disk now
        episode_id += 1
    """
)


def test_killed_run_keeps_every_completed_episode(tmp_path):
    path = tmp_path / "killed.jsonl"
    code = _CHILD.format(tests=str(TESTS), path=str(path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    reported = -1
    deadline = time.monotonic() + 60
    try:
        while reported < 200 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            reported = int(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert reported >= 200, "the child did not get far enough"
    turns, episodes = read_trajectories(path)
    # Every episode the child finished before the kill is complete on disk.
    assert set(range(reported + 1)) <= set(episodes["episode_id"])
    counts = turns.groupby("episode_id").size()
    for row in episodes.itertuples():
        assert counts[row.episode_id] == row.turns
    assert isinstance(episodes, pd.DataFrame)


# -- with the env --------------------------------------------------------------------------


def _logged_run(path: Path, seed: int) -> list[dict]:
    """Random recommender vs the oracle user, 30 episodes, logged; returns the lines
    without their timing fields."""
    data = tiny_dialog_data()
    with TrajectoryLogger(path) as logger:
        env = LoggingWrapper(RecDialogEnv(data, render_prompts=False), logger)
        recommender, user = RandomRecommender(seed), OracleUser(data)
        for i in range(30):  # later, unseeded resets continue the seeded stream
            play_episode(env, recommender, user, seed=seed if i == 0 else None)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_FIELDS} for line in lines]


def test_same_seed_gives_identical_logs(tmp_path):
    first = _logged_run(tmp_path / "a.jsonl", seed=5)
    assert _logged_run(tmp_path / "b.jsonl", seed=5) == first
    assert _logged_run(tmp_path / "c.jsonl", seed=6) != first
    episodes = [line for line in first if line["kind"] == "episode"]
    assert [e["episode_id"] for e in episodes] == list(range(30))


def test_logging_wrapper_matches_the_env_records(tmp_path):
    data = tiny_dialog_data()
    path = tmp_path / "t.jsonl"
    with TrajectoryLogger(path) as logger:
        env = LoggingWrapper(RecDialogEnv(data, render_prompts=False, reveal_target=True), logger)
        records = play_episode(env, RandomRecommender(0), OracleUser(data), seed=1)
        assert env.acting_agent is None and env.unwrapped is env.env
    turns, episodes = read_trajectories(path)
    expected = [json.loads(json.dumps(r)) for r in records]  # tuples (flags) become lists
    assert turns.drop(columns=list(TIMING_FIELDS)).to_dict("records") == expected
    assert episodes.loc[0, "target"] == data.sessions[records[0]["session_id"]].target
    assert episodes.loc[0, "turns"] == len(records)


def test_vector_logging_wrapper(tmp_path):
    data = tiny_dialog_data()
    path = tmp_path / "v.jsonl"
    with TrajectoryLogger(path) as logger:
        venv = VectorLoggingWrapper(
            VectorRecDialogEnv(data, num_envs=4, render_prompts=False), logger
        )
        recommender, user = RandomRecommender(0), OracleUser(data)
        obs, _ = venv.reset(seed=0)
        while not venv.all_done:
            agent = venv.acting_agent
            policy = recommender if agent == "recommender" else user
            replies = [policy(o[agent]) if o else None for o in obs]
            obs, _, _, _, _ = venv.step(replies)
    turns, episodes = read_trajectories(path)
    assert sorted(episodes["episode_id"]) == [0, 1, 2, 3]
    assert episodes["turns"].sum() == len(turns)
    counts = turns.groupby("episode_id").size()
    assert counts.to_dict() == episodes.set_index("episode_id")["turns"].to_dict()
