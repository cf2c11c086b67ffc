"""Training-free baselines (coars_agents.baselines) and the prompt options they use."""

from __future__ import annotations

import math

import pytest
from evaltools import SHORT_PROMPTS, synthetic, tiny_policy
from tinydata import tiny_dialog_data

from coars_agents.baselines import (
    AFL_RECOMMENDER_INSTRUCTION,
    AFL_USER_INSTRUCTION,
    Baseline,
    afl,
    zero_shot,
)
from coars_agents.policy import LLMPolicy
from coars_agents.rollout import LLMAgent, rollout
from coars_env.dialog import prompts
from coars_env.dialog.config import EnvConfig
from coars_env.dialog.env import RECOMMENDER, USER, RecDialogEnv
from coars_env.dialog.parsing import ACTION_NAMES, REC_FORMAT
from coars_env.metrics import alignment_observation
from coars_env.vector import VectorRecDialogEnv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy() -> LLMPolicy:
    # With seed 1 the tiny user agent does not click at turn 1, so AFL dialogues go on.
    return tiny_policy(seed=1)


# ------------------------------------------------------------------------------ prompt options


def test_instructions_go_before_the_answer_format():
    plain = prompts.recommender_system(20, 5, "movie")
    fmt = REC_FORMAT.format(n=20)
    assert plain == prompts.REC_SYSTEM.format(max_turns=5, noun="movie", answer_format=fmt)
    marker = "\n" + prompts.ANSWER_HEADER
    assert prompts.recommender_system(20, 5, "movie", "Reflect first.") == plain.replace(
        marker, "\nReflect first." + marker
    )
    user_plain = prompts.user_system("movie")
    assert prompts.user_system("movie", True, "  ") == user_plain  # blank: unchanged
    assert prompts.user_system("movie", True, "Be strict.") == user_plain.replace(
        marker, "\nBe strict." + marker
    )


def test_env_instruction_options():
    data = tiny_dialog_data()
    default = RecDialogEnv(data)
    default.reset(options={"session_id": 0})
    explicit = RecDialogEnv(data, EnvConfig(rec_instruction="", user_instruction=""))
    explicit.reset(options={"session_id": 0})
    assert default.messages() == explicit.messages()  # backward compatible

    # a character outside the base charset must not break the observation space
    env = RecDialogEnv(data, rec_instruction="Think → then answer.", user_instruction="Be fair ✓")
    obs, _ = env.reset(options={"session_id": 0})
    assert (
        "Think → then answer.\n" + prompts.ANSWER_HEADER
        in obs[RECOMMENDER]["messages"][0]["content"]
    )
    assert env.observation_space(RECOMMENDER).contains(obs[RECOMMENDER])
    obs, *_ = env.step({RECOMMENDER: "Item: 1\nReason: fits"})
    assert "Be fair ✓" in obs[USER]["messages"][0]["content"]
    assert env.observation_space(USER).contains(obs[USER])
    # the alignment protocol renders the user prompt with the same option
    aligned = alignment_observation(env, data.alignment[0], 0)
    assert "Be fair ✓" in aligned["messages"][0]["content"]


# ------------------------------------------------------------------------------ zero-shot


def test_zero_shot_end_to_end(policy, generate_calls):
    baseline = zero_shot(policy, reason_tokens=4)
    assert isinstance(baseline, Baseline) and baseline.user == "oracle"
    assert baseline.env_overrides["max_turns"] == 1
    assert isinstance(baseline.recommender, LLMAgent) and baseline.recommender.adapter is None
    r = baseline.evaluate(
        synthetic(), n_sessions=4, batch_size=4, env_overrides=SHORT_PROMPTS, progress=False
    )
    assert r.name == "zero-shot" and r.config["max_turns"] == 1
    assert generate_calls == [4]  # one batched recommender call; the oracle user is scripted
    assert (r.episodes["turns"] == 1).all()
    assert r["hit@1"].mean == r["turn1_hit@1"].mean == r["click_rate"].mean
    assert r["rec_format_failure_rate"].mean == 0.0 and r["wrong_click_rate"].mean == 0.0
    assert r["ndcg@10"].n == r["turn1_target_prob"].n == 4  # ranked by choice probability
    assert math.isnan(r["user_f1"].mean)
    assert r.chance["hit@1"] == 0.05  # one recommendation out of 20

    with_llm_user = zero_shot(policy, user="llm", reason_tokens=4)
    assert isinstance(with_llm_user.user, LLMAgent) and with_llm_user.user.role == USER


# ------------------------------------------------------------------------------ AFL


def test_afl_dialogue_carries_feedback_and_instructions(policy):
    baseline = afl(policy, max_rounds=2, reason_tokens=4)
    assert baseline.env_overrides["rec_instruction"] == AFL_RECOMMENDER_INSTRUCTION
    data = synthetic()
    venv = VectorRecDialogEnv(data, num_envs=3, **{**baseline.env_overrides, **SHORT_PROMPTS})
    episodes = rollout(
        venv, baseline.agents(), seed=0, options=[{"session_id": s} for s in (0, 1, 2)]
    )
    assert any(ep.num_turns == 2 for ep in episodes), "fixture model should not click at once"
    for ep in episodes:
        assert not any(r["rec_format_failure"] or r["user_format_failure"] for r in ep.turns)
        for turn in ep.recommender:
            assert AFL_RECOMMENDER_INSTRUCTION in turn.messages[0]["content"]
        for turn in ep.user_agent:
            assert AFL_USER_INSTRUCTION in turn.messages[0]["content"]
        if ep.num_turns == 2:  # turn 2: the recommender reads the user's turn-1 feedback
            first = ep.turns[0]
            prompt = ep.recommender[1].messages[1]["content"]
            assert "Conversation so far:" in prompt
            assert f"User: {ACTION_NAMES[first['action']]} (score {first['score']:.2f})" in prompt
            assert "Conversation so far:" in ep.user_agent[1].messages[1]["content"]


def test_afl_end_to_end(policy):
    r = afl(policy, max_rounds=2, reason_tokens=4).evaluate(
        synthetic(),
        n_sessions=3,
        batch_size=3,
        n_alignment_users=1,
        env_overrides=SHORT_PROMPTS,
        progress=False,
    )
    assert r.name == "AFL-style" and r.config["max_turns"] == 2
    assert r["hit@1"].n == 3 and 1 <= r["avg_turns"].mean <= 2
    assert r["rec_format_failure_rate"].mean == 0.0 and r["user_format_failure_rate"].mean == 0.0
    assert len(r.alignment_decisions) == 20 and 0.0 <= r["user_f1"].mean <= 1.0
    assert r.chance["hit@1"] == 0.1  # 2 rounds, 20 candidates
