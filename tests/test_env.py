"""RecDialogEnv: PettingZoo API, spaces, determinism, exact rewards, no target leaks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from envtools import TITLES, play, tiny_dialog_data
from gymnasium.utils.env_checker import data_equivalence
from pettingzoo.test import parallel_api_test, parallel_seed_test

import coars_env
from coars_env.dialog.env import RECOMMENDER, TURN_RECORD_KEY, USER, RecDialogEnv
from coars_env.dialog.parsing import CLICK, DISLIKE, SKIP, STAR, format_recommender, format_user

EXACT = 1e-9
CONTRACT_RECORD_KEYS = (
    "episode_id session_id user turn rec_text rec_position rec_item rec_format_failure repeat "
    "user_text action score user_format_failure score_clamped hit q n_peers_liked "
    "n_peers_disliked reward_rec reward_user mask_rec mask_user terminated truncated"
).split()
OBS_KEYS = {
    "phase",
    "turn",
    "history",
    "candidates",
    "recommended",
    "responses",
    "scores",
    "peer",
    "messages",
}


@pytest.fixture(scope="module")
def data():
    return tiny_dialog_data()


def u(action, score, reason=""):
    return {"action": action, "score": score, "reason": reason}


# ----------------------------------------------------------------------------- API


def test_pettingzoo_parallel_api(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the API test reports problems as warnings
        parallel_api_test(RecDialogEnv(data), num_cycles=50)
        parallel_api_test(RecDialogEnv(data, render_prompts=False), num_cycles=50)


def test_pettingzoo_parallel_seed(data):
    parallel_seed_test(lambda: RecDialogEnv(data))


def test_metadata_agents_and_cached_spaces(data):
    env = RecDialogEnv(data)
    assert env.metadata["name"] == "recdialog_v0"
    assert env.possible_agents == ["recommender", "user"]
    for agent in env.possible_agents:
        assert env.observation_space(agent) is env.observation_space(agent)
        assert env.action_space(agent) is env.action_space(agent)
        assert set(env.observation_space(agent).spaces) == OBS_KEYS
    space = env.observation_space(RECOMMENDER)
    assert space["candidates"].shape == (6,) and space["recommended"].shape == (5,)
    assert space["history"].shape == (4,)  # the longest history of the data
    # every character of the item texts is in the Text charset
    assert all(set(t) <= space["messages"].feature_space["content"].character_set for t in TITLES)


def random_reply(env, rng, agent):
    """A mix of structured, canonical, messy and random-text replies."""
    kind = rng.integers(4)
    if agent == RECOMMENDER:
        n = env.n_candidates
        if kind == 0:
            return int(rng.integers(-1, n + 1))
        if kind == 1:
            return format_recommender(int(rng.integers(n)), "because")
        if kind == 2:
            return env.catalog.titles[env.session.candidates[int(rng.integers(n))]]
        return env.action_space(agent).sample()
    if kind == 0:
        return {"action": int(rng.integers(4)), "score": float(rng.random())}
    if kind == 1:
        return format_user(int(rng.integers(4)), float(rng.random()), "so so")
    if kind == 2:
        return f"**Action:** {['click', 'star', 'skip', 'dislike'][rng.integers(4)]}"
    return env.action_space(agent).sample()


def run_random_episodes(env, seed, n_episodes):
    rng = np.random.default_rng(seed)
    for agent in env.possible_agents:
        env.action_space(agent).seed(seed)
    trace = []
    for episode in range(n_episodes):
        obs, infos = env.reset(seed=seed + episode)
        trace.append((obs, infos))
        while env.agents:
            for agent in env.possible_agents:
                assert env.observation_space(agent).contains(obs[agent]), (agent, obs[agent])
            actions = {a: random_reply(env, rng, a) for a in env.agents}
            obs, rew, term, trunc, infos = env.step(actions)
            trace.append((obs, rew, term, trunc, infos))
        for agent in env.possible_agents:
            assert env.observation_space(agent).contains(obs[agent])
    return trace


def test_random_episodes_stay_in_their_spaces(data):
    run_random_episodes(RecDialogEnv(data), seed=1, n_episodes=30)
    run_random_episodes(
        RecDialogEnv(data, render_prompts=False, max_turns=2), seed=2, n_episodes=10
    )
    run_random_episodes(RecDialogEnv(data, max_prompt_chars=200), seed=3, n_episodes=10)


def test_same_seed_same_episodes(data):
    a = run_random_episodes(RecDialogEnv(data), seed=7, n_episodes=8)
    b = run_random_episodes(RecDialogEnv(data), seed=7, n_episodes=8)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert data_equivalence(x, y)


def test_session_selection_and_seeding(data):
    env = RecDialogEnv(data)
    _, infos = env.reset(options={"session_id": 3})
    assert infos[USER]["session_id"] == 3 and env.session.session_id == 3
    with pytest.raises(ValueError):
        env.reset(options={"session_id": len(data.sessions)})
    env.reset(options={"unknown": 1})  # other option keys are ignored

    def sessions(env, seed):
        first = env.reset(seed=seed)[1][USER]["session_id"]
        return [first] + [env.reset()[1][USER]["session_id"] for _ in range(20)]

    assert sessions(RecDialogEnv(data), 5) == sessions(RecDialogEnv(data), 5)
    assert len(set(sessions(RecDialogEnv(data), 5))) > 1
    env = RecDialogEnv(data)
    assert [env.reset()[1][USER]["episode_id"] for _ in range(3)] == [0, 1, 2]
    assert env.reset(options={"episode_id": 42})[1][USER]["episode_id"] == 42


def test_phases_alternate_and_other_agent_is_ignored(data):
    env = RecDialogEnv(data)
    obs, _ = env.reset(seed=0, options={"session_id": 0})
    assert obs[RECOMMENDER]["phase"] == 0 and obs[RECOMMENDER]["turn"] == 1
    assert obs[RECOMMENDER]["messages"] and obs[USER]["messages"] == ()
    assert env.acting_agent == RECOMMENDER
    # garbage for the non-acting agent is fine
    obs, rew, *_ = env.step({RECOMMENDER: 4, USER: object()})
    assert rew == {RECOMMENDER: 0.0, USER: 0.0}
    assert obs[USER]["phase"] == 1 and env.acting_agent == USER
    assert obs[USER]["messages"] and obs[RECOMMENDER]["messages"] == ()
    assert obs[USER]["recommended"][0] == 4
    assert obs[USER]["peer"] == pytest.approx([0.5, 2, 1])  # item 0: peers 10, 12 liked, 11 not
    obs, *_ = env.step({RECOMMENDER: "Item: 99", USER: u(SKIP, 0.4)})
    assert obs[RECOMMENDER]["phase"] == 0 and obs[RECOMMENDER]["turn"] == 2
    assert obs[RECOMMENDER]["responses"][0] == SKIP
    assert obs[RECOMMENDER]["scores"][0] == pytest.approx(0.4)
    assert not obs[RECOMMENDER]["peer"].any()


def test_step_after_the_end_raises(data):
    env = RecDialogEnv(data)
    play(env, [1, u(CLICK, 0.9)], session_id=0)
    assert env.agents == []
    with pytest.raises(RuntimeError):
        env.step({RECOMMENDER: 0})


# ----------------------------------------------------------------------------- rewards


def test_worked_trajectory_miss_repeat_then_hit_at_turn_3(data):
    """Session 0: target = item 3 at position 1 (q = 0.5); position 4 is item 0 (q = 0.5)."""
    env = RecDialogEnv(data)
    rewards, records = play(
        env,
        [
            format_recommender(4, "you like romance"),
            format_user(DISLIKE, 0.2, "not my taste"),
            4,  # repeat of a miss
            u(SKIP, 0.4),
            "Item: Toy Story 2\nReason: you loved Toy Story",
            "Action: click\nScore: 0.9\nReason: yes",
        ],
    )
    assert [r["turn"] for r in records] == [1, 2, 3]
    t1, t2, t3 = records
    # turn 1: METHOD.md's miss, s = 0.2, q = 0.5
    assert (t1["hit"], t1["q"], t1["action"]) == (False, pytest.approx(0.5), DISLIKE)
    assert t1["reward_rec"] == pytest.approx(-0.6, abs=EXACT)
    assert t1["reward_user"] == pytest.approx(0.618, abs=EXACT)
    assert rewards[0] == {RECOMMENDER: 0.0, USER: 0.0}  # recommender phase
    assert rewards[1][RECOMMENDER] == pytest.approx(-0.6, abs=EXACT)
    # turn 2: a repeat is a miss plus the format penalty; the user turn is masked
    assert t2["repeat"] and not t2["hit"]
    assert t2["reward_rec"] == pytest.approx(-(0.5 + 0.2) - 0.5, abs=EXACT)
    assert t2["reward_user"] == pytest.approx(0.2 * 1.01, abs=EXACT)
    assert (t2["mask_rec"], t2["mask_user"]) == (1.0, 0.0)
    # turn 3: METHOD.md's hit at t = 3, s = 0.9, q = 0.5
    assert t3["hit"] and t3["rec_position"] == 1 and t3["rec_item"] == 3
    assert t3["reward_rec"] == pytest.approx(0.7695, abs=EXACT)
    assert t3["reward_user"] == pytest.approx(0.768, abs=EXACT)
    assert rewards[5] == {RECOMMENDER: t3["reward_rec"], USER: t3["reward_user"]}
    assert t3["terminated"] and not t3["truncated"]
    assert t1["rec_text"] == "Item: 5\nReason: you like romance" and t2["rec_text"] == ""


def test_hit_at_turn_1(data):
    env = RecDialogEnv(data)
    rewards, (t1,) = play(env, [1, u(CLICK, 0.9)])
    assert t1["hit"] and t1["terminated"]
    assert t1["reward_rec"] == pytest.approx(0.95, abs=EXACT)
    assert t1["reward_user"] == pytest.approx(0.768, abs=EXACT)
    assert (t1["mask_rec"], t1["mask_user"]) == (1.0, 1.0)


def test_miss_but_positive_masked_for_user_only(data):
    env = RecDialogEnv(data)
    _, (t1,) = play(env, [0, u(STAR, 0.7)])  # item 7: q = -1
    assert not t1["hit"] and t1["q"] == pytest.approx(-1.0)
    assert t1["reward_rec"] == pytest.approx(-0.85, abs=EXACT)
    assert t1["reward_user"] == pytest.approx(-0.4 * 1.04, abs=EXACT)  # the alpha*q term
    assert (t1["mask_rec"], t1["mask_user"]) == (1.0, 0.0)
    env = RecDialogEnv(data, exclude_miss_positive="both")
    _, (t1,) = play(env, [0, u(STAR, 0.7)])
    assert (t1["mask_rec"], t1["mask_user"]) == (0.0, 0.0)
    env = RecDialogEnv(data, exclude_miss_positive="none")  # the ablation: nothing masked
    _, (t1,) = play(env, [0, u(STAR, 0.7)])
    assert (t1["mask_rec"], t1["mask_user"]) == (1.0, 1.0)
    assert t1["reward_user"] == pytest.approx(-0.4 * 1.04, abs=EXACT)


def test_wrong_click_terminates(data):
    env = RecDialogEnv(data)
    _, (t1,) = play(env, [2, u(CLICK, 0.8)])
    assert t1["terminated"] and not t1["hit"] and t1["mask_user"] == 0.0
    assert t1["reward_rec"] == pytest.approx(-0.9, abs=EXACT)


def test_recommender_format_failure(data):
    env = RecDialogEnv(data)
    env.reset(options={"session_id": 0})
    obs, rew, _, _, infos = env.step({RECOMMENDER: "I am not sure, sorry."})
    assert infos[RECOMMENDER]["format_failure"] and rew[RECOMMENDER] == 0.0
    # nothing to judge: the user phase happens, but the user need not (and cannot) act
    assert env.acting_agent is None and env.phase == 1
    assert obs[USER]["messages"] == () and obs[USER]["recommended"][0] == -1
    assert env.messages(USER) == []
    obs, rew, term, trunc, infos = env.step({USER: u(CLICK, 0.99)})  # ignored
    record = infos[USER][TURN_RECORD_KEY]
    assert record["rec_format_failure"] and record["action"] == -1 and record["score"] == 0.0
    assert rew == {RECOMMENDER: pytest.approx(-1.0), USER: 0.0}
    assert (record["mask_rec"], record["mask_user"]) == (1.0, 0.0)
    assert not term[USER] and obs[RECOMMENDER]["turn"] == 2
    assert "format error" in obs[RECOMMENDER]["messages"][1]["content"]


def test_user_format_failure(data):
    env = RecDialogEnv(data, format_penalty=-0.25)
    _, (t1,) = play(env, [2, "hmm, hard to say"])  # item 1: no peer opinions, q = 0
    assert t1["user_format_failure"] and t1["action"] == SKIP and t1["score"] == 0.5
    assert t1["reward_user"] == pytest.approx(-0.25, abs=EXACT)
    assert t1["reward_rec"] == pytest.approx(-0.75, abs=EXACT)
    assert t1["mask_user"] == 1.0
    assert not t1["terminated"]


def test_score_clamped_flag(data):
    env = RecDialogEnv(data)
    _, (t1,) = play(env, [2, "Action: skip\nScore: 0.9"])
    assert t1["score_clamped"] and t1["score"] == 0.5


def test_termination_vs_truncation(data):
    env = RecDialogEnv(data, max_turns=2)
    env.reset(options={"session_id": 0})
    for pos in (0, 2):
        env.step({RECOMMENDER: pos})
        obs, rew, term, trunc, infos = env.step({USER: u(SKIP, 0.4)})
    assert term == {RECOMMENDER: False, USER: False}
    assert trunc == {RECOMMENDER: True, USER: True}
    assert env.agents == []
    assert obs[USER]["turn"] == 2 and obs[USER]["phase"] == 1  # the last observation
    assert list(obs[USER]["responses"]) == [SKIP, SKIP]
    assert obs[USER]["messages"] == ()
    # a click at the last turn terminates (not truncates)
    _, records = play(env, [0, u(SKIP, 0.4), 1, u(CLICK, 0.8)])
    assert records[-1]["terminated"] and not records[-1]["truncated"]


def test_turn_record_schema_and_infos(data):
    env = RecDialogEnv(data)
    env.reset(options={"session_id": 0})
    _, _, _, _, infos = env.step({RECOMMENDER: 0})
    assert TURN_RECORD_KEY not in infos[RECOMMENDER] and infos[USER] == {}
    assert set(infos[RECOMMENDER]) == {"format_failure", "flags", "repeat"}
    _, _, _, _, infos = env.step({USER: u(SKIP, 0.4)})
    record = infos[RECOMMENDER][TURN_RECORD_KEY]
    assert record is infos[USER][TURN_RECORD_KEY]
    assert list(record)[: len(CONTRACT_RECORD_KEYS)] == CONTRACT_RECORD_KEYS
    assert "target" not in record and "target" not in infos[USER]
    assert infos[USER]["mask"] == record["mask_user"]
    for key in ("time", "seconds", "wall"):  # no timings
        assert not any(key in k for k in record)


# ----------------------------------------------------------------------------- leaks


def all_text(obs):
    return "\n".join(m["content"] for agent_obs in obs.values() for m in agent_obs["messages"])


def test_target_never_marked_in_observations():
    """Two sessions that differ only in the target give identical observations."""
    from envtools import SESSIONS

    user, history, _, cands, top1, peers = SESSIONS[0]
    same = [(user, history, cands[i], cands, top1, peers) for i in range(len(cands))]
    env = RecDialogEnv(tiny_dialog_data(sessions=same), max_turns=5)
    replies = [0, u(SKIP, 0.4), "Item: 3", "Action: star\nScore: 0.6", 5, u(SKIP, 0.3)]
    replies += ["Item: 2\nReason: x", u(DISLIKE, 0.1), 4, u(SKIP, 0.3)]
    traces = []
    for session_id in range(len(cands)):
        obs, _ = env.reset(options={"session_id": session_id})
        trace = [obs]
        for reply in replies:
            agent = RECOMMENDER if env.phase == 0 else USER
            obs, *_ = env.step({agent: reply})
            trace.append(obs)
        traces.append(trace)
    # session i's target is candidate i: its episode sees exactly what the others see
    for trace in traces[1:]:
        assert data_equivalence(trace, traces[0])


def test_target_title_only_in_candidate_list(data):
    env = RecDialogEnv(data)
    for session in data.sessions:
        obs, _ = env.reset(options={"session_id": session.session_id})
        text = all_text(obs)
        target_line = env.catalog.line(session.target)
        assert text.count(env.catalog.title(session.target)) == 1
        assert f"{session.candidates.index(session.target) + 1}. {target_line}" in text
        miss = next(p for p, i in enumerate(session.candidates) if i != session.target)
        obs, *_ = env.step({RECOMMENDER: miss})
        assert env.catalog.title(session.target) not in all_text(obs)  # the user prompt
        assert "target" not in all_text(obs).lower()


def test_reveal_target_puts_it_in_infos_only(data):
    env = RecDialogEnv(data, reveal_target=True)
    obs, infos = env.reset(options={"session_id": 0})
    assert infos[USER]["target"] == 3 and infos[RECOMMENDER]["target_position"] == 1
    _, _, _, _, infos = env.step({RECOMMENDER: 0})
    assert infos[RECOMMENDER]["target"] == 3
    obs, _, _, _, infos = env.step({USER: u(SKIP, 0.3)})
    assert infos[USER][TURN_RECORD_KEY]["target"] == 3
    assert "target" not in obs[USER]


# ----------------------------------------------------------------------------- prompts


def test_prompts_content(data):
    env = RecDialogEnv(data, sasrec_hint=True, render_mode="ansi")
    obs, _ = env.reset(options={"session_id": 0})
    system, user_msg = obs[RECOMMENDER]["messages"]
    assert system["role"] == "system" and user_msg["role"] == "user"
    assert "Item: <candidate number 1-6>\nReason:" in system["content"]
    content = user_msg["content"]
    assert content.index("Toy Story (1995)") < content.index("12 Angry Men (1957)")  # oldest first
    assert "1. Heat (1995)" in content and "6. 東京物語 (Tokyo Story) (1953)" in content
    assert "ranks candidate 3 first" in content  # sasrec_top1 = item 1 at position 2
    obs, *_ = env.step({RECOMMENDER: "Item: 5\nReason: a   charming\nfilm 😀"})
    system, user_msg = obs[USER]["messages"]
    assert "Action: <click|star|skip|dislike>\nScore:" in system["content"]
    content = user_msg["content"]
    assert "The recommender suggests: Amélie (2001)" in content
    assert "Its reason: a charming film \ufffd" in content  # cleaned, inside the charset
    assert "Of 3 similar users with an opinion, 2 liked it, 1 disliked it." in content
    assert "Candidates:" not in content
    env.step({USER: "Action: skip\nScore: 0.4\nReason: seen it"})
    content = env.messages(RECOMMENDER)[1]["content"]
    assert "Turn 1: you recommended candidate 5, Amélie (2001)" in content
    assert "User: skip (score 0.40). seen it" in content
    assert "turn 1: recommender: [5] Amélie (2001) | user: skip 0.40" in env.render()

    env = RecDialogEnv(data, peer_opinions_in_prompt=False, render_prompts=False)
    obs, _ = env.reset(options={"session_id": 0})
    assert obs[RECOMMENDER]["messages"] == ()
    obs, *_ = env.step({RECOMMENDER: 4})
    assert obs[USER]["messages"] == ()
    assert "similar users" not in env.messages(USER)[1]["content"]
    assert "similar users" not in env.messages(USER)[0]["content"]


def test_candidate_numbers_last_puts_each_number_after_its_item(data):
    first = RecDialogEnv(data).reset(options={"session_id": 0})[0][RECOMMENDER]["messages"]
    env = RecDialogEnv(data, candidate_numbers="last")
    last = env.reset(options={"session_id": 0})[0][RECOMMENDER]["messages"]
    assert last[0] == first[0]  # same system message and answer format
    lines = last[1]["content"].split("\n")
    start = lines.index("Candidates:") + 1
    assert lines[start] == "- Heat (1995) [Action, Crime, Thriller] = candidate 1"
    assert lines[start + 5].startswith("- 東京物語 (Tokyo Story) (1953)")
    assert lines[start + 5].endswith(" = candidate 6")
    # Only the candidate lines differ from the default prompt.
    old = first[1]["content"].split("\n")
    changed = [i for i, (a, b) in enumerate(zip(old, lines)) if a != b]
    assert len(old) == len(lines) and changed == list(range(start, start + 6))
    # The answer still names the number: candidate 5 is the same item either way.
    obs, *_ = env.step({RECOMMENDER: "Item: 5\nReason: fits"})
    assert obs[USER]["recommended"][0] == 4
    with pytest.raises(ValueError, match="candidate_numbers must be 'first' or 'last'"):
        RecDialogEnv(data, candidate_numbers="middle")


def test_prompt_shortening_rule(data):
    env = RecDialogEnv(data, max_turns=5, max_prompt_chars=1400)
    obs, _ = env.reset(options={"session_id": 1})  # history of 4 items
    for _ in range(3):
        env.step({RECOMMENDER: 1})
        env.step({USER: u(SKIP, 0.3, "x" * 200)})
    full = env.messages(RECOMMENDER, max_chars=100_000)[1]["content"]
    short = env.messages(RECOMMENDER)[1]["content"]
    assert len(full) > 1400 >= len(short)
    history = env.session.history
    # oldest history first (down to 3 items), then the oldest memory turn
    assert env.catalog.line(history[0]) in full and env.catalog.line(history[0]) not in short
    assert all(env.catalog.line(i) in short for i in history[1:])
    assert "Turn 1: you recommended" in full and "Turn 1: you recommended" not in short
    assert "Turn 3: you recommended" in short and "1 older turns omitted" in short
    assert "Candidates:" in short and short.endswith("Turn 4 of 5. Your answer:")
    # explicit limits (what the LLM layer passes)
    limited = env.messages(RECOMMENDER, max_history=1, max_memory_turns=1, max_chars=100_000)
    content = limited[1]["content"]
    assert "3 older omitted" in content and "2 older turns omitted" in content
    assert "Turn 3: you recommended" in content and "Turn 2:" not in content
    # far too small: lines are dropped, then the text is cut, but the question stays
    tiny = env.messages(RECOMMENDER, max_chars=400)[1]["content"]
    assert len(tiny) <= 400 and tiny.endswith("\nTurn 4 of 5. Your answer:")
    assert env.catalog.line(history[-1]) in tiny and "…" in tiny


# ----------------------------------------------------------------------------- registry


def test_registry_ids_and_unknown_overrides():
    import pettingzoo

    assert coars_env.list_envs() == [
        "RecDialog-ml1m",
        "RecDialog-ml100k",
        "RecDialog-lastfm",
        "RecDialog-synthetic",
    ]
    for env_id in coars_env.list_envs():
        assert f"coars/{env_id}-v0" in pettingzoo.parallel_registry
    with pytest.raises(TypeError, match="max_turns"):
        coars_env.make("RecDialog-synthetic", max_turn=3)
    with pytest.raises(ValueError, match="RecDialog-ml1m"):
        coars_env.make("RecDialog-nope")


@pytest.mark.slow
def test_make_through_the_data_pipeline(tmp_path):
    """coars_env.make / pettingzoo.make on the embedded synthetic dataset (trains SASRec)."""
    import pettingzoo

    data_options = {
        "progress": False,
        "cache_dir": str(tmp_path),
        "sasrec": {"epochs": 1, "num_threads": 1},
    }
    env = coars_env.make("RecDialog-synthetic", split="test", seed=0, max_turns=3, **data_options)
    assert env.max_turns == 3 and env.n_candidates == 20 and env.data.split == "test"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel_api_test(env, num_cycles=20)
    run_random_episodes(env, seed=0, n_episodes=5)
    pz_env = pettingzoo.make("parallel", "coars/RecDialog-synthetic", split="valid", **data_options)
    assert isinstance(pz_env, RecDialogEnv) and pz_env.data.split == "valid"
