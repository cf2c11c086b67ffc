"""Does CoARS learn? A seeded training of a real LLM on the synthetic dataset (opt-in).

The claims under test, on at least 300 held-out test sessions, each against the untrained
model by at least 3 standard errors (one training run serves both tests):

- a short seeded CoARS training raises the recommender's Hit@1 against the oracle user
  (which clicks only the target); turn-1 Hit@1, the repeat rate and the format-failure rates
  are printed beside it;
- the gain is not only fewer failures: the recommender's first choice gets better, i.e. its
  exact turn-1 probability of the target (``eval/turn1_target_prob``, the expected turn-1
  Hit@1, which neither repeats nor the user agent affect) rises. The H200 runs of session 4
  met the first claim in 2 of 3 seeds and not this one.

It needs a GPU for a real model: with SmolLM2-135M a step takes about a minute on a 2-core
CPU, and learning needs tens of steps. CI therefore skips it; run it with

    COARS_LEARNING_TEST=1 pytest -s tests/test_learning.py

Environment: ``COARS_LEARNING_MODEL`` (default ``smollm2``), ``COARS_LEARNING_STEPS``
(default 30), ``COARS_LEARNING_MINUTES`` (a wall-time cap on training, default none),
``COARS_LEARNING_OUT`` (a folder for the run's logs and ``learning_test.json``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from coars_agents.coars import CoARSConfig, CoARSTrainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("COARS_LEARNING_TEST"),
        reason="opt-in learning test (GPU-sized): set COARS_LEARNING_TEST=1",
    ),
]

HELD_OUT_SESSIONS = 300

LEARNING_PRESET = dict(
    env_id="RecDialog-synthetic",
    seed=0,
    max_turns=3,
    sessions_per_step=16,
    rollouts_per_session=4,
    group_normalise=True,
    reason_tokens=4,
    learning_rate=5e-4,
    micro_batch_size=16,
    merged_rollouts=True,
    eval_split="test",
    eval_batch_size=100,
    eval_alignment_users=0,
    tensorboard=False,
)
"""The stated setting: T = 3, 16 sessions x 4 rollouts per step, group-normalised interaction
rewards plus the credit term (lambda = 0.1), LoRA r = 16 on all linear layers, lr 5e-4,
4-token rationales and merged-adapter decoding. It is the setting of the second H200
comparison (docs/results/synthetic_h200_15steps.md). There, seed 0 went from Hit@1 0.043 to
0.153 (4.6 SE) in 15 steps, seed 2 reached 3.9 SE and seed 1 2.7 SE. The gain came from the
recommender no longer repeating itself after a miss; turn-1 Hit@1 did not move. Since then the
group statistics leave masked turns out and the user agent's rewards are no longer
group-normalised (``group_normalise_user``), which removed the mechanism of that gain (the user
rejecting everything); the session-6 runs (docs/results/synthetic_h200_turn1.md) found no
turn-1 gain in 27-33 steps, and the session-14 runs (4 candidates, T = 1, the answer line;
docs/results/synthetic_h200_answer_hint.md) none in 860-1,470 sessions, while labels moved the
first choice only after about 1,500. Expect this test to fail until the method learns
preferences."""


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory) -> dict:
    out = Path(os.environ.get("COARS_LEARNING_OUT") or tmp_path_factory.mktemp("learning"))
    config = CoARSConfig(
        model=os.environ.get("COARS_LEARNING_MODEL", "smollm2"),
        output_dir=str(out / "run"),
        total_steps=int(os.environ.get("COARS_LEARNING_STEPS", "30")),
        time_limit_minutes=float(os.environ.get("COARS_LEARNING_MINUTES", "0")),
        mixed_precision="bf16" if _cuda() else "no",
        **LEARNING_PRESET,
    )
    trainer = CoARSTrainer(config)
    assert len(trainer.eval_data.sessions) >= HELD_OUT_SESSIONS
    before = trainer.evaluate(HELD_OUT_SESSIONS, use_adapters=False)
    trainer.train()
    after = trainer.evaluate(HELD_OUT_SESSIONS)
    report: dict = {"steps": trainer.step, "sessions": HELD_OUT_SESSIONS}
    for key in ("eval/oracle/hit@1", "eval/turn1_target_prob"):
        gain = after[key] - before[key]
        se = math.sqrt(before[f"{key}_se"] ** 2 + after[f"{key}_se"] ** 2)
        report[key] = {"before": before[key], "after": after[key], "gain": gain, "se": se}
        print(f"{key}: {before[key]:.3f} -> {after[key]:.3f}, gain {gain / se:.1f} SE")
    for name in ("turn1_hit@1", "rec_format_failure_rate", "repeat_rate"):
        print(f"{name}: {before[f'eval/oracle/{name}']:.3f} -> {after[f'eval/oracle/{name}']:.3f}")
    print(f"after {trainer.step} steps")
    (out / "learning_test.json").write_text(
        json.dumps({**report, "before": before, "after": after}, indent=1) + "\n"
    )
    return report


def _assert_gain(report: dict, key: str) -> None:
    r = report[key]
    assert r["gain"] >= 3 * r["se"], (
        f"{key} {r['before']:.3f} -> {r['after']:.3f} is < 3 SE ({r['se']:.3f}) "
        f"after {report['steps']} steps"
    )


def test_coars_training_raises_held_out_hit_rate(learning_run):
    _assert_gain(learning_run, "eval/oracle/hit@1")


def test_the_first_choice_improves_not_only_fewer_failures(learning_run):
    _assert_gain(learning_run, "eval/turn1_target_prob")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
