from coars_agents.hindsight import (
    HEADER,
    diagnose_turn,
    recommender_reference,
    user_reference,
    with_reference,
)

TITLES = {10: "Amélie", 11: "Heat", 12: "Alien, The"}


def title_of(item: int) -> str:
    return TITLES[item]


def turn(t, position, item, hit, action, **flags):
    return {
        "turn": t,
        "rec_position": position,
        "rec_item": item,
        "hit": hit,
        "action": action,
        "score": 0.5,
        **flags,
    }


def test_recommender_reference_names_target_and_labels_wrong_turns():
    turns = [turn(1, 2, 11, False, "skip"), turn(2, 0, 12, False, "click")]
    text = recommender_reference(4, "Amélie", turns, title_of)
    assert text.splitlines() == [
        HEADER,
        'The user\'s real next item was candidate 5: "Amélie".',
        'Turn 1: recommended item 3 "Heat"; the user answered skip. '
        "Wrong: not the user's real next item.",
        'Turn 2: recommended item 1 "Alien, The"; the user answered click. '
        "Wrong: not the user's real next item. "
        "The user's click was misaligned: the user did not choose this item.",
    ]


def test_diagnosis_of_failures_repeats_and_misaligned_user():
    assert "answer format" in diagnose_turn(
        turn(1, -1, -1, False, "skip", rec_format_failure=True), title_of
    )
    assert "already been recommended" in diagnose_turn(
        turn(2, 1, 11, False, "skip", repeat=True), title_of
    )
    hit_skipped = diagnose_turn(turn(3, 4, 10, True, "dislike"), title_of)
    assert "real next item" in hit_skipped and "dislike was misaligned" in hit_skipped


def test_action_codes_from_turn_records_are_named():
    text = diagnose_turn(turn(1, 0, 11, False, 0), title_of)
    assert "the user answered click." in text and "click was misaligned" in text
    assert "answered nothing." in diagnose_turn(
        turn(1, -1, -1, False, -1, rec_format_failure=True), title_of
    )


def test_user_reference_verdicts():
    yes = user_reference("Amélie", True, "Amélie", [], title_of)
    no = user_reference("Heat", False, "Amélie", [], title_of)
    assert "IS the item" in yes and "NOT" not in yes
    assert "is NOT the item" in no and '"Amélie"' in no


def test_with_reference_appends_to_last_user_message_without_mutating():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    out = with_reference(messages, "d")
    assert out == [{"role": "system", "content": "s"}, {"role": "user", "content": "u\n\nd"}]
    assert messages[1]["content"] == "u"
