"""Batched rollouts (coars_agents.rollout) of tiny LLM policies through the RecDialog env.

A random tiny Llama (float64, so greedy choices have no near-ties) plays on the hand-built
``tinydata`` sessions (20 candidates). Prompts are kept short (no item summaries, three
history items) and the turn limit is 2, so every test runs in seconds.
"""

from __future__ import annotations

import pytest
import torch
from tinydata import tiny_dialog_data

from coars_agents.models import tiny_test_model
from coars_agents.policy import LLMPolicy, SamplingConfig
from coars_agents.rollout import Episode, LLMAgent, rollout
from coars_env.agents import CLICK, OracleUser, RandomRecommender
from coars_env.dialog.env import RECOMMENDER, USER
from coars_env.vector import VectorRecDialogEnv

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {"max_turns": 2, "max_summary_chars": 0, "max_history_items": 3}
SESSIONS = (0, 1, 2)
REASON_TOKENS = 4
GREEDY = SamplingConfig(greedy=True, max_new_tokens=16)


@pytest.fixture(scope="module")
def data():
    return tiny_dialog_data()


@pytest.fixture(scope="module")
def policy() -> LLMPolicy:
    # A large init (std 0.2) makes the random model's answers depend on the prompt; with
    # seed 0 the episodes of SESSIONS have both lengths (clicks at turn 1, and 2 turns), so
    # finished rows leave the batch while others go on.
    model, tokenizer = tiny_test_model(
        seed=0,
        dtype=torch.float64,
        hidden_size=64,
        num_layers=2,
        max_position_embeddings=2048,
        init_std=0.2,
    )
    return LLMPolicy(model, tokenizer)


def llm(policy: LLMPolicy, role: str, sampling: SamplingConfig = GREEDY) -> LLMAgent:
    return LLMAgent(policy, role, sampling=sampling, reason_tokens=REASON_TOKENS)


def llm_pair(policy: LLMPolicy, sampling: SamplingConfig = GREEDY) -> dict[str, LLMAgent]:
    return {RECOMMENDER: llm(policy, RECOMMENDER, sampling), USER: llm(policy, USER, sampling)}


def play(data, agents, sessions=SESSIONS, seed: int = 0) -> list[Episode]:
    venv = VectorRecDialogEnv(data, num_envs=len(sessions), **ENV)
    return rollout(venv, agents, seed=seed, options=[{"session_id": s} for s in sessions])


@pytest.fixture(scope="module")
def greedy_episodes(policy, data) -> list[Episode]:
    """LLM vs LLM, greedy, on SESSIONS in one batch of 3."""
    return play(data, llm_pair(policy))


def generations(ep: Episode):
    """Everything an LLM produced in an episode, for exact comparisons."""
    return [
        (side, t.turn, t.text, t.prompt_ids, t.completion_ids, t.forced.tolist())
        for side, turns in (("rec", ep.recommender), ("user", ep.user_agent))
        for t in turns
    ]


def records(ep: Episode) -> list[dict]:
    """Turn records without the slot-dependent episode id."""
    return [{k: v for k, v in r.items() if k != "episode_id"} for r in ep.turns]


# ----------------------------------------------------------------------------------------------


def test_llm_agents_play_through_the_env(policy, data, generate_calls):
    episodes = play(data, llm_pair(policy))
    assert [ep.session_id for ep in episodes] == list(SESSIONS)
    lengths = [ep.num_turns for ep in episodes]
    assert set(lengths) == {1, 2}, "fixture model should give episodes of both lengths"
    for ep in episodes:
        last = ep.turns[-1]
        assert last["terminated"] or last["truncated"]
        assert ep.hit == bool(last["hit"])
        # constrained decoding: every answer parses
        assert not any(r["rec_format_failure"] or r["user_format_failure"] for r in ep.turns)
        assert len(ep.recommender) == len(ep.user_agent) == ep.num_turns
        for k, (record, rec, usr) in enumerate(zip(ep.turns, ep.recommender, ep.user_agent)):
            assert record["turn"] == rec.turn == usr.turn == k + 1
            assert {"reward_rec", "reward_user", "mask_rec", "mask_user"} <= set(record)
            assert record["mask_rec"] in (0, 1) and record["mask_user"] in (0, 1)
            for turn, side in ((rec, "rec"), (usr, "user")):
                # the rendered prompt: system message (role + format) and the user message
                assert [m["role"] for m in turn.messages] == ["system", "user"]
                assert turn.prompt_ids == policy.render(turn.messages)
                n = len(turn.completion_ids)
                assert n > 0 and turn.logprobs.shape == (n,) and turn.forced.shape == (n,)
                assert turn.forced.any() and not turn.forced.all()  # template + free reason
                assert torch.all(turn.logprobs <= 0)
                assert turn.text == record[f"{side}_text"]
            assert "Candidates:" in rec.messages[1]["content"]
            assert rec.text.startswith("Item: ") and usr.text.startswith("Action: ")
            assert record["rec_position"] == int(rec.text.split()[1].strip()) - 1

    # ONE batched generate call per phase; its rows are the episodes still running.
    expected = []
    for t in range(max(lengths)):
        live = sum(n > t for n in lengths)
        expected += [live, live]  # recommender phase, user phase
    assert generate_calls == expected


def test_logprobs_are_aligned_with_completion_ids(policy, greedy_episodes):
    turns = [t for ep in greedy_episodes for t in ep.recommender + ep.user_agent]
    scored = policy.score([t.prompt_ids for t in turns], [t.completion_ids for t in turns])
    for turn, lp in zip(turns, scored):
        torch.testing.assert_close(turn.logprobs.double(), lp.double(), atol=1e-5, rtol=0)


def test_batched_rollout_equals_unbatched(policy, data, greedy_episodes):
    """Greedy float64: B=3 in lock-step gives what three B=1 rollouts give (other seeds too:
    with session ids and greedy decoding nothing else is random)."""
    batched = greedy_episodes
    singles = [play(data, llm_pair(policy), sessions=(s,), seed=10 + s)[0] for s in SESSIONS]
    for b, s in zip(batched, singles):
        assert b.session_id == s.session_id and b.candidates == s.candidates
        assert generations(b) == generations(s)
        assert records(b) == records(s)
        for tb, ts in zip(b.recommender + b.user_agent, s.recommender + s.user_agent):
            torch.testing.assert_close(tb.logprobs, ts.logprobs, atol=1e-5, rtol=0)


def test_llm_recommender_with_scripted_oracle_user(policy, data, generate_calls):
    episodes = play(data, {RECOMMENDER: llm(policy, RECOMMENDER), USER: OracleUser(data)})
    assert generate_calls and generate_calls[0] == len(SESSIONS)  # recommender phases only
    assert len(generate_calls) == max(ep.num_turns for ep in episodes)
    for ep in episodes:
        assert ep.user_agent == [] and len(ep.recommender) == ep.num_turns
        for r in ep.turns:  # the oracle clicks the target and only the target
            assert (r["action"] == CLICK) == bool(r["hit"])


def test_scripted_recommender_with_llm_user(policy, data, generate_calls):
    agents = {RECOMMENDER: RandomRecommender(seed=0), USER: llm(policy, USER)}
    episodes = play(data, agents)
    assert len(generate_calls) == max(ep.num_turns for ep in episodes)  # user phases only
    for ep in episodes:
        assert ep.recommender == [] and len(ep.user_agent) == ep.num_turns
        assert not any(r["user_format_failure"] for r in ep.turns)
        positions = [r["rec_position"] for r in ep.turns]
        assert len(set(positions)) == len(positions)  # the random recommender never repeats


def test_recommender_format_failures_keep_turn_records(policy, data, generate_calls):
    """A turn-1 failure in every slot: the user phase has nothing to judge (no generate
    call), and the failed turn is still recorded."""

    def fails_first_turn(obs) -> str | int:
        return "no idea, sorry" if int(obs["turn"]) == 1 else 0

    episodes = play(data, {RECOMMENDER: fails_first_turn, USER: llm(policy, USER)})
    for ep in episodes:
        assert [r["turn"] for r in ep.turns][:1] == [1]
        assert ep.turns[0]["rec_format_failure"] and ep.turns[0]["action"] == -1
        assert ep.num_turns == 2 or ep.turns[-1]["terminated"]
        assert [t.turn for t in ep.user_agent] == [r["turn"] for r in ep.turns[1:]]
    assert generate_calls == [len(SESSIONS)]  # only the turn-2 user phase


def test_same_seed_same_episodes_when_sampling(policy, data):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16)
    sessions = SESSIONS[:2]
    first = play(data, llm_pair(policy, sampling), sessions, seed=3)
    again = play(data, llm_pair(policy, sampling), sessions, seed=3)
    other = play(data, llm_pair(policy, sampling), sessions, seed=4)
    for a, b in zip(first, again):
        assert generations(a) == generations(b)
        assert records(a) == records(b)
        for ta, tb in zip(a.recommender + a.user_agent, b.recommender + b.user_agent):
            assert torch.equal(ta.logprobs, tb.logprobs)
    assert [generations(e) for e in first] != [generations(e) for e in other]


def test_exclude_recommended_never_repeats_a_candidate(policy, data):
    """Against the oracle user (who clicks only the target) a greedy tiny recommender plays
    all 5 turns of most sessions; with exclude_recommended it never names a candidate twice,
    and it is the same agent otherwise (identical first turns)."""
    sessions = tuple(range(5))

    def five_turns(exclude: bool) -> list[Episode]:
        agent = LLMAgent(
            policy,
            RECOMMENDER,
            sampling=GREEDY,
            reason_tokens=REASON_TOKENS,
            exclude_recommended=exclude,
        )
        venv = VectorRecDialogEnv(data, num_envs=len(sessions), **{**ENV, "max_turns": 5})
        agents = {RECOMMENDER: agent, USER: OracleUser(data)}
        return rollout(venv, agents, seed=0, options=[{"session_id": s} for s in sessions])

    plain, excluding = five_turns(False), five_turns(True)
    repeats = lambda eps: sum(r["repeat"] for ep in eps for r in ep.turns)  # noqa: E731
    assert repeats(plain) > 0, "fixture: the plain greedy agent should repeat itself"
    assert repeats(excluding) == 0
    for ep in excluding:
        positions = [r["rec_position"] for r in ep.turns]
        assert len(set(positions)) == len(positions)
    assert [ep.turns[0]["rec_position"] for ep in plain] == [
        ep.turns[0]["rec_position"] for ep in excluding
    ]
