from types import SimpleNamespace

from coars_agents.hindsight import (
    DIAGNOSIS_SYSTEM,
    HEADER,
    clean_diagnosis,
    diagnose_turn,
    diagnosis_messages,
    recommender_reference,
    user_reference,
    with_reference,
    write_diagnoses,
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
        "Answer with Item: 5",
        HEADER,
        'The user\'s real next item was candidate 5: "Amélie".',
        'Turn 1: recommended item 3 "Heat"; the user answered skip. '
        "Wrong: not the user's real next item.",
        'Turn 2: recommended item 1 "Alien, The"; the user answered click. '
        "Wrong: not the user's real next item. "
        "The user's click was misaligned: the user did not choose this item.",
    ]
    # Without the answer hint, d is the same minus its first line (the d of sessions 1-12).
    plain = recommender_reference(4, "Amélie", turns, title_of, answer_hint=False)
    assert plain.splitlines() == text.splitlines()[1:]


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
    assert yes.splitlines() == [
        "Answer with Action: click",
        HEADER,
        '"Amélie" IS the item this user really chose next: accepting it is aligned.',
    ]
    assert no.splitlines() == [
        "Answer with Action: dislike",
        HEADER,
        '"Heat" is NOT the item this user chose next (that was "Amélie"): accepting it would '
        "be misaligned.",
    ]
    plain = user_reference("Heat", False, "Amélie", [], title_of, answer_hint=False)
    assert plain.splitlines() == no.splitlines()[1:]


def test_the_answer_hints_are_answers_the_parser_reads_as_the_aligned_ones():
    from coars_env.dialog.parsing import ACTION_NAMES, parse_recommender, parse_user

    hint = recommender_reference(4, "Amélie", [], title_of).splitlines()[0]
    assert parse_recommender(hint.removeprefix("Answer with "), 20).position == 4
    for is_target, action in ((True, "click"), (False, "dislike")):
        hint = user_reference("Heat", is_target, "Amélie", [], title_of).splitlines()[0]
        parsed = parse_user(hint.removeprefix("Answer with "))
        assert ACTION_NAMES[parsed.action] == action and not parsed.format_failure


def test_with_reference_appends_to_last_user_message_without_mutating():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    out = with_reference(messages, "d")
    assert out == [{"role": "system", "content": "s"}, {"role": "user", "content": "u\n\nd"}]
    assert messages[1]["content"] == "u"


# ------------------------------------------------------------ LLM-written diagnoses


def test_a_written_note_follows_the_template_verdict_in_every_reference():
    noted = turn(1, 2, 11, False, "skip", diagnosis="Heat is a thriller; she watches comedies.")
    line = (
        'Turn 1: recommended item 3 "Heat"; the user answered skip. '
        "Wrong: not the user's real next item. Why: Heat is a thriller; she watches comedies."
    )
    assert diagnose_turn(noted, title_of) == line
    assert recommender_reference(0, "Amélie", [noted], title_of).splitlines()[-1] == line
    assert user_reference("Heat", False, "Amélie", [noted], title_of).splitlines()[-1] == line
    # An empty note (the writer gave nothing usable) leaves the template line alone.
    assert diagnose_turn({**noted, "diagnosis": ""}, title_of) == line.split(" Why:")[0]


def test_diagnosis_prompt_states_history_target_and_verdict_without_an_old_note():
    record = turn(2, 0, 12, False, "click", diagnosis="stale note")
    messages = diagnosis_messages(record, [11, 12], 10, title_of)
    assert messages == [
        {"role": "system", "content": DIAGNOSIS_SYSTEM},
        {
            "role": "user",
            "content": "\n".join(
                [
                    "The user's earlier items (oldest first):",
                    "- Heat",
                    "- Alien, The",
                    "The user's real next item: Amélie",
                    'Turn 2: recommended item 1 "Alien, The"; the user answered click. '
                    "Wrong: not the user's real next item. "
                    "The user's click was misaligned: the user did not choose this item.",
                    "Why? Answer in one sentence.",
                ]
            ),
        },
    ]
    assert "- (none shown)" in diagnosis_messages(record, [], 10, title_of)[1]["content"]


def test_clean_diagnosis_keeps_one_line_within_the_limit():
    assert clean_diagnosis("\n  It is a   horror film.\nSecond line") == "It is a horror film."
    assert clean_diagnosis(" \n\t\n") == ""
    assert clean_diagnosis("one two three four", max_chars=12) == "one two..."
    assert clean_diagnosis("exactly twelve", max_chars=14) == "exactly twelve"


class FakeWriter:
    """Records what write_diagnoses asks for; answers each prompt with a canned text."""

    def __init__(self, texts, limit_lines=None):
        self.texts, self.limit_lines, self.calls = texts, limit_lines, []

    def generate(self, batch, *, adapter, sampling, shortener):
        self.calls.append((adapter, sampling))
        prompts = []
        for i, messages in enumerate(batch):
            # Too long while the prompt has more than limit_lines history lines.
            while self.limit_lines is not None and (
                messages[1]["content"].count("\n- ") > self.limit_lines
            ):
                messages = shortener(i, messages)
            prompts.append(messages)
        self.prompts = prompts
        return [SimpleNamespace(text=t) for t in self.texts]


def test_write_diagnoses_runs_the_frozen_base_greedily_and_cleans_each_note():
    cases = [(turn(1, 2, 11, False, "skip"), [10, 12], 10), (turn(1, 0, 10, True, "click"), [], 10)]
    writer = FakeWriter(["A thriller, not a comedy.\nmore", "   "])
    notes = write_diagnoses(writer, cases, title_of, max_new_tokens=7)
    assert notes == ["A thriller, not a comedy.", ""]
    ((adapter, sampling),) = writer.calls
    assert adapter is None and sampling.greedy and sampling.max_new_tokens == 7
    assert sampling.stop == ("\n",)
    assert write_diagnoses(writer, [], title_of) == [] and len(writer.calls) == 1


def test_write_diagnoses_drops_the_oldest_history_until_the_prompt_fits():
    case = (turn(1, 2, 11, False, "skip"), [10, 11, 12, 10, 11], 12)
    writer = FakeWriter(["x"], limit_lines=2)
    write_diagnoses(writer, [case], title_of)
    content = writer.prompts[0][1]["content"]
    # 5 -> 2 items: the newest two, the oldest dropped first.
    assert "- Amélie\n- Heat\nThe user's real next item" in content
    assert content.count("\n- ") == 2
