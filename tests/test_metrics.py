"""Exact metric values on hand-built episodes (tests/tinydata.py: hand_built_episodes)."""

from __future__ import annotations

import math

import pytest
from tinydata import hand_built_episodes, tiny_dialog_data

from coars_env.dialog.env import USER, RecDialogEnv
from coars_env.logs import summarize_episode
from coars_env.metrics import (
    CHANCE,
    alignment_metrics,
    alignment_observation,
    always_accept_f1,
    episodes_from_turns,
    evaluate_user_alignment,
    hit_rate_by_turn,
    mean_ci,
    metrics_table,
    proportion_ci,
    random_recommender_hit_rate,
    random_turn1_hit_rate,
    recommendation_metrics,
)


def _episodes():
    return [summarize_episode(turns) for turns in hand_built_episodes()]


def _pick(summary: dict, keys: str) -> tuple:
    return tuple(summary[k] for k in keys.split())


def test_summaries_of_hand_built_episodes():
    a, b, c, d = _episodes()
    assert _pick(a, "hit hit_turn first_turn_hit clicked wrong_click") == (
        True,
        1,
        True,
        True,
        False,
    )
    assert _pick(b, "hit hit_turn clicked wrong_click turns") == (False, 0, True, True, 3)
    assert _pick(c, "hit hit_turn clicked truncated turns") == (False, 2, False, True, 5)
    assert _pick(d, "hit hit_turn rec_format_failures final_item") == (True, 2, 1, 102)
    assert b["reward_rec"] == pytest.approx(-2.4)
    assert c["reward_user"] == pytest.approx(1.2)


def test_recommendation_metrics_exact():
    m = recommendation_metrics(_episodes())
    assert m["hit@1"].mean == 0.5 and m["hit@1"].n == 4
    assert m["turn1_hit@1"].mean == 0.25
    assert m["avg_turns"].mean == 2.75
    assert m["click_rate"].mean == 0.75
    assert m["wrong_click_rate"].mean == 0.25
    assert m["rec_format_failure_rate"].mean == pytest.approx(1 / 11)
    assert m["rec_format_failure_rate"].n == 11
    assert m["user_format_failure_rate"].mean == 0.0
    assert m["user_format_failure_rate"].n == 10  # not asked after the recommender failure
    assert m["repeat_rate"].mean == 0.0
    assert m["reward_rec"].mean == pytest.approx((0.95 - 2.4 - 2.02 - 0.1) / 4)
    # Wilson 95% interval of 2/4 and the normal interval of turns [1, 3, 5, 2].
    assert m["hit@1"].low == pytest.approx(0.15004, abs=1e-5)
    assert m["hit@1"].high == pytest.approx(0.84996, abs=1e-5)
    half = 1.96 * math.sqrt(8.75 / 3) / 2
    assert m["avg_turns"].low == pytest.approx(2.75 - half)
    assert m["avg_turns"].high == pytest.approx(2.75 + half)
    table = metrics_table(m)
    assert table.loc["hit@1", "mean"] == 0.5 and list(table.columns) == ["mean", "low", "high", "n"]


def test_metrics_accept_frames_and_episodes_from_turns():
    turns = [r for ep in hand_built_episodes() for r in ep]
    episodes = episodes_from_turns(turns)
    assert list(episodes["episode_id"]) == [0, 1, 2, 3]
    assert recommendation_metrics(episodes) == recommendation_metrics(_episodes())
    # An episode cut off mid-way (no terminated/truncated turn) is not an episode.
    assert len(episodes_from_turns(turns[:-1])) == 3


def test_hit_rate_by_turn_is_cumulative():
    table = hit_rate_by_turn(_episodes(), max_turns=5)
    assert list(table["turn"]) == [1, 2, 3, 4, 5]
    assert list(table["hit_rate"]) == [0.25, 0.75, 0.75, 0.75, 0.75]
    assert (table["n"] == 4).all()


def test_intervals():
    zero = proportion_ci(0, 10)
    assert (zero.mean, zero.low) == (0.0, 0.0)
    assert zero.high == pytest.approx(0.27754, abs=1e-5)
    one = proportion_ci(10, 10)
    assert one.high == 1.0 and one.low == pytest.approx(1 - 0.27754, abs=1e-5)
    assert math.isnan(proportion_ci(0, 0).mean)
    with pytest.raises(ValueError):
        proportion_ci(3, 2)
    single = mean_ci([4.0])
    assert single.mean == 4.0 and math.isnan(single.low)
    assert mean_ci([]).n == 0
    assert mean_ci([1.0, 1.0]).low == 1.0


def test_alignment_metrics_exact():
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    accepts = [True, True, True, False, True, False, False, False]
    m = alignment_metrics(accepts, labels)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 3)
    assert m["precision"] == 0.75 and m["recall"] == 0.75 and m["f1"] == 0.75
    assert m["accuracy"] == 0.75 and m["accept_rate"] == 0.5
    everything = alignment_metrics([True] * 8, labels)
    assert everything["f1"] == pytest.approx(2 / 3)
    nothing = alignment_metrics([False] * 8, labels)
    assert (nothing["precision"], nothing["recall"], nothing["f1"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        alignment_metrics([True], labels)


def test_chance_references():
    assert random_recommender_hit_rate(20, 5) == 0.25
    assert random_turn1_hit_rate(20) == 0.05
    assert always_accept_f1(0.5) == pytest.approx(0.6667, abs=1e-4)
    assert CHANCE == {"hit@1": 0.25, "turn1_hit@1": 0.05, "alignment_f1": pytest.approx(2 / 3)}


def test_alignment_observation_is_a_user_observation():
    data = tiny_dialog_data()
    env = RecDialogEnv(data)
    case = data.alignment[0]
    obs = alignment_observation(env, case, 3, rec_reason="You liked similar films.")
    assert env.observation_space(USER).contains(obs)
    assert obs["recommended"][0] == 3 and obs["phase"] == 1 and obs["turn"] == 1
    q = data.peer_score(case.peers, case.items[3])
    assert obs["peer"][0] == pytest.approx(q)
    text = obs["messages"][1]["content"]
    assert data.title(case.items[3]) in text and "You liked similar films." in text
    assert obs["messages"][0]["role"] == "system"


def test_evaluate_user_alignment_with_any_policy_form():
    data = tiny_dialog_data()
    always = evaluate_user_alignment(lambda obs: {"action": "star", "score": 0.6}, data)
    assert always.metrics["f1"] == pytest.approx(CHANCE["alignment_f1"])
    assert always.metrics["n"] == 40 and always.metrics["n_users"] == 2
    assert always.decisions["accept"].all()
    # A perfect policy (cheating through the labels) in text form, batched.
    label = {(c.user, item): y for c in data.alignment for item, y in zip(c.items, c.labels)}
    users = iter([c.user for c in data.alignment for _ in c.items])

    def perfect(observations):
        replies = []
        for obs in observations:
            item = int(obs["candidates"][obs["recommended"][0]])
            action = "click" if label[(next(users), item)] else "dislike"
            replies.append(f"Action: {action}\nScore: {0.9 if action == 'click' else 0.1}")
        return replies

    best = evaluate_user_alignment(perfect, data, batched=True)
    assert (best.metrics["precision"], best.metrics["recall"], best.metrics["f1"]) == (1, 1, 1)
    # Unreadable replies are format failures, i.e. skips: nothing accepted.
    garbage = evaluate_user_alignment(lambda obs: "¯\\_(ツ)_/¯", data, max_cases=1)
    assert garbage.metrics["format_failure_rate"] == 1.0 and garbage.metrics["f1"] == 0.0
    assert garbage.metrics["n"] == 20
    columns = "user item position label action score accept format_failure"
    assert list(garbage.decisions.columns) == columns.split()
