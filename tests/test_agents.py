"""Built-in scripted agents on structured observations (docs/CONTRACTS.md)."""

from __future__ import annotations

import numpy as np
import pytest
from tinydata import tiny_dialog_data

from coars_env.agents import (
    CLICK,
    DISLIKE,
    SCORE_INTERVALS,
    SKIP,
    STAR,
    OracleUser,
    PopularityRecommender,
    RandomRecommender,
    SASRecRecommender,
    SessionIndex,
    TargetRecommender,
    make_scripted,
    play_episode,
)
from coars_env.dialog.env import RecDialogEnv

T = 5


def _obs(session, phase: int, recommended: list[int], responses: list[int] = (), q: float = 0.0):
    """A structured observation as the env builds it (history window 20, T turns)."""
    turn = len(recommended) if phase == 1 else len(recommended) + 1
    rec = np.full(max(T, len(recommended)), -1, dtype=np.int64)
    rec[: len(recommended)] = recommended
    resp = np.full(len(rec), -1, dtype=np.int64)
    resp[: len(responses)] = responses
    history = np.full(20, -1, dtype=np.int64)
    history[: len(session.history)] = session.history
    return {
        "phase": phase,
        "turn": turn,
        "history": history,
        "candidates": np.asarray(session.candidates, dtype=np.int64),
        "recommended": rec,
        "responses": resp,
        "scores": np.zeros(len(rec), dtype=np.float32),
        "peer": np.array([q, 0, 0], dtype=np.float32) if phase == 1 else np.zeros(3, np.float32),
    }


def test_session_index_finds_sessions_by_candidates():
    data = tiny_dialog_data()
    index = SessionIndex(data)
    for session in data.sessions:
        assert index.lookup(_obs(session, 0, [])) is session
    other = dict(_obs(data.sessions[0], 0, []), candidates=np.arange(20))
    assert index.lookup(other) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_recommender_never_repeats_and_is_seeded(seed):
    data = tiny_dialog_data()
    session = data.sessions[0]
    agent = RandomRecommender(seed)
    recommended: list[int] = []
    for _ in range(20):  # all 20 candidates, one per turn, no repeat
        recommended.append(agent(_obs(session, 0, recommended)))
    assert sorted(recommended) == list(range(20))
    again = RandomRecommender(0)
    again.reset(seed)
    replay: list[int] = []
    for _ in range(20):
        replay.append(again(_obs(session, 0, replay)))
    assert replay == recommended


def test_popularity_recommender_goes_down_the_popularity_list():
    data = tiny_dialog_data()
    session = data.sessions[1]
    agent = PopularityRecommender(data)
    recommended: list[int] = []
    for _ in range(5):
        recommended.append(agent(_obs(session, 0, recommended)))
    pops = [data.popularity[session.candidates[p]] for p in recommended]
    assert pops == sorted(pops, reverse=True)
    assert pops[0] == max(data.popularity[list(session.candidates)])
    assert len(set(recommended)) == 5


def test_sasrec_recommender_starts_with_sasrec_top1():
    data = tiny_dialog_data()
    agent = SASRecRecommender(data)
    for session in data.sessions:
        first = agent(_obs(session, 0, []))
        assert session.candidates[first] == session.sasrec_top1
        second = agent(_obs(session, 0, [first]))
        assert second != first


def test_oracle_user_clicks_the_target_and_only_the_target():
    data = tiny_dialog_data()
    user = OracleUser(data)
    actions = set()
    for session in data.sessions:
        for position, item in enumerate(session.candidates):
            for q in (-1.0, 0.0, 1.0):
                answer = user(_obs(session, 1, [position], q=q))
                low, high = SCORE_INTERVALS[answer["action"]]
                assert low <= answer["score"] <= high
                assert (answer["action"] == CLICK) == (item == session.target)
                actions.add(answer["action"])
    assert actions == {CLICK, STAR, SKIP, DISLIKE}
    # Later turns: the current recommendation is the last one in ``recommended``.
    session = data.sessions[2]
    target_pos = session.candidates.index(session.target)
    wrong = (target_pos + 1) % 20
    assert user(_obs(session, 1, [wrong, target_pos], [SKIP]))["action"] == CLICK
    assert user(_obs(session, 1, [target_pos, wrong], [SKIP]))["action"] != CLICK
    # A recommender format failure (position -1) is skipped.
    assert user(_obs(session, 1, [-1]))["action"] == SKIP


def test_oracle_user_target_lookup_and_unknown_session():
    data = tiny_dialog_data()
    session = data.sessions[0]
    decoy = next(i for i in session.candidates if i != session.target)
    user = OracleUser(data, target_lookup=lambda obs: decoy)
    position = session.candidates.index(decoy)
    assert user(_obs(session, 1, [position]))["action"] == CLICK
    lost = dict(_obs(session, 1, [0]), candidates=np.arange(20))
    with pytest.raises(KeyError, match="target_lookup"):
        OracleUser(data)(lost)


# -- full episodes on the real env ---------------------------------------------------------


def _recommenders(data):
    return {
        "random": RandomRecommender(0),
        "popularity": PopularityRecommender(data),
        "sasrec": SASRecRecommender(data),
    }


@pytest.mark.parametrize("name", ["random", "popularity", "sasrec"])
def test_builtins_play_full_episodes(name):
    data = tiny_dialog_data()
    env = RecDialogEnv(data, render_prompts=False)
    recommender = _recommenders(data)[name]
    user = OracleUser(data)
    for session in data.sessions:
        records = play_episode(
            env, recommender, user, seed=0, options={"session_id": session.session_id}
        )
        assert 1 <= len(records) <= env.max_turns
        positions = [r["rec_position"] for r in records]
        assert len(set(positions)) == len(positions)  # no built-in repeats
        assert not any(r["rec_format_failure"] or r["user_format_failure"] for r in records)
        last = records[-1]
        assert last["terminated"] or last["truncated"]
        # The oracle clicks the target and only the target: no wrong clicks.
        assert all((r["action"] == CLICK) == r["hit"] for r in records)
        assert last["terminated"] == last["hit"]
    if name == "sasrec":  # odd sessions have SASRec's top-1 on the target
        assert play_episode(env, recommender, user, options={"session_id": 1})[0]["hit"]


def test_random_recommender_hits_at_chance_against_the_oracle():
    data = tiny_dialog_data()
    env = RecDialogEnv(data, render_prompts=False)
    recommender, user = RandomRecommender(7), OracleUser(data)
    hits = [play_episode(env, recommender, user, seed=i)[-1]["hit"] for i in range(400)]
    # 5 turns out of 20 candidates: 0.25 (binomial sd over 400 episodes: 0.022).
    assert abs(np.mean(hits) - 0.25) < 0.07


def test_oracle_user_with_the_env_target():
    data = tiny_dialog_data()
    env = RecDialogEnv(data, render_prompts=False)
    user = OracleUser(data, target_lookup=lambda obs: env.session.target)
    records = play_episode(env, PopularityRecommender(data), user, seed=3)
    assert all((r["action"] == CLICK) == r["hit"] for r in records)


def test_genre_recommender_picks_the_history_genre_and_never_repeats():
    from coars_env.agents import GenreRecommender

    data = tiny_dialog_data()  # item i has genre GENRES[i % 4]: Drama, Comedy, Action, Horror
    agent = GenreRecommender(data)
    obs = {"history": [2, 6, 10, 1, -1], "candidates": [0, 5, 14, 18], "recommended": [-1, -1]}
    # History: 3 Action, 1 Comedy -> scores Drama 0, Comedy 0.25, Action 0.75, Action 0.75.
    assert agent.scores(np.array([2, 6, 10, 1]), np.array([0, 5, 14, 18])).tolist() == [
        0.0,
        0.25,
        0.75,
        0.75,
    ]
    assert agent(obs) == 2  # the first of the tied Action candidates
    assert agent({**obs, "recommended": [2, -1]}) == 3
    assert agent({**obs, "recommended": [2, 3]}) == 1  # then Comedy over Drama


def test_target_recommender_names_the_target_with_its_probability():
    data = tiny_dialog_data()
    env = RecDialogEnv(data, render_prompts=False)
    user = OracleUser(data)
    for session in data.sessions:  # target_prob 1 (the "oracle"): a hit at turn 1, always
        records = play_episode(
            env, TargetRecommender(data), user, seed=0, options={"session_id": session.session_id}
        )
        assert [r["hit"] for r in records] == [True]

    def episodes(seed: int) -> list[list[dict]]:
        agent = make_scripted("balanced", "recommender", data, seed=seed)
        return [play_episode(env, agent, user, seed=i) for i in range(400)]

    def picks(played: list[list[dict]]) -> list[list[int]]:
        return [[r["rec_position"] for r in records] for records in played]

    played = episodes(3)
    # A fair coin per turn: turn-1 Hit@1 0.5 (binomial sd over 400 episodes: 0.025).
    assert abs(np.mean([r[0]["hit"] for r in played]) - 0.5) < 0.075
    for records in played:
        positions = [r["rec_position"] for r in records]
        assert len(set(positions)) == len(positions)  # misses are other, new candidates
        assert not any(r["hit"] for r in records[:-1])  # the oracle clicks the first hit
    # Hit by turn T = 1 - 0.5**T (the coin is tossed each turn until the target is named).
    assert abs(np.mean([r[-1]["hit"] for r in played]) - (1 - 0.5**T)) < 0.03
    assert picks(played) == picks(episodes(3))  # seeded
    assert picks(played) != picks(episodes(4))
    with pytest.raises(ValueError, match="target_prob must be in"):
        TargetRecommender(data, target_prob=1.5)
    with pytest.raises(ValueError, match="unknown scripted user 'balanced'"):
        make_scripted("balanced", "user", data)
