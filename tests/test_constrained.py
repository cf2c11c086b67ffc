"""Constrained decoding: templates, token tries and masks (no model needed: random walks)."""

import re

import pytest
import torch

from coars_agents.constrained import (
    Choice,
    Free,
    Literal,
    Template,
    TemplateState,
    TokenVocab,
    compile_template,
    recommender_template,
    score_choices,
    user_template,
)
from coars_agents.models import tiny_tokenizer

REC_RE = re.compile(r"Item: (\d+)\nReason: ([^\n]*)")
USER_RE = re.compile(r"Action: (click|star|skip|dislike)\nScore: (\d\.\d\d)\nReason: ([^\n]*)")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return TokenVocab(tokenizer, n_logits=len(tokenizer) + 3, eos_ids=[tokenizer.eos_token_id])


def walk(template, vocab, seed, max_steps=200):
    """Follow the template choosing uniformly among the allowed tokens (the harshest 'model')."""
    gen = torch.Generator().manual_seed(seed)
    state = TemplateState(template, vocab)
    ids, forced = [], []
    while not state.done and len(ids) < max_steps:
        mask = state.allowed()
        assert mask.any()
        assert not mask[len(vocab.texts) :].any(), "padding rows of the output layer are banned"
        allowed = mask.nonzero().squeeze(1)
        tok = int(allowed[torch.randint(len(allowed), (1,), generator=gen)])
        ids.append(tok)
        forced.append(len(allowed) == 1)
        state.advance(tok)
    assert state.done
    return state, ids, forced


def test_score_choices_follow_the_intervals():
    table = score_choices()
    assert table["click"] == ("0.80", "0.85", "0.90", "0.95", "1.00")
    assert table["star"] == ("0.55", "0.60", "0.65", "0.70", "0.75")
    assert table["skip"] == ("0.30", "0.35", "0.40", "0.45", "0.50")
    assert table["dislike"] == ("0.00", "0.05", "0.10", "0.15", "0.20", "0.25")


def test_from_format_and_names():
    t = Template.from_format("A: {x} and {{y}} {z}", x=Choice(["1"]), z=Free(3))
    assert t.segments == (
        Literal("A: "),
        Choice(["1"], "x"),
        Literal(" and {y} "),
        Free(3, "\n", "z"),
    )
    with pytest.raises(KeyError):
        Template.from_format("{missing}")
    with pytest.raises(ValueError):
        Template((Choice(["a"], "n"), Choice(["b"], "n")))


def test_space_hand_off(vocab, tokenizer):
    steps = compile_template(recommender_template(20, 8), vocab)
    kinds = [(type(s.seg).__name__, s.prefix) for s in steps]
    assert kinds == [("Literal", ""), ("Choice", " "), ("Literal", ""), ("Free", " ")]
    assert tokenizer.decode(list(steps[0].tokens)) == "Item:"
    assert tokenizer.decode(list(steps[2].tokens)) == "\nReason:"


@pytest.mark.parametrize("seed", range(40))
def test_random_walks_follow_the_templates(vocab, tokenizer, seed):
    state, ids, forced = walk(recommender_template(20, 12), vocab, seed)
    text = state.trim(tokenizer.decode(ids, skip_special_tokens=True))
    m = REC_RE.fullmatch(text)
    assert m, text
    assert 1 <= int(m.group(1)) <= 20
    assert state.fields["item"] == m.group(1) and state.fields["reason"] == m.group(2)
    # forced tokens are exactly the literals (the tiny BPE has several tokens per item number)
    assert tokenizer.decode([t for t, f in zip(ids, forced) if f]) == "Item:\nReason:"

    state, ids, _ = walk(user_template(12), vocab, seed)
    text = state.trim(tokenizer.decode(ids, skip_special_tokens=True))
    m = USER_RE.fullmatch(text)
    assert m, text
    assert m.group(2) in score_choices()[m.group(1)], "score consistent with the action"
    assert state.fields["action"] == m.group(1) and state.fields["score"] == m.group(2)


@pytest.mark.parametrize("seed", range(30))
def test_prefix_ambiguous_options_and_segment_kinds(vocab, tokenizer, seed):
    # "1" is a token prefix of "10" and "100"; a choice directly followed by a choice, by free
    # text and by the end of the template.
    template = Template(
        (
            Choice(["1", "10", "100", "7"], "a"),
            Choice(lambda prev: ["x", "xy"] if prev["a"] == "7" else ["1", "11"], "b"),
            Literal("|"),
            Free(4, stop="|", name="f"),
            Choice(["ab", "a"], "c"),
        )
    )
    state, ids, _ = walk(template, vocab, seed)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    f = state.fields
    assert f["a"] in {"1", "10", "100", "7"}
    assert f["b"] in ({"x", "xy"} if f["a"] == "7" else {"1", "11"})
    assert f["c"] in {"ab", "a"}
    assert text.startswith(f["a"] + f["b"] + "|" + f["f"])
    assert text.endswith(f["c"])
    assert "|" not in f["f"]


def test_all_options_are_reachable(vocab):
    seen = {
        walk(Template((Choice(["1", "10", "100"], "a"),)), vocab, s)[0].fields["a"]
        for s in range(60)
    }
    assert seen == {"1", "10", "100"}


def test_free_segment_rules(vocab, tokenizer):
    eos = tokenizer.eos_token_id
    state = TemplateState(Template((Literal("A:"), Free(5, stop="\n", name="r"))), vocab)
    for tok in vocab.encode("A:"):
        state.advance(tok)
    mask = state.allowed()
    assert not mask[eos], "EOS needs at least one free token first"
    # tokens containing the stop string other than at their end are banned
    for i, text in enumerate(vocab.texts):
        if "\n" in text and not text.endswith("\n"):
            assert not mask[i]
    nl = vocab.encode("\n")[0]
    state.advance(vocab.encode("x")[0])
    assert state.allowed()[eos], "EOS may end the last free segment"
    state.advance(nl)
    assert state.done and state.ended_by == "stop" and state.fields["r"] == "x"
    assert state.trim("A:x\n") == "A:x"

    budget = TemplateState(Template((Free(2, stop=None, name="r"), Literal("!"))), vocab)
    assert not budget.allowed()[eos], "EOS is banned in a free segment that is not the last"
    budget.advance(vocab.encode("x")[0])
    budget.advance(vocab.encode("y")[0])
    assert budget.steps[budget.index].seg == Literal("!"), "the budget ends the segment"


def test_invalid_tokens_and_options_raise(vocab):
    state = TemplateState(Template((Choice(["7", "8"], "a"),)), vocab)
    with pytest.raises(ValueError):
        state.advance(vocab.encode("9")[0])
    with pytest.raises(ValueError):
        TemplateState(Template((Choice(["7", "7"], "a"),)), vocab)
    with pytest.raises(ValueError):
        TemplateState(Template((Choice([], "a"),)), vocab)


def test_recommender_template_can_exclude_candidates():
    from coars_agents.constrained import Choice, recommender_template

    template = recommender_template(5, 4, exclude={2, 4})
    choices = [seg for seg in template.segments if isinstance(seg, Choice)]
    assert [list(c.options) for c in choices] == [["1", "3", "5"]]
    with pytest.raises(ValueError, match="leaves no candidate"):
        recommender_template(2, 4, exclude={1, 2})
