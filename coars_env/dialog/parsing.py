"""The one parser: agent replies (text or structured) -> structured actions.

Nothing here raises on bad input: whatever an agent returns (empty, megabytes, emoji,
JSON, a dict, ``None``) becomes a result whose ``flags`` say what happened. A reply that
cannot be read is a *format failure* (METHOD.md): for the recommender, no position; for
the user, a skip with score 0.5.

Recommender (canonical ``Item: <number 1-N>\\nReason: <text>``). Rules, in order:

1. ``int`` / numpy integer: a 0-based candidate position (the structured form).
2. Text with a JSON object holding an ``item`` key (``candidate``/``position`` also read):
   its value is read like an item field (below); ``reason``/``rationale`` is the reason.
3. Lines that start with an item label (``Item: 7``, ``**Item:** 7``, ``item #7``,
   ``Item = Heat (1995)``; also ``Recommendation:``, ``Candidate:``, ``Choice:``,
   ``Answer:``, ``Pick:``), before the ``Reason:`` label: each label's field is read;
   all must name the same candidate, otherwise it is a format failure.
4. No label: the first non-empty line is the item field (flag ``unlabelled``).

An item field is read as: a leading candidate number (``7``, ``7.``, ``#7``, ``[7]``,
``No. 7``; 1-based) -- if a candidate title follows it, it must be that number's title,
otherwise ``conflict``. A field that is a candidate's whole title wins over a number it
starts with ("12 Angry Men") and over an out-of-range number ("187"); a bare in-range
number is always a number. Else ``#7`` / ``number 7`` / ``candidate 7`` inside the field;
else candidate titles. Titles match case-, accent- and punctuation-insensitively, with
or without the year in parentheses, and with MovieLens' moved articles restored
("Matrix, The (1999)" matches "The Matrix"). The field must be one title exactly, or
contain the titles of exactly one candidate (a title inside a longer matched title,
"Heat" inside "Heat 2", does not count); several candidates -> ``multiple_items``; none
-> ``unknown_title``; a title shared by two candidates -> ``ambiguous_title``. Only the
item field is searched: the reason may name other titles freely.

User (canonical ``Action: click\\nScore: 0.85\\nReason: <text>``). Structured forms: a
dict ``{"action": code or name, "score": float, "reason": str}`` or an ``int`` code.
Text: a JSON object with ``action``/``score``/``reason``; else ``Action:`` / ``Score:`` /
``Reason:`` labels anywhere (markdown and case ignored; different actions labelled ->
failure); without an ``Action`` label, the action words (click, star, skip, dislike and
their inflections) on the first non-empty line, if they name exactly one action.
Scores: ``0.85``, ``85%``, ``8.5/10``. A missing score becomes the midpoint of the
action's interval (flag ``score_missing``); a score outside the action's interval is
clamped into it (flag ``score_clamped``; an open end is approached to within
``SCORE_EPSILON``); a score without any action gives the action whose interval holds it
(flag ``action_from_score``).
"""

from __future__ import annotations

import json
import math
import numbers
import re
import unicodedata
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

from coars_env.dialog.rewards import CLICK, DISLIKE, SKIP, STAR

# ----------------------------------------------------------------------------- constants

ACTION_NAMES: tuple[str, ...] = ("click", "star", "skip", "dislike")  # index = action code
ACTION_CODES: dict[str, int] = {name: code for code, name in enumerate(ACTION_NAMES)}

# (low, high) per action code. click (0.75, 1], star (0.5, 0.75], skip (0.25, 0.5] are open
# at the low end; dislike [0, 0.25] is closed (METHOD.md, ours).
SCORE_INTERVALS: dict[int, tuple[float, float]] = {
    CLICK: (0.75, 1.0),
    STAR: (0.5, 0.75),
    SKIP: (0.25, 0.5),
    DISLIKE: (0.0, 0.25),
}
# Clamping onto an open low end lands this far inside it (star 0.5 -> 0.501).
SCORE_EPSILON = 1e-3
SCORE_MIDPOINTS: dict[int, float] = {a: (lo + hi) / 2 for a, (lo, hi) in SCORE_INTERVALS.items()}

# The canonical answer formats; the LLM layer uses the prefixes for constrained decoding.
REC_PREFIX = "Item: "
REASON_PREFIX = "\nReason: "
USER_ACTION_PREFIX = "Action: "
USER_SCORE_PREFIX = "\nScore: "
REC_FORMAT = REC_PREFIX + "<candidate number 1-{n}>" + REASON_PREFIX + "<one short sentence>"
USER_FORMAT = (
    USER_ACTION_PREFIX
    + "<click|star|skip|dislike>"
    + USER_SCORE_PREFIX
    + "<number between 0 and 1>"
    + REASON_PREFIX
    + "<one short sentence>"
)

# Replies longer than this are cut before parsing (bounded cost; flag "truncated").
MAX_PARSE_CHARS = 8_000

# Flags (strings, so they read well in logs).
FLAG_FORMAT_FAILURE = "format_failure"
FLAG_MISSING = "missing"  # no action given (None)
FLAG_BAD_TYPE = "bad_type"  # neither text nor a structured form
FLAG_EMPTY = "empty"
FLAG_TRUNCATED = "truncated"
FLAG_STRUCTURED = "structured"
FLAG_JSON = "json"
FLAG_UNLABELLED = "unlabelled"
FLAG_TITLE = "title"  # the item was named by its title
FLAG_OUT_OF_RANGE = "out_of_range"
FLAG_MULTIPLE_ITEMS = "multiple_items"
FLAG_CONFLICT = "conflict"  # a number and a different candidate's title
FLAG_UNKNOWN_TITLE = "unknown_title"
FLAG_AMBIGUOUS_TITLE = "ambiguous_title"
FLAG_NO_ITEM = "no_item"
FLAG_BAD_ACTION = "bad_action"
FLAG_MULTIPLE_ACTIONS = "multiple_actions"
FLAG_NO_ACTION = "no_action"
FLAG_SCORE_MISSING = "score_missing"
FLAG_SCORE_CLAMPED = "score_clamped"
FLAG_ACTION_FROM_SCORE = "action_from_score"


class RecParse(NamedTuple):
    """A parsed recommender reply. ``position`` is 0-based; None = format failure."""

    position: int | None
    reason: str
    flags: tuple[str, ...]

    @property
    def format_failure(self) -> bool:
        return self.position is None


class UserParse(NamedTuple):
    """A parsed user reply. On a format failure: SKIP with score 0.5."""

    action: int
    score: float
    reason: str
    flags: tuple[str, ...]

    @property
    def format_failure(self) -> bool:
        return FLAG_FORMAT_FAILURE in self.flags

    @property
    def score_clamped(self) -> bool:
        return FLAG_SCORE_CLAMPED in self.flags


# ----------------------------------------------------------------------------- rendering


def format_recommender(position: int, reason: str = "") -> str:
    """The canonical recommender reply for a 0-based ``position``."""
    return f"{REC_PREFIX}{position + 1}{REASON_PREFIX}{reason}"


def format_user(action: int, score: float, reason: str = "") -> str:
    """The canonical user reply."""
    return (
        f"{USER_ACTION_PREFIX}{ACTION_NAMES[action]}{USER_SCORE_PREFIX}{score:.2f}"
        f"{REASON_PREFIX}{reason}"
    )


# ----------------------------------------------------------------------------- scores


def score_to_action(score: float) -> int:
    """The action whose interval holds ``score`` (clipped to [0, 1])."""
    if score > 0.75:
        return CLICK
    if score > 0.5:
        return STAR
    if score > 0.25:
        return SKIP
    return DISLIKE


def clamp_score(action: int, score: float) -> tuple[float, bool]:
    """``score`` moved into ``action``'s interval; returns (score, was_clamped)."""
    low, high = SCORE_INTERVALS[action]
    if score > high:
        return high, True
    if action == DISLIKE:
        if score < low:
            return low, True
    elif score <= low:
        return low + SCORE_EPSILON, True
    return score, False


# ----------------------------------------------------------------------------- helpers

_MARKDOWN = re.compile(r"\*\*|__|`+|~~")
_LINE_DECOR = re.compile(r"(?m)^[ \t]*(?:#{1,6}[ \t]+|[-*+>][ \t]+)+")
_REASON_LABEL = re.compile(r"(?i)\b(?:reason|rationale|justification|why)\s*[:=]")
# A line that starts with an item label. Without a ":"/"=" only "Item 7" / "Item #7" counts
# (checked in code), so a reason line such as "Item lists are..." is no label.
_ITEM_LABEL = re.compile(
    r"(?im)^[^\w\n]*(?:(?:recommended|my|chosen)[ \t]+)?"
    r"(?:item(?:[ \t]*(?:number|no\.?))?|recommendation|candidate|choice|answer|pick)\b"
    r"[ \t]*([:=]|-(?!\d))?[ \t]*(.*)$"
)
_LEADING_NUMBER = re.compile(
    r"(?i)^[\s\[(#]*(?:no\.?\s*|number\s*|candidate\s*|item\s*)?#?\s*(\d{1,6})(?![\d,]|\.\d)"
    r"(?=$|[\s.):\],;!?/\-]|[^\w])"
)
_INNER_NUMBER = re.compile(r"(?i)(?:#\s*|\bnumber\s+|\bcandidate\s+|\bno\.\s*)(\d{1,6})\b")
_ARTICLE_MOVED = re.compile(r"^(.*?),\s*(the|a|an|la|le|les|l'|il|el|los|las|das|der|die)$", re.I)
_TRAILING_PARENS = re.compile(r"\s*\([^()]*\)\s*$")
_NON_WORD = re.compile(r"[\W_]+")


def _strip_markdown(text: str) -> str:
    return _LINE_DECOR.sub("", _MARKDOWN.sub("", text))


def _prepare(reply: str) -> tuple[str, list[str]]:
    flags: list[str] = []
    if len(reply) > MAX_PARSE_CHARS:
        reply = reply[:MAX_PARSE_CHARS]
        flags.append(FLAG_TRUNCATED)
    return reply, flags


def _find_json_object(text: str) -> dict | None:
    """The first JSON object in ``text`` (e.g. inside a ```json fence), or None."""
    start = text.find("{")
    if start < 0:
        return None
    end = text.rfind("}")
    if end > start:
        try:
            obj = json.loads(text[start : end + 1])
            if isinstance(obj, dict):
                return obj
        except (ValueError, RecursionError):
            pass
    for match in re.finditer(r"\{[^{}]*\}", text):
        try:
            obj = json.loads(match.group(0))
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _json_get(obj: Mapping, *keys: str) -> Any:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    for key in keys:
        if key in lowered:
            return lowered[key]
    return None


def _norm(text: str) -> str:
    """Case-, accent- and punctuation-insensitive form, padded with spaces for word search."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = _NON_WORD.sub(" ", text).strip()
    return f" {text} " if text else ""


@lru_cache(maxsize=65_536)
def title_variants(title: str) -> tuple[str, ...]:
    """Normalised ways an agent may write ``title`` (see module doc), longest first."""
    variants = {_norm(title)}
    base = title.strip()
    while True:  # "City of Lost Children, The (Cité des enfants perdus, La) (1995)"
        stripped = _TRAILING_PARENS.sub("", base)
        if stripped == base or not stripped:
            break
        base = stripped
        variants.add(_norm(base))
    moved = _ARTICLE_MOVED.match(base)
    if moved:
        article = moved.group(2)
        sep = "" if article.endswith("'") else " "
        variants.add(_norm(f"{article}{sep}{moved.group(1)}"))
    variants.discard("")
    return tuple(sorted(variants, key=len, reverse=True))


def _match_titles(field: str, titles: Sequence[str]) -> tuple[int | None, str | None]:
    """(position, None) or (None, failure flag) for an item field naming candidates by title."""
    raw = field.strip().casefold()
    same = [p for p, t in enumerate(titles) if t.strip().casefold() == raw]
    if len(same) == 1:  # also catches titles without letters or digits ("#####")
        return same[0], None
    norm_field = _norm(field)
    if not norm_field:
        return None, FLAG_AMBIGUOUS_TITLE if same else FLAG_NO_ITEM
    exact = [p for p, t in enumerate(titles) if norm_field in title_variants(t)]
    if len(exact) == 1:
        return exact[0], None
    if len(exact) > 1:
        return None, FLAG_AMBIGUOUS_TITLE
    found: dict[int, str] = {}  # position -> longest variant found in the field
    for position, title in enumerate(titles):
        for variant in title_variants(title):
            if variant in norm_field:
                found[position] = variant
                break
    # A title found only inside another found title ("Heat" in "Heat 2") does not count.
    kept = [
        p
        for p, v in found.items()
        if not any(q != p and v != w and v in w for q, w in found.items())
    ]
    variants_kept = {found[p] for p in kept}
    if len(kept) == 1:
        return kept[0], None
    if len(kept) > 1 and len(variants_kept) == 1:
        return None, FLAG_AMBIGUOUS_TITLE  # two candidates with the same title
    if len(kept) > 1:
        return None, FLAG_MULTIPLE_ITEMS
    return None, FLAG_UNKNOWN_TITLE


def _resolve_field(
    field: str, n_candidates: int, titles: Sequence[str] | None
) -> tuple[int | None, str | None, bool]:
    """Read an item field: (position, failure flag, named by title)."""
    field = field.strip().strip("\"'“”‘’*_`")
    if not field:
        return None, FLAG_NO_ITEM, False
    number = _LEADING_NUMBER.match(field)
    if number is not None:
        rest = field[number.end() :]
        if rest.strip(" \t.:)]-") and titles is not None:
            # A title that starts with a number ("12 Angry Men", "2001: A Space Odyssey").
            whole, _ = _match_titles(field, titles)
            if whole is not None and _norm(titles[whole]).startswith(f" {number.group(1)} "):
                return whole, None, True
        position = int(number.group(1)) - 1
        if not 0 <= position < n_candidates:
            if titles is not None:  # a title that is a number ("187", "1941")
                whole, _ = _match_titles(field, titles)
                if whole is not None:
                    return whole, None, True
            return None, FLAG_OUT_OF_RANGE, False
        if titles is not None and rest.strip(" \t.:)]-"):
            named, _ = _match_titles(rest, titles)
            if named is not None and named != position:
                return None, FLAG_CONFLICT, False
        return position, None, False
    number = _INNER_NUMBER.search(field)
    if number is not None:  # an explicit "#7" / "number 7" wins over titles in the field
        position = int(number.group(1)) - 1
        if not 0 <= position < n_candidates:
            return None, FLAG_OUT_OF_RANGE, False
        return position, None, False
    if titles is None:
        return None, FLAG_NO_ITEM, False
    position, failure = _match_titles(field, titles)
    return position, failure, True


def _cut_at_reason(line: str) -> str:
    match = _REASON_LABEL.search(line)
    return line[: match.start()] if match else line


_LABEL_AFTER_REASON = re.compile(r"(?im)^[^\w\n]*(?:item|action|score)\b\s*[:=]")


def _reason_after_label(text: str) -> str | None:
    """The text after ``Reason:``, up to a later Item/Action/Score label line if any."""
    match = _REASON_LABEL.search(text)
    if match is None:
        return None
    reason = text[match.end() :]
    later = _LABEL_AFTER_REASON.search(reason)
    return (reason[: later.start()] if later else reason).strip()


# ----------------------------------------------------------------------------- recommender


def parse_recommender(
    reply: Any, n_candidates: int = 20, titles: Sequence[str] | None = None
) -> RecParse:
    """Parse a recommender reply (see the module doc for the rules).

    Args:
        reply: text, a 0-based ``int`` position, or anything else (-> format failure).
        n_candidates: size of the candidate list (numbers 1..n are valid).
        titles: the candidates' titles in list order, to accept titles; None = numbers only.
    """
    if reply is None:
        return RecParse(None, "", (FLAG_FORMAT_FAILURE, FLAG_MISSING))
    if isinstance(reply, bool) or not isinstance(reply, (str, int)) and not _is_np_int(reply):
        return RecParse(None, "", (FLAG_FORMAT_FAILURE, FLAG_BAD_TYPE))
    if not isinstance(reply, str):
        position = int(reply)
        if 0 <= position < n_candidates:
            return RecParse(position, "", (FLAG_STRUCTURED,))
        return RecParse(None, "", (FLAG_FORMAT_FAILURE, FLAG_STRUCTURED, FLAG_OUT_OF_RANGE))

    text, flags = _prepare(reply)
    if not text.strip():
        return RecParse(None, "", (FLAG_FORMAT_FAILURE, FLAG_EMPTY, *flags))

    obj = _find_json_object(text) if "{" in text else None
    if obj is not None:
        value = _json_get(obj, "item", "candidate", "position", "number", "recommendation")
        if value is not None and not isinstance(value, (bool, dict, list)):
            flags.append(FLAG_JSON)
            reason = _json_get(obj, "reason", "rationale", "justification")
            reason = "" if reason is None else str(reason)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            position, failure, by_title = _resolve_field(str(value), n_candidates, titles)
            return _rec_result(position, failure, by_title, reason, flags)

    clean = _strip_markdown(text)
    labels = [
        m
        for m in _ITEM_LABEL.finditer(clean)
        if m.group(1) or m.group(2).lstrip().startswith(("#", *"0123456789"))
    ]
    reason_label = _REASON_LABEL.search(clean)
    if reason_label is not None:  # labels inside the reason text ("Item 3 was...") don't count
        labels = [m for m in labels if m.start() < reason_label.start()] or labels
    if labels:
        positions: set[int] = set()
        failure = None
        by_title = False
        for label in labels:
            field = _cut_at_reason(label.group(2))
            if not field.strip():  # "Item:" alone on its line: the value is on the next
                following = clean[label.end() :].lstrip("\n").split("\n", 1)[0]
                field = _cut_at_reason(following)
            position, fail, named = _resolve_field(field, n_candidates, titles)
            if position is None:
                failure = failure or fail
            else:
                positions.add(position)
                by_title = by_title or named
        if len(positions) > 1:
            position, failure = None, FLAG_MULTIPLE_ITEMS
        elif len(positions) == 1 and failure is None:
            position = positions.pop()
        else:
            position = None
        reason = _reason_after_label(clean)
        if reason is None:
            reason = clean[labels[-1].end() :].strip()
        return _rec_result(position, failure, by_title, reason, flags)

    flags.append(FLAG_UNLABELLED)
    lines = [line for line in clean.split("\n") if line.strip()]
    first = lines[0] if lines else ""
    position, failure, by_title = _resolve_field(_cut_at_reason(first), n_candidates, titles)
    reason = _reason_after_label(clean)
    if reason is None:
        reason = "\n".join(lines[1:]).strip()
    return _rec_result(position, failure, by_title, reason, flags)


def _rec_result(
    position: int | None, failure: str | None, by_title: bool, reason: str, flags: list[str]
) -> RecParse:
    if position is None:
        return RecParse(None, reason, (FLAG_FORMAT_FAILURE, failure or FLAG_NO_ITEM, *flags))
    if by_title:
        flags.append(FLAG_TITLE)
    return RecParse(position, reason, tuple(flags))


def _is_np_int(value: Any) -> bool:
    # numpy integers register as numbers.Integral; bool is excluded by the callers first.
    return isinstance(value, numbers.Integral)


# ----------------------------------------------------------------------------- user

_ACTION_WORDS: dict[str, int] = {
    **dict.fromkeys(("click", "clicks", "clicked", "clicking"), CLICK),
    **dict.fromkeys(("star", "stars", "starred", "starring"), STAR),
    **dict.fromkeys(("skip", "skips", "skipped", "skipping"), SKIP),
    **dict.fromkeys(("dislike", "dislikes", "disliked", "disliking"), DISLIKE),
}
_ACTION_WORD = re.compile(
    r"(?i)\b(" + "|".join(sorted(_ACTION_WORDS, key=len, reverse=True)) + r")\b"
)
_ACTION_LABEL = re.compile(r"(?i)\b(?:action|decision|response)\s*[:=]\s*[^\w\n]*([A-Za-z]+|\d)?")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SCORE_LABEL = re.compile(
    r"(?i)\b(?:score|acceptance(?:\s+score)?|confidence)\s*[:=]\s*[^\w\n+\-.]*"
    rf"({_NUMBER})(\s*%|\s*/\s*(?:{_NUMBER}))?"
)
_USER_FAILURE = (SKIP, 0.5)


def parse_user(reply: Any) -> UserParse:
    """Parse a user reply (see the module doc for the rules)."""
    if reply is None:
        return _user_failure("", [FLAG_MISSING])
    if isinstance(reply, Mapping):
        return _user_from_fields(
            reply.get("action"), reply.get("score"), reply.get("reason", ""), [FLAG_STRUCTURED]
        )
    if isinstance(reply, bool):
        return _user_failure("", [FLAG_BAD_TYPE])
    if isinstance(reply, int) or _is_np_int(reply):
        return _user_from_fields(int(reply), None, "", [FLAG_STRUCTURED])
    if not isinstance(reply, str):
        return _user_failure("", [FLAG_BAD_TYPE])

    text, flags = _prepare(reply)
    if not text.strip():
        return _user_failure("", [FLAG_EMPTY, *flags])

    obj = _find_json_object(text) if "{" in text else None
    if obj is not None:
        action = _json_get(obj, "action", "decision", "response")
        score = _json_get(obj, "score", "acceptance", "acceptance_score", "confidence")
        if action is not None or score is not None:
            reason = _json_get(obj, "reason", "rationale", "justification")
            return _user_from_fields(
                action, score, "" if reason is None else str(reason), [*flags, FLAG_JSON]
            )

    clean = _strip_markdown(text)
    reason_match = _REASON_LABEL.search(clean)
    head = clean[: reason_match.start()] if reason_match else clean
    reason = _reason_after_label(clean) or ""

    action: Any = None
    labelled = [(m.group(1) or "").lower() for m in _ACTION_LABEL.finditer(head)]
    if not labelled and reason_match:  # labels after the reason ("Reason: ...\nAction: skip")
        labelled = [(m.group(1) or "").lower() for m in _ACTION_LABEL.finditer(clean)]
    if labelled:
        codes = {int(w) if w.isdigit() else _ACTION_WORDS.get(w, -1) for w in labelled}
        if len(codes) > 1:
            return _user_failure(reason, [*flags, FLAG_MULTIPLE_ACTIONS])
        action = codes.pop()
        if not 0 <= action < len(ACTION_NAMES):
            return _user_failure(reason, [*flags, FLAG_BAD_ACTION])
    else:
        lines = [line for line in head.split("\n") if line.strip()]
        words = (
            {_ACTION_WORDS[w.lower()] for w in _ACTION_WORD.findall(lines[0])} if lines else set()
        )
        if len(words) > 1:
            return _user_failure(reason, [*flags, FLAG_MULTIPLE_ACTIONS])
        if words:
            action = words.pop()
            flags.append(FLAG_UNLABELLED)
        if not reason_match:
            reason = "\n".join(lines[1:]).strip()

    score: float | None = None
    score_match = _SCORE_LABEL.search(head) or _SCORE_LABEL.search(clean)
    if score_match:
        score = _read_score(score_match.group(1), score_match.group(2))
    return _user_from_fields(action, score, reason, flags)


def _read_score(number: str, suffix: str | None) -> float | None:
    try:
        value = float(number)
        if suffix:
            suffix = suffix.strip()
            if suffix == "%":
                value /= 100.0
            else:
                denominator = float(suffix.lstrip("/ \t"))
                value = value / denominator if denominator > 0 else math.nan
    except (ValueError, OverflowError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def _user_from_fields(action: Any, score: Any, reason: Any, flags: list[str]) -> UserParse:
    """Validate (action, score) from JSON, a dict or text labels."""
    reason = "" if reason is None else str(reason)
    code: int | None
    if action is None:
        code = None
    elif isinstance(action, str):
        code = _ACTION_WORDS.get(action.strip().strip("*_`'\"").lower())
        if code is None and action.strip().isdigit():
            code = int(action.strip())
        if code is None or not 0 <= code < len(ACTION_NAMES):
            return _user_failure(reason, [*flags, FLAG_BAD_ACTION])
    elif isinstance(action, bool):
        return _user_failure(reason, [*flags, FLAG_BAD_ACTION])
    elif isinstance(action, int) or _is_np_int(action):
        code = int(action)
        if not 0 <= code < len(ACTION_NAMES):
            return _user_failure(reason, [*flags, FLAG_BAD_ACTION])
    else:
        return _user_failure(reason, [*flags, FLAG_BAD_ACTION])

    value: float | None
    if score is None or isinstance(score, bool):
        value = None
    elif isinstance(score, str):
        match = re.search(rf"({_NUMBER})(\s*%|\s*/\s*(?:{_NUMBER}))?", score)
        value = _read_score(match.group(1), match.group(2)) if match else None
    else:
        try:
            value = float(score)
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is not None and not math.isfinite(value):
            value = None

    if code is None:
        if value is None:
            return _user_failure(reason, [*flags, FLAG_NO_ACTION])
        flags.append(FLAG_ACTION_FROM_SCORE)
        clipped = min(max(value, 0.0), 1.0)
        if clipped != value:
            flags.append(FLAG_SCORE_CLAMPED)
        return UserParse(score_to_action(clipped), clipped, reason, tuple(flags))
    if value is None:
        flags.append(FLAG_SCORE_MISSING)
        return UserParse(code, SCORE_MIDPOINTS[code], reason, tuple(flags))
    value, clamped = clamp_score(code, value)
    if clamped:
        flags.append(FLAG_SCORE_CLAMPED)
    return UserParse(code, value, reason, tuple(flags))


def _user_failure(reason: str, flags: list[str]) -> UserParse:
    action, score = _USER_FAILURE
    return UserParse(action, score, reason, (FLAG_FORMAT_FAILURE, *flags))
