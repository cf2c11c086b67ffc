"""Constrained decoding: answer templates compiled to per-step token masks.

Small models on a CPU rarely follow an answer format by themselves. A :class:`Template` is a
sequence of segments:

- :class:`Literal` ``(text)``: forced text (e.g. ``"Item:"``);
- :class:`Choice` ``(options)``: exactly one of a set of strings; the options may depend on
  the earlier choices (a callable ``previous_choices -> options``, e.g. the scores allowed
  after the chosen action);
- :class:`Free` ``(max_tokens, stop)``: free text with a token budget, ending at ``stop``.

How it is enforced (:class:`TemplateState`, one per sequence being generated): at each step
the state gives a boolean mask over the model's vocabulary; the sampler masks the logits with
it, and the chosen token advances the state. Literals and options are tokenised *standalone*
(``tokenizer.encode(text, add_special_tokens=False)``) and followed token by token through a
token trie: simple and robust, at the cost of sometimes not being the tokenisation the model
would have picked in context. Two rules keep that cost low for BPE tokenizers:

- *space hand-off*: trailing spaces of a literal are moved to the front of the next
  segment, so ``"Item: " Choice(["7"])`` is decoded as ``"Item:"`` then ``" 7"``, the way
  byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2) split ``"Item: 7"``. In a
  :class:`Free` segment the first token(s) must then start with that space;
- *option ends*: when one option is a token prefix of another (``"1"`` and ``"10"``), the
  model decides: at that trie node the allowed tokens are the trie children plus the first
  tokens of whatever follows (here the next literal). A token that is both continues the
  option.

Log-probs: constraints only change which token is *sampled*; the policy still reports the log-
prob of the chosen token under the raw model distribution (temperature 1, unmasked), because
the trainer needs the raw distribution. A step where the mask allows exactly one token is
*forced*: it carries no choice, and the policy marks it in ``Generation.forced``.

Wiring the env's format constants (``coars_env.dialog.parsing``) is the rollout layer's job,
through the ``fmt`` argument of the ready-made templates, e.g.
``recommender_template(20, 48, fmt=REC_PREFIX + "{item}" + REASON_PREFIX + "{reason}")``.

Tokenizers must round-trip the literals and options (``decode(encode(s)) == s``); this is
checked, and fails for SentencePiece tokenizers that prepend a space to standalone text.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

OptionsFn = Callable[[Mapping[str, str]], Sequence[str]]
"""Options computed from the earlier choices of the same answer (name -> chosen option)."""

DEFAULT_RECOMMENDER_FORMAT = "Item: {item}\nReason: {reason}"
"""Canonical recommender answer (docs/CONTRACTS.md); the rollout layer passes the env's own."""

DEFAULT_USER_FORMAT = "Action: {action}\nScore: {score}\nReason: {reason}"
"""Canonical user answer (docs/CONTRACTS.md); the rollout layer passes the env's own."""

DEFAULT_ACTIONS = ("click", "star", "skip", "dislike")
"""User actions, in the order of their codes (CLICK=0, STAR=1, SKIP=2, DISLIKE=3)."""

DEFAULT_SCORE_INTERVALS: dict[str, tuple[float, float]] = {
    "click": (0.75, 1.0),
    "star": (0.5, 0.75),
    "skip": (0.25, 0.5),
    "dislike": (0.0, 0.25),
}
"""Score interval ``(low, high]`` of each action (``[0, 0.25]`` for dislike: a lower bound of 0
is inclusive), from METHOD.md."""


# ----------------------------------------------------------------------------------------------
# Segments and templates
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Literal:
    """Forced text. Every token of it is a forced step."""

    text: str


@dataclass(frozen=True)
class Choice:
    """Exactly one string out of ``options``.

    Attributes:
        options: the allowed strings, or a callable from the earlier choices
            (``{name: option}``) to them.
        name: key of the chosen option in ``TemplateState.fields`` and in the mapping passed to
            later callables; defaults to ``"_<segment index>"``.
    """

    options: Sequence[str] | OptionsFn
    name: str | None = None


@dataclass(frozen=True)
class Free:
    """Free text of at most ``max_tokens`` tokens, ending at ``stop``.

    Inside a free segment, special tokens are banned (EOS too, except in the last segment of
    a template, where it ends the answer), and so are tokens that contain ``stop`` anywhere
    but at their end: the segment text then ends exactly with ``stop``, which belongs to the
    generated text (a following :class:`Literal` should not repeat it). A ``stop`` that spans
    several tokens is detected on the text, and may then be followed by a few characters of
    its last token.

    Attributes:
        max_tokens: token budget; reaching it ends the segment (not an error).
        stop: text that ends the segment; ``None`` for none (budget or EOS only).
        name: key of the text in ``TemplateState.fields``; defaults to ``"_<segment index>"``.
    """

    max_tokens: int
    stop: str | None = "\n"
    name: str | None = None


Segment = Literal | Choice | Free


@dataclass(frozen=True)
class Template:
    """A sequence of segments that an answer must follow.

    Build one directly (``Template((Literal("Item:"), Choice(...), ...))``) or from a
    format string with :meth:`from_format`.
    """

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a template needs at least one segment")
        names = [s.name for s in self.segments if isinstance(s, Choice | Free) and s.name]
        if len(names) != len(set(names)):
            raise ValueError(f"duplicate segment names in {names}")

    @classmethod
    def from_format(cls, fmt: str, **fields: Choice | Free) -> Template:
        """A template from a ``str.format``-style string whose named fields are segments.

        ``Template.from_format("Item: {item}\\nReason: {reason}", item=Choice(...),
        reason=Free(48))``. The keyword name becomes the segment's ``name``.
        """
        segments: list[Segment] = []
        for literal, name, _, _ in string.Formatter().parse(fmt):
            if literal and segments and isinstance(segments[-1], Literal):
                segments[-1] = Literal(segments[-1].text + literal)  # "{{" splits literals
            elif literal:
                segments.append(Literal(literal))
            if name is None:
                continue
            if name not in fields:
                raise KeyError(f"format field {{{name}}} has no segment; got {sorted(fields)}")
            seg = fields[name]
            segments.append(
                Choice(seg.options, name)
                if isinstance(seg, Choice)
                else Free(seg.max_tokens, seg.stop, name)
            )
        return cls(tuple(segments))


def recommender_template(
    n_candidates: int = 20,
    reason_tokens: int = 48,
    *,
    fmt: str = DEFAULT_RECOMMENDER_FORMAT,
    reason_stop: str | None = "\n",
    exclude: Collection[int] = (),
) -> Template:
    """``"Item: " Choice("1".."n") "\\nReason: " Free(reason_tokens)``.

    ``fmt`` must have the fields ``{item}`` and ``{reason}``; fields: ``item`` (the 1-based
    candidate number as a string) and ``reason``. ``exclude``: 1-based numbers not offered
    (e.g. the candidates already recommended in the session); at least one must remain.
    """
    excluded = set(exclude)
    items = [str(i) for i in range(1, n_candidates + 1) if i not in excluded]
    if not items:
        raise ValueError(f"exclude={sorted(exclude)} leaves no candidate of {n_candidates}")
    return Template.from_format(
        fmt, item=Choice(items), reason=Free(reason_tokens, stop=reason_stop)
    )


def score_choices(
    intervals: Mapping[str, tuple[float, float]] = DEFAULT_SCORE_INTERVALS,
    step: float = 0.05,
) -> dict[str, tuple[str, ...]]:
    """The grid ``0, step, ..., 1`` split by action interval, formatted with 2 decimals.

    An interval ``(low, high)`` holds ``low < v <= high`` (``0 <= v`` when ``low == 0``).
    Defaults: click 0.80..1.00, star 0.55..0.75, skip 0.30..0.50, dislike 0.00..0.25.
    """
    grid = [round(k * step, 6) for k in range(int(round(1.0 / step)) + 1)]
    out = {}
    for action, (low, high) in intervals.items():
        values = [v for v in grid if (low < v or low == v == 0.0) and v <= high]
        if not values:
            raise ValueError(f"no score of step {step} in the interval of {action!r}")
        out[action] = tuple(f"{v:.2f}" for v in values)
    return out


def user_template(
    reason_tokens: int = 48,
    *,
    fmt: str = DEFAULT_USER_FORMAT,
    actions: Sequence[str] = DEFAULT_ACTIONS,
    scores: Mapping[str, Sequence[str]] | None = None,
    reason_stop: str | None = "\n",
) -> Template:
    """``"Action: " Choice(actions) "\\nScore: " Choice(scores of that action) "\\nReason: " Free``.

    ``fmt`` must have the fields ``{action}``, ``{score}`` and ``{reason}``. ``scores`` maps
    each action to its allowed score strings (default :func:`score_choices`), so the score is
    always consistent with the action.
    """
    table = dict(scores) if scores is not None else score_choices()
    missing = [a for a in actions if a not in table]
    if missing:
        raise ValueError(f"no scores for actions {missing}")

    def scores_for(previous: Mapping[str, str]) -> Sequence[str]:
        return table[previous["action"]]

    return Template.from_format(
        fmt,
        action=Choice(list(actions)),
        score=Choice(scores_for),
        reason=Free(reason_tokens, stop=reason_stop),
    )


# ----------------------------------------------------------------------------------------------
# Vocabulary view
# ----------------------------------------------------------------------------------------------


class TokenVocab:
    """What the masks need to know about a tokenizer, computed once per policy.

    Args:
        tokenizer: the policy's tokenizer.
        n_logits: size of the model's output layer (may exceed ``len(tokenizer)``: ids beyond
            the tokenizer are padding rows, always banned).
        eos_ids: ids that end a sequence.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, n_logits: int, eos_ids: Sequence[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.n_logits = n_logits
        # Ids outside the output layer (e.g. -1: "never stop") cannot be sampled: drop them.
        self.eos_ids = tuple(i for i in eos_ids if 0 <= i < n_logits)
        n = min(len(tokenizer), n_logits)
        # Text of each token in context: decode it after an anchor token and strip the anchor,
        # since SentencePiece-style decoders drop a leading space at the start of a sequence.
        anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
        anchor_text = tokenizer.decode(anchor)
        decoded = tokenizer.batch_decode([anchor + [i] for i in range(n)])
        self.texts: list[str] = [d[len(anchor_text) :] for d in decoded]
        self.special = torch.zeros(n_logits, dtype=torch.bool)
        self.special[n:] = True
        self.special[[i for i in tokenizer.all_special_ids if i < n_logits]] = True
        self.special[list(self.eos_ids)] = True
        self._encode_cache: dict[str, tuple[int, ...]] = {}
        self._free_cache: dict[tuple, torch.Tensor] = {}
        self._trie_cache: dict[tuple, _TrieNode] = {}

    def encode(self, text: str) -> tuple[int, ...]:
        """Standalone tokenisation of ``text``; raises if it does not decode back to ``text``."""
        if text not in self._encode_cache:
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            if not ids or self.tokenizer.decode(list(ids)) != text:
                raise ValueError(
                    f"{text!r} does not round-trip through the tokenizer; "
                    "constrained decoding needs literals and options that do"
                )
            self._encode_cache[text] = ids
        return self._encode_cache[text]

    def mask_of(self, ids: Sequence[int]) -> torch.Tensor:
        """A boolean mask over the vocabulary that allows exactly ``ids``."""
        mask = torch.zeros(self.n_logits, dtype=torch.bool)
        mask[list(ids)] = True
        return mask

    def free_mask(self, stop: str | None, prefix: str, allow_eos: bool) -> torch.Tensor:
        """Tokens allowed in a free segment (see :class:`Free`); ``prefix``: text the next
        token(s) must start with (space hand-off)."""
        key = (stop, prefix, allow_eos)
        if key not in self._free_cache:
            special = self.special.tolist()
            ok = [
                not special[i] and _free_token_ok(text, stop, prefix)
                for i, text in enumerate(self.texts)
            ]
            mask = torch.zeros(self.n_logits, dtype=torch.bool)
            mask[: len(ok)] = torch.tensor(ok, dtype=torch.bool)
            if allow_eos:
                mask[list(self.eos_ids)] = True
            self._free_cache[key] = mask
        return self._free_cache[key]

    def trie(self, prefix: str, options: tuple[str, ...]) -> _TrieNode:
        """Token trie of ``prefix + option`` for each option."""
        key = (prefix, options)
        if key not in self._trie_cache:
            if not options:
                raise ValueError("a choice needs at least one option")
            root = _TrieNode()
            for option in options:
                if not option:
                    raise ValueError("choice options must be non-empty")
                node = root
                for tok in self.encode(prefix + option):
                    node = node.children.setdefault(tok, _TrieNode())
                if node.option is not None:
                    raise ValueError(f"duplicate option {option!r}")
                node.option = option
            self._trie_cache[key] = root
        return self._trie_cache[key]


def _free_token_ok(text: str, stop: str | None, prefix: str) -> bool:
    if not text:  # tokens that decode to nothing carry no text: ban them
        return False
    if stop and stop in text and text.find(stop) != len(text) - len(stop):
        return False  # the stop string may only end a token
    return not prefix or text.startswith(prefix) or prefix.startswith(text)


@dataclass
class _TrieNode:
    children: dict[int, _TrieNode] = field(default_factory=dict)
    option: str | None = None  # set where an option ends


# ----------------------------------------------------------------------------------------------
# Compiled template and per-sequence state
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """A normalised segment: ``prefix`` is the handed-off text the segment must start with."""

    seg: Segment
    name: str
    prefix: str = ""
    tokens: tuple[int, ...] = ()  # literal tokens


def compile_template(template: Template, vocab: TokenVocab) -> tuple[_Step, ...]:
    """Merge adjacent literals, hand trailing spaces of literals to the next segment and
    tokenise the literals."""
    merged: list[Segment] = []
    for seg in template.segments:
        if isinstance(seg, Literal) and merged and isinstance(merged[-1], Literal):
            merged[-1] = Literal(merged[-1].text + seg.text)
        elif not (isinstance(seg, Literal) and not seg.text):
            merged.append(seg)
    steps: list[_Step] = []
    prefix = ""
    for i, seg in enumerate(merged):
        name = f"_{i}" if isinstance(seg, Literal) or seg.name is None else seg.name
        if isinstance(seg, Literal):
            text = prefix + seg.text
            prefix = ""
            if i + 1 < len(merged):  # hand trailing spaces to the following choice/free text
                stripped = text.rstrip(" ")
                prefix, text = text[len(stripped) :], stripped
            if text:
                steps.append(_Step(seg, name, tokens=vocab.encode(text)))
        else:
            if isinstance(seg, Free) and seg.max_tokens < 1:
                raise ValueError("Free.max_tokens must be >= 1")
            steps.append(_Step(seg, name, prefix=prefix))
            prefix = ""
    return tuple(steps)


class TemplateState:
    """Where one sequence stands in a template: gives the allowed tokens, takes the chosen one.

    Usage (what ``LLMPolicy.generate`` does per row and step)::

        state = TemplateState(template, vocab)
        while not state.done:
            mask = state.allowed()        # bool[n_logits]
            token = sample(logits, mask)
            state.advance(token)

    After it is done, ``fields`` maps every choice/free segment name to its text (choices: the
    option string; free text: without the handed-off leading space and the stop string) and
    ``ended_by`` says how the last segment ended: ``"complete"``, ``"stop"``, ``"budget"`` or
    ``"eos"``.
    """

    def __init__(self, template: Template, vocab: TokenVocab) -> None:
        self.vocab = vocab
        self.steps = compile_template(template, vocab)
        self.fields: dict[str, str] = {}
        self.done = False
        self.ended_by: str | None = None
        self._enter(0)

    # -- segment entry -------------------------------------------------------------------------

    def _enter(self, index: int) -> None:
        self.index = index
        if index == len(self.steps):
            self.done = True
            self.ended_by = self.ended_by or "complete"
            return
        step = self.steps[index]
        seg = step.seg
        self.pos = 0  # literal position
        if isinstance(seg, Choice):
            self.node = self._trie(index, self.fields)
        elif isinstance(seg, Free):
            self.pending = step.prefix  # handed-off text still to produce
            self.free_ids: list[int] = []
            self.free_text = ""

    def _trie(self, index: int, choices: Mapping[str, str]) -> _TrieNode:
        step = self.steps[index]
        seg = step.seg
        assert isinstance(seg, Choice)
        options = seg.options(dict(choices)) if callable(seg.options) else seg.options
        return self.vocab.trie(step.prefix, tuple(options))

    def _start_mask(self, index: int, choices: Mapping[str, str]) -> torch.Tensor:
        """Tokens that may start segment ``index`` (used to end an option that is a prefix of
        another one)."""
        if index == len(self.steps):
            return self.vocab.mask_of(self.vocab.eos_ids)
        step = self.steps[index]
        if isinstance(step.seg, Literal):
            return self.vocab.mask_of(step.tokens[:1])
        if isinstance(step.seg, Choice):
            return self.vocab.mask_of(self._trie(index, choices).children)
        return self.vocab.free_mask(step.seg.stop, step.prefix, allow_eos=False)

    def _is_last(self) -> bool:
        return self.index == len(self.steps) - 1

    # -- stepping ------------------------------------------------------------------------------

    def literal_run(self) -> tuple[int, ...]:
        """The tokens forced next, in order: the rest of the current literal, unless that
        literal ends the template (so consuming the run never completes it). Empty anywhere
        else. A decoder may feed the run in one forward pass instead of one pass per token."""
        if self.done or self._is_last():
            return ()
        step = self.steps[self.index]
        return step.tokens[self.pos :] if isinstance(step.seg, Literal) else ()

    def allowed(self) -> torch.Tensor:
        """Boolean mask (``n_logits``,) of the tokens allowed next."""
        if self.done:
            raise RuntimeError("template already complete")
        step = self.steps[self.index]
        seg = step.seg
        if isinstance(seg, Literal):
            return self.vocab.mask_of(step.tokens[self.pos : self.pos + 1])
        if isinstance(seg, Choice):
            mask = self.vocab.mask_of(self.node.children)
            if self.node.option is not None:  # an option may end here: let the model decide
                choices = {**self.fields, step.name: self.node.option}
                mask = mask | self._start_mask(self.index + 1, choices)
            return mask
        allow_eos = self._is_last() and len(self.free_ids) > 0
        return self.vocab.free_mask(seg.stop, self.pending, allow_eos)

    def advance(self, token: int) -> None:
        """Consume the chosen ``token`` (must be allowed)."""
        if self.done:
            raise RuntimeError("template already complete")
        step = self.steps[self.index]
        seg = step.seg
        if isinstance(seg, Literal):
            if token != step.tokens[self.pos]:
                raise ValueError(f"token {token} is not the forced literal token")
            self.pos += 1
            if self.pos == len(step.tokens):
                self._enter(self.index + 1)
        elif isinstance(seg, Choice):
            if token in self.node.children:
                self.node = self.node.children[token]
                if self.node.option is not None and not self.node.children:
                    self.fields[step.name] = self.node.option
                    self._enter(self.index + 1)
            elif self.node.option is not None:
                # The option ended at the previous token; `token` starts the next segment.
                self.fields[step.name] = self.node.option
                self._enter(self.index + 1)
                if self.done:
                    if token not in self.vocab.eos_ids:
                        raise ValueError(f"token {token} is not allowed after the template")
                    self.ended_by = "eos"
                else:
                    self.advance(token)
            else:
                raise ValueError(f"token {token} is not allowed in choice {step.name!r}")
        else:
            self._advance_free(step, seg, token)

    def _advance_free(self, step: _Step, seg: Free, token: int) -> None:
        if token in self.vocab.eos_ids:
            if not self._is_last():
                raise ValueError("EOS is only allowed in the last free segment")
            self._finish_free(step, seg, "eos")
            return
        self.free_ids.append(token)
        text = self.vocab.texts[token] if token < len(self.vocab.texts) else ""
        if self.pending:
            self.pending = self.pending[len(text) :] if self.pending.startswith(text) else ""
        self.free_text += text
        if seg.stop and seg.stop in self.free_text[len(step.prefix) :]:
            self._finish_free(step, seg, "stop")
        elif len(self.free_ids) >= seg.max_tokens:
            self._finish_free(step, seg, "budget")

    def _finish_free(self, step: _Step, seg: Free, how: str) -> None:
        text = self.vocab.tokenizer.decode(self.free_ids, skip_special_tokens=True)
        if step.prefix and text.startswith(step.prefix):
            text = text[len(step.prefix) :]
        if seg.stop and seg.stop in text:
            text = text[: text.index(seg.stop)]
        self.fields[step.name] = text
        if self._is_last():
            self.ended_by = how
        self._enter(self.index + 1)

    def trim(self, text: str) -> str:
        """The full answer text without the stop string that ended the last free segment."""
        if self.ended_by == "stop":
            seg = self.steps[-1].seg
            assert isinstance(seg, Free) and seg.stop
            cut = text.rfind(seg.stop)
            if cut >= 0:
                return text[:cut]
        return text


# ----------------------------------------------------------------------------------------------
# The exact distribution over a choice's options
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceDecision:
    """One sampling step with more than one allowed token, on the way to an option.

    Attributes:
        path: the choice's tokens already emitted (which trie node the step is at).
        allowed: bool[n_logits], the tokens the constraint allows at that step.
        taken: bool[n_logits], the allowed tokens that lead to the option: one child token,
            or (where the option may end and a longer option continues) the tokens that start
            the next segment.
    """

    path: tuple[int, ...]
    allowed: torch.Tensor
    taken: torch.Tensor


def choice_decisions(
    template: Template, vocab: TokenVocab, name: str
) -> tuple[tuple[int, ...], dict[str, list[ChoiceDecision]]]:
    """How constrained decoding of ``template`` arrives at each option of the choice ``name``.

    Returns the forced tokens before the choice (only literals may precede it) and, per
    option, its decisions in order. Steps with a single allowed token are left out: they
    have probability 1 under the constraint. The probability of an option is the product
    over its decisions of ``p(taken) / p(allowed)`` under the sampling distribution, which is
    what :meth:`coars_agents.policy.LLMPolicy.choice_probabilities` computes.
    """
    if not any(isinstance(s, Choice) and s.name == name for s in template.segments):
        raise ValueError(f"the template has no choice named {name!r}")
    state = TemplateState(template, vocab)
    prefix: list[int] = []
    while True:
        step = state.steps[state.index]
        if isinstance(step.seg, Choice) and step.name == name:
            break
        if not isinstance(step.seg, Literal):
            raise ValueError(f"only literals may precede the choice {name!r} in the template")
        token = step.tokens[state.pos]
        prefix.append(token)
        state.advance(token)
    index = state.index
    decisions: dict[str, list[ChoiceDecision]] = {}

    def walk(node: _TrieNode, path: tuple[int, ...], before: list[ChoiceDecision]) -> None:
        children = vocab.mask_of(list(node.children))
        end = torch.zeros_like(children)
        if node.option is not None and node.children:
            # The option may end here: the next segment's first tokens end it, unless they
            # also continue a longer option (TemplateState.advance prefers continuing).
            following = state._start_mask(index + 1, {**state.fields, name: node.option})
            end = following & ~children
        allowed = children | end
        branching = int(allowed.sum()) > 1
        if node.option is not None:
            # With children, ending is a decision (of probability 0 if no token ends it).
            ending = [ChoiceDecision(path, allowed, end)] if node.children else []
            decisions[node.option] = before + ending
        for token, child in node.children.items():
            step = [ChoiceDecision(path, allowed, vocab.mask_of([token]))] if branching else []
            walk(child, (*path, token), before + step)

    walk(state.node, (), [])
    return tuple(prefix), decisions
