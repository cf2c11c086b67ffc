"""The one parser: canonical, messy and adversarial replies; never an exception."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium import spaces

from coars_env.dialog import parsing as P
from coars_env.dialog.parsing import (
    CLICK,
    DISLIKE,
    SCORE_EPSILON,
    SKIP,
    STAR,
    format_recommender,
    format_user,
    parse_recommender,
    parse_user,
)
from coars_env.dialog.prompts import BASE_CHARSET

TITLES = [
    "Toy Story (1995)",  # 1
    "Toy Story 2 (1999)",  # 2
    "Matrix, The (1999)",  # 3
    "12 Angry Men (1957)",  # 4
    "2001: A Space Odyssey (1968)",  # 5
    "Amélie (2001)",  # 6
    "Heat (1995)",  # 7
    "Björk: Live! — “Vespertine”",  # 8
    "東京物語 (Tokyo Story)",  # 9
    "Heat (1995)",  # 10: same title as 7 (titles are not unique)
]
N = len(TITLES)


def rec(reply, titles=TITLES):
    return parse_recommender(reply, N, titles)


@pytest.mark.parametrize(
    "reply, position",
    [
        ("Item: 3\nReason: a classic", 2),
        ("item:3", 2),
        ("ITEM :  3 \n reason: x", 2),
        ("**Item:** 7\n**Reason:** tense", 6),
        ("Item: **7**", 6),
        ("### Item: 7", 6),
        ("- Item: #7", 6),
        ("Item 7 is my pick.", 6),
        ("Item: [7]", 6),
        ("Item: No. 7", 6),
        ("Item:\n7\nReason: on the next line", 6),
        ("Reason: first the reason\nItem: 4", 3),
        ("Item: 3 Reason: inline", 2),
        ("7.", 6),
        ("#7", 6),
        ("7) Heat", 6),
        ('{"item": 2, "reason": "sequel"}', 1),
        ('```json\n{"item": "2", "reason": "sequel"}\n```', 1),
        ('{"Item": 2.0}', 1),
        ("Item: 3 (Matrix, The)", 2),
        ("Item: 7 - Heat (1995)", 6),
    ],
)
def test_recommender_numbers(reply, position):
    parsed = rec(reply)
    assert parsed.position == position, parsed
    assert not parsed.format_failure


@pytest.mark.parametrize(
    "reply, position",
    [
        ("Item: The Matrix\nReason: you like sci-fi", 2),
        ("Item: matrix, the (1999)", 2),
        ("Item: Toy Story 2", 1),  # not read as Toy Story: the longer title wins
        ("Item: toy story", 0),
        ("Item: 12 Angry Men", 3),  # a title that starts with a number
        ("Item: 2001: A Space Odyssey", 4),
        ("Item: Amelie", 5),  # accents optional
        ("Item: AMÉLIE (2001)", 5),
        ("Item: Björk: Live! — “Vespertine”", 7),
        ("Item: bjork live vespertine", 7),
        ("Item: 東京物語", 8),
        ("The Matrix", 2),
        ('{"item": "The Matrix", "reason": "x"}', 2),
        ("Item: I recommend The Matrix (1999).", 2),
        ("Item: The Matrix\nReason: better than Toy Story and Heat", 2),  # reason is free
    ],
)
def test_recommender_titles(reply, position):
    parsed = rec(reply)
    assert parsed.position == position, parsed
    assert P.FLAG_TITLE in parsed.flags


@pytest.mark.parametrize(
    "reply, flag",
    [
        ("", P.FLAG_EMPTY),
        ("   \n\t ", P.FLAG_EMPTY),
        (None, P.FLAG_MISSING),
        ("Item: Star Wars (1977)", P.FLAG_UNKNOWN_TITLE),  # a title not among the candidates
        ("Item: 11", P.FLAG_OUT_OF_RANGE),
        ("Item: 0", P.FLAG_OUT_OF_RANGE),
        ("Item: 3\nItem: 4", P.FLAG_MULTIPLE_ITEMS),  # two different items named
        ("Item: The Matrix and Amélie", P.FLAG_MULTIPLE_ITEMS),
        ("Item: 3 (Amélie)", P.FLAG_CONFLICT),  # number and another candidate's title
        ("Item: Heat", P.FLAG_AMBIGUOUS_TITLE),  # two candidates share the title
        ("Item: none of them", P.FLAG_UNKNOWN_TITLE),
        ("I cannot decide.", P.FLAG_UNKNOWN_TITLE),
        (3.5, P.FLAG_BAD_TYPE),
        (True, P.FLAG_BAD_TYPE),
        ({"item": 1}, P.FLAG_BAD_TYPE),
        (["Item: 1"], P.FLAG_BAD_TYPE),
        (-1, P.FLAG_OUT_OF_RANGE),
        (N, P.FLAG_OUT_OF_RANGE),
    ],
)
def test_recommender_failures(reply, flag):
    parsed = rec(reply)
    assert parsed.format_failure and parsed.position is None
    assert P.FLAG_FORMAT_FAILURE in parsed.flags
    assert flag in parsed.flags, parsed


def test_recommender_structured_and_reason():
    assert rec(4) == P.RecParse(4, "", (P.FLAG_STRUCTURED,))
    assert rec(np.int64(4)).position == 4
    assert rec("Item: 5\nReason: Because  it is\ngood.").reason == "Because  it is\ngood."
    assert parse_recommender("Item: The Matrix", N, None).format_failure  # no titles given
    assert parse_recommender("Item: 20", 20).position == 19


def test_adversarial_recommender_replies_never_raise():
    cases = [
        "x" * 200_000,
        "Item: 3\n" + "é" * 100_000,
        "😀" * 5000,
        "\x00\x01\x02 Item: \ud800",
        "{" * 5000,
        '{"item": {"nested": [1, 2]}}',
        '{"item": null}',
        "Item: " + "9" * 500,
        "Item: -3",
        "Item: 1e3",
        "\n" * 10_000,
    ]
    for reply in cases:
        parsed = rec(reply)
        assert isinstance(parsed.flags, tuple)
    assert P.FLAG_TRUNCATED in rec("x" * 200_000).flags
    assert rec("Item: 3\n" + "é" * 100_000).position == 2


def test_random_text_from_the_action_space_never_raises():
    space = spaces.Text(300, min_length=0, charset=BASE_CHARSET | set("東京物語😀"), seed=0)
    for _ in range(300):
        text = space.sample()
        rec(text)
        parse_user(text)


@pytest.mark.parametrize(
    "reply, action, score",
    [
        ("Action: click\nScore: 0.85\nReason: love it", CLICK, 0.85),
        ("action: STAR\nscore: 0.6", STAR, 0.6),
        ("**Action:** Skip\n**Score:** 0.3\n**Reason:** meh", SKIP, 0.3),
        ("Action: dislike, Score: 0.1", DISLIKE, 0.1),
        ("Action: clicked\nScore: 90%", CLICK, 0.9),
        ("Action: star\nScore: 7/10", STAR, 0.7),
        ("Action: 1\nScore: .7", STAR, 0.7),
        ('{"action": "click", "score": 0.95, "reason": "yes"}', CLICK, 0.95),
        ('```json\n{"action": 3, "score": "0.2"}\n```', DISLIKE, 0.2),
        ("Reason: not for me\nAction: skip\nScore: 0.4", SKIP, 0.4),
        ({"action": 0, "score": 0.95}, CLICK, 0.95),
        ({"action": "star", "score": 0.6, "reason": "later"}, STAR, 0.6),
        ({"action": np.int64(2), "score": np.float32(0.3)}, SKIP, pytest.approx(0.3)),
    ],
)
def test_user_good(reply, action, score):
    parsed = parse_user(reply)
    assert (parsed.action, parsed.score) == (action, score), parsed
    assert not parsed.format_failure and not parsed.score_clamped


def test_user_reason():
    assert parse_user("Action: skip\nScore: 0.3\nReason: too long").reason == "too long"
    assert parse_user({"action": 1, "reason": "later"}).reason == "later"


def test_user_missing_score_is_the_midpoint():
    for name, code in P.ACTION_CODES.items():
        parsed = parse_user(f"Action: {name}")
        low, high = P.SCORE_INTERVALS[code]
        assert parsed.action == code and parsed.score == pytest.approx((low + high) / 2)
        assert P.FLAG_SCORE_MISSING in parsed.flags and not parsed.format_failure
    assert parse_user(2) == P.UserParse(SKIP, 0.375, "", (P.FLAG_STRUCTURED, P.FLAG_SCORE_MISSING))
    assert parse_user("Action: click\nScore: nan").score == 0.875


@pytest.mark.parametrize(
    "reply, action, score",
    [
        ("Action: skip\nScore: 0.9", SKIP, 0.5),
        ("Action: star\nScore: 0.5", STAR, 0.5 + SCORE_EPSILON),  # open low end
        ("Action: click\nScore: 0.75", CLICK, 0.75 + SCORE_EPSILON),
        ("Action: click\nScore: 1.5", CLICK, 1.0),
        ("Action: dislike\nScore: -0.2", DISLIKE, 0.0),
        ("Action: dislike\nScore: 0.6", DISLIKE, 0.25),  # dislike is closed at 0.25
        ({"action": 1, "score": 0.9}, STAR, 0.75),
    ],
)
def test_user_score_clamped(reply, action, score):
    parsed = parse_user(reply)
    assert (parsed.action, parsed.score) == (action, pytest.approx(score)), parsed
    assert parsed.score_clamped and not parsed.format_failure


def test_interval_boundaries_are_inside():
    assert parse_user("Action: star\nScore: 0.75").score == 0.75
    assert not parse_user("Action: dislike\nScore: 0.25").score_clamped
    assert not parse_user("Action: dislike\nScore: 0").score_clamped
    for code, (_, high) in P.SCORE_INTERVALS.items():
        assert P.score_to_action(high) == code
        assert P.clamp_score(code, high) == (high, False)


def test_user_lenient_forms():
    parsed = parse_user("Click! I love this one.")
    assert parsed.action == CLICK and P.FLAG_UNLABELLED in parsed.flags
    parsed = parse_user("Score: 0.6")
    assert (parsed.action, parsed.score) == (STAR, 0.6)
    assert P.FLAG_ACTION_FROM_SCORE in parsed.flags


@pytest.mark.parametrize(
    "reply, flag",
    [
        ("", P.FLAG_EMPTY),
        (None, P.FLAG_MISSING),
        ("Action: maybe\nScore: 0.5", P.FLAG_BAD_ACTION),
        ("Action: click\nAction: skip", P.FLAG_MULTIPLE_ACTIONS),
        ("I would skip it, but not dislike it", P.FLAG_MULTIPLE_ACTIONS),
        ("I have no idea.", P.FLAG_NO_ACTION),
        ({"action": 7, "score": 0.5}, P.FLAG_BAD_ACTION),
        ({"action": True}, P.FLAG_BAD_ACTION),
        ({"score": None}, P.FLAG_NO_ACTION),
        (9, P.FLAG_BAD_ACTION),
        (0.5, P.FLAG_BAD_TYPE),
        ("😀" * 10_000, P.FLAG_TRUNCATED),
    ],
)
def test_user_failures_are_skips(reply, flag):
    parsed = parse_user(reply)
    assert parsed.format_failure
    assert (parsed.action, parsed.score) == (SKIP, 0.5)
    assert flag in parsed.flags, parsed


def test_canonical_formats_round_trip():
    assert format_recommender(6, "why") == "Item: 7\nReason: why"
    assert format_recommender(6, "why").startswith(P.REC_PREFIX)
    assert P.REASON_PREFIX in format_recommender(0)
    assert rec(format_recommender(6, "why")) == P.RecParse(6, "why", ())
    text = format_user(STAR, 0.6, "later")
    assert text == "Action: star\nScore: 0.60\nReason: later"
    assert text.startswith(P.USER_ACTION_PREFIX) and P.USER_SCORE_PREFIX in text
    assert parse_user(text) == P.UserParse(STAR, 0.6, "later", ())
    assert (
        P.REC_FORMAT.format(n=20) == "Item: <candidate number 1-20>\nReason: <one short sentence>"
    )
    assert P.ACTION_NAMES == ("click", "star", "skip", "dislike")
    assert (
        [P.ACTION_CODES[n] for n in P.ACTION_NAMES] == [CLICK, STAR, SKIP, DISLIKE] == [0, 1, 2, 3]
    )


def test_titles_that_are_numbers_or_symbols():
    titles = ["187 (1997)", "#####", "1941 (1979)", "Heat (1995)"]
    assert parse_recommender("Item: 187", 4, titles).position == 0  # out of range: a title
    assert parse_recommender("Item: #####", 4, titles).position == 1
    assert parse_recommender("Item: 1941", 4, titles).position == 2
    assert parse_recommender("Item: 3", 4, titles).position == 2  # in range: a number
    assert parse_recommender('{"item": 187}', 4, titles).position == 0
    assert parse_recommender("Item: 187", 4, None).format_failure
