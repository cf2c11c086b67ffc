"""Observation -> chat messages. Every prompt template of the environment lives here.

Each agent gets two messages: a ``system`` message (its role and the exact answer
format of ``parsing.py``) and a ``user`` message (what it sees this turn). Prompts are
short and plain because small models read them.

Shortening rule (``_fit``): the user message is first limited to the ``max_history``
most recent history items and the ``max_memory_turns`` most recent dialogue turns; if it
is still longer than ``max_chars``, lines are dropped in this order until it fits:
(1) oldest history items down to ``MIN_HISTORY_KEPT``, (2) oldest memory turns down to
the last one, (3) the remaining history but the most recent item, (4) the last memory
turn; the candidates and the current question are never dropped. Only then, as a last
resort, the text before the question is cut so that the message fits (with "…").
The system messages are short, fixed texts and are never shortened.

Extra instructions (``EnvConfig.rec_instruction`` / ``user_instruction``, e.g. the AFL
baseline's reflection step): an optional text inserted into an agent's system message as
its own line, just before the "Answer in exactly this format" part, so the answer
format stays the last thing the model reads. Empty (the default) leaves the system
message exactly as without the option.

All text is kept inside a character set (``build_charset``): the environment's ``Text``
spaces use it, so agent rationales quoted in the memory have characters outside it
replaced by U+FFFD (item texts are inside it by construction).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import pandas as pd

from coars_env.dialog.parsing import ACTION_NAMES, REC_FORMAT, USER_FORMAT

Messages = list[dict[str, str]]

REPLACEMENT_CHAR = "\ufffd"
ELLIPSIS = "…"
MIN_HISTORY_KEPT = 3

# printable ASCII, Latin-1 Supplement, Latin Extended-A/B, general punctuation, euro sign
# and the replacement character; build_charset adds every character of the item texts.
BASE_CHARSET: frozenset[str] = frozenset(
    string.printable
    + "".join(map(chr, range(0x00A0, 0x0250)))
    + "".join(map(chr, range(0x2010, 0x205F)))
    + "€™"
    + REPLACEMENT_CHAR
)

_WHITESPACE = re.compile(r"\s+")

# ----------------------------------------------------------------------------- templates

REC_SYSTEM = (
    "You are a recommender talking with a user for at most {max_turns} turns. Each turn, "
    "recommend exactly one {noun} from the numbered candidate list: the one this user most "
    "likely wants next. Never recommend the same {noun} twice. A click ends the "
    "conversation.\nAnswer in exactly this format:\n{answer_format}"
)
USER_SYSTEM = (
    "You play a real user of a recommendation service for {noun}s. Judge the recommended "
    "{noun} as this user would, from the user's history{peer_clause}.\n"
    "Actions: click = you want it now (score above 0.75; ends the conversation); "
    "star = you like it, but not now (above 0.5 up to 0.75); skip = not interested "
    "(above 0.25 up to 0.5); dislike = you dislike it (0 to 0.25).\n"
    "Answer in exactly this format:\n{answer_format}"
)
PEER_CLAUSE = " and what similar users thought of it"
ANSWER_HEADER = "Answer in exactly this format:"  # opens the last part of both system messages

REC_HISTORY_HEADER = "The user's history ({nouns}, oldest first{omitted}):"
USER_HISTORY_HEADER = "Your history ({nouns}, oldest first{omitted}):"
CANDIDATES_HEADER = "Candidates:"
CANDIDATE_LINE = {"first": "{number}. {item}", "last": "- {item} = candidate {number}"}
"""A candidate's line, by where its number goes (``EnvConfig.candidate_numbers``)."""
HINT_LINE = "A conventional recommender ranks candidate {number} first."
MEMORY_HEADER = "Conversation so far{omitted}:"
NO_MEMORY = "Conversation so far: none."
REC_QUESTION = "Turn {turn} of {max_turns}. Your answer:"
USER_QUESTION = "Turn {turn} of {max_turns}. The recommender suggests: {item}"
USER_REC_REASON = "Its reason: {reason}"
USER_ANSWER = "Your answer:"

REC_MEMORY_TURN = "Turn {turn}: you recommended candidate {number}, {title}{repeat}."
USER_MEMORY_TURN = "Turn {turn}: the recommender suggested {title}{repeat}."
REC_MEMORY_REASON = " Your reason: {reason}"
USER_MEMORY_REASON = " Its reason: {reason}"
REC_MEMORY_FAILURE = "Turn {turn}: you gave no valid answer (format error)."
USER_MEMORY_FAILURE = "Turn {turn}: the recommender gave no valid recommendation."
REC_MEMORY_RESPONSE = " | User: {action} (score {score:.2f}). {reason}"
USER_MEMORY_RESPONSE = " | You: {action} (score {score:.2f}). {reason}"
REPEAT_NOTE = " (already recommended before)"


def peer_sentence(n_liked: int, n_disliked: int) -> str:
    """What the user agent is told about its peers' opinions on the recommended item."""
    total = n_liked + n_disliked
    if total == 0:
        return "None of the similar users has an opinion on it."
    users = "user" if total == 1 else "users"
    return (
        f"Of {total} similar {users} with an opinion, {n_liked} liked it, {n_disliked} disliked it."
    )


def item_noun_for(dataset_name: str) -> str:
    """A readable noun for a dataset's items ("movie", "artist", ...)."""
    name = dataset_name.lower()
    if "ml-" in name or name.startswith("ml") or "movielens" in name or "movie" in name:
        return "movie"
    if "lastfm" in name or "last.fm" in name or "music" in name:
        return "artist"
    if "amazon" in name or "instrument" in name:
        return "product"
    return "item"


# ----------------------------------------------------------------------------- texts


def build_charset(texts: Iterable[str]) -> frozenset[str]:
    """``BASE_CHARSET`` plus every character of ``texts`` (the item texts of a dataset)."""
    extra: set[str] = set()
    for text in texts:
        extra.update(text)
    return BASE_CHARSET | frozenset(extra)


def clean_text(text: str, max_chars: int, charset: frozenset[str] | None = None) -> str:
    """One line: whitespace collapsed, cut to ``max_chars`` ("…"), foreign chars -> U+FFFD."""
    text = _WHITESPACE.sub(" ", text).strip()
    if len(text) > max_chars:
        text = text[: max(max_chars - 1, 0)].rstrip() + ELLIPSIS if max_chars > 0 else ""
    if charset is not None and not charset.issuperset(text):
        text = "".join(c if c in charset else REPLACEMENT_CHAR for c in text)
    return text


class Catalog:
    """Item texts for prompts (title, year, genres, summary), read once from ``items``.

    ``items`` is ``DialogData.items`` (dense index; ``title`` and optionally ``year``,
    ``genres`` (``|``-joined), ``summary``). Lines are cached on first use.
    """

    def __init__(self, items: pd.DataFrame, *, max_summary_chars: int = 160):
        n = len(items)
        self.titles: list[str] = [_WHITESPACE.sub(" ", str(t)).strip() for t in items["title"]]
        self.years: list[int | None] = [None] * n
        if "year" in items.columns:
            self.years = [None if pd.isna(y) else int(y) for y in items["year"]]
        self.genres: list[str] = [""] * n
        if "genres" in items.columns:
            self.genres = [
                ", ".join(g for g in str(v).split("|") if g) if isinstance(v, str) else ""
                for v in items["genres"]
            ]
        self.summaries: list[str] = [""] * n
        if "summary" in items.columns:
            self.summaries = [
                clean_text(v, max_summary_chars) if isinstance(v, str) else ""
                for v in items["summary"]
            ]
        self._short: dict[int, str] = {}
        self._long: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.titles)

    def texts(self) -> Iterable[str]:
        """Every string a line can contain (for ``build_charset``)."""
        yield from self.titles
        yield from self.genres
        yield from self.summaries

    def title(self, item: int) -> str:
        """The title, with the year appended when known and not already in it."""
        line = self._short.get(item)
        if line is None:
            line = self.titles[item]
            year = self.years[item]
            if year is not None and f"({year})" not in line:
                line = f"{line} ({year})"
            self._short[item] = line
        return line

    def line(self, item: int) -> str:
        """Compact one-line description: ``Title (year) [genres]: summary``."""
        line = self._long.get(item)
        if line is None:
            line = self.title(item)
            if self.genres[item]:
                line += f" [{self.genres[item]}]"
            if self.summaries[item]:
                line += f": {self.summaries[item]}"
            self._long[item] = line
        return line


class MemoryTurn(NamedTuple):
    """One finished turn of the dialogue memory, as the prompts show it."""

    turn: int
    position: int  # 0-based candidate position; -1 when the recommender's reply failed
    item: int  # dense item index; -1 when the recommender's reply failed
    rec_reason: str
    action: int  # action code; -1 when the user had nothing to judge
    score: float
    user_reason: str
    repeat: bool = False


# ----------------------------------------------------------------------------- rendering


def with_instruction(system: str, instruction: str = "") -> str:
    """``system`` with ``instruction`` inserted as its own line before ``ANSWER_HEADER``.

    An empty instruction returns ``system`` unchanged (the default prompts stay identical).
    """
    instruction = instruction.strip()
    if not instruction:
        return system
    head, sep, tail = system.partition("\n" + ANSWER_HEADER)
    if not sep:  # no answer header (a custom template): append at the end
        return f"{system}\n{instruction}"
    return f"{head}\n{instruction}{sep}{tail}"


def recommender_system(
    n_candidates: int, max_turns: int, item_noun: str = "item", instruction: str = ""
) -> str:
    """The recommender's system message: its role, an optional extra ``instruction`` and
    the exact answer format."""
    answer_format = REC_FORMAT.format(n=n_candidates)
    system = REC_SYSTEM.format(max_turns=max_turns, noun=item_noun, answer_format=answer_format)
    return with_instruction(system, instruction)


def user_system(item_noun: str = "item", with_peers: bool = True, instruction: str = "") -> str:
    """The user agent's system message: its role, the actions, an optional extra
    ``instruction`` and the answer format."""
    peer_clause = PEER_CLAUSE if with_peers else ""
    system = USER_SYSTEM.format(noun=item_noun, peer_clause=peer_clause, answer_format=USER_FORMAT)
    return with_instruction(system, instruction)


def recommender_messages(
    catalog: Catalog,
    *,
    history: Sequence[int],
    candidates: Sequence[int],
    memory: Sequence[MemoryTurn],
    turn: int,
    max_turns: int,
    hint_position: int | None = None,
    item_noun: str = "item",
    max_history: int | None = None,
    max_memory_turns: int | None = None,
    max_chars: int = 12_000,
    max_reason_chars: int = 300,
    charset: frozenset[str] | None = None,
    instruction: str = "",
    candidate_numbers: str = "first",
) -> Messages:
    """The recommender's chat prompt for ``turn`` (history, numbered candidates, memory).

    ``instruction``: extra text for the system message (``with_instruction``).
    ``candidate_numbers``: a key of ``CANDIDATE_LINE``, where each candidate's number goes.
    """
    system = recommender_system(len(candidates), max_turns, item_noun, instruction)
    history_lines = [f"- {catalog.line(i)}" for i in history]
    candidate_lines = [CANDIDATES_HEADER]
    line = CANDIDATE_LINE[candidate_numbers]
    candidate_lines += [
        line.format(number=n, item=catalog.line(i)) for n, i in enumerate(candidates, start=1)
    ]
    if hint_position is not None:
        candidate_lines.append(HINT_LINE.format(number=hint_position + 1))
    memory_lines = [_memory_line(m, catalog, True, max_reason_chars, charset) for m in memory]
    question = REC_QUESTION.format(turn=turn, max_turns=max_turns)
    content = _fit(
        history_header=REC_HISTORY_HEADER,
        nouns=f"{item_noun}s",
        history_lines=history_lines,
        middle=candidate_lines,
        memory_lines=memory_lines,
        tail=[question],
        max_history=max_history,
        max_memory_turns=max_memory_turns,
        max_chars=max_chars,
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def user_messages(
    catalog: Catalog,
    *,
    history: Sequence[int],
    memory: Sequence[MemoryTurn],
    turn: int,
    max_turns: int,
    item: int,
    rec_reason: str,
    peers: tuple[int, int] | None = None,
    item_noun: str = "item",
    max_history: int | None = None,
    max_memory_turns: int | None = None,
    max_chars: int = 12_000,
    max_reason_chars: int = 300,
    charset: frozenset[str] | None = None,
    instruction: str = "",
) -> Messages:
    """The user agent's chat prompt: history, memory, the recommendation, peer opinions.

    ``peers`` = (n_liked, n_disliked) among the similar users with an opinion on ``item``;
    None leaves peer opinions out of the prompt. ``instruction``: extra text for the
    system message (``with_instruction``).
    """
    system = user_system(item_noun, with_peers=peers is not None, instruction=instruction)
    history_lines = [f"- {catalog.line(i)}" for i in history]
    memory_lines = [_memory_line(m, catalog, False, max_reason_chars, charset) for m in memory]
    tail = [USER_QUESTION.format(turn=turn, max_turns=max_turns, item=catalog.line(item))]
    reason = clean_text(rec_reason, max_reason_chars, charset)
    if reason:
        tail.append(USER_REC_REASON.format(reason=reason))
    if peers is not None:
        tail.append(peer_sentence(*peers))
    tail.append(USER_ANSWER)
    content = _fit(
        history_header=USER_HISTORY_HEADER,
        nouns=f"{item_noun}s",
        history_lines=history_lines,
        middle=[],
        memory_lines=memory_lines,
        tail=tail,
        max_history=max_history,
        max_memory_turns=max_memory_turns,
        max_chars=max_chars,
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def _memory_line(
    m: MemoryTurn,
    catalog: Catalog,
    for_recommender: bool,
    max_reason_chars: int,
    charset: frozenset[str] | None,
) -> str:
    if m.position < 0:
        template = REC_MEMORY_FAILURE if for_recommender else USER_MEMORY_FAILURE
        return template.format(turn=m.turn)
    template = REC_MEMORY_TURN if for_recommender else USER_MEMORY_TURN
    line = template.format(
        turn=m.turn,
        number=m.position + 1,
        title=catalog.title(m.item),
        repeat=REPEAT_NOTE if m.repeat else "",
    )
    reason = clean_text(m.rec_reason, max_reason_chars, charset)
    if reason:
        line += (REC_MEMORY_REASON if for_recommender else USER_MEMORY_REASON).format(reason=reason)
    if m.action >= 0:
        response = REC_MEMORY_RESPONSE if for_recommender else USER_MEMORY_RESPONSE
        line += response.format(
            action=ACTION_NAMES[m.action],
            score=m.score,
            reason=clean_text(m.user_reason, max_reason_chars, charset),
        ).rstrip()
    return line


def _fit(
    *,
    history_header: str,
    nouns: str,
    history_lines: list[str],
    middle: list[str],
    memory_lines: list[str],
    tail: list[str],
    max_history: int | None,
    max_memory_turns: int | None,
    max_chars: int,
) -> str:
    """Assemble the user message, applying the shortening rule of the module doc."""
    n_history, n_memory = len(history_lines), len(memory_lines)
    hist = history_lines[-max_history:] if max_history is not None else history_lines
    mem = memory_lines[-max_memory_turns:] if max_memory_turns is not None else memory_lines
    if max_history == 0:
        hist = []
    if max_memory_turns == 0:
        mem = []

    def assemble() -> str:
        lines: list[str] = []
        if hist:
            omitted = n_history - len(hist)
            lines.append(
                history_header.format(
                    nouns=nouns, omitted=f"; {omitted} older omitted" if omitted else ""
                )
            )
            lines += hist
        lines += middle
        if mem:
            omitted = n_memory - len(mem)
            lines.append(
                MEMORY_HEADER.format(omitted=f" ({omitted} older turns omitted)" if omitted else "")
            )
            lines += mem
        elif n_memory == 0:
            lines.append(NO_MEMORY)
        lines += tail
        return "\n".join(lines)

    content = assemble()
    if len(content) <= max_chars:
        return content
    # Drop lines by the rule, tracking the length instead of re-assembling each time
    # (headers may change by a few characters, so re-check after assembling).
    excess = len(content) - max_chars
    for floor_history, floor_memory in (
        (MIN_HISTORY_KEPT, n_memory),
        (MIN_HISTORY_KEPT, 1),
        (1, 1),
        (1, 0),
    ):
        while excess > 0 and len(hist) > floor_history:
            excess -= len(hist.pop(0)) + 1
        while excess > 0 and len(mem) > floor_memory:
            excess -= len(mem.pop(0)) + 1
    content = assemble()
    while len(content) > max_chars and (len(hist) > 1 or mem):
        if len(hist) > 1:
            hist.pop(0)
        else:
            mem.pop(0)
        content = assemble()
    if len(content) > max_chars:  # last resort: cut before the question, keep the question
        question = "\n".join(tail)
        keep = max_chars - len(question) - 2
        if keep > 0:
            content = (
                content[: len(content) - len(question) - 1][:keep] + ELLIPSIS + "\n" + question
            )
        else:
            content = content[: max_chars - 1] + ELLIPSIS
    return content
