"""Rewards and masks: METHOD.md's worked values and the composition rules."""

from __future__ import annotations

import pytest

from coars_env.dialog.config import EnvConfig
from coars_env.dialog.rewards import (
    CLICK,
    DISLIKE,
    SKIP,
    STAR,
    is_miss_positive,
    reward_rec,
    reward_user,
    stage_factor,
    turn_outcome,
)

EXACT = 1e-12


def test_method_worked_values():
    assert reward_rec(True, 3, 0.9) == pytest.approx(0.7695, abs=EXACT)
    assert reward_rec(False, 1, 0.2) == pytest.approx(-0.6, abs=EXACT)
    assert reward_rec(False, 4, 0.2) == pytest.approx(-0.6, abs=EXACT)  # D_t = 1 for misses
    assert reward_user(True, 0.9, 0.5) == pytest.approx(0.768, abs=EXACT)
    assert reward_user(False, 0.2, 0.5) == pytest.approx(0.618, abs=EXACT)
    for hit in (True, False):
        for q in (-1.0, 0.0, 0.5, 1.0):
            assert reward_user(hit, 0.5, q) == 0.0


def test_stage_factor():
    assert stage_factor(True, 1) == 1.0
    assert stage_factor(True, 3) == pytest.approx(0.81, abs=EXACT)
    assert stage_factor(False, 5) == 1.0
    assert stage_factor(True, 2, gamma=1.0) == 1.0
    with pytest.raises(ValueError):
        stage_factor(True, 0)


def test_turn1_hit_and_alpha_q_term():
    assert reward_rec(True, 1, 0.9) == pytest.approx(0.95, abs=EXACT)
    # (2s-1) = 0.8: q = 0 -> 0.8; q = -1 (peers disliked it, user right) -> 0.8 * 1.08
    assert reward_user(True, 0.9, 0.0) == pytest.approx(0.8, abs=EXACT)
    assert reward_user(True, 0.9, -1.0) == pytest.approx(0.864, abs=EXACT)
    assert reward_user(True, 0.9, 1.0) == pytest.approx(0.736, abs=EXACT)
    assert reward_user(True, 0.9, 1.0, alpha=0.0) == pytest.approx(0.8, abs=EXACT)


def test_outcome_hit_and_miss():
    out = turn_outcome(hit=True, t=3, action=CLICK, s=0.9, q=0.5)
    assert out.reward_rec == pytest.approx(0.7695, abs=EXACT)
    assert out.reward_user == pytest.approx(0.768, abs=EXACT)
    assert (out.mask_rec, out.mask_user) == (1.0, 1.0)
    out = turn_outcome(hit=False, t=2, action=DISLIKE, s=0.2, q=0.5)
    assert out.reward_rec == pytest.approx(-0.6, abs=EXACT)
    assert out.reward_user == pytest.approx(0.618, abs=EXACT)
    assert (out.mask_rec, out.mask_user) == (1.0, 1.0)


def test_miss_but_positive_masks_user_only_by_default():
    assert is_miss_positive(False, STAR) and is_miss_positive(False, CLICK)
    assert not is_miss_positive(True, CLICK) and not is_miss_positive(False, SKIP)
    out = turn_outcome(hit=False, t=1, action=STAR, s=0.7, q=-1.0)
    assert out.reward_rec == pytest.approx(-0.85, abs=EXACT)  # the miss penalty stays
    assert out.reward_user == pytest.approx(-0.4 * 1.04, abs=EXACT)
    assert (out.mask_rec, out.mask_user) == (1.0, 0.0)
    both = turn_outcome(hit=False, t=1, action=CLICK, s=0.9, q=0.0, exclude_miss_positive="both")
    assert (both.mask_rec, both.mask_user) == (0.0, 0.0)
    # "none": the user learns from its accepted miss, with the reward the mask hid.
    none = turn_outcome(hit=False, t=1, action=STAR, s=0.7, q=-1.0, exclude_miss_positive="none")
    assert (none.reward_rec, none.reward_user) == (out.reward_rec, out.reward_user)
    assert (none.mask_rec, none.mask_user) == (1.0, 1.0)
    # A repeat still leaves the user's turn out: "hit" was overridden by rule.
    repeat = turn_outcome(
        hit=False, t=2, action=CLICK, s=0.9, q=0.0, repeat=True, exclude_miss_positive="none"
    )
    assert repeat.mask_user == 0.0


def test_recommender_format_failure():
    out = turn_outcome(hit=False, t=2, action=-1, s=0.0, q=0.0, rec_failure=True)
    assert out.reward_rec == pytest.approx(-1.0, abs=EXACT)  # miss with s=0, plus -0.5
    assert out.reward_user == 0.0
    assert (out.mask_rec, out.mask_user) == (1.0, 0.0)
    out = turn_outcome(
        hit=False, t=2, action=-1, s=0.9, q=0.0, rec_failure=True, format_penalty=-0.25
    )
    assert out.reward_rec == pytest.approx(-0.75, abs=EXACT)  # s is 0 whatever is passed


def test_user_format_failure_is_a_skip_with_penalty_no_mask_removes():
    out = turn_outcome(hit=True, t=1, action=SKIP, s=0.5, q=0.5, user_failure=True)
    assert out.reward_user == pytest.approx(-0.5, abs=EXACT)
    assert out.reward_rec == pytest.approx(0.75, abs=EXACT)
    assert out.mask_user == 1.0


def test_repeat_is_a_penalised_miss():
    # Even when the repeated item is the target: no cashing in twice.
    out = turn_outcome(hit=True, t=2, action=CLICK, s=0.9, q=0.0, repeat=True)
    assert out.reward_rec == pytest.approx(-0.95 - 0.5, abs=EXACT)
    assert out.mask_rec == 1.0
    assert out.mask_user == 0.0
    # "both" cannot remove the recommender's penalty
    out = turn_outcome(
        hit=False, t=2, action=STAR, s=0.6, q=0.0, repeat=True, exclude_miss_positive="both"
    )
    assert out.reward_rec == pytest.approx(-0.8 - 0.5, abs=EXACT)
    assert out.mask_rec == 1.0


def test_config_validation_and_replace():
    cfg = EnvConfig()
    assert (cfg.max_turns, cfg.alpha, cfg.gamma, cfg.format_penalty) == (5, 0.1, 0.9, -0.5)
    assert cfg.exclude_miss_positive == "user" and not cfg.reveal_target
    assert cfg.replace(max_turns=3).max_turns == 3
    with pytest.raises(TypeError, match="max_turns"):
        cfg.replace(max_turn=3)
    with pytest.raises(ValueError):
        EnvConfig(format_penalty=0.5)
    with pytest.raises(ValueError):
        EnvConfig(exclude_miss_positive="recommender")
    with pytest.raises(ValueError):
        EnvConfig(max_turns=0)
