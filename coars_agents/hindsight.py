"""Reference trajectories d: the teacher's privileged, hindsight context (training only).

METHOD.md: the teacher sees the agent's ordinary context x plus a reference trajectory
d that states the ground-truth item and a retrospective diagnosis of each turn. Ours is
a deterministic template (an LLM-written diagnosis could replace :func:`diagnose_turn`).

Two rules keep the teacher honest:
- d never quotes the output being scored as a good answer (a small teacher copies what
  its context holds): earlier outputs appear only with their verdict, wrong ones as wrong;
- d is built from the turns the agents already played (earlier trajectories of the same
  session, or the current one on a first visit) plus the target; it exists only at
  training time and never reaches the environment.

A turn is described by a mapping with the turn-record keys of docs/CONTRACTS.md:
``turn, rec_position, rec_item, hit, action, score, rec_format_failure,
user_format_failure, repeat``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from coars_env.dialog.parsing import ACTION_NAMES

HEADER = "Hindsight reference (for training; the session is already over):"

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
    return " ".join(parts)


def recommender_reference(
    target_position: int,
    target_title: str,
    turns: Sequence[Turn],
    title_of: Callable[[int], str],
) -> str:
    """d for the recommender: the target and the diagnosis of earlier turns.

    ``target_position`` is 0-based; the text uses the 1-based candidate number the
    recommender answers with.
    """
    lines = [
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
) -> str:
    """d for the user agent: whether the item under judgement is the real next item."""
    verdict = (
        f'"{item_title}" IS the item this user really chose next: accepting it is aligned.'
        if is_target
        else f'"{item_title}" is NOT the item this user chose next (that was '
        f'"{target_title}"): accepting it would be misaligned.'
    )
    lines = [HEADER, verdict]
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
