"""coars_agents.evaluate: metrics on scripted and tiny-LLM episodes, outputs, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from evaltools import SHORT_PROMPTS, SYNTHETIC_DATA, synthetic, tiny_policy
from tinydata import tiny_dialog_data

from coars_agents import evaluate as ev
from coars_agents.evaluate import (
    JUDGED_RATIONALE,
    METRIC_ORDER,
    chance_levels,
    comparison_table,
    describe_agent,
    evaluate,
    load_adapter_agent,
    main,
    resolve_adapter_dir,
    scripted_ranking,
    select_sessions,
    turn1_choice_ranking,
    turn1_user_judgements,
    user_judgement_metrics,
)
from coars_agents.hindsight import recommender_reference, user_reference, with_reference
from coars_agents.policy import LLMPolicy, SamplingConfig
from coars_agents.rollout import LLMAgent, fit_prompt
from coars_env.agents import PopularityRecommender, SessionIndex
from coars_env.dialog.config import EnvConfig
from coars_env.dialog.parsing import format_recommender
from coars_env.logs import read_trajectories
from coars_env.vector import VectorRecDialogEnv

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingConfig(greedy=True, max_new_tokens=16)


@pytest.fixture(scope="module")
def tiny():
    return tiny_dialog_data()


@pytest.fixture(scope="module")
def policy() -> LLMPolicy:
    return tiny_policy()


# ------------------------------------------------------------------------------ exact values


def test_target_recommender_vs_oracle_user_is_exact(tiny):
    index = SessionIndex(tiny)

    def picks_target(obs) -> int:
        session = index.lookup(obs)
        return session.candidates.index(session.target)

    for recommender in ("oracle", picks_target):
        r = evaluate(tiny, recommender, "oracle", progress=False)
        assert r["hit@1"].n == len(tiny.sessions) == 5
        for metric in ("hit@1", "turn1_hit@1", "avg_turns", "click_rate"):
            assert r[metric].mean == 1.0, metric
        assert r["wrong_click_rate"].mean == 0.0 and r["repeat_rate"].mean == 0.0
        assert r["rec_format_failure_rate"].mean == 0.0
        # R_rec(hit, t=1, s=1.0) = (0.5 + 0.5 * 1.0) * gamma**0 = 1
        assert r["reward_rec"].mean == pytest.approx(1.0)
        assert (r.hit_by_turn["hit_rate"] == 1.0).all() and list(r.hit_by_turn["turn"]) == [
            1,
            2,
            3,
            4,
            5,
        ]
        assert math.isnan(r["user_f1"].mean) and r["user_f1"].n == 0  # scripted user
    # a named scripted ranker has a ranking (target first); a bare callable has none
    assert r["ndcg@5"].n == 0 and math.isnan(r["ndcg@5"].mean)
    named = evaluate(tiny, "oracle", "oracle", progress=False)
    assert named["ndcg@5"].mean == named["ndcg@10"].mean == named["hit@5"].mean == 1.0


def test_chance_levels():
    c = chance_levels(20, 5)
    assert c["hit@1"] == 0.25 and c["turn1_hit@1"] == 0.05 and c["click_rate"] == 0.25
    assert c["avg_turns"] == pytest.approx(1 + 0.95 + 0.9 + 0.85 + 0.8)
    assert c["hit@5"] == 0.25 and c["hit@10"] == 0.5
    assert c["ndcg@5"] == pytest.approx(sum(1 / math.log2(r + 2) for r in range(5)) / 20)
    assert c["user_f1"] == pytest.approx(2 / 3) and c["user_precision"] == 0.5
    one_turn = chance_levels(20, 1)
    assert one_turn["hit@1"] == one_turn["turn1_hit@1"] == 0.05 and one_turn["avg_turns"] == 1.0


def test_popularity_ranking_and_ranking_metrics(tiny):
    pop = PopularityRecommender(tiny)
    for session in tiny.sessions:
        expected = sorted(range(20), key=lambda p: (-tiny.popularity[session.candidates[p]], p))
        assert scripted_ranking(pop, session) == expected
    r = evaluate(tiny, "popularity", "oracle", progress=False)
    ranks = r.episodes["target_rank"].to_numpy()
    # against the oracle user with T = 5, the final recommendation hits iff rank < 5
    assert list(r.episodes["hit"]) == [bool(k < 5) for k in ranks]
    assert r["hit@10"].mean == np.mean(ranks < 10)
    ndcg10 = np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0)
    assert r["ndcg@10"].mean == pytest.approx(ndcg10.mean())
    assert r["hit@1"].mean == r["hit@5"].mean


def test_random_recommender_vs_oracle_user_is_at_chance():
    """1200 seeded episodes (600 sessions x 2 seeds) sit at the chance levels.

    Seeded, so deterministic; the band is the 95% CI widened to about 3.5 standard errors, so
    that a change anywhere upstream (data, env) makes a false failure very unlikely."""
    data = synthetic()
    r = evaluate(data, "random", "oracle", seeds=(0, 1), batch_size=300, progress=False)
    assert r["hit@1"].n == 2 * len(data.sessions)
    for metric in ("hit@1", "turn1_hit@1", "avg_turns", "hit@5", "hit@10", "ndcg@5", "ndcg@10"):
        est = r[metric]
        band = 1.8 * (est.high - est.low) / 2
        assert abs(est.mean - r.chance[metric]) <= band, (metric, est, r.chance[metric])
    assert r["wrong_click_rate"].mean == 0.0 and r["repeat_rate"].mean == 0.0
    assert r["click_rate"].mean == r["hit@1"].mean == r.hit_by_turn["hit_rate"].iloc[-1]
    assert list(r.per_seed["seed"]) == [0, 1] and list(r.per_seed["n"]) == [600, 600]


def test_alignment_estimates_from_hand_built_decisions():
    # user 0: tp 3, fp 1, fn 1, tn 5; user 1: tp 1, fp 0, fn 3, tn 6
    rows = []
    for user, (tp, fp, fn, tn) in ((0, (3, 1, 1, 5)), (1, (1, 0, 3, 6))):
        for accept, label, k in ((1, 1, tp), (1, 0, fp), (0, 1, fn), (0, 0, tn)):
            rows += [{"user": user, "accept": bool(accept), "label": label}] * k
    decisions = pd.DataFrame(rows).assign(format_failure=False, seed=0)
    from coars_env.metrics import alignment_metrics

    metrics = alignment_metrics(decisions["accept"], decisions["label"])
    est = ev._alignment_estimates(metrics, decisions)
    assert est["user_precision"].mean == 4 / 5 and est["user_precision"].n == 5
    assert est["user_recall"].mean == 4 / 8 and est["user_recall"].n == 8
    assert est["user_f1"].mean == pytest.approx(2 * 4 / (2 * 4 + 1 + 4))
    assert est["user_f1"].low <= est["user_f1"].mean <= est["user_f1"].high
    assert est["user_accept_rate"].mean == 5 / 20


def test_session_subset_is_seeded(tiny):
    assert select_sessions(10, None) == list(range(10))
    a, b = select_sessions(100, 7, 0), select_sessions(100, 7, 1)
    assert a == select_sessions(100, 7, 0) == sorted(a) and len(set(a)) == 7 and a != b
    r = evaluate(tiny, "sasrec", "oracle", n_sessions=3, subset_seed=2, progress=False)
    assert sorted(r.episodes["session_id"]) == select_sessions(5, 3, 2)


# ------------------------------------------------------------------------------ LLM agents


def test_llm_user_alignment_is_batched(tiny, policy, generate_calls):
    user = LLMAgent(policy, "user", sampling=GREEDY, reason_tokens=4)
    env = {**SHORT_PROMPTS, "max_turns": 2}
    r = evaluate(tiny, "oracle", user, batch_size=16, env_overrides=env, progress=False)
    n_items = sum(len(c.items) for c in tiny.alignment)
    assert n_items == 40
    # 5 episodes in one batch: one user phase per turn, then the 40 alignment items in
    # batches of 16
    assert generate_calls[-3:] == [16, 16, 8]
    d = r.alignment_decisions
    assert len(d) == 40 and not d["format_failure"].any()
    tp = int((d["accept"] & (d["label"] == 1)).sum())
    fp = int((d["accept"] & (d["label"] == 0)).sum())
    assert r["user_precision"].n == tp + fp and r["user_f1"].n == 40
    assert r["alignment_format_failure_rate"].mean == 0.0
    assert r.alignment["n_users"] == len(tiny.alignment)
    assert r.chance["user_f1"] == pytest.approx(2 / 3)  # 1:1 positives
    one = evaluate(tiny, "oracle", user, n_alignment_users=1, env_overrides=env, progress=False)
    assert len(one.alignment_decisions) == 20


def test_adapter_checkpoint_acts_like_its_weights(tiny, tmp_path):
    policy = tiny_policy(seed=3)
    for role in ("recommender", "user"):
        policy.add_adapter(role)  # LoRA B = 0: the adapter equals the base model
    step = tmp_path / "run" / "checkpoints" / "step_000002"
    for role in ("recommender", "user"):
        policy.save_adapter(role, step / "adapters" / role)
    assert resolve_adapter_dir(tmp_path / "run", "user") == step / "adapters" / "user"
    assert resolve_adapter_dir(step, "user") == step / "adapters" / "user"
    assert resolve_adapter_dir(step / "adapters" / "user", "user") == step / "adapters" / "user"
    with pytest.raises(FileNotFoundError):
        resolve_adapter_dir(tmp_path, "user")

    agent = load_adapter_agent(policy, "recommender", tmp_path / "run", reason_tokens=4)
    assert agent.adapter == "eval-recommender" and "adapter eval-recommender" in describe_agent(
        agent
    )
    base = LLMAgent(policy, "recommender", sampling=agent.sampling, reason_tokens=4)
    kw = {"n_sessions": 2, "env_overrides": {**SHORT_PROMPTS, "max_turns": 2}, "progress": False}
    with_adapter = evaluate(tiny, agent, "oracle", **kw)
    without = evaluate(tiny, base, "oracle", **kw)
    assert list(with_adapter.turns["rec_text"]) == list(without.turns["rec_text"])


def test_llm_recommender_ranks_candidates_by_its_turn1_choice_probabilities(tiny, policy):
    agent = LLMAgent(policy, "recommender", sampling=GREEDY, reason_tokens=4)
    env = {**SHORT_PROMPTS, "max_turns": 2}
    r = evaluate(tiny, agent, "oracle", seeds=(0, 1), env_overrides=env, progress=False)
    config = EnvConfig(**env).replace(render_prompts=False, reveal_target=True)
    ranking = turn1_choice_ranking(agent, tiny, config, range(5), batch_size=2)
    assert list(ranking["session_id"]) == [0, 1, 2, 3, 4]
    # One ranking per session, however many seeds were played.
    assert r["turn1_target_prob"].n == r["hit@5"].n == r["ndcg@10"].n == 5
    assert r["turn1_target_prob"].mean == pytest.approx(ranking["target_prob"].mean())
    ranks = ranking["target_rank"].to_numpy()
    assert r["hit@5"].mean == pytest.approx((ranks < 5).mean())
    assert r["ndcg@5"].mean == pytest.approx(np.where(ranks < 5, 1 / np.log2(ranks + 2), 0).mean())
    assert ((ranks == 0) == (ranking["target_prob"] == ranking["top_prob"])).all()
    assert (ranking["target_prob"] > 0).all()
    # The tiny tokenizer has one token per candidate number, so the greedy first pick is the
    # most probable candidate: turn-1 hits are exactly the sessions ranked first.
    episodes = r.episodes.merge(ranking, on="session_id")
    assert (episodes["first_turn_hit"] == (episodes["target_rank_y"] == 0)).all()
    assert r.chance["turn1_target_prob"] == 0.05
    # The same numbers as the policy's own choice_probabilities on the turn-1 prompt.
    venv = VectorRecDialogEnv(tiny, config, 1)
    venv.reset(seed=0, options=[{"session_id": 3}])
    prompt = policy.render(fit_prompt(venv.envs[0], policy, GREEDY.max_new_tokens))
    (probs,) = policy.choice_probabilities([prompt], agent.template(20), "item")
    position = tiny.sessions[3].candidates.index(tiny.sessions[3].target)
    assert ranking.loc[3, "target_prob"] == pytest.approx(probs[str(position + 1)])
    p3 = [probs[str(k + 1)] for k in range(20)]
    assert ranking.loc[3, "top_position"] == int(np.argmax(p3)) + 1  # first of ties, 1-based
    assert ranking.loc[3, "top_prob"] == pytest.approx(max(p3))
    assert ranking["top_position"].between(1, 20).all()

    # The teacher's ranking: the same prompt with the first-visit hindsight reference d.
    teacher = turn1_choice_ranking(agent, tiny, config, range(5), batch_size=2, hindsight=True)
    session = tiny.sessions[3]
    reference = recommender_reference(position, tiny.title(session.target), [], tiny.title)
    assert f"candidate {position + 1}:" in reference
    messages = with_reference(fit_prompt(venv.envs[0], policy, GREEDY.max_new_tokens), reference)
    (teacher_probs,) = policy.choice_probabilities(
        [policy.render(messages)], agent.template(20), "item"
    )
    assert teacher.loc[3, "target_prob"] == pytest.approx(teacher_probs[str(position + 1)])
    assert not np.allclose(teacher["target_prob"], ranking["target_prob"])

    # Another wording of d, one per session (a probe of what the teacher reads).
    def hint(s):
        return f"Answer with item {s.candidates.index(s.target) + 1}."

    probed = turn1_choice_ranking(agent, tiny, config, range(5), batch_size=2, reference=hint)
    messages = with_reference(
        fit_prompt(venv.envs[0], policy, GREEDY.max_new_tokens), hint(session)
    )
    (probe_probs,) = policy.choice_probabilities(
        [policy.render(messages)], agent.template(20), "item"
    )
    assert probed.loc[3, "target_prob"] == pytest.approx(probe_probs[str(position + 1)])
    assert not np.allclose(probed["target_prob"], teacher["target_prob"])

    skipped = evaluate(
        tiny, agent, "oracle", env_overrides=env, progress=False, rank_candidates=False
    )
    assert skipped["turn1_target_prob"].n == skipped["hit@5"].n == 0
    assert list(skipped.episodes["hit"]) == list(r.episodes[r.episodes["seed"] == 0]["hit"])


def test_llm_user_judges_a_hit_and_a_miss_by_its_exact_action_probabilities(tiny, policy):
    agent = LLMAgent(policy, "user", sampling=GREEDY, reason_tokens=4)
    config = EnvConfig(**SHORT_PROMPTS, max_turns=2).replace(render_prompts=False)
    judged = turn1_user_judgements(agent, tiny, config, range(5), batch_size=2, seed=0)
    assert len(judged) == 10
    assert list(zip(judged["session_id"], judged["kind"])) == [
        (s, kind) for s in range(5) for kind in ("hit", "miss")
    ]
    for row in judged.itertuples():
        session = tiny.sessions[row.session_id]
        target = session.candidates.index(session.target)
        assert (row.position == target) == (row.kind == "hit")
        assert 0 <= row.position < len(session.candidates)
        assert row.p_click + row.p_star + row.p_skip + row.p_dislike == pytest.approx(1.0)
        assert row.p_accept == pytest.approx(row.p_click + row.p_star)
    # The misses are seeded per session: the same seed draws the same, another seed others.
    again = turn1_user_judgements(agent, tiny, config, range(5), batch_size=5, seed=0)
    other = turn1_user_judgements(agent, tiny, config, range(5), batch_size=5, seed=1)
    assert again["position"].tolist() == judged["position"].tolist()
    assert np.allclose(again["p_accept"], judged["p_accept"])  # batching changes nothing
    assert other["position"].tolist() != judged["position"].tolist()
    # The same numbers as the policy's own choice_probabilities on the user's turn-1 prompt.
    miss = judged[(judged["session_id"] == 3) & (judged["kind"] == "miss")].iloc[0]
    venv = VectorRecDialogEnv(tiny, config, 1)
    venv.reset(seed=0, options=[{"session_id": 3}])
    observations, *_ = venv.step([format_recommender(int(miss["position"]), JUDGED_RATIONALE)])
    assert miss["q"] == pytest.approx(float(observations[0]["user"]["peer"][0]))
    prompt = policy.render(fit_prompt(venv.envs[0], policy, GREEDY.max_new_tokens))
    (probs,) = policy.choice_probabilities([prompt], agent.template(20), "action")
    assert miss["p_accept"] == pytest.approx(probs["click"] + probs["star"])
    assert miss["p_dislike"] == pytest.approx(probs["dislike"])
    hits, misses = (judged[judged["kind"] == k]["p_accept"].to_numpy() for k in ("hit", "miss"))
    assert not np.allclose(hits, misses)  # the prompts differ in the item judged
    metrics = user_judgement_metrics(judged)
    assert metrics["user_accept_hit"] == pytest.approx(hits.mean())
    assert metrics["user_accept_gap"] == pytest.approx((hits - misses).mean())
    # The user teacher's judgements: the same prompt with the user's first-visit d appended.
    teacher = turn1_user_judgements(
        agent, tiny, config, range(5), batch_size=2, seed=0, hindsight=True
    )
    assert teacher["position"].tolist() == judged["position"].tolist()
    session = tiny.sessions[3]
    for kind, verdict in (("hit", "IS the item"), ("miss", "is NOT the item")):
        row = judged[(judged["session_id"] == 3) & (judged["kind"] == kind)].iloc[0]
        venv.reset(seed=0, options=[{"session_id": 3}])
        venv.step([format_recommender(int(row["position"]), JUDGED_RATIONALE)])
        item = session.candidates[int(row["position"])]
        reference = user_reference(
            tiny.title(item), kind == "hit", tiny.title(session.target), [], tiny.title
        )
        assert verdict in reference
        prompt = fit_prompt(venv.envs[0], policy, GREEDY.max_new_tokens)
        (teacher_probs,) = policy.choice_probabilities(
            [policy.render(with_reference(prompt, reference))], agent.template(20), "action"
        )
        taught = teacher[(teacher["session_id"] == 3) & (teacher["kind"] == kind)].iloc[0]
        assert taught["p_accept"] == pytest.approx(teacher_probs["click"] + teacher_probs["star"])
        assert taught["q"] == row["q"]
    assert not np.allclose(teacher["p_accept"], judged["p_accept"])
    with pytest.raises(ValueError, match="constrained LLM user"):
        turn1_user_judgements(
            LLMAgent(policy, "user", sampling=GREEDY, constrained=False), tiny, config, [0]
        )


def test_user_judgement_metrics_from_hand_set_probabilities():
    judged = pd.DataFrame(
        {
            "session_id": [0, 0, 1, 1],
            "kind": ["hit", "miss", "miss", "hit"],
            "p_accept": [0.9, 0.3, 0.5, 0.5],
        }
    )
    assert user_judgement_metrics(judged) == pytest.approx(
        {
            "user_accept_hit": 0.7,
            "user_accept_miss": 0.4,
            "user_accept_gap": 0.3,
            "user_accept_gap_se": 0.3 / math.sqrt(2),  # paired gaps 0.6 and 0.0
        }
    )


# ------------------------------------------------------------------------------ outputs, CLI


def test_log_dir_holds_tables_plots_and_trajectories(tiny, tmp_path):
    r = evaluate(tiny, "sasrec", "oracle", seeds=(0, 1), log_dir=tmp_path, progress=False)
    for name in (
        "metrics.csv",
        "metrics.md",
        "episodes.csv",
        "hit_by_turn.csv",
        "per_seed.csv",
        "config.json",
        "hit_by_turn.png",
        "rewards.png",
        "trajectories.jsonl",
    ):
        assert (tmp_path / name).is_file(), name
    for png in ("hit_by_turn.png", "rewards.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    turns, episodes = read_trajectories(tmp_path / "trajectories.jsonl")
    assert len(episodes) == 10 and len(turns) == len(r.turns)
    assert sorted(turns["seed"].unique()) == [0, 1] and episodes["episode_id"].is_unique
    assert "target" in turns.columns  # logs keep the target for error analysis
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert list(table["metric"]) == list(METRIC_ORDER)
    assert "| hit@1 |" in (tmp_path / "metrics.md").read_text()
    cmp = comparison_table([r, r])
    assert len(cmp) == 3 and cmp["system"].iloc[-1].startswith("chance")


def test_cli_scripted(tmp_path, capsys):
    main(
        [
            "--env",
            "RecDialog-synthetic",
            "--recommender",
            "popularity",
            "--user",
            "oracle",
            "--n-sessions",
            "20",
            "--out",
            str(tmp_path),
            "--data-options",
            json.dumps(SYNTHETIC_DATA),
            "--no-progress",
        ]
    )
    assert "| hit@1 |" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "metrics.csv").set_index("metric")
    assert table.loc["hit@1", "n"] == 20 and not math.isnan(table.loc["ndcg@10", "mean"])
    assert json.loads((tmp_path / "config.json").read_text())["recommender"] == "popularity"


def test_cli_llm_baseline(tmp_path, capsys):
    main(
        [
            "--env",
            "RecDialog-synthetic",
            "--baseline",
            "zero-shot",
            "--model",
            "tiny",
            "--reason-tokens",
            "4",
            "--n-sessions",
            "2",
            "--out",
            str(tmp_path),
            "--data-options",
            json.dumps(SYNTHETIC_DATA),
            "--env-options",
            json.dumps(SHORT_PROMPTS),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert "# Evaluation: zero-shot" in out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["max_turns"] == 1 and config["recommender"].startswith("LLM")
