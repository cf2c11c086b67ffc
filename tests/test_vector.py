"""VectorRecDialogEnv: lock-step phases, done handling, autoreset, independence from B."""

from __future__ import annotations

import numpy as np
import pytest
from envtools import tiny_dialog_data
from gymnasium.utils.env_checker import data_equivalence

from coars_env.dialog.env import RECOMMENDER, TURN_RECORD_KEY, USER
from coars_env.dialog.parsing import CLICK, SKIP, STAR, format_recommender
from coars_env.vector import VectorRecDialogEnv, episode_seed


@pytest.fixture(scope="module")
def data():
    return tiny_dialog_data()


def scripted_reply(agent, obs):
    """Deterministic replies from the observation only (mixing text and structured forms)."""
    turn = int(obs["turn"])
    if agent == RECOMMENDER:
        position = (int(obs["history"][0]) + 2 * turn) % len(obs["candidates"])
        return format_recommender(position, "why not") if turn % 2 else position
    if turn == 1:
        return "I cannot tell"  # a user format failure
    if obs["peer"][0] > 0:
        return {"action": CLICK, "score": 0.9}
    return {"action": STAR if turn % 2 else SKIP, "score": 0.6 if turn % 2 else 0.4}


def run(venv, seed, max_steps=200):
    """Play with scripted replies; returns each slot's list of (turn record, rewards)."""
    obs, _ = venv.reset(seed=seed)
    per_slot = [[] for _ in range(venv.num_envs)]
    for _ in range(max_steps):
        if venv.all_done:
            break
        agent = venv.acting_agent
        replies = [scripted_reply(agent, o[agent]) if o else None for o in obs]
        step_obs, rewards, _, _, infos = venv.step(replies)
        obs = [new if new else old for new, old in zip(step_obs, obs)]
        for i, info in enumerate(infos):
            if info and TURN_RECORD_KEY in info[USER]:
                per_slot[i].append((info[USER][TURN_RECORD_KEY], rewards[i]))
    return per_slot


def test_results_do_not_depend_on_batch_size(data):
    small = run(VectorRecDialogEnv(data, num_envs=2, render_prompts=False), seed=3)
    large = run(VectorRecDialogEnv(data, num_envs=7, render_prompts=False), seed=3)
    assert all(small) and all(large)
    for i in range(2):
        assert data_equivalence(small[i], large[i])
    # slot seeds depend on (seed, i) only, and differ between slots
    assert episode_seed(3, 0) != episode_seed(3, 1)
    assert len({slot[0][0]["session_id"] for slot in large}) > 1


def test_autoreset_results_do_not_depend_on_batch_size(data):
    def episodes(num_envs):
        venv = VectorRecDialogEnv(data, num_envs=num_envs, autoreset=True, render_prompts=False)
        per_slot = run(venv, seed=11, max_steps=40)
        # drop episode_id (i + k * num_envs by design); keep everything else
        return [
            [({k: v for k, v in r.items() if k != "episode_id"}, w) for r, w in s] for s in per_slot
        ]

    a, b = episodes(1), episodes(3)
    assert len(a[0]) > 3
    assert data_equivalence(a[0], b[0])


def test_lock_step_and_done_handling(data):
    venv = VectorRecDialogEnv(data, num_envs=3, max_turns=2)
    obs, infos = venv.reset(
        seed=0, options=[{"session_id": 0}, {"session_id": 1}, {"session_id": 2}]
    )
    assert [i[USER]["session_id"] for i in infos] == [0, 1, 2]
    assert [i[USER]["episode_id"] for i in infos] == [0, 1, 2]
    assert venv.acting_agent == RECOMMENDER and venv.needs_action.all()
    prompts = venv.messages()
    assert all(p and p[0]["role"] == "system" for p in prompts)
    assert all(o[RECOMMENDER]["messages"] == tuple(p) for o, p in zip(obs, prompts))
    # slot 1 fails the format: its user has nothing to judge
    obs, rewards, *_ = venv.step([1, "no idea", 0])
    assert venv.acting_agent == USER
    assert venv.needs_action.tolist() == [True, False, True]
    assert venv.messages()[1] is None and venv.messages()[0][1]["role"] == "user"
    # slot 0 clicks the target (item 3 at position 1): done; the others go on
    obs, rewards, terms, truncs, infos = venv.step(
        [{"action": CLICK, "score": 0.9}, None, {"action": SKIP, "score": 0.3}]
    )
    assert terms[0] == {RECOMMENDER: True, USER: True}
    assert rewards[0][RECOMMENDER] == pytest.approx(0.95)
    assert rewards[1][RECOMMENDER] == pytest.approx(-1.0)
    assert venv.dones.tolist() == [True, False, False]
    assert venv.acting_agent == RECOMMENDER
    obs, rewards, terms, truncs, infos = venv.step([0, 0, 1])
    assert obs[0] == {} and rewards[0] == {} and infos[0] == {}  # a finished slot stays done
    # user phase of the last turn (missing replies are user format failures): truncated
    obs, rewards, terms, truncs, infos = venv.step([None, None, None])
    assert truncs[1] == {RECOMMENDER: True, USER: True} and truncs[2][USER]
    assert venv.all_done and venv.acting_agent is None
    assert not venv.needs_action.any()
    # explicit per-slot reset
    obs, infos = venv.reset_episode(1, options={"session_id": 4})
    assert infos[USER]["session_id"] == 4 and infos[USER]["episode_id"] == 1 + 3
    assert venv.dones.tolist() == [True, False, True] and venv.acting_agent == RECOMMENDER


def test_autoreset_same_step(data):
    venv = VectorRecDialogEnv(data, num_envs=2, autoreset=True, render_prompts=False)
    venv.reset(seed=0, options={"session_id": 0})
    venv.step([1, 0])  # slot 0 recommends the target, slot 1 an item with q = -1
    obs, rewards, terms, truncs, infos = venv.step(
        [{"action": CLICK, "score": 0.9}, {"action": SKIP, "score": 0.3}]
    )
    assert terms[0][USER] and not terms[1][USER]
    assert not venv.dones.any()  # slot 0 already runs its next episode
    assert obs[0][RECOMMENDER]["turn"] == 1 and obs[0][RECOMMENDER]["phase"] == 0
    final = infos[0][USER]["final_observation"]
    assert final["responses"][0] == CLICK and final["phase"] == 1
    assert infos[0][USER][TURN_RECORD_KEY]["terminated"]
    assert infos[0][RECOMMENDER]["reset_info"]["episode_id"] == 2  # slot 0, 2nd episode
    assert "final_observation" not in infos[1][USER]
    assert venv.acting_agent == RECOMMENDER  # both slots still in phase


def test_observations_in_space(data):
    venv = VectorRecDialogEnv(data, num_envs=4, autoreset=True)
    obs, _ = venv.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(30):
        agent = venv.acting_agent
        for o in obs:
            for a in venv.possible_agents:
                assert venv.observation_space(a).contains(o[a])
        replies = [
            int(rng.integers(6)) if agent == RECOMMENDER else int(rng.integers(4)) for _ in obs
        ]
        obs, *_ = venv.step(replies)


def test_bad_arguments(data):
    with pytest.raises(ValueError):
        VectorRecDialogEnv(data, num_envs=0)
    venv = VectorRecDialogEnv(data, num_envs=2)
    venv.reset(seed=0)
    with pytest.raises(ValueError):
        venv.step([0])
    with pytest.raises(ValueError):
        venv.reset(options=[{}])
