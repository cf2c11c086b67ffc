"""The CoARS trainer on a tiny random model: metrics, which parameters move, masks, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from envtools import tiny_dialog_data

from coars_agents.coars import CoARSConfig, CoARSTrainer
from coars_env.dialog.env import RECOMMENDER, USER

TINY = dict(
    model="tiny",
    max_turns=2,
    sessions_per_step=2,
    max_new_tokens=16,
    reason_tokens=4,
    micro_batch_size=4,
    tensorboard=False,
    eval_sessions=2,
)

EXPECTED_METRICS = {
    "step",
    "time/generation_s",
    "time/step_s",
    "throughput/tokens_per_s",
    "rollout/hit@1",
    "rollout/turn1_hit@1",
    "rollout/avg_turns",
    "rollout/click_rate",
    "rollout/wrong_click_rate",
    "rollout/repeat_rate",
    "rollout/rec_format_failure_rate",
    "rollout/user_format_failure_rate",
    "rollout/reward_rec",
    "rollout/reward_user",
}
PER_AGENT = [
    "loss",
    "mean_reward",
    "mean_abs_credit",
    "frac_positive_credit",
    "trained_turns",
    "masked_turns",
    "updated",
    "carried_turns",
]


def make_trainer(tmp_path: Path, **overrides) -> CoARSTrainer:
    config = CoARSConfig(output_dir=str(tmp_path / "run"), **{**TINY, **overrides})
    return CoARSTrainer(
        config,
        train_data=tiny_dialog_data(split="train"),
        eval_data=tiny_dialog_data(split="valid"),
    )


def snapshot(trainer: CoARSTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters()}


def changed(before: dict[str, torch.Tensor], trainer: CoARSTrainer) -> set[str]:
    return {n for n, p in trainer.policy.model.named_parameters() if not torch.equal(before[n], p)}


def test_one_step_logs_every_metric_and_moves_only_adapters(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=1, checkpoint_every=1)
    before = snapshot(trainer)
    history = trainer.train()
    assert len(history) == 1
    metrics = history[0]
    expected = EXPECTED_METRICS | {f"{a}/{k}" for a in (RECOMMENDER, USER) for k in PER_AGENT}
    expected |= {f"time/{a}_{k}_s" for a in (RECOMMENDER, USER) for k in ("scoring", "backward")}
    assert expected <= set(metrics)
    assert metrics["rollout/rec_format_failure_rate"] == 0.0  # constrained decoding
    moved = changed(before, trainer)
    assert moved, "no parameter changed"
    assert all(".lora_" in n for n in moved), "a base weight changed"
    # Both adapters learn (LoRA B starts at zero, so B moves first).
    assert any(".lora_B.recommender." in n for n in moved)
    assert any(".lora_B.user." in n for n in moved)
    # Logs: JSONL and CSV that pandas reads, and an atomic checkpoint.
    frame = pd.read_json(tmp_path / "run" / "metrics.jsonl", lines=True)
    assert frame["step"].tolist() == [1]
    assert (tmp_path / "run" / "metrics.csv").exists()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001"
    assert (checkpoint / "adapters" / "recommender" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_merged_rollouts_train_like_adapter_rollouts(tmp_path):
    """Decoding with merged copies changes speed, not the training run."""
    runs = {}
    for merged in (False, True):
        trainer = make_trainer(tmp_path / str(merged), total_steps=3, merged_rollouts=merged)
        history = trainer.train()
        assert not trainer.policy._merged  # copies are freed after each rollout
        runs[merged] = (history, snapshot(trainer))
    (plain, plain_params), (fast, fast_params) = runs[False], runs[True]
    for a, b in zip(plain, fast):
        for key in ("rollout/hit@1", "rollout/avg_turns", "recommender/trained_turns"):
            assert a[key] == b[key], key
        assert a["recommender/loss"] == pytest.approx(b["recommender/loss"], abs=1e-5)
    for name, value in plain_params.items():
        torch.testing.assert_close(fast_params[name], value, atol=1e-5, rtol=0)


@pytest.mark.parametrize("credit", [0.1, 0.0])
def test_the_teacher_is_scored_only_when_its_credit_is_used(tmp_path, credit):
    trainer = make_trainer(tmp_path, total_steps=1, credit_coef_rec=credit, credit_coef_user=credit)
    score, passes = trainer.policy.score, []

    def recording_score(*args, requires_grad=False, **kwargs):
        passes.append("student" if requires_grad else "teacher")
        return score(*args, requires_grad=requires_grad, **kwargs)

    trainer.policy.score = recording_score
    before = snapshot(trainer)
    (metrics,) = trainer.train()
    assert passes.count("student") >= 2  # both agents train
    assert passes.count("teacher") == (passes.count("student") if credit else 0)
    assert any(".lora_B.recommender." in n for n in changed(before, trainer))
    if not credit:
        assert metrics["recommender/mean_abs_credit"] == 0.0
        assert metrics["recommender/frac_positive_credit"] == 0.0


def perturb_adapter(trainer: CoARSTrainer, agent: str, seed: int = 0, scale: float = 0.05) -> None:
    """Move an adapter off the identity (LoRA B starts at 0), so that it and the base differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.policy.trainable_parameters(agent):
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.mark.parametrize(
    "form, teacher",
    [("forward_kl", "shared"), ("reverse_kl", "shared"), ("forward_kl", "base")],
)
def test_dense_credit_loss_is_lambda_times_the_teacher_student_kl(tmp_path, form, teacher):
    """With ``credit_form`` a KL, the credit part of the loss is lambda times the per-turn
    mean KL between the teacher's (x + d) and the student's (x) next-token distributions
    over the tokens that carry loss. Rewards set to 0 leave only that part. The teacher
    scores with the agent's adapter (``shared``) or the frozen base (``base``)."""
    import dataclasses

    from coars_agents.credit import distillation_divergence
    from coars_agents.rollout import rollout

    lam = 0.5
    trainer = make_trainer(
        tmp_path,
        credit_form=form,
        credit_coef_rec=lam,
        teacher=teacher,
        train_agents="recommender",
        micro_batch_size=2,
    )
    # Far enough from the base that the shared and the base teacher differ well beyond the
    # tolerance of the loss check (1e-4 relative; at 0.05 they differed by about that much).
    perturb_adapter(trainer, RECOMMENDER, scale=0.2)
    episodes = rollout(
        trainer.train_env,
        trainer.agents(greedy=False),
        seed=0,
        options=[{"session_id": s} for s in trainer.sample_sessions(0)],
    )
    samples = [
        dataclasses.replace(s, reward=0.0)
        for s in trainer.build_samples(episodes)
        if s.agent == RECOMMENDER
    ]
    assert len(samples) > trainer.config.micro_batch_size  # several chunks
    completions = [s.completion_ids for s in samples]

    def tables(side: str, adapter: str | None) -> list[torch.Tensor]:
        contexts = [getattr(s, side) for s in samples]
        return trainer.policy.score(contexts, completions, adapter=adapter, full_distributions=True)

    def per_turn_kl(teacher_tables, student_tables) -> tuple[list[float], list[float]]:
        means, sums = [], []
        for k, s in enumerate(samples):
            mask = s.loss_mask.float()[None]
            kl = distillation_divergence(
                teacher_tables[k][None], student_tables[k][None], mask, form
            )
            sums.append(float(kl.sum()))
            means.append(float(kl.sum()) / max(1.0, float(mask.sum())) * s.turn_mask)
        return means, sums

    student = tables("student_ids", RECOMMENDER)
    teachers = {"shared": tables("teacher_ids", RECOMMENDER), "base": tables("teacher_ids", None)}
    means, sums = per_turn_kl(teachers[teacher], student)
    # Swapped contexts, or the other teacher, change the value by far more than the
    # tolerance used below (a random tiny model's distributions are near uniform).
    other = "base" if teacher == "shared" else "shared"
    for wrong in (
        per_turn_kl(student, teachers[teacher])[0],
        per_turn_kl(teachers[other], student)[0],
    ):
        assert abs(np.mean(wrong) - np.mean(means)) > 1e-3 * np.mean(means)
    before = snapshot(trainer)
    metrics = trainer.train_agent(RECOMMENDER, samples)
    assert metrics["recommender/loss"] == pytest.approx(lam * np.mean(means), rel=1e-4)
    tokens = sum(float(s.loss_mask.sum()) for s in samples)
    assert metrics["recommender/mean_distill_kl"] == pytest.approx(sum(sums) / tokens, rel=1e-4)
    assert metrics["recommender/mean_abs_credit"] > 0  # A is still logged
    assert any(".lora_B.recommender." in n for n in changed(before, trainer))


def test_training_one_agent_leaves_the_other_adapter_untouched(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=1, train_agents="recommender")
    before = snapshot(trainer)
    trainer.train()
    moved = changed(before, trainer)
    assert any(".recommender." in n for n in moved)
    assert not any(".user." in n for n in moved)
    assert set(trainer.optimizers) == {RECOMMENDER}


def partner_rollout(trainer: CoARSTrainer) -> list:
    from coars_agents.rollout import rollout

    group = trainer.config.rollouts_per_session
    options = [
        {"session_id": s} for s in trainer.sample_sessions(trainer.step) for _ in range(group)
    ]
    return rollout(trainer.train_env, trainer.training_agents(), seed=5, options=options)


def test_a_balanced_scripted_recommender_partner_trains_the_user_alone(tmp_path):
    trainer = make_trainer(
        tmp_path,
        total_steps=2,
        train_agents="user",
        recommender_partner="balanced",
        rollouts_per_session=2,
        sessions_per_step=5,
        max_turns=1,
        exclude_miss_positive="none",
    )
    episodes = partner_rollout(trainer)
    # The scripted partner generates nothing; the user LLM judges every recommendation.
    assert all(ep.recommender == [] and len(ep.user_agent) == 1 for ep in episodes)
    assert not any(t["rec_format_failure"] for ep in episodes for t in ep.turns)
    picks = [ep.turns[0]["rec_position"] for ep in episodes]
    assert 0 < sum(ep.hit for ep in episodes) < len(episodes)  # hits and misses
    assert picks == [ep.turns[0]["rec_position"] for ep in partner_rollout(trainer)]  # seeded
    trainer.step = 1  # another step, other coins
    assert picks != [ep.turns[0]["rec_position"] for ep in partner_rollout(trainer)]
    trainer.step = 0
    samples = trainer.build_samples(episodes)
    assert {s.agent for s in samples} == {USER} and len(samples) == len(episodes)
    before = snapshot(trainer)
    history = trainer.train()
    moved = changed(before, trainer)
    assert any(".user." in n for n in moved)
    assert not any(".recommender." in n for n in moved)
    assert [h["user/trained_turns"] for h in history if "user/trained_turns" in h] == [10, 10]


def test_partner_choices_are_exactly_the_scripted_built_ins():
    # The config's Literal choices (tyro's --help) restate coars_env.agents' names: keep them equal.
    from typing import get_args, get_type_hints

    from coars_env.agents import SCRIPTED_RECOMMENDERS, SCRIPTED_USERS, make_scripted

    hints = get_type_hints(CoARSConfig)
    choices = {k: get_args(hints[k]) for k in ("recommender_partner", "user_partner")}
    assert choices["recommender_partner"] == ("llm", *SCRIPTED_RECOMMENDERS)
    assert choices["user_partner"] == ("llm", *SCRIPTED_USERS)
    data = tiny_dialog_data(split="train")
    for role, names in ((RECOMMENDER, SCRIPTED_RECOMMENDERS), (USER, SCRIPTED_USERS)):
        assert all(callable(make_scripted(name, role, data)) for name in names)


def test_the_oracle_user_partner_answers_while_the_recommender_trains(tmp_path):
    trainer = make_trainer(
        tmp_path, total_steps=1, train_agents="recommender", user_partner="oracle", max_turns=3
    )
    episodes = partner_rollout(trainer)
    assert all(ep.user_agent == [] and ep.recommender for ep in episodes)
    for ep in episodes:  # the oracle user clicks the target and only the target
        assert all((t["action"] == 0) == t["hit"] for t in ep.turns if not t["rec_format_failure"])
    before = snapshot(trainer)
    trainer.train()
    moved = changed(before, trainer)
    assert any(".recommender." in n for n in moved)
    assert not any(".user." in n for n in moved)


def test_samples_carry_env_rewards_masks_and_exclude_forced_tokens(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=1)
    sessions = trainer.sample_sessions(0)
    from coars_agents.rollout import rollout

    episodes = rollout(
        trainer.train_env,
        trainer.agents(greedy=False),
        seed=0,
        options=[{"session_id": s} for s in sessions],
    )
    samples = trainer.build_samples(episodes)
    for ep in episodes:
        records = {r["turn"]: r for r in ep.turns}
        rec = [s for s in samples if s.agent == RECOMMENDER and s.session_id == ep.session_id]
        assert [s.reward for s in rec] == [records[t.turn]["reward_rec"] for t in ep.recommender]
        user = [s for s in samples if s.agent == USER and s.session_id == ep.session_id]
        assert [s.turn_mask for s in user] == [records[t.turn]["mask_user"] for t in ep.user_agent]
        for sample, turn in zip(rec, ep.recommender):
            # Template tokens ("Item: ", "\nReason: ") were forced: no loss on them.
            assert sample.loss_mask.tolist() == (~turn.forced.bool()).tolist()
            assert sample.student_ids == turn.prompt_ids
            # The teacher context is longer: x plus the hindsight reference d.
            assert len(sample.teacher_ids) > len(sample.student_ids)
    # The hindsight memory now holds each session's trajectory for the next visit.
    assert set(trainer.memory) == {ep.session_id for ep in episodes}


@pytest.mark.parametrize("answer_hint", [True, False])
def test_the_teacher_context_opens_with_the_answer_line_until_the_target_was_named(
    tmp_path, answer_hint
):
    from coars_agents.rollout import rollout

    trainer = make_trainer(tmp_path, answer_hint=answer_hint)
    options = [{"session_id": s} for s in trainer.sample_sessions(0)]
    episodes = rollout(trainer.train_env, trainer.agents(greedy=False), seed=0, options=options)
    long = [ep for ep in episodes if len(ep.recommender) >= 2]
    assert long, "the check needs an episode of two turns or more"
    for ep in long:  # as if turn 1 had named the target and the user had rejected it
        ep.turns[0]["hit"] = True
    samples = trainer.build_samples(episodes)
    decode = trainer.policy.tokenizer.decode
    for ep in episodes:
        target = ep.candidates.index(ep.target) + 1
        rec = [s for s in samples if s.agent == RECOMMENDER and s.session_id == ep.session_id]
        for sample, turn in zip(rec, ep.recommender):
            named_before = any(r["hit"] for r in ep.turns if r["turn"] < turn.turn)
            expected = answer_hint and not named_before
            assert (f"Answer with Item: {target}\n" in decode(sample.teacher_ids)) == expected
        users = [s for s in samples if s.agent == USER and s.session_id == ep.session_id]
        records = {r["turn"]: r for r in ep.turns}
        for sample, turn in zip(users, ep.user_agent):
            action = "click" if records[turn.turn]["rec_item"] == ep.target else "dislike"
            line = f"Answer with Action: {action}\n"
            assert (line in decode(sample.teacher_ids)) == answer_hint
            assert "Answer with" not in decode(sample.student_ids)


def test_llm_diagnoses_come_from_the_frozen_base_and_reach_the_teacher_context(tmp_path):
    from coars_agents.hindsight import write_diagnoses
    from coars_agents.rollout import rollout
    from coars_env.dialog.prompts import Catalog

    trainer = make_trainer(tmp_path, diagnosis="llm", diagnosis_tokens=6)
    perturb_adapter(trainer, RECOMMENDER)
    perturb_adapter(trainer, USER, seed=1)
    options = [{"session_id": s} for s in trainer.sample_sessions(0)]
    episodes = rollout(trainer.train_env, trainer.agents(greedy=False), seed=0, options=options)
    untouched = [[dict(r) for r in ep.turns] for ep in episodes]
    metrics = trainer.write_diagnoses(episodes)
    records = [r for ep in episodes for r in ep.turns]  # first visits: the episodes' own turns
    assert metrics["hindsight/diagnoses_written"] == len(records) > 0
    assert metrics["hindsight/empty_diagnoses"] == sum(not r["diagnosis"] for r in records)
    assert metrics["time/diagnosis_s"] > 0
    assert any(r["diagnosis"] for r in records), "the check below needs a non-empty note"
    # The notes are the frozen base's greedy answers to the writer's prompts.
    catalog = Catalog(trainer.train_data.items, max_summary_chars=0)
    describe = catalog.line
    cases = [
        (turn, trainer.train_data.sessions[ep.session_id].history[-10:], ep.target)
        for ep, turns in zip(episodes, untouched)
        for turn in turns
    ]
    base_notes = write_diagnoses(trainer.policy, cases, describe, max_new_tokens=6, adapter=None)
    assert [r["diagnosis"] for r in records] == base_notes
    # Each written note is in the teacher context of every sample that references its turn.
    samples = trainer.build_samples(episodes)
    decode = trainer.policy.tokenizer.decode
    for ep in episodes:
        notes = [r["diagnosis"] for r in ep.turns if r["diagnosis"]]
        for sample in (s for s in samples if s.session_id == ep.session_id):
            teacher_text = decode(sample.teacher_ids)
            assert all(f"Why: {note}" in teacher_text for note in notes)
            assert "Why:" not in decode(sample.student_ids)


def test_a_separate_diagnosis_model_writes_the_notes(tmp_path):
    from coars_agents.hindsight import write_diagnoses
    from coars_agents.models import tiny_test_model
    from coars_agents.policy import LLMPolicy
    from coars_agents.rollout import rollout
    from coars_env.dialog.prompts import Catalog

    writer = LLMPolicy(*tiny_test_model(7, max_position_embeddings=4096))
    config = CoARSConfig(
        output_dir=str(tmp_path / "run"), **{**TINY, "diagnosis": "llm", "diagnosis_tokens": 6}
    )
    trainer = CoARSTrainer(
        config,
        train_data=tiny_dialog_data(split="train"),
        eval_data=tiny_dialog_data(split="valid"),
        diagnosis_policy=writer,
    )
    options = [{"session_id": s} for s in trainer.sample_sessions(0)]
    episodes = rollout(trainer.train_env, trainer.agents(greedy=False), seed=0, options=options)
    catalog = Catalog(trainer.train_data.items, max_summary_chars=0)
    cases = [
        (dict(turn), trainer.train_data.sessions[ep.session_id].history[-10:], ep.target)
        for ep in episodes
        for turn in ep.turns
    ]
    describe = catalog.line
    trainer.write_diagnoses(episodes)
    notes = [r["diagnosis"] for ep in episodes for r in ep.turns]
    assert notes == write_diagnoses(writer, cases, describe, max_new_tokens=6)
    assert notes != write_diagnoses(trainer.policy, cases, describe, max_new_tokens=6)


def test_llm_diagnoses_are_written_once_per_turn_record_and_kept_in_checkpoints(tmp_path):
    settings = dict(diagnosis="llm", diagnosis_tokens=4, sessions_per_step=5, checkpoint_every=1)
    trainer = make_trainer(tmp_path, total_steps=1, **settings)
    (first,) = trainer.train()
    # Step 1 visits every session first: each episode's own turns are diagnosed.
    assert first["hindsight/diagnoses_written"] == 5 * first["rollout/avg_turns"]
    notes = {k: [r["diagnosis"] for r in v] for k, v in trainer.memory.items()}
    assert len(notes) == 5
    # A resumed run has the notes back; step 2 revisits every session, so its references
    # are step 1's turns, already written: nothing new to write.
    resumed = make_trainer(tmp_path, total_steps=2, **settings)
    resumed.load_checkpoint(resumed.checkpoint_dirs()[-1])
    assert {k: [r["diagnosis"] for r in v] for k, v in resumed.memory.items()} == notes
    (second,) = resumed.train()
    assert second["hindsight/diagnoses_written"] == 0
    # The default template writes nothing and logs nothing about it.
    plain = make_trainer(tmp_path / "plain", total_steps=1)
    (metrics,) = plain.train()
    assert not any(key.startswith("hindsight/") for key in metrics)
    assert all("diagnosis" not in r for v in plain.memory.values() for r in v)
    with pytest.raises(ValueError, match="diagnosis_tokens must be >= 1, got 0"):
        CoARSConfig(diagnosis_tokens=0)


def grouped_rollout(trainer: CoARSTrainer, group: int) -> tuple[list[int], list]:
    """Step 0's sessions, each rolled out ``group`` times (a group-normalisation batch)."""
    from coars_agents.rollout import rollout

    sessions = trainer.sample_sessions(0)
    options = [{"session_id": s} for s in sessions for _ in range(group)]
    episodes = rollout(trainer.train_env, trainer.agents(greedy=False), seed=0, options=options)
    return sessions, episodes


@pytest.mark.parametrize("group_std", [True, False])
def test_group_normalised_rewards_are_centred_per_session_and_agent(tmp_path, group_std):
    trainer = make_trainer(
        tmp_path,
        rollouts_per_session=3,
        group_normalise=True,
        group_std=group_std,
        group_normalise_user=True,
    )
    sessions, episodes = grouped_rollout(trainer, 3)
    samples = trainer.build_samples(episodes)
    n_masked = 0
    for agent, key, turns_of in (
        (RECOMMENDER, "reward_rec", lambda ep: ep.recommender),
        (USER, "reward_user", lambda ep: ep.user_agent),
    ):
        mask_key = "mask_rec" if agent == RECOMMENDER else "mask_user"
        for session in set(sessions):
            records = [
                {r["turn"]: r for r in ep.turns}[t.turn]
                for ep in episodes
                if ep.session_id == session
                for t in turns_of(ep)
            ]
            got = [s for s in samples if s.agent == agent and s.session_id == session]
            assert [s.turn_mask for s in got] == [r[mask_key] for r in records]
            # Statistics over the trained turns only; masked turns keep their env reward.
            trained = [i for i, r in enumerate(records) if r[mask_key]]
            raw = torch.tensor([records[i][key] for i in trained])
            expected = raw - raw.mean()
            if group_std:
                expected = expected / (raw.std(unbiased=False) + 1e-6)
            if len(trained) < 2:
                expected = torch.zeros(len(trained))
            assert [got[i].reward for i in trained] == pytest.approx(expected.tolist(), abs=1e-5)
            masked = [i for i in range(len(records)) if i not in trained]
            assert [got[i].reward for i in masked] == [records[i][key] for i in masked]
            n_masked += len(masked)
    assert n_masked > 0, "the untrained user accepts some misses: masked turns to check"


def test_group_normalisation_leaves_the_user_agents_rewards_raw_by_default(tmp_path):
    trainer = make_trainer(tmp_path, rollouts_per_session=3, group_normalise=True)
    sessions, episodes = grouped_rollout(trainer, 3)
    samples = trainer.build_samples(episodes)
    records = {
        (ep.session_id, i): {r["turn"]: r for r in ep.turns} for i, ep in enumerate(episodes)
    }
    user = [s for s in samples if s.agent == USER]
    expected = [
        records[(ep.session_id, i)][t.turn]["reward_user"]
        for i, ep in enumerate(episodes)
        for t in ep.user_agent
    ]
    assert user and [s.reward for s in user] == pytest.approx(expected)
    # The recommender's rewards are still centred per session.
    rec = [s for s in samples if s.agent == RECOMMENDER and s.turn_mask > 0]
    for session in set(sessions):
        group = [s.reward for s in rec if s.session_id == session]
        if len(group) > 1:
            assert sum(group) == pytest.approx(0.0, abs=1e-5)
    assert any(abs(s.reward) > 1e-3 for s in user), "raw user rewards are not all zero"


def test_outcome_reward_baseline_trains_recommender_only_with_final_hit(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=1, reward_mode="outcome")
    assert trainer.config.trained_agents == (RECOMMENDER,)
    assert trainer.credit_coef(RECOMMENDER) == 0.0
    from coars_agents.rollout import rollout

    episodes = rollout(
        trainer.train_env,
        trainer.agents(greedy=False),
        seed=1,
        options=[{"session_id": s} for s in trainer.sample_sessions(0)],
    )
    samples = trainer.build_samples(episodes)
    assert {s.agent for s in samples} == {RECOMMENDER}
    by_session = {ep.session_id: (1.0 if ep.hit else -1.0) for ep in episodes}
    assert all(s.reward == by_session[s.session_id] for s in samples)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="clip_ratio"):
        CoARSConfig(ppo_epochs=2)
    with pytest.raises(ValueError):
        CoARSConfig(sessions_per_step=0)
    with pytest.raises(ValueError, match="learning rates"):
        CoARSConfig(user_learning_rate=0.0)
    for bad in (dict(rank_every=-1), dict(eval_every=-2), dict(checkpoint_every=0)):
        with pytest.raises(ValueError, match="rank_every"):
            CoARSConfig(**bad)
    with pytest.raises(ValueError, match="num_candidates must be >= 2, got 1"):
        CoARSConfig(num_candidates=1)
    with pytest.raises(ValueError, match="reason_tokens must be >= 1"):
        CoARSConfig(reason_tokens=0)
    with pytest.raises(ValueError, match="set constrained=True or credit_tokens='all'"):
        CoARSConfig(credit_tokens="first_choice", constrained=False)
    with pytest.raises(ValueError, match="the user does not learn here"):
        CoARSConfig(user_class_balance=True, train_agents="recommender")
    with pytest.raises(ValueError, match="only the user agent may learn: set train_agents='user'"):
        CoARSConfig(recommender_partner="balanced")
    with pytest.raises(ValueError, match="the user agent cannot learn"):
        CoARSConfig(user_partner="oracle", train_agents="user")
    # Valid: the outcome baseline never trains the user; no training plays no rollouts.
    CoARSConfig(user_partner="oracle", reward_mode="outcome")
    CoARSConfig(recommender_partner="balanced", total_steps=0)


def test_candidate_numbers_reaches_the_training_and_evaluation_prompts(tmp_path):
    trainer = make_trainer(tmp_path, candidate_numbers="last")
    assert trainer.env_kwargs["candidate_numbers"] == "last"
    from coars_env.dialog.env import RecDialogEnv

    # Training rolls out in train_env; evaluation builds its envs from env_kwargs.
    eval_env = RecDialogEnv(trainer.eval_data, **trainer.env_kwargs)
    for env in (trainer.train_env.envs[0], eval_env):
        env.reset(seed=0, options={"session_id": 0})
        prompt = env.messages(RECOMMENDER)[1]["content"]
        assert prompt.count(" = candidate ") == len(env.session.candidates)


def test_num_candidates_sets_the_run_data_candidate_lists():
    from evaltools import SYNTHETIC_DATA

    from coars_agents.coars import load_run_data

    config = CoARSConfig(num_candidates=6, data_overrides=dict(SYNTHETIC_DATA))
    data = load_run_data(config, "valid")
    assert {len(s.candidates) for s in data.sessions} == {6}
    assert all(s.target in s.candidates for s in data.sessions)
    default = load_run_data(CoARSConfig(data_overrides=dict(SYNTHETIC_DATA)), "valid")
    assert {len(s.candidates) for s in default.sessions} == {20}
    # Each session keeps its user and target: only the negatives are fewer.
    assert [(s.user, s.target) for s in data.sessions] == [
        (s.user, s.target) for s in default.sessions
    ]


def test_rank_every_logs_the_turn1_choice_curve_from_step_0(tmp_path):
    from coars_agents.evaluate import select_sessions, turn1_choice_ranking
    from coars_env.dialog.config import EnvConfig

    trainer = make_trainer(tmp_path, total_steps=3, rank_every=2, eval_sessions=3)
    untrained = trainer.rank_turn1()
    history = trainer.train()
    # A step-0 row (before any update), then steps 1-3 with the ranking after steps 2 and 3.
    assert [m["step"] for m in history] == [0.0, 1.0, 2.0, 3.0]
    assert history[0] == {"step": 0.0, **untrained}
    assert "eval/turn1_target_prob" not in history[1]
    assert {"eval/turn1_target_prob", "eval/ndcg@5"} <= history[2].keys()
    assert "eval/turn1_target_prob" not in history[3]
    logged = pd.read_json(tmp_path / "run" / "metrics.jsonl", lines=True)
    assert list(logged["step"]) == [0, 1, 2, 3]
    # The logged value is the mean target probability of the turn-1 ranking of the trained
    # recommender on the same 3 sessions.
    sessions = select_sessions(len(trainer.eval_data.sessions), 3, trainer.config.seed)
    agent = trainer.agents(greedy=True)[RECOMMENDER]
    config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)
    ranking = turn1_choice_ranking(agent, trainer.eval_data, config, sessions)
    assert trainer.rank_turn1()["eval/turn1_target_prob"] == pytest.approx(
        ranking["target_prob"].mean()
    )
    assert 0.0 < untrained["eval/turn1_target_prob"] < 1.0
    assert untrained["eval/turn1_target_prob_se"] > 0.0
    # The paired gain over the untrained model: 0 at step 0, then the mean per-session change.
    assert untrained["eval/turn1_target_prob_gain"] == 0.0
    assert untrained["eval/turn1_target_prob_gain_se"] == 0.0
    base = turn1_choice_ranking(
        trainer.agents(greedy=True, use_adapters=False)[RECOMMENDER],
        trainer.eval_data,
        config,
        sessions,
    )
    change = ranking["target_prob"].to_numpy() - base["target_prob"].to_numpy()
    assert history[2]["eval/turn1_target_prob_gain"] == pytest.approx(
        history[2]["eval/turn1_target_prob"] - untrained["eval/turn1_target_prob"]
    )
    last = trainer.rank_turn1()
    # The position-collapse diagnostic: the largest share of sessions with one top number.
    _, counts = np.unique(ranking["top_position"].to_numpy(), return_counts=True)
    assert last["eval/turn1_top_position_share"] == pytest.approx(counts.max() / 3)
    assert last["eval/turn1_target_prob_gain"] == pytest.approx(change.mean())
    assert last["eval/turn1_target_prob_gain_se"] == pytest.approx(change.std() / np.sqrt(3))
    assert last["eval/turn1_target_prob_gain_se"] > 0.0  # training moved some sessions
    assert not any(k.startswith(("eval/teacher_", "eval/user_")) for m in history for k in m)


def test_turn1_gain_of_an_adapter_trained_before_the_first_ranking_is_over_the_base(tmp_path):
    from coars_agents.evaluate import select_sessions, turn1_choice_ranking
    from coars_env.dialog.config import EnvConfig

    # As after a resume: the first ranking of the run already sees a trained adapter, so the
    # untrained reference is ranked once with the adapter switched off.
    trainer = make_trainer(tmp_path, eval_sessions=4)
    assert trainer.policy.adapter_is_identity(RECOMMENDER)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.policy.peft_model.named_parameters():
            if ".lora_B.recommender." in name:
                param.normal_(std=0.5)
    assert not trainer.policy.adapter_is_identity(RECOMMENDER)
    assert trainer.policy.adapter_is_identity(USER)
    metrics = trainer.rank_turn1()
    sessions = select_sessions(len(trainer.eval_data.sessions), 4, trainer.config.seed)
    config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)
    probs = {
        adapters: turn1_choice_ranking(
            trainer.agents(greedy=True, use_adapters=adapters)[RECOMMENDER],
            trainer.eval_data,
            config,
            sessions,
        )["target_prob"].to_numpy()
        for adapters in (True, False)
    }
    change = probs[True] - probs[False]
    assert np.abs(change).max() > 1e-3  # the perturbed adapter ranks differently
    assert metrics["eval/turn1_target_prob_gain"] == pytest.approx(change.mean())
    assert metrics["eval/turn1_target_prob_gain_se"] == pytest.approx(change.std() / 2.0)
    # Another subset or split has no untrained reference: no gain is reported there.
    other = trainer.rank_turn1(2)
    assert "eval/turn1_target_prob_gain" not in other
    assert "eval/turn1_target_prob_gain" not in trainer.rank_turn1(subset_seed=7)


def test_rank_teacher_logs_the_hindsight_teachers_turn1_choice(tmp_path):
    from coars_agents.evaluate import select_sessions, turn1_choice_ranking
    from coars_env.dialog.config import EnvConfig

    trainer = make_trainer(
        tmp_path, total_steps=1, rank_every=1, eval_sessions=3, rank_teacher=True
    )
    history = trainer.train()
    assert [m["step"] for m in history] == [0.0, 1.0]
    sessions = select_sessions(len(trainer.eval_data.sessions), 3, trainer.config.seed)
    agent = trainer.agents(greedy=True)[RECOMMENDER]
    config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)
    student = turn1_choice_ranking(agent, trainer.eval_data, config, sessions)
    teacher = turn1_choice_ranking(agent, trainer.eval_data, config, sessions, hindsight=True)
    logged = history[-1]
    assert logged["eval/turn1_target_prob"] == pytest.approx(student["target_prob"].mean())
    assert logged["eval/teacher_turn1_target_prob"] == pytest.approx(teacher["target_prob"].mean())
    assert logged["eval/teacher_turn1_top_prob"] == pytest.approx(teacher["top_prob"].mean())
    assert logged["eval/teacher_turn1_target_prob"] != logged["eval/turn1_target_prob"]


def test_rank_teacher_ranks_with_the_frozen_base_when_the_teacher_is_the_base(tmp_path):
    trainer = make_trainer(tmp_path, eval_sessions=3, rank_teacher=True, teacher="base")
    untrained = trainer.rank_turn1()
    perturb_adapter(trainer, RECOMMENDER)
    moved = trainer.rank_turn1()
    assert moved["eval/turn1_target_prob"] != untrained["eval/turn1_target_prob"]  # student moved
    for key in ("eval/teacher_turn1_target_prob", "eval/teacher_turn1_top_prob"):
        assert moved[key] == pytest.approx(untrained[key], abs=1e-6)  # the teacher did not


def test_rank_user_logs_the_user_agents_turn1_judgements(tmp_path):
    from coars_agents.evaluate import (
        select_sessions,
        turn1_user_judgements,
        user_judgement_metrics,
    )
    from coars_env.dialog.config import EnvConfig

    trainer = make_trainer(tmp_path, total_steps=1, rank_every=1, eval_sessions=3, rank_user=True)
    history = trainer.train()
    sessions = select_sessions(len(trainer.eval_data.sessions), 3, trainer.config.seed)
    agent = trainer.agents(greedy=True)[USER]
    config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)
    judged = turn1_user_judgements(agent, trainer.eval_data, config, sessions, seed=0)
    expected = user_judgement_metrics(judged)
    for key in ("user_accept_hit", "user_accept_miss", "user_accept_gap", "user_accept_gap_se"):
        assert history[-1][f"eval/{key}"] == pytest.approx(expected[key])
        assert f"eval/{key}" in history[0]  # the curve starts before the first step
    assert not any(k.startswith("eval/teacher_") for m in history for k in m)


def test_rank_teacher_with_rank_user_logs_the_user_teachers_judgements(tmp_path):
    from coars_agents.evaluate import (
        select_sessions,
        turn1_user_judgements,
        user_judgement_metrics,
    )
    from coars_env.dialog.config import EnvConfig

    trainer = make_trainer(
        tmp_path, eval_sessions=3, rank_user=True, rank_teacher=True, teacher="base"
    )
    perturb_adapter(trainer, USER)
    logged = trainer.rank_turn1()
    sessions = select_sessions(len(trainer.eval_data.sessions), 3, trainer.config.seed)
    config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)
    base_user = trainer.agents(greedy=True, use_adapters=False)[USER]
    judge = dict(data=trainer.eval_data, config=config, session_ids=sessions, seed=0)
    taught = user_judgement_metrics(turn1_user_judgements(base_user, hindsight=True, **judge))
    student = user_judgement_metrics(
        turn1_user_judgements(trainer.agents(greedy=True)[USER], **judge)
    )
    for key in ("user_accept_hit", "user_accept_miss", "user_accept_gap", "user_accept_gap_se"):
        assert logged[f"eval/teacher_{key}"] == pytest.approx(taught[key])  # the frozen base + d
        assert logged[f"eval/{key}"] == pytest.approx(student[key])  # the perturbed adapter
    assert logged["eval/teacher_user_accept_miss"] != logged["eval/user_accept_miss"]


def test_min_trained_turns_carries_turns_over_steps_and_checkpoints(tmp_path):
    waiting = make_trainer(tmp_path, total_steps=2, min_trained_turns=10**6, checkpoint_every=1)
    before = snapshot(waiting)
    history = waiting.train()
    assert not changed(before, waiting), "no agent reached min_trained_turns: no update"
    for agent in (RECOMMENDER, USER):
        carried = [m[f"{agent}/carried_turns"] for m in history]
        assert [m[f"{agent}/updated"] for m in history] == [0.0, 0.0]
        assert 0 < carried[0] <= carried[1] == len(waiting.pending[agent])
        assert all(s.turn_mask > 0 and s.agent == agent for s in waiting.pending[agent])
        assert f"{agent}/loss" not in history[0]
    # The carried turns are in the checkpoint, and a resumed run steps on them with its own.
    assert (tmp_path / "run" / "checkpoints" / "step_000002" / "pending_turns.pt").is_file()
    resumed = make_trainer(tmp_path, total_steps=3, min_trained_turns=1)
    resumed.load_checkpoint(resumed.checkpoint_dirs()[-1])
    for agent in (RECOMMENDER, USER):
        got, want = resumed.pending[agent], waiting.pending[agent]
        assert [s.completion_ids for s in got] == [s.completion_ids for s in want]
        assert [s.reward for s in got] == [s.reward for s in want]
    carried = {agent: len(resumed.pending[agent]) for agent in (RECOMMENDER, USER)}
    (metrics,) = resumed.train()
    assert metrics["step"] == 3.0
    for agent in (RECOMMENDER, USER):
        assert metrics[f"{agent}/updated"] == 1.0 and metrics[f"{agent}/carried_turns"] == 0.0
        assert metrics[f"{agent}/trained_turns"] >= carried[agent]
        assert resumed.pending[agent] == []
    assert changed(before, resumed)
    with pytest.raises(ValueError, match="min_trained_turns must be >= 0"):
        CoARSConfig(min_trained_turns=-1)


def test_the_user_agent_can_sample_at_its_own_temperature(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=0, temperature=0.8, user_temperature=2.0)
    sampling = {role: agent.sampling for role, agent in trainer.agents(greedy=False).items()}
    assert (sampling[RECOMMENDER].temperature, sampling[USER].temperature) == (0.8, 2.0)
    assert all(agent.sampling.greedy for agent in trainer.agents(greedy=True).values())
    default = make_trainer(tmp_path / "b", total_steps=0, temperature=0.7)
    assert default.agents(greedy=False)[USER].sampling.temperature == 0.7
    for bad in (dict(user_temperature=0.0), dict(temperature=-1.0)):
        with pytest.raises(ValueError, match="user_temperature must be > 0"):
            CoARSConfig(**bad)


def test_the_user_adapter_can_have_its_own_learning_rate(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=0, learning_rate=3e-4, user_learning_rate=1e-5)
    rates = {a: [g["lr"] for g in opt.param_groups] for a, opt in trainer.optimizers.items()}
    assert rates == {RECOMMENDER: [3e-4], USER: [1e-5]}
    assert (
        make_trainer(tmp_path / "b", total_steps=0).optimizers[USER].param_groups[0]["lr"] == 2e-4
    )


RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from envtools import tiny_dialog_data
from coars_agents.coars import CoARSConfig, CoARSTrainer
config = CoARSConfig(output_dir={out!r}, total_steps=4, checkpoint_every=1, **{tiny!r})
CoARSTrainer(config, train_data=tiny_dialog_data(split="train"),
             eval_data=tiny_dialog_data(split="valid")).train()
"""


def run_training(out: Path, kill_after_checkpoint: str | None = None) -> None:
    code = RUNNER.format(tests=str(Path(__file__).parent), out=str(out), tiny=TINY)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    if kill_after_checkpoint is None:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err.decode()[-3000:]
        return
    target = out / "checkpoints" / kill_after_checkpoint
    deadline = time.time() + 900
    while not target.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_killed_run_resumes_to_bitwise_identical_adapters(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(straight)
    run_training(resumed, kill_after_checkpoint="step_000002")
    assert not (resumed / "checkpoints" / "step_000004").exists()
    run_training(resumed)
    from safetensors.torch import load_file

    for agent in (RECOMMENDER, USER):
        a = load_file(
            straight
            / "checkpoints"
            / "step_000004"
            / "adapters"
            / agent
            / "adapter_model.safetensors"
        )
        b = load_file(
            resumed
            / "checkpoints"
            / "step_000004"
            / "adapters"
            / agent
            / "adapter_model.safetensors"
        )
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{agent} adapter differs after resume"
    # The logs read back whole: one line per step, no duplicates from the redone steps.
    for run in (straight, resumed):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    a = pd.read_json(straight / "metrics.jsonl", lines=True)
    b = pd.read_json(resumed / "metrics.jsonl", lines=True)
    for column in ("rollout/reward_rec", "rollout/reward_user", "recommender/loss"):
        assert a[column].tolist() == b[column].tolist()


def test_an_agent_without_samples_takes_no_step(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=1)
    before = snapshot(trainer)
    metrics = trainer.train_agent(USER, [])
    assert metrics["user/trained_turns"] == 0.0 and metrics["user/loss"] == 0.0
    assert not changed(before, trainer)


def test_evaluate_reports_hit_rates_and_user_alignment_deterministically(tmp_path):
    from tinydata import tiny_dialog_data as tiny_with_alignment

    data = tiny_with_alignment()
    config = CoARSConfig(
        output_dir=str(tmp_path / "run"), **{**TINY, "eval_sessions": 5, "eval_batch_size": 3}
    )
    trainer = CoARSTrainer(config, train_data=data, eval_data=data)
    first = trainer.evaluate()
    assert first["eval/sessions"] == 5.0
    for opponent in ("oracle", "llm"):
        assert 0.0 <= first[f"eval/{opponent}/hit@1"] <= 1.0
        assert first[f"eval/{opponent}/rec_format_failure_rate"] == 0.0  # constrained
    # The oracle user clicks only the target: a session ends early only on a hit.
    assert first["eval/oracle/avg_turns"] >= 1.0
    assert "eval/llm/user_f1" in first and 0.0 <= first["eval/llm/user_f1"] <= 1.0
    # The turn-1 choice distribution (no opponent involved) is logged once.
    assert {k: v for k, v in first.items() if "turn1_target_prob" in k or "@5" in k} == {
        k: v for k, v in trainer.rank_turn1().items() if "turn1_target_prob" in k or "@5" in k
    }
    assert not any(k.startswith(("eval/llm/turn1_target", "eval/oracle/ndcg")) for k in first)
    # Greedy evaluation is deterministic, and fresh adapters (LoRA B = 0) act like the base.
    assert trainer.evaluate() == first
    assert trainer.evaluate(use_adapters=False) == first


def test_time_limit_stops_after_one_step_with_a_checkpoint_and_resumes(tmp_path):
    trainer = make_trainer(
        tmp_path, total_steps=3, time_limit_minutes=1e-9, checkpoint_every=100, rank_every=5
    )
    history = trainer.train()
    assert [m["step"] for m in history] == [0.0, 1.0]  # the step-0 ranking, then step 1
    assert "eval/turn1_target_prob" in history[1]  # ranked where the limit stopped it
    assert [p.name for p in trainer.checkpoint_dirs()] == ["step_000001"]
    resumed = make_trainer(tmp_path, total_steps=3, checkpoint_every=100)
    assert [m["step"] for m in resumed.train()] == [2.0, 3.0]


def test_a_nan_log_prob_skips_the_chunk_and_leaves_the_adapter_finite(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=1, micro_batch_size=64)
    score = trainer.policy.score

    def nan_for_recommender_student(prompts, completions, adapter=None, requires_grad=False, **kw):
        out = score(prompts, completions, adapter=adapter, requires_grad=requires_grad, **kw)
        if adapter == RECOMMENDER and requires_grad:
            out[0] = out[0] * float("nan")
        return out

    trainer.policy.score = nan_for_recommender_student
    before = snapshot(trainer)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        metrics = trainer.train()[0]
    assert metrics["recommender/nonfinite_chunks"] == 1.0
    assert metrics["recommender/nonfinite_student_tokens"] > 0
    assert metrics["user/nonfinite_chunks"] == 0.0
    moved = changed(before, trainer)
    assert not any(".recommender." in n for n in moved)  # the only chunk was skipped
    assert any(".user." in n for n in moved)
    assert all(torch.isfinite(p).all() for p in trainer.policy.model.parameters())


def test_exclude_recommended_reaches_the_recommender_only(tmp_path):
    trainer = make_trainer(tmp_path, exclude_recommended=True)
    agents = trainer.agents(greedy=True)
    assert agents[RECOMMENDER].exclude_recommended and not agents[USER].exclude_recommended


def test_first_choice_mask_is_the_first_run_of_chosen_tokens():
    from coars_agents.coars import first_choice_mask

    def mask(forced):
        return first_choice_mask(torch.tensor(forced, dtype=torch.bool)).tolist()

    # "Item: " (forced), "3" (chosen), "\nReason: " (forced), a free rationale (chosen).
    assert mask([1, 1, 0, 1, 1, 0, 0, 0]) == [0, 0, 1, 0, 0, 0, 0, 0]
    # A two-token number ("1", "2" of "12"), then forced text.
    assert mask([1, 0, 0, 1, 0]) == [0, 1, 1, 0, 0]
    assert mask([1, 1, 1]) == [0, 0, 0]  # nothing chosen
    assert mask([0, 0]) == [1, 1]


def test_balance_user_turns_weighs_hits_and_misses_equally():
    from coars_agents.coars import TurnSample, balance_user_turns

    def turn(hit: bool, mask: float) -> TurnSample:
        empty = torch.zeros(0)
        return TurnSample(USER, 0, [], [], [], empty, empty.bool(), 0.0, mask, judged_target=hit)

    samples = [turn(True, 1.0), turn(False, 1.0), turn(False, 1.0), turn(False, 1.0)]
    samples.append(turn(False, 0.0))  # masked: out of training, stays out
    balance_user_turns(samples)
    # 4 trained turns: the hit gets 4 / (2 * 1) = 2, each miss 4 / (2 * 3) = 2 / 3.
    assert [s.turn_mask for s in samples] == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3, 0.0])
    only_misses = [turn(False, 1.0), turn(False, 1.0)]
    balance_user_turns(only_misses)
    assert [s.turn_mask for s in only_misses] == [1.0, 1.0]


def test_user_class_balance_reweighs_the_same_rollouts_and_logs_the_mix(tmp_path):
    settings = dict(
        train_agents="user", exclude_miss_positive="none", sessions_per_step=6, total_steps=1
    )
    plain = make_trainer(tmp_path / "plain", **settings)
    balanced = make_trainer(tmp_path / "balanced", user_class_balance=True, **settings)

    def user_samples(trainer: CoARSTrainer) -> list:
        return [s for s in trainer.build_samples(trainer.rollout_batch(0)) if s.agent == USER]

    # 6 sessions a step from a split of 5: every session, once (it used to fail).
    assert len(plain.train_data.sessions) == 5 and len(plain.rollout_batch(0)) == 5
    before, after = user_samples(plain), user_samples(balanced)
    assert [s.reward for s in before] == [s.reward for s in after]  # only the weights differ
    assert {s.turn_mask for s in before} <= {0.0, 1.0}
    trained = [s for s in after if s.turn_mask > 0]
    hits = [s for s in trained if s.judged_target]
    misses = [s for s in trained if not s.judged_target]
    assert hits and misses and len(hits) != len(misses)  # a mix for the weights to correct
    assert sum(s.turn_mask for s in hits) == pytest.approx(len(trained) / 2)
    assert sum(s.turn_mask for s in misses) == pytest.approx(len(trained) / 2)
    metrics = balanced.train_step()  # step 0 again: the same rollouts
    assert (metrics["user/hit_turns"], metrics["user/miss_turns"]) == (len(hits), len(misses))
