"""The training examples run end to end at tiny scale: examples/train_coevolve.py (the README's
main job) and examples/compare_training.py (the method comparison), plus the learning-curve
plots the evaluator draws from training logs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from test_examples import load_example

from coars_agents.coars import CoARSConfig
from coars_agents.evaluate import plot_learning_curves, read_training_logs
from coars_env.dialog.env import RECOMMENDER, USER


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Trainer settings for seconds-long runs: random tiny model, small SASRec, 1 turn."""
    return dict(
        model="tiny",
        max_turns=1,
        sessions_per_step=1,
        reason_tokens=2,
        max_new_tokens=12,
        eval_sessions=2,
        eval_batch_size=2,
        eval_alignment_users=0,
        tensorboard=False,
        data_overrides={
            "sasrec": {"hidden": 16, "blocks": 1, "heads": 1, "max_len": 16, "epochs": 1},
            "progress": False,
            "alignment_users": 4,
            "cache_dir": str(tmp_path_factory.mktemp("coars-train-data")),
        },
    )


def test_train_coevolve_prints_a_before_after_table(tmp_path, tiny_train, capsys):
    example = load_example("train_coevolve")
    config = CoARSConfig(output_dir=str(tmp_path / "run"), total_steps=2, **tiny_train)
    result = example.main(example.Args(train=config, final_eval_sessions=2))
    out = capsys.readouterr().out
    assert "| Hit@1 vs oracle user |" in out and "| user alignment F1 |" in out
    for phase in ("before", "after"):
        assert result[phase]["eval/sessions"] == 2.0
        assert 0.0 <= result[phase]["eval/oracle/hit@1"] <= 1.0
    logged = pd.read_json(tmp_path / "run" / "metrics.jsonl", lines=True)
    assert logged["step"].tolist() == [1, 2]

    # coars-eval on the run folder: both trained agents, plus the run's learning curves.
    from coars_agents.evaluate import EvalArgs, run

    evaluated = run(
        EvalArgs(
            env="RecDialog-synthetic",
            recommender=str(tmp_path / "run"),
            user=str(tmp_path / "run"),
            model="tiny",
            n_sessions=2,
            batch_size=2,
            n_alignment_users=1,
            max_turns=1,
            reason_tokens=2,
            out=str(tmp_path / "eval"),
            data_options=json.dumps(tiny_train["data_overrides"]),
            progress=False,
        )
    )
    assert evaluated["hit@1"].n == 2
    assert (tmp_path / "eval" / "learning_curves.png").stat().st_size > 0


def test_compare_training_tabulates_seeds_resumes_and_plots(tmp_path, tiny_train):
    example = load_example("compare_training")
    train = CoARSConfig(total_steps=1, eval_every=1, **tiny_train)
    args = example.Args(
        methods=("untrained", "coars"),
        seeds=(0, 1),
        out_dir=str(tmp_path / "cmp"),
        final_sessions=3,
        final_alignment_users=1,
        references=("genre",),
        train=train,
    )
    everything = example.main(args)
    reference = everything[everything["method"] == "ref:genre"]
    assert len(reference) == 1 and reference["eval/sessions"].item() == 3
    frame = everything[everything["method"] != "ref:genre"]
    assert sorted(zip(frame["method"], frame["seed"])) == [
        ("coars", 0),
        ("coars", 1),
        ("untrained", 0),
        ("untrained", 1),
    ]
    assert dict(zip(frame["method"], frame["steps"])) == {"untrained": 0, "coars": 1}
    assert (frame["eval/sessions"] == 3).all()
    summary = pd.read_csv(tmp_path / "cmp" / "summary.csv")
    assert set(summary["method"]) == {"untrained", "coars", "ref:genre"}
    coars = summary[summary["method"] == "coars"].iloc[0]
    hits = frame[frame["method"] == "coars"]["eval/oracle/hit@1"]
    assert coars["seeds"] == 2 and math.isclose(coars["Hit@1"], hits.mean())
    assert coars["eval sessions"] == 3  # the evaluation's sessions, not the training's
    assert (
        "| RecDialog-synthetic | coars | 2 | 1 | 3 |"
        in (tmp_path / "cmp" / "summary.md").read_text()
    )
    assert (tmp_path / "cmp" / "learning_curves_synthetic.png").stat().st_size > 0

    # Finished jobs are not run again, and --report-only rebuilds the same table.
    log = tmp_path / "cmp" / "synthetic" / "coars" / "seed0" / "metrics.jsonl"
    lines = log.read_text()
    again = example.main(args)
    assert log.read_text() == lines
    timing = ["eval_seconds"]  # references are re-evaluated (in milliseconds) on each call
    pd.testing.assert_frame_equal(
        again.drop(columns=timing).reset_index(drop=True),
        everything.drop(columns=timing).reset_index(drop=True),
    )
    report = example.main(example.Args(**{**vars(args), "report_only": True}))
    assert len(report) == 5
    # Every job and the reference saw the same held-out sessions: the untrained seeds agree.
    untrained = frame[frame["method"] == "untrained"]["eval/oracle/hit@1"]
    assert untrained.nunique() == 1


def test_compare_training_keeps_going_when_a_job_fails_and_retries_it(
    tmp_path, tiny_train, monkeypatch
):
    example = load_example("compare_training")
    real_job = example.run_job

    def out_of_memory_once(args, env_id, method, seed, threads):
        if (method, seed) == ("coars", 1):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_job(args, env_id, method, seed, threads)

    monkeypatch.setattr(example, "run_job", out_of_memory_once)
    args = example.Args(
        methods=("untrained", "coars"),
        seeds=(0, 1),
        out_dir=str(tmp_path / "cmp"),
        final_sessions=2,
        final_alignment_users=0,
        references=(),
        train=CoARSConfig(total_steps=1, **tiny_train),
    )
    with pytest.raises(RuntimeError, match=r"1 of 4 jobs failed"):
        example.main(args)
    error = tmp_path / "cmp" / "synthetic" / "coars" / "seed1" / "error.txt"
    assert "CUDA out of memory (simulated)" in error.read_text()
    summary = pd.read_csv(tmp_path / "cmp" / "summary.csv")
    assert dict(zip(summary["method"], summary["seeds"])) == {"untrained": 2, "coars": 1}

    # The same command again trains only the failed job; its stale error report goes away.
    finished_log = tmp_path / "cmp" / "synthetic" / "coars" / "seed0" / "metrics.jsonl"
    before = finished_log.read_text()
    monkeypatch.setattr(example, "run_job", real_job)
    frame = example.main(args)
    assert sorted(zip(frame["method"], frame["seed"]))[:2] == [("coars", 0), ("coars", 1)]
    assert len(frame) == 4 and not error.exists()
    assert finished_log.read_text() == before
    assert (error.parent / "result.json").is_file()


def test_compare_training_threads_per_job(tmp_path, monkeypatch):
    example = load_example("compare_training")
    seen: list[int] = []

    def record_threads(args, env_id, method, seed, threads):
        seen.append(threads)
        raise RuntimeError("not run")

    monkeypatch.setattr(example, "run_job", record_threads)
    monkeypatch.setattr(example.os, "cpu_count", lambda: 16)
    args = example.Args(
        methods=("coars",), seeds=(0,), out_dir=str(tmp_path), references=(), final_sessions=1
    )
    for threads_per_job, expected in ((0, 16), (3, 3)):
        with pytest.raises(RuntimeError, match="1 of 1 jobs failed"):
            example.main(example.Args(**{**vars(args), "threads_per_job": threads_per_job}))
        assert seen.pop() == expected
    with pytest.raises(ValueError, match="threads_per_job must be >= 0"):
        example.main(example.Args(**{**vars(args), "threads_per_job": -1}))


def test_compare_training_checks_references_before_any_job(tmp_path, monkeypatch):
    # Session 14 lost a GPU comparison's table: `--references none` failed only after training.
    example = load_example("compare_training")
    started: list[tuple] = []

    def record_job(args, env_id, method, seed, threads):
        started.append((method, seed))
        raise RuntimeError("not run")

    monkeypatch.setattr(example, "run_job", record_job)
    args = example.Args(methods=("coars",), seeds=(0,), out_dir=str(tmp_path), final_sessions=1)
    with pytest.raises(ValueError, match=r"unknown reference recommender\(s\) \['nne'\].*'none'"):
        example.main(example.Args(**{**vars(args), "references": ("genre", "nne")}))
    assert started == []
    assert example.reference_names(("none",)) == ()
    assert example.reference_names(()) == ()
    assert example.reference_names(("random", "genre")) == ("random", "genre")
    with pytest.raises(RuntimeError, match="1 of 1 jobs failed"):
        example.main(example.Args(**{**vars(args), "references": ("none",)}))
    assert started == [("coars", 0)]
    # A method the shared settings do not fit fails before any job too.
    partner = dataclasses.replace(args.train, train_agents="user", recommender_partner="balanced")
    methods = ("coars-user-only", "coars-rec-only")  # the second trains the recommender
    with pytest.raises(ValueError, match="only the user agent may learn"):
        example.main(example.Args(**{**vars(args), "methods": methods, "train": partner}))
    assert started == [("coars", 0)]


def test_compare_training_methods_are_the_baselines_and_method_md_ablations(tmp_path):
    example = load_example("compare_training")
    args = example.Args(out_dir=str(tmp_path), train=CoARSConfig(total_steps=7, eval_every=2))
    config = {m: example.job_config(args, "RecDialog-synthetic", m, 3) for m in example.METHODS}
    assert set(config) == set(example.METHOD_SETTINGS)
    assert (config["untrained"].total_steps, config["untrained"].eval_every) == (0, 0)
    assert config["outcome"].reward_mode == "outcome"
    assert config["coars"].reward_mode == "interaction"
    assert config["coars"].credit_coef_rec == config["coars"].credit_coef_user == 0.1
    assert config["coars-no-credit"].credit_coef_rec == 0.0
    assert config["coars-no-credit"].credit_coef_user == 0.0
    assert config["coars-rec-only"].trained_agents == ("recommender",)
    assert config["coars-user-only"].trained_agents == ("user",)
    for method, c in config.items():
        assert c.seed == 3 and c.output_dir == str(tmp_path / "synthetic" / method / "seed3")
        if method != "untrained":
            assert (c.total_steps, c.eval_every) == (7, 2)
            assert c.trained_agents == {
                "outcome": ("recommender",),
                "coars-rec-only": ("recommender",),
                "coars-user-only": ("user",),
            }.get(method, ("recommender", "user"))


def test_t_interval_is_the_student_t_interval_over_seeds():
    example = load_example("compare_training")
    mean, low, high = example.t_interval(np.array([0.1, 0.3]))
    half = 12.706 * np.std([0.1, 0.3], ddof=1) / math.sqrt(2)
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert example.t_interval(np.array([0.4]))[0] == 0.4
    assert math.isnan(example.t_interval(np.array([0.4]))[1])


def test_learning_curves_read_logs_skip_torn_lines_and_plot(tmp_path):
    runs = {}
    for seed, offset in ((0, 0.0), (1, 0.2)):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        rows = [{"step": s, "rollout/hit@1": offset + 0.1 * s} for s in (1, 2, 3)]
        rows[2]["eval/oracle/hit@1"] = 0.5
        text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rollout/hi'
        (folder / "metrics.jsonl").write_text(text)
        runs.setdefault("coars", []).append(folder)
    logs = read_training_logs(runs)
    assert len(logs) == 6 and set(logs["label"]) == {"coars"}
    # A log file itself (as kept beside a report) reads the same as its run folder.
    kept = read_training_logs({"coars": [tmp_path / "seed1" / "metrics.jsonl"]})
    assert kept["rollout/hit@1"].tolist() == pytest.approx([0.3, 0.4, 0.5])
    png = plot_learning_curves(runs, tmp_path / "curves.png")
    assert png.stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="no training log"):
        read_training_logs({"x": [tmp_path / "nowhere"]})
    with pytest.raises(ValueError, match="none of"):
        plot_learning_curves(runs, tmp_path / "none.png", metrics=[("user/loss", "loss")])


def test_baselines_script_runs_every_system_at_tiny_scale(tmp_path, tiny_train):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "baselines_ml100k.py"
    data_options = {**tiny_train["data_overrides"], "cache_dir": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        str(script),
        "--env", "RecDialog-synthetic",
        "--systems", "random,genre,sasrec,zero-shot,afl",
        "--model", "tiny",
        "--n-sessions", "3",
        "--n-alignment-users", "1",
        "--batch-size", "3",
        "--reason-tokens", "2",
        "--env-options", json.dumps({"max_turns": 2}),
        "--data-options", json.dumps(data_options),
        "--out", str(tmp_path / "out"),
        "--runs", str(tmp_path / "runs"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(next((tmp_path / "out").glob("*.csv")))
    hits = table[table["metric"] == "hit@1"].set_index("system")["n"]
    assert len(hits) == 5 and (hits == 3).all()


# ------------------------------------------------------------------------------ supervised probe


def test_supervised_answer_ids_are_the_tokens_constrained_decoding_produces(tmp_path, tiny_train):
    from coars_agents.coars import CoARSTrainer
    from coars_agents.constrained import TemplateState

    example = load_example("supervised_turn1")
    trainer = CoARSTrainer(CoARSConfig(total_steps=0, output_dir=str(tmp_path), **tiny_train))
    agent = trainer.agents(greedy=False)[RECOMMENDER]
    for number in (1, 7, 12, 20):
        ids, n_forced = example.answer_ids(agent, 20, number)
        state = TemplateState(agent.template(20), agent.policy.vocab)
        for position, token in enumerate(ids):
            allowed = state.allowed()
            assert allowed[token], (number, position)
            if position < n_forced:  # the forced prefix: exactly one token allowed
                assert int(allowed.sum()) == 1
            state.advance(token)
        assert state.fields["item"] == str(number)
        assert agent.policy.tokenizer.decode(ids).startswith(f"Item: {number}\n")
    user = trainer.agents(greedy=False)[USER]
    for action in ("click", "skip"):
        ids, n_forced = example.answer_ids(user, 0, action)
        state = TemplateState(user.template(0), user.policy.vocab)
        for token in ids:
            assert state.allowed()[token]
            state.advance(token)
        assert state.fields["action"] == action
        assert user.policy.tokenizer.decode(ids).startswith(f"Action: {action}\nScore:")


def test_supervised_turn1_train_pool_trains_and_ranks_only_the_pool(tmp_path, tiny_train):
    from coars_agents.coars import CoARSTrainer
    from coars_agents.evaluate import select_sessions, turn1_choice_ranking
    from coars_env.dialog.config import EnvConfig

    example = load_example("supervised_turn1")
    settings = {**tiny_train, "sessions_per_step": 2, "micro_batch_size": 2, "rank_every": 8}
    config = CoARSConfig(output_dir=str(tmp_path / "pool"), learning_rate=1e-2, **settings)
    trainer = CoARSTrainer(config)
    n_train = len(trainer.train_data.sessions)
    with pytest.raises(ValueError, match="train_pool must be in"):
        example.train_supervised(trainer, 1, train_pool=n_train + 1)
    pool = example.training_pool(trainer, 3)
    assert pool == select_sessions(n_train, 3, config.seed)
    drawn = [example.pool_sessions(trainer, pool, step) for step in range(1, 4)]
    assert all(len(set(s)) == 2 and set(s) <= set(pool) for s in drawn)
    assert drawn == [example.pool_sessions(trainer, pool, step) for step in range(1, 4)]

    history = example.train_supervised(trainer, 8, train_pool=3)
    ranked = [row["step"] for row in history if "fit/turn1_target_prob" in row]
    assert ranked == [0, 8]
    # The fit is the trained recommender's mean P(target) on exactly the pool's sessions ...
    agent = trainer.agents(greedy=True)[RECOMMENDER]
    env_config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)
    fit = turn1_choice_ranking(agent, trainer.train_data, env_config, pool)
    assert history[-1]["fit/turn1_target_prob"] == pytest.approx(fit["target_prob"].mean())
    # ... and it rose: the labels it saw again and again got likelier.
    assert history[-1]["fit/turn1_target_prob"] > history[0]["fit/turn1_target_prob"]
    assert "eval/turn1_target_prob" in history[-1]  # the held-out curve goes on beside it


def test_supervised_turn1_fits_the_targets_of_its_training_sessions(tmp_path, tiny_train):
    from coars_agents.coars import CoARSTrainer
    from coars_agents.evaluate import turn1_choice_ranking
    from coars_env.dialog.config import EnvConfig

    example = load_example("supervised_turn1")
    settings = {**tiny_train, "sessions_per_step": 4, "micro_batch_size": 3, "rank_every": 2}
    config = CoARSConfig(output_dir=str(tmp_path / "sft"), learning_rate=1e-2, **settings)
    trainer = CoARSTrainer(config)
    trained = sorted({s for step in range(1, 5) for s in trainer.sample_sessions(step)})
    agent = trainer.agents(greedy=True)[RECOMMENDER]
    env_config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)

    def ranking():
        return turn1_choice_ranking(agent, trainer.train_data, env_config, trained)

    before = ranking()
    params = {
        a: [p.detach().clone() for p in trainer.policy.trainable_parameters(a)]
        for a in (RECOMMENDER, USER)
    }
    history = example.train_supervised(trainer, 4)

    assert [row["step"] for row in history] == [0, 1, 2, 3, 4]
    ranked = [row["step"] for row in history if "eval/turn1_target_prob" in row]
    assert ranked == [0, 2, 4]
    # The held-out curve carries its paired gain over step 0 (a mean of per-session changes).
    assert history[0]["eval/turn1_target_prob_gain"] == 0.0
    assert history[4]["eval/turn1_target_prob_gain"] == pytest.approx(
        history[4]["eval/turn1_target_prob"] - history[0]["eval/turn1_target_prob"]
    )
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in history[1:])
    logged = pd.read_json(tmp_path / "sft" / "metrics.jsonl", lines=True)
    assert list(logged["step"]) == [0, 1, 2, 3, 4]
    # Only the recommender adapter learned.
    changed = {
        a: any(not torch.equal(p0, p) for p0, p in zip(ps, trainer.policy.trainable_parameters(a)))
        for a, ps in params.items()
    }
    assert changed == {RECOMMENDER: True, USER: False}
    # It learned the answers it was shown: the targets of its training sessions became likelier.
    after = ranking()
    gained = (after["target_prob"] > before["target_prob"]).sum()
    assert after["target_prob"].mean() > 1.5 * before["target_prob"].mean()
    assert gained > len(trained) / 2
    with pytest.raises(ValueError, match="steps must be >= 1"):
        example.train_supervised(trainer, 0)


def test_supervised_turn1_stops_at_its_time_limit_and_ranks_there(tmp_path, tiny_train):
    """``--time-limit-minutes`` bounds the probe as it bounds the trainer (it was ignored):
    a limit every step passes stops it after step 1, which is ranked though off the grid."""
    from coars_agents.coars import CoARSTrainer

    example = load_example("supervised_turn1")
    settings = {**tiny_train, "sessions_per_step": 2, "rank_every": 5}
    config = CoARSConfig(output_dir=str(tmp_path / "sft"), time_limit_minutes=1e-9, **settings)
    history = example.train_supervised(CoARSTrainer(config), 10)
    assert [row["step"] for row in history] == [0, 1]
    assert "eval/turn1_target_prob" in history[1]
    logged = pd.read_json(tmp_path / "sft" / "metrics.jsonl", lines=True)
    assert list(logged["step"]) == [0, 1]


def test_supervised_user_learns_its_labels_and_logs_the_judgement_curve(tmp_path, tiny_train):
    from coars_agents.coars import CoARSTrainer
    from coars_env.dialog.config import EnvConfig

    example = load_example("supervised_turn1")
    settings = {**tiny_train, "sessions_per_step": 3, "micro_batch_size": 4, "rank_every": 2}
    config = CoARSConfig(output_dir=str(tmp_path / "user"), learning_rate=1e-2, **settings)
    trainer = CoARSTrainer(config)
    env_config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)
    # The pairs of step 1: each session's hit, then a seeded miss, labelled click / skip.
    sessions = trainer.sample_sessions(1)
    prompts, answers, n_forced = example.user_batch(trainer, env_config, sessions, 1)
    assert len(prompts) == len(answers) == 2 * len(sessions)
    user = trainer.agents(greedy=True)[USER]
    labels = [user.policy.tokenizer.decode(ids[n_forced:]) for ids in answers]
    assert all(
        a.startswith(" click") and b.startswith(" skip") for a, b in zip(*[iter(labels)] * 2)
    )
    again, _, _ = example.user_batch(trainer, env_config, sessions, 1)
    assert again == prompts  # the misses are seeded
    assert len({tuple(p) for p in prompts}) == len(prompts)  # a miss is never the hit

    def label_logprob() -> float:
        scored = trainer.policy.score(prompts, answers, adapter=USER)
        return float(sum(lp[n_forced:].sum() for lp in scored))

    before = label_logprob()
    params = {
        a: [p.detach().clone() for p in trainer.policy.trainable_parameters(a)]
        for a in (RECOMMENDER, USER)
    }
    history = example.train_supervised(trainer, 4, USER)
    assert [row["step"] for row in history] == [0, 1, 2, 3, 4]
    ranked = [row["step"] for row in history if "eval/user_accept_gap" in row]
    assert ranked == [0, 2, 4]
    assert not any("eval/turn1_target_prob" in row for row in history)
    changed = {
        a: any(not torch.equal(p0, p) for p0, p in zip(ps, trainer.policy.trainable_parameters(a)))
        for a, ps in params.items()
    }
    assert changed == {RECOMMENDER: False, USER: True}
    # Step 1's labels (trained once, then other sessions' labels for 3 steps) got likelier.
    assert label_logprob() > before
    row = history[-1]
    assert row["eval/user_accept_gap"] == pytest.approx(
        row["eval/user_accept_hit"] - row["eval/user_accept_miss"]
    )
    rec_only = CoARSTrainer(dataclasses.replace(config, train_agents="recommender"))
    with pytest.raises(ValueError, match="'user' has no optimizer"):
        example.train_supervised(rec_only, 1, USER)


# ------------------------------------------------------------------------------ user reward push


def test_user_reward_push_follows_the_masked_reward(tmp_path, tiny_train):
    example = load_example("user_reward_push")
    config = CoARSConfig(output_dir=str(tmp_path / "push"), **tiny_train)
    summary = example.main(example.Args(sessions=3, train=config))
    table = pd.read_csv(tmp_path / "push" / "user_reward_push.csv")
    assert json.loads((tmp_path / "push" / "user_reward_push.json").read_text()) == summary
    assert sorted(table["kind"]) == ["hit"] * 3 + ["miss"] * 3
    hits, misses = table[table["kind"] == "hit"], table[table["kind"] == "miss"]
    # Accepted misses are masked; a hit pays for accepting and costs for rejecting; rejecting
    # a miss pays (R_user's signs, with |alpha q (2s - 1)| <= 0.1 unable to flip them).
    assert (misses["reward_accept"] == 0.0).all()
    assert (hits["reward_accept"] > 0).all() and (hits["reward_reject"] < 0).all()
    assert (misses["reward_reject"] > 0).all()
    p = table["p_accept"]
    expected = p * (1 - p) * (table["reward_accept"] - table["reward_reject"])
    assert np.allclose(table["push"], expected)
    assert (hits["push"] > 0).all() and (misses["push"] < 0).all()
    # The break-even hit rate balances the two cases' mean pushes.
    f = summary["break_even_hit_rate"]
    assert 0 < f < 1
    assert f * summary["hit/push"] + (1 - f) * summary["miss/push"] == pytest.approx(0, abs=1e-12)
    assert summary["hit/p_accept"] == pytest.approx(hits["p_accept"].mean())
    for action in ("click", "star", "skip", "dislike"):  # each score mean lies in its interval
        low, high = {"click": (0.8, 1), "star": (0.55, 0.75), "skip": (0.3, 0.5)}.get(
            action, (0, 0.25)
        )
        assert table[f"score_{action}"].between(low - 1e-9, high + 1e-9).all()
    # Without the mask, accepted misses cost (R_user < 0 for s > 0.5), the hits are unchanged
    # and every miss pushes harder towards rejecting.
    unmasked = dataclasses.replace(
        config, exclude_miss_positive="none", output_dir=str(tmp_path / "none")
    )
    example.main(example.Args(sessions=3, train=unmasked))
    none = pd.read_csv(tmp_path / "none" / "user_reward_push.csv")
    pd.testing.assert_frame_equal(none[none["kind"] == "hit"], hits)
    none_misses = none[none["kind"] == "miss"]
    assert (none_misses["reward_accept"] < 0).all()
    assert np.allclose(none_misses["reward_reject"], misses["reward_reject"])
    assert (none_misses["push"] < misses["push"]).all()


# ------------------------------------------------------------------------------ credit profile
def profiled_trainer(tmp_path: Path, tiny_train: dict[str, Any], **overrides: Any):
    """A recommender-only trainer with the dense credit and the frozen teacher: 3 sessions x
    2 rollouts a step."""
    from coars_agents.coars import CoARSTrainer

    settings = {**tiny_train, "sessions_per_step": 3, "rollouts_per_session": 2, **overrides}
    return CoARSTrainer(
        CoARSConfig(
            output_dir=str(tmp_path / "prof"),
            train_agents="recommender",
            credit_form="forward_kl",
            teacher="base",
            **settings,
        )
    )


def test_credit_profile_sees_exactly_what_the_trainers_step_sees(tmp_path, tiny_train):
    """The profile rolls out and scores the batch the trainer's step would: its per-token KL
    and |A| average to the step's logged ``mean_distill_kl`` and ``mean_abs_credit``."""
    example = load_example("credit_profile")
    trainer = profiled_trainer(tmp_path, tiny_train, micro_batch_size=4)
    profile = example.credit_profile(trainer, RECOMMENDER, step=0)
    metrics = trainer.train_step()  # step 0's batch, the adapters the profile scored
    assert profile["kl"].mean() == pytest.approx(metrics["recommender/mean_distill_kl"], rel=1e-4)
    assert profile["credit"].abs().mean() == pytest.approx(
        metrics["recommender/mean_abs_credit"], rel=1e-4
    )
    turns = metrics["recommender/trained_turns"] + metrics["recommender/masked_turns"]
    assert profile["turn_id"].nunique() == turns == 6  # 3 sessions x 2 rollouts, T = 1
    assert (profile.groupby("turn_id")["is_answer"].sum() == 1).all()
    assert (profile["kl"] > -1e-6).all()
    assert profile["credit"].between(-1.0, 1.0).all()
    answers = profile[profile["is_answer"]]
    assert answers[["teacher_p_target", "student_p_target"]].stack().between(0, 1).all()
    assert profile.loc[~profile["is_answer"], "teacher_p_target"].isna().all()
    summary = example.summarise(profile)
    assert summary["turns"] == 6
    assert summary["tokens_per_turn"] == len(profile) / 6
    assert summary["answer_share_of_kl"] == pytest.approx(answers["kl"].sum() / profile["kl"].sum())
    with pytest.raises(ValueError, match="is not trained by this config"):
        example.credit_profile(trainer, USER)


def test_credit_profile_cli_profiles_a_checkpoint_and_writes_the_per_token_csv(
    tmp_path, tiny_train
):
    """From a checkpoint it profiles the trained adapters on the run's next batch: the shared
    teacher (the adapter itself) then differs from the fresh profile's."""
    from coars_agents.coars import CoARSTrainer

    example = load_example("credit_profile")
    config = CoARSConfig(
        output_dir=str(tmp_path / "run"),
        train_agents="recommender",
        total_steps=2,
        checkpoint_every=2,
        learning_rate=5e-2,
        **tiny_train,
    )
    CoARSTrainer(config).train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    profiled = dataclasses.replace(config, output_dir=str(tmp_path / "prof"))
    trained = example.main(example.Args(train=profiled, checkpoint=str(checkpoint), step=0))
    written = pd.read_csv(tmp_path / "prof" / "credit_profile.csv")
    assert len(written) == trained["turns"] * trained["tokens_per_turn"]
    assert {"token", "kl", "credit", "teacher_p_target"} <= set(written.columns)
    fresh = example.main(example.Args(train=profiled, step=0))
    assert trained["student_p_target"] != fresh["student_p_target"]


def test_first_choice_credit_is_the_answer_tokens_kl_only(tmp_path, tiny_train):
    """``credit_tokens='first_choice'``: the step's KL and |A| are the profile's means over the
    answer tokens alone (the rationale carries none of the credit)."""
    example = load_example("credit_profile")
    trainer = profiled_trainer(tmp_path, tiny_train, credit_tokens="first_choice")
    profile = example.credit_profile(trainer, RECOMMENDER, step=0)
    answers = profile[profile["is_answer"]]
    assert len(profile) > len(answers) == 6  # the rationales have trained tokens too
    metrics = trainer.train_step()
    assert answers["kl"].mean() == pytest.approx(metrics["recommender/mean_distill_kl"], rel=1e-4)
    assert answers["credit"].abs().mean() == pytest.approx(
        metrics["recommender/mean_abs_credit"], rel=1e-4
    )
    assert profile["kl"].mean() != pytest.approx(answers["kl"].mean(), rel=1e-3)
