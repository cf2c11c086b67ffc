"""One dataclass for every knob of the RecDialog environment.

Defaults follow ``METHOD.md``; choices the paper leaves open are marked *(ours)* there and
are configurable here. ``coars_env.make(env_id, **overrides)`` accepts any field name below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

ExcludeMissPositive = Literal["user", "both", "none"]
CandidateNumbers = Literal["first", "last"]


@dataclass(frozen=True)
class EnvConfig:
    """Configuration of ``RecDialogEnv`` (rewards, masks, prompts, space sizes)."""

    # --- dialogue -------------------------------------------------------------------------
    max_turns: int = 5
    """T: the session is truncated after this many turns (a click terminates it earlier)."""

    # --- rewards (METHOD.md, "Interaction reward") ----------------------------------------
    alpha: float = 0.1
    """Weight of the peer term in ``R_user = (2hit-1)(2s-1)(1 - alpha*q*(2s-1))``."""

    gamma: float = 0.9
    """Stage factor ``D_t = gamma**(t-1)`` for hits, 1 for misses (ours); 1.0 disables it."""

    format_penalty: float = -0.5
    """Added (so it must be <= 0) to the reward of the agent whose reply was a format
    failure, and to the recommender's reward on a repeat. No mask removes it: a turn that
    carries it always has that agent's mask = 1 (ours)."""

    exclude_miss_positive: ExcludeMissPositive = "user"
    """Who loses the turns where the recommendation missed but the user responded
    positively (star or click): ``"user"`` masks them for the user agent only (METHOD.md
    default); ``"both"`` masks them for the recommender too; ``"none"`` masks them for
    neither, so the user agent's accepted misses carry their (negative) reward (an ablation
    of the mask, ours)."""

    # --- what the agents and the infos see ------------------------------------------------
    reveal_target: bool = False
    """Put the target (``target`` item, ``target_position``) in every info dict, e.g. for
    hindsight references at training time. Never put in observations."""

    sasrec_hint: bool = False
    """Show SASRec's top-1 candidate to the recommender as a hint (as AFL does)."""

    peer_opinions_in_prompt: bool = True
    """Tell the user agent how many similar users liked / disliked the recommended item."""

    render_prompts: bool = True
    """Render the chat prompt into the acting agent's ``messages`` observation at every
    step. Scripted agents that read only the structured keys should set False: stepping
    then never builds a string (``env.messages(agent)`` still renders on demand)."""

    item_noun: str = ""
    """What items are called in prompts ("movie", "artist"); "" = from the dataset name."""

    rec_instruction: str = ""
    """Extra instruction for the recommender's system message, inserted just before its
    answer format (``prompts.with_instruction``), e.g. the AFL baseline's "reflect on the
    user's feedback" step. "" (default) leaves the prompt unchanged."""

    user_instruction: str = ""
    """Extra instruction for the user agent's system message (as ``rec_instruction``), e.g.
    the AFL baseline's "judge with a rationale" step. "" (default) leaves it unchanged."""

    candidate_numbers: CandidateNumbers = "first"
    """Where each candidate's number goes in the recommender's prompt: ``"first"``
    (``3. Title (year) [genres]``, the numbered list of the paper's prompts) or ``"last"``
    (``- Title (year) [genres] = candidate 3``, ours): read left to right, the number then
    follows the item it names, so choosing by content needs one lookup instead of two. For
    comparisons of prompt formats; with SmolLM2 it made no difference in 480 supervised
    sessions (docs/results/synthetic_cpu_supervised_turn1.md, runs D and E)."""

    # --- prompt length limits (the shortening rule lives in prompts.py) -------------------
    max_history_items: int = 20
    """At most this many history items (the most recent) are shown in a prompt."""

    max_memory_turns: int = 10
    """At most this many past turns (the most recent) are shown in a prompt."""

    max_rationale_chars: int = 300
    """Each rationale kept in the dialogue memory is cut to this many characters."""

    max_summary_chars: int = 160
    """Item summaries (when the dataset has them) are cut to this many characters."""

    max_prompt_chars: int = 12_000
    """Upper bound on the length of each prompt's user message; longer ones are shortened
    (oldest history first, then oldest memory: ``prompts`` module doc). System messages are
    short fixed texts; the ``messages`` Text space allows the longer of the two."""

    # --- action spaces --------------------------------------------------------------------
    max_action_chars: int = 1_000
    """Max length of the action ``Text`` spaces (what ``sample()`` draws). Longer replies
    are still accepted: the parser reads at most ``parsing.MAX_PARSE_CHARS`` of them."""

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.format_penalty > 0.0:
            raise ValueError(
                f"format_penalty is added to the reward and must be <= 0, got {self.format_penalty}"
            )
        if self.exclude_miss_positive not in get_args(ExcludeMissPositive):
            raise ValueError(
                "exclude_miss_positive must be 'user', 'both' or 'none', got "
                f"{self.exclude_miss_positive!r}"
            )
        for name in (
            "max_history_items",
            "max_memory_turns",
            "max_rationale_chars",
            "max_summary_chars",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.candidate_numbers not in get_args(CandidateNumbers):
            raise ValueError(
                f"candidate_numbers must be 'first' or 'last', got {self.candidate_numbers!r}"
            )
        if self.max_prompt_chars < 200:
            raise ValueError(f"max_prompt_chars must be >= 200, got {self.max_prompt_chars}")
        if self.max_action_chars < 1:
            raise ValueError(f"max_action_chars must be >= 1, got {self.max_action_chars}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def replace(self, **changes: Any) -> EnvConfig:
        """A copy with ``changes``; unknown names raise ``TypeError`` listing the valid ones."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(
                f"unknown EnvConfig field(s) {unknown}; valid: {', '.join(self.field_names())}"
            )
        return EnvConfig(**{**asdict(self), **changes})
