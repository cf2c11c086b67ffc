"""Reference trajectories d: the teacher's privileged, hindsight context (training only).

METHOD.md: the teacher sees the agent's ordinary context x plus a reference trajectory
d that states the ground-truth item and a retrospective diagnosis of each turn. Ours is
a deterministic template (:func:`diagnose_turn`). METHOD.md's option of an LLM-written
diagnosis is :func:`write_diagnoses`: an LLM adds one sentence of *why* to each turn's
template line (stored in the turn record under ``"diagnosis"``); the verdict itself stays
the template's, so a poor note adds noise but never turns a wrong answer into a right one.

Two rules keep the teacher honest:
- d never quotes the output being scored as a good answer (a small teacher copies what
  its context holds): earlier outputs appear only with their verdict, wrong ones as wrong.
  What d may state is the ground truth, and by default its first line states it in the
  agent's answer format (:data:`ANSWER_HINT`), the one wording a small teacher reads;
- d is built from the turns the agents already played (earlier trajectories of the same
  session, or the current one on a first visit) plus the target; it exists only at
  training time and never reaches the environment.

A turn is described by a mapping with the turn-record keys of docs/CONTRACTS.md:
``turn, rec_position, rec_item, hit, action, score, rec_format_failure,
user_format_failure, repeat``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from coars_agents.policy import LLMPolicy, SamplingConfig
from coars_env.dialog.parsing import ACTION_NAMES, REC_PREFIX, USER_ACTION_PREFIX
from coars_env.dialog.rewards import CLICK, DISLIKE

HEADER = "Hindsight reference (for training; the session is already over):"
ANSWER_HINT = "Answer with {answer}"
"""d's first line with ``answer_hint``: the aligned answer in the agent's own answer format
("Answer with Item: 3", "Answer with Action: dislike"). The frozen SmolLM2-135M teacher reads
this line and barely reads the verdict sentences alone: on 100 synthetic validation sessions
(4 candidates) its turn-1 P(target) is 0.70, the target likeliest in all 100, against 0.35
and 24 of 100 without it; its P(accept) after a miss is 0.09 with it and 0.98 without
(docs/results/synthetic_cpu_answer_hint.md). It depends only on the ground truth, never on
the output being scored."""

Turn = Mapping[str, object]


def _item_label(turn: Turn, title_of: Callable[[int], str]) -> str:
    if turn.get("rec_format_failure") or int(turn.get("rec_item", -1)) < 0:
        return "an unreadable answer"
    return f'item {int(turn["rec_position"]) + 1} "{title_of(int(turn["rec_item"]))}"'


def action_name(action: object) -> str:
    """Turn records hold action codes (-1 when there was nothing to judge); names pass through."""
    if isinstance(action, str):
        return action
    code = int(action)  # type: ignore[arg-type]
    return ACTION_NAMES[code] if 0 <= code < len(ACTION_NAMES) else "nothing"


def diagnose_turn(turn: Turn, title_of: Callable[[int], str]) -> str:
    """One line: what was recommended, how the user answered, and what was wrong."""
    label = _item_label(turn, title_of)
    action = action_name(turn.get("action", -1))
    parts = [f"Turn {turn['turn']}: recommended {label}; the user answered {action}."]
    if turn.get("rec_format_failure"):
        parts.append("Wrong: the recommendation did not follow the answer format.")
    elif turn.get("repeat"):
        parts.append("Wrong: that item had already been recommended.")
    elif turn.get("hit"):
        parts.append("This was the user's real next item.")
    else:
        parts.append("Wrong: not the user's real next item.")
    if turn.get("user_format_failure"):
        parts.append("The user's answer did not follow the answer format.")
    elif turn.get("hit") and action in ("skip", "dislike"):
        parts.append(f"The user's {action} was misaligned: the user really chose this item.")
    elif not turn.get("hit") and action == "click":
        parts.append("The user's click was misaligned: the user did not choose this item.")
    note = turn.get("diagnosis")
    if note:  # an LLM-written explanation (write_diagnoses); "" when it wrote nothing usable
        parts.append(f"Why: {note}")
    return " ".join(parts)


def recommender_reference(
    target_position: int,
    target_title: str,
    turns: Sequence[Turn],
    title_of: Callable[[int], str],
    *,
    answer_hint: bool = True,
) -> str:
    """d for the recommender: the target and the diagnosis of earlier turns.

    ``target_position`` is 0-based; the text uses the 1-based candidate number the
    recommender answers with. ``answer_hint`` starts d with :data:`ANSWER_HINT` for the
    target ("Answer with Item: 3").
    """
    lines = [ANSWER_HINT.format(answer=f"{REC_PREFIX}{target_position + 1}")] if answer_hint else []
    lines += [
        HEADER,
        f'The user\'s real next item was candidate {target_position + 1}: "{target_title}".',
    ]
    lines += [diagnose_turn(turn, title_of) for turn in turns]
    return "\n".join(lines)


def user_reference(
    item_title: str,
    is_target: bool,
    target_title: str,
    turns: Sequence[Turn],
    title_of: Callable[[int], str],
    *,
    answer_hint: bool = True,
) -> str:
    """d for the user agent: whether the item under judgement is the real next item.
    ``answer_hint`` starts d with :data:`ANSWER_HINT` for the action of the highest reward:
    click for the target, dislike for any other item."""
    verdict = (
        f'"{item_title}" IS the item this user really chose next: accepting it is aligned.'
        if is_target
        else f'"{item_title}" is NOT the item this user chose next (that was '
        f'"{target_title}"): accepting it would be misaligned.'
    )
    aligned = ACTION_NAMES[CLICK if is_target else DISLIKE]
    lines = [ANSWER_HINT.format(answer=f"{USER_ACTION_PREFIX}{aligned}")] if answer_hint else []
    lines += [HEADER, verdict]
    lines += [diagnose_turn(turn, title_of) for turn in turns]
    return "\n".join(lines)


def with_reference(messages: Sequence[Mapping[str, str]], reference: str) -> list[dict[str, str]]:
    """Teacher context: the student's chat messages with d appended to the last user turn."""
    out = [dict(message) for message in messages]
    for message in reversed(out):
        if message["role"] == "user":
            message["content"] = f"{message['content']}\n\n{reference}"
            return out
    out.append({"role": "user", "content": reference})
    return out


# --------------------------------------------------------------- LLM-written diagnoses

DIAGNOSIS_SYSTEM = (
    "You review a finished recommendation dialogue in hindsight. You are given the items the "
    "user chose before, the item the user really chose next, and one turn of the dialogue "
    "with its verdict. In one short sentence, explain why the verdict holds: compare the "
    "recommended item with the user's history and the real next item."
)


def diagnosis_messages(
    turn: Turn, history: Sequence[int], target: int, describe: Callable[[int], str]
) -> list[dict[str, str]]:
    """The writer's chat prompt for one turn: history, real next item, the template verdict."""
    lines = ["The user's earlier items (oldest first):"]
    lines += [f"- {describe(item)}" for item in history] or ["- (none shown)"]
    lines.append(f"The user's real next item: {describe(target)}")
    lines.append(diagnose_turn({**turn, "diagnosis": ""}, describe))
    lines.append("Why? Answer in one sentence.")
    return [
        {"role": "system", "content": DIAGNOSIS_SYSTEM},
        {"role": "user", "content": "\n".join(lines)},
    ]


def clean_diagnosis(text: str, max_chars: int = 240) -> str:
    """The note kept from a writer's output: its first non-empty line, whitespace collapsed,
    cut at a word boundary to ``max_chars`` (``...`` marks a cut); ``""`` if nothing is left
    (the reference then holds the template line alone)."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"\s+", " ", line).strip()
    if len(line) > max_chars:
        line = line[: max_chars - 3].rsplit(" ", 1)[0].rstrip() + "..."
    return line


def write_diagnoses(
    policy: LLMPolicy,
    cases: Sequence[tuple[Turn, Sequence[int], int]],
    describe: Callable[[int], str],
    *,
    max_new_tokens: int = 32,
    adapter: str | None = None,
) -> list[str]:
    """One LLM-written note per ``(turn record, history items, target item)`` case, batched.
    ``describe`` names an item for the writer (the trainer passes
    :meth:`coars_env.dialog.prompts.Catalog.line` without summaries: ``Title (year) [genres]``).

    The writer is ``policy`` with ``adapter`` (default ``None``: the frozen base, so the
    writer does not drift with training), greedy, stopped at the first newline. A prompt too
    long for the context drops its oldest history items (halving) until it fits. Returns
    :func:`clean_diagnosis` of each output, in order (``""`` where nothing usable came out).
    """
    histories = [list(history) for _, history, _ in cases]

    def messages(i: int) -> list[dict[str, str]]:
        turn, _, target = cases[i]
        return diagnosis_messages(turn, histories[i], target, describe)

    def shorter(i: int, _messages) -> list[dict[str, str]] | None:
        if not histories[i]:
            return None
        histories[i] = histories[i][(len(histories[i]) + 1) // 2 :]  # drop the older half
        return messages(i)

    if not cases:
        return []
    outputs = policy.generate(
        [messages(i) for i in range(len(cases))],
        adapter=adapter,
        sampling=SamplingConfig(greedy=True, max_new_tokens=max_new_tokens, stop=("\n",)),
        shortener=shorter,
    )
    return [clean_diagnosis(out.text) for out in outputs]
