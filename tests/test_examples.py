"""The third-party agent examples (examples/*.py) run, at tiny scale, and do what they claim.

The examples build the synthetic dataset through the real pipeline; here with a small
SASRec and a temporary cache (``DATA``), so a cold run costs seconds, not minutes.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    module_name = f"coars_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_options(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """DataConfig overrides: a small SASRec, no progress bars, a cache shared by this module."""
    return {
        "sasrec": {"hidden": 16, "blocks": 1, "heads": 1, "max_len": 16, "epochs": 1, "seed": 1},
        "progress": False,
        "alignment_users": 4,
        "cache_dir": str(tmp_path_factory.mktemp("coars-example-data")),
    }


# ------------------------------------------------------------------ REINFORCE recommender

REINFORCE_MARGIN = 0.25
"""The trained agent's held-out Hit@1 must beat the random recommender's by this much.

Measured at the test's scale (1000 training episodes, 300 valid sessions, small-SASRec
synthetic data): seed 0 gives 0.760 vs 0.263 (+0.50); seeds 1 and 2 give +0.52 and +0.46.
With the default data and 6000 episodes: 0.808 [0.775, 0.838] vs 0.255 on valid.
"""


@pytest.mark.slow
def test_reinforce_recommender_beats_random(tmp_path: Path, data_options: dict) -> None:
    rf = load_example("reinforce_recommender")
    cfg = rf.Config(
        total_episodes=1000,
        eval_sessions=300,
        output_dir=str(tmp_path),
        progress=False,
        plot=True,
    )
    results = rf.main(cfg, data_options)
    random_hit, before, after = (results[k]["hit@1"] for k in ("random", "before", "after"))
    assert after.n == random_hit.n == 300
    assert after.mean - random_hit.mean >= REINFORCE_MARGIN, (after, random_hit)
    assert after.low > random_hit.high  # the 95% intervals do not overlap
    # The untrained policy is uniform (zero logits): near chance (0.25).
    assert abs(before.mean - 0.25) < 0.1
    # Logs: one CSV row per update, the curve and the JSON summary.
    lines = (tmp_path / "train_log.csv").read_text().splitlines()
    assert lines[0] == "update,episodes,mean_return,hit_rate,entropy,loss"
    assert len(lines) - 1 == math.ceil(1000 / cfg.batch_episodes)
    assert (tmp_path / "learning_curve.png").stat().st_size > 0
    assert (tmp_path / "results.json").exists()
    # Training improved the sampled policy too (first vs last updates).
    log = results["train_log"]
    first = np.mean([r["hit_rate"] for r in log[:5]])
    last = np.mean([r["hit_rate"] for r in log[-5:]])
    assert last > first


def test_reinforce_recommender_is_deterministic(tmp_path: Path, data_options: dict) -> None:
    rf = load_example("reinforce_recommender")
    runs = []
    for i in range(2):
        cfg = rf.Config(
            total_episodes=64,
            batch_episodes=16,
            eval_sessions=20,
            output_dir=str(tmp_path / str(i)),
            progress=False,
            plot=False,
        )
        runs.append(rf.main(cfg, data_options))
    assert runs[0]["train_log"] == runs[1]["train_log"]
    for name in ("random", "before", "after"):
        assert runs[0][name] == runs[1][name]


def test_reinforce_policy_masks_recommended_candidates() -> None:
    rf = load_example("reinforce_recommender")
    import torch

    policy = rf.CandidateScorer(n_features=4, bilinear_rank=2, feedback_rank=2)
    x = torch.randn(1, 20, 4)
    open_mask = torch.ones(1, 20, dtype=torch.bool)
    open_mask[0, [3, 7]] = False
    logits = policy(x, torch.randn(1, 4), torch.randn(1, 4), open_mask)
    assert torch.isinf(logits[0, [3, 7]]).all() and torch.isfinite(logits[0, open_mask[0]]).all()
    # Zero initialisation: uniform over the open candidates.
    probs = torch.softmax(logits, -1)[0]
    assert torch.allclose(probs[open_mask[0]], torch.full((18,), 1 / 18))


# ------------------------------------------------------------------ PettingZoo two policies


@pytest.mark.parametrize("user", ["peer", "random"])
def test_pettingzoo_two_policies(user: str, data_options: dict, capsys) -> None:
    pz = load_example("pettingzoo_two_policies")
    cfg = pz.Config(episodes=20, user=user, show_prompt=True, show_transcript=True)
    out = pz.main(cfg, data_options)
    episodes = out["episodes"]
    assert len(episodes) == 20 and out["metrics"]["hit@1"].n == 20
    # The reward totals are the sums of the episodes' rewards.
    for agent, key in (("recommender", "reward_rec"), ("user", "reward_user")):
        assert out["reward_totals"][agent] == pytest.approx(sum(e[key] for e in episodes))
    # The text recommender never fails to parse and never repeats itself.
    assert all(e["rec_format_failures"] == 0 and e["repeats"] == 0 for e in episodes)
    assert all(e["user_format_failures"] == 0 for e in episodes)
    printed = capsys.readouterr().out
    assert "Hit@1" in printed and "turn 1: recommender:" in printed and "Candidates:" in printed


# ------------------------------------------------------------------ TRL bridge


@pytest.fixture(scope="module")
def trl_env(data_options: dict):
    bridge = load_example("trl_rollout_bridge")
    return bridge, bridge.make_env(bridge.Config(), overrides=data_options)


def _answers(env, session_id: int) -> dict[str, str]:
    """Answers for one session: the target's number, another candidate's, and junk."""
    session = env.data.sessions[session_id]
    target = session.candidates.index(session.target)
    return {
        "hit": f"Item: {target + 1}\nReason: fits.",
        "miss": f"Item: {(target + 1) % 20 + 1}\nReason: fits.",
        "junk": "I cannot decide.",
    }


def test_trl_reward_functions(trl_env) -> None:
    bridge, env = trl_env
    answers = _answers(env, 5)
    texts = [answers["hit"], answers["miss"], answers["junk"]]
    chat = [[{"role": "assistant", "content": t}] for t in texts]  # TRL's conversational form
    env_reward = bridge.EnvRecommenderReward(env)
    formula = bridge.formula_recommender_reward(env)
    for completions in (texts, chat):
        kwargs = {"prompts": [None] * 3, "completions": completions, "session_id": [5] * 3}
        by_env, by_formula = env_reward(**kwargs), formula(**kwargs)
        assert by_env[0] == by_formula[0] == pytest.approx(1.0)  # a turn-1 click: (0.5+0.5)*1
        assert -1.0 <= by_env[1] <= -0.5 and by_formula[1] == pytest.approx(-0.6875)
        assert by_env[2] == by_formula[2] == pytest.approx(-1.0)  # format failure: -0.5 - 0.5
    assert [r["hit"] for r in env_reward.records] == [True, False, False]
    # With an answer prefix in the prompt, the reward puts it back before parsing.
    prefixed = env_reward(
        prompts=[None],
        completions=[answers["hit"].removeprefix("Item: ")],
        session_id=[5],
        answer_prefix=["Item: "],
    )
    assert prefixed == [pytest.approx(1.0)]


def test_trl_session_prompts(trl_env) -> None:
    bridge, env = trl_env
    rows = bridge.session_prompts(env, [0, 3])
    assert [r["session_id"] for r in rows] == [0, 3]
    assert rows[0]["prompt"][0]["role"] == "system" and rows[0]["prompt"][-1]["role"] == "user"
    assert rows == bridge.session_prompts(env, [0, 3])  # a session always gives the same prompt


def test_trl_tool_environment(trl_env) -> None:
    bridge, env = trl_env
    tool_env = bridge.RecommendationToolEnv(env)
    answers = _answers(env, 7)
    hint = tool_env.reset(session_id=7, prompt="ignored")
    assert "recommend" in hint
    wrong = answers["miss"].split("\n")[0].removeprefix("Item: ")
    assert "reaction" in tool_env.recommend(int(wrong))
    assert "not a candidate" in tool_env.recommend(99)
    target = answers["hit"].split("\n")[0].removeprefix("Item: ")
    assert "click" in tool_env.recommend(int(target))
    assert tool_env.recommend(1) == "The conversation is over."
    rewards = [r["reward_rec"] for r in env.turn_records]
    assert tool_env.get_reward() == pytest.approx(sum(rewards)) and rewards[-1] > 0


def test_trl_rollout_mode(data_options: dict) -> None:
    bridge = load_example("trl_rollout_bridge")
    cfg = bridge.Config(mode="rollout", num_sessions=2, max_turns=2, max_completion_length=10)
    out = bridge.main(cfg, data_options)
    episodes, samples = out["episodes"], out["samples"]
    assert len(samples) == sum(len(e.recommender) for e in episodes) >= 2
    for sample in samples:
        assert len(sample["logprobs"]) == len(sample["completion_ids"]) > 0
        assert sample["text"].startswith("Item: ")  # constrained decoding always parses
    last = [s for s in samples if s["turn"] == max(x["turn"] for x in samples)]
    assert all(s["return_to_go"] == pytest.approx(s["reward"]) for s in last)


def test_trl_grpo_trainer_runs(tmp_path: Path, data_options: dict) -> None:
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    bridge = load_example("trl_rollout_bridge")
    cfg = bridge.Config(
        num_sessions=2,
        num_generations=2,
        max_steps=1,
        max_completion_length=8,
        output_dir=str(tmp_path),
    )
    out = bridge.main(cfg, data_options)
    assert len(out["reward_logs"]) == 1
    assert -1.5 <= out["reward_logs"][0]["reward"] <= 1.0
    assert len(out["dataset"]) == 2
