"""Single-agent Gymnasium views: check_env (text and numeric), episodes, opponents, ids."""

from __future__ import annotations

import warnings

import envtools
import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from tinydata import tiny_dialog_data

from coars_env.agents import CLICK, DISLIKE, STAR, GenreRecommender
from coars_env.dialog.env import RecDialogEnv
from coars_env.dialog.parsing import format_recommender, format_user
from coars_env.logs import TrajectoryLogger, read_trajectories
from coars_env.wrappers import (
    DEFAULT_ACTION_SCORES,
    RecommenderEnv,
    UserEnv,
    gymnasium_ids,
    register_gymnasium_envs,
)

DATA = {"tiny20": tiny_dialog_data, "envtools": envtools.tiny_dialog_data}


@pytest.mark.parametrize("numeric", [False, True], ids=["text", "numeric"])
@pytest.mark.parametrize("view", [RecommenderEnv, UserEnv])
@pytest.mark.parametrize("data", DATA, ids=list(DATA))
def test_check_env(view, numeric, data):
    env = view(DATA[data](), numeric=numeric)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checker warning either
        check_env(env, skip_render_check=True)


def test_recommender_env_text_episode_and_info():
    data = tiny_dialog_data()
    env = RecommenderEnv(data, reveal_target=True)
    obs, info = env.reset(seed=0, options={"session_id": 2})
    assert obs["phase"] == 0 and obs["messages"][1]["role"] == "user"
    assert "episode_id" not in info and env.episode_id == 0
    target_pos = data.sessions[2].candidates.index(data.sessions[2].target)
    wrong = (target_pos + 1) % 20
    obs, reward, terminated, truncated, info = env.step(format_recommender(wrong, "a guess"))
    record = info["turn_record"]
    assert (record["turn"], record["hit"], record["rec_position"]) == (1, False, wrong)
    assert reward == record["reward_rec"] < 0 and not (terminated or truncated)
    assert "episode_id" not in record and info["mask"] == record["mask_rec"]
    obs, reward, terminated, truncated, info = env.step(target_pos)  # structured form
    assert info["turn_record"]["hit"] and info["turn_record"]["action"] == CLICK
    assert terminated and not truncated and reward == pytest.approx(0.9 * 1.0)


def test_recommender_env_numeric_observation():
    data = tiny_dialog_data()
    env = RecommenderEnv(data, numeric=True)
    obs, _ = env.reset(seed=1, options={"session_id": 0})
    session = data.sessions[0]
    np.testing.assert_array_equal(obs["candidates"], data.item_features[list(session.candidates)])
    assert obs["history_mask"].sum() == len(session.history)
    np.testing.assert_array_equal(obs["history"][:4], data.item_features[list(session.history)])
    assert obs["recommended"].sum() == 0 and obs["turn"] == 1
    target_pos = session.candidates.index(session.target)
    wrong = (target_pos + 3) % 20
    obs, _, _, _, info = env.step(np.int64(wrong))
    action, score = info["turn_record"]["action"], info["turn_record"]["score"]
    assert obs["recommended"][wrong] == 1 and obs["turn"] == 2
    assert obs["feedback"][wrong, action] == 1.0
    assert obs["feedback"][wrong, 4] == pytest.approx(score)
    assert obs["feedback"].sum() == pytest.approx(1.0 + score)


def test_recommender_env_full_random_episodes_hit_only_by_target():
    env = RecommenderEnv(tiny_dialog_data(), numeric=True)
    env.action_space.seed(0)
    for seed in range(20):
        env.reset(seed=seed)
        done, turns = False, 0
        while not done:
            _, reward, terminated, truncated, info = env.step(env.action_space.sample())
            done, turns = terminated or truncated, turns + 1
            record = info["turn_record"]
            assert terminated == (record["action"] == CLICK) == record["hit"]  # oracle user
        assert turns <= 5 and (terminated or turns == 5)


def test_recommender_env_with_a_text_user_policy():
    data = tiny_dialog_data()
    seen = []

    def stubborn_user(obs):
        seen.append(obs["messages"])
        return format_user(DISLIKE, 0.1, "no")

    env = RecommenderEnv(data, user=stubborn_user)
    env.reset(seed=0)
    for turn in range(5):
        _, _, terminated, truncated, info = env.step(f"Item: {turn + 1}\nReason: try")
    assert truncated and not terminated and info["turn_record"]["action"] == DISLIKE
    assert len(seen) == 5 and all(m and m[0]["role"] == "system" for m in seen)
    # A recommender format failure: the user is not asked, the turn is still played.
    env.reset(seed=0)
    _, reward, _, _, info = env.step("I cannot decide")
    assert info["turn_record"]["rec_format_failure"] and len(seen) == 5 and reward < 0


def test_user_env_numeric_episode():
    data = tiny_dialog_data()
    env = UserEnv(data, numeric=True, recommender="popularity")
    obs, _ = env.reset(seed=0, options={"session_id": 0})
    assert obs["turn"] == 1 and obs["item"].shape == (8,)
    _, reward, terminated, truncated, info = env.step(STAR)
    record = info["turn_record"]
    assert (record["action"], record["score"]) == (STAR, DEFAULT_ACTION_SCORES[STAR])
    assert reward == record["reward_user"] and not (terminated or truncated)
    obs, reward, terminated, truncated, info = env.step(CLICK)
    assert terminated and info["turn_record"]["turn"] == 2 and info["mask"] in (0.0, 1.0)


def test_user_env_text_episode_against_sasrec():
    data = tiny_dialog_data()
    env = UserEnv(data)  # SASRec recommender: odd sessions start on the target
    obs, _ = env.reset(seed=0, options={"session_id": 1})
    assert data.sessions[1].target == data.sessions[1].candidates[obs["recommended"][0]]
    assert "Action:" in obs["messages"][0]["content"]
    _, reward, terminated, _, info = env.step("Action: click\nScore: 0.9\nReason: yes")
    assert terminated and info["turn_record"]["hit"] and reward > 0


def test_user_env_skips_turns_without_a_recommendation():
    data = tiny_dialog_data()
    replies = iter(["Item: 1", "nonsense", "Item: 2", "Item: 3"])
    env = UserEnv(data, recommender=lambda obs: next(replies), numeric=True)
    env.reset(seed=0, options={"session_id": 0})
    _, reward, terminated, truncated, info = env.step(DISLIKE)
    skipped = info["skipped_turn_records"]
    assert [r["turn"] for r in skipped] == [2] and skipped[0]["rec_format_failure"]
    assert reward == info["turn_record"]["reward_user"]  # skipped turns give the user 0
    obs, _, _, _, _ = env.step(DISLIKE)
    assert obs["turn"] == 4
    with pytest.raises(RuntimeError, match="failed every turn"):
        UserEnv(data, recommender=lambda obs: "?", max_turns=1).reset(seed=0)


def test_user_env_random_recommender_is_seeded():
    data = tiny_dialog_data()

    def positions(seed):
        env = UserEnv(data, recommender="random", numeric=True)
        env.reset(seed=seed)
        out, done = [], False
        while not done:
            _, _, term, trunc, info = env.step(DISLIKE)
            out.append(info["turn_record"]["rec_position"])
            done = term or trunc
        return out

    assert positions(3) == positions(3) and len(set(positions(3))) == 5


def test_views_log_turns(tmp_path):
    path = tmp_path / "log.jsonl"
    with TrajectoryLogger(path) as logger:
        env = UserEnv(tiny_dialog_data(), numeric=True, recommender="random", logger=logger)
        env.action_space.seed(0)
        for seed in range(3):
            env.reset(seed=seed)
            done = False
            while not done:
                _, _, term, trunc, _ = env.step(env.action_space.sample())
                done = term or trunc
    turns, episodes = read_trajectories(path)
    assert list(episodes["episode_id"]) == [0, 1, 2]
    assert episodes["turns"].sum() == len(turns)


def test_bad_arguments():
    data = tiny_dialog_data()
    with pytest.raises(TypeError, match="exactly one"):
        RecommenderEnv()
    with pytest.raises(TypeError, match="only apply"):
        RecommenderEnv(env=RecDialogEnv(data), max_turns=3)
    with pytest.raises(ValueError, match="recommender must be"):
        UserEnv(data, recommender="bm25")
    with pytest.raises(ValueError, match="user must be"):
        RecommenderEnv(data, user="human")
    with pytest.raises(ValueError, match="action_scores"):
        UserEnv(data, action_scores=(0.9, 0.6))


def test_gymnasium_ids_are_registered():
    register_gymnasium_envs()
    register_gymnasium_envs()  # idempotent, no re-registration warning
    ids = gymnasium_ids()
    for data in ("ml1m", "ml100k", "lastfm", "synthetic"):
        for view in ("Recommender", "User"):
            assert f"coars/RecDialog{view}-{data}-v0" in gymnasium.registry
            assert f"coars/RecDialog{view}-{data}-v0" in ids


TINY_DATA = {
    "sasrec": {"hidden": 16, "blocks": 1, "heads": 1, "max_len": 16, "epochs": 1, "seed": 1},
    "progress": False,
    "alignment_users": 0,
}


@pytest.mark.slow
def test_gymnasium_make_synthetic(tmp_path_factory):
    register_gymnasium_envs()
    cache = str(tmp_path_factory.mktemp("coars-cache"))
    for view in ("Recommender", "User"):
        for numeric in (False, True):
            env = gymnasium.make(
                f"coars/RecDialog{view}-synthetic-v0",
                numeric=numeric,
                cache_dir=cache,
                max_turns=3,
                **TINY_DATA,
            )
            check_env(env.unwrapped, skip_render_check=True)
            obs, _ = env.reset(seed=0)
            assert env.observation_space.contains(obs)
            _, _, _, _, info = env.step(env.action_space.sample())
            assert "turn_record" in info
            env.close()


def test_user_env_with_the_genre_recommender_and_a_bad_name():
    data = tiny_dialog_data()
    env = UserEnv(data, numeric=True, recommender="genre")
    env.reset(seed=0, options={"session_id": 0})
    _, _, _, _, info = env.step(STAR)
    session = data.sessions[0]
    scores = GenreRecommender(data).scores(np.array(session.history), np.array(session.candidates))
    assert info["turn_record"]["rec_position"] == int(np.argmax(scores))
    with pytest.raises(ValueError, match="'genre'"):
        UserEnv(data, recommender="content")
