"""``RecDialogEnv``: the recommender-user dialogue as a PettingZoo ``ParallelEnv``.

One episode is one session of a ``DialogData`` split. Each turn ``t = 1..T`` takes two
``step`` calls, always in this order:

1. **recommender phase** (``obs["phase"] == 0``): the recommender's action is read
   (text, or a 0-based candidate position); the user's action is ignored. Rewards are 0.
2. **user phase** (``obs["phase"] == 1``): the user judges the recommendation (text, or
   ``{"action": code, "score": s}``); the recommender's action is ignored. Both agents'
   rewards for turn ``t`` are returned, and both infos carry the turn record
   (``infos[agent]["turn_record"]``, docs/CONTRACTS.md) and the agent's training mask.

Phases strictly alternate, so B episodes stepped in lock-step always wait for the same
agent (``coars_env.vector``). When the recommender's reply was a format failure there is
nothing to judge: the user phase still happens, but the user's observation has
``recommended[t-1] == -1`` and empty ``messages``, ``acting_agent`` is None, and the
user's action is ignored. The episode ends on a click (``terminations`` True for both)
or after turn ``T`` (``truncations`` True for both); the last observation keeps
``phase == 1`` and the last turn number, with every response filled in.

Observation (per agent, ``gymnasium.spaces.Dict``; the same structured part for both):
``phase`` Discrete(2), ``turn`` Discrete(T, start=1), ``history`` int64[W] (dense items,
oldest first, right-padded -1), ``candidates`` int64[C], ``recommended`` int64[T]
(candidate position per turn, -1 = none yet / format failure), ``responses`` int64[T]
(action codes, -1 = none), ``scores`` float32[T] (0 where no response), ``peer``
float32[3] = (q_t, n_peers_liked, n_peers_disliked) of the current recommendation in the
user phase (zeros otherwise), and ``messages``: the acting agent's chat prompt as a tuple
of ``{"role", "content"}`` dicts (empty for the other agent, and always empty with
``EnvConfig.render_prompts=False``: scripted agents then never pay for string
building; ``env.messages(agent)`` renders on demand). The two agents' observations of
one step share their numpy arrays (fresh ones every step): copy before writing into them.

Seeding: ``reset(seed=s)`` reseeds ``env.np_random``; ``reset()`` without a seed continues
its stream (seeded from OS entropy if never seeded). The session is
``options["session_id"]`` when given, else drawn uniformly from ``np_random``; nothing
else in the env is random, so an episode is a function of (seed, actions).
``options["episode_id"]`` sets the turn records' ``episode_id`` (default: the number of
earlier resets of this env). Other option keys are ignored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import logger, spaces
from gymnasium.utils import seeding
from pettingzoo import ParallelEnv

from coars_env.data.common import DialogData, Session, peer_score
from coars_env.dialog import parsing, prompts
from coars_env.dialog.config import EnvConfig
from coars_env.dialog.rewards import CLICK, turn_outcome

RECOMMENDER = "recommender"
USER = "user"
TURN_RECORD_KEY = "turn_record"  # infos[agent][TURN_RECORD_KEY] after each user phase
N_ACTIONS = len(parsing.ACTION_NAMES)
_PEER_CACHE_SIZE = 1_000_000  # (session, position) entries before the memo is cleared


class RecDialogEnv(ParallelEnv):
    """Recommender and user LLM agents talking about one recommendation session.

    Args:
        data: one split's sessions, item texts and peer opinions.
        config: the env's knobs (``EnvConfig``); ``overrides`` replace single fields,
            e.g. ``RecDialogEnv(data, max_turns=3, render_prompts=False)``.
        render_mode: None or ``"ansi"`` (``render()`` returns a text transcript).
    """

    metadata = {"name": "recdialog_v0", "render_modes": ["ansi"], "is_parallelizable": True}

    def __init__(
        self,
        data: DialogData,
        config: EnvConfig | None = None,
        *,
        render_mode: str | None = None,
        **overrides: Any,
    ):
        config = config or EnvConfig()
        if overrides:
            config = config.replace(**overrides)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}")
        if not data.sessions:
            raise ValueError(f"DialogData {data.name}/{data.split} has no sessions")
        n_cands = {len(s.candidates) for s in data.sessions}
        if len(n_cands) != 1:
            raise ValueError(f"all sessions need the same number of candidates, got {n_cands}")

        self.data = data
        self.config = config
        self.render_mode = render_mode
        self.possible_agents = [RECOMMENDER, USER]
        self.agents: list[str] = []
        self.n_candidates: int = n_cands.pop()
        self.history_len: int = max(1, max(len(s.history) for s in data.sessions))
        self.max_turns: int = config.max_turns
        self.n_items: int = len(data.items)

        self.catalog = prompts.Catalog(data.items, max_summary_chars=config.max_summary_chars)
        self.item_noun: str = config.item_noun or prompts.item_noun_for(data.name)
        instructions = [config.rec_instruction, config.user_instruction]
        texts = [*self.catalog.texts(), self.item_noun, *instructions]
        self.charset: frozenset[str] = prompts.build_charset(texts)

        # Spaces are built once: PettingZoo wants the same object at every call.
        self._observation_spaces = {a: self._make_observation_space() for a in self.possible_agents}
        self._action_spaces = {
            a: spaces.Text(config.max_action_chars, min_length=0, charset=self.charset)
            for a in self.possible_agents
        }

        self._peer_cache: dict[tuple[int, int], tuple[float, int, int]] = {}
        self.np_random: np.random.Generator | None = None
        self.np_random_seed: int | None = None
        self._n_resets = 0
        self._session: Session | None = None

    # ------------------------------------------------------------------ spaces

    def _make_observation_space(self) -> spaces.Dict:
        T, C, W, K = self.max_turns, self.n_candidates, self.history_len, self.data.peer_k
        # User messages are shortened to max_prompt_chars; system messages are fixed texts.
        longest_system = max(
            len(prompts.recommender_system(C, T, self.item_noun, self.config.rec_instruction)),
            len(prompts.user_system(self.item_noun, True, self.config.user_instruction)),
        )
        max_chars = max(self.config.max_prompt_chars, longest_system)
        text = spaces.Text(max_chars, min_length=0, charset=self.charset)
        role = spaces.Text(16, min_length=1, charset="abcdefghijklmnopqrstuvwxyz")
        return spaces.Dict(
            {
                "phase": spaces.Discrete(2),
                "turn": spaces.Discrete(T, start=1),
                "history": spaces.Box(-1, self.n_items - 1, (W,), np.int64),
                "candidates": spaces.Box(0, self.n_items - 1, (C,), np.int64),
                "recommended": spaces.Box(-1, C - 1, (T,), np.int64),
                "responses": spaces.Box(-1, N_ACTIONS - 1, (T,), np.int64),
                "scores": spaces.Box(0.0, 1.0, (T,), np.float32),
                "peer": spaces.Box(
                    np.array([-1.0, 0.0, 0.0], np.float32),
                    np.array([1.0, K, K], np.float32),
                    dtype=np.float32,
                ),
                # A chat prompt is a list of {"role", "content"} messages; Sequence of Dict
                # keeps that shape (the LLM layer passes it to apply_chat_template as is)
                # and passes gymnasium's checks, unlike a plain Python list. Its values
                # are tuples; the Text charset is BASE_CHARSET + every item-text char.
                "messages": spaces.Sequence(spaces.Dict({"role": role, "content": text})),
            }
        )

    def observation_space(self, agent: str) -> spaces.Dict:
        return self._observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Text:
        """Text replies. Structured forms are accepted too (not part of the space):
        an ``int`` position for the recommender, ``{"action", "score"}`` for the user."""
        return self._action_spaces[agent]

    # ------------------------------------------------------------------ reset / step

    def reset(
        self, seed: int | None = None, options: dict | None = None
    ) -> tuple[dict[str, dict], dict[str, dict]]:
        if seed is not None or self.np_random is None:
            self.np_random, self.np_random_seed = seeding.np_random(seed)
        options = options or {}
        sessions = self.data.sessions
        if options.get("session_id") is not None:
            session_id = int(options["session_id"])
            if not 0 <= session_id < len(sessions):
                raise ValueError(f"session_id {session_id} not in [0, {len(sessions)})")
        else:
            session_id = int(self.np_random.integers(len(sessions)))
        episode_id = options.get("episode_id")
        self._episode_id = int(episode_id) if episode_id is not None else self._n_resets
        self._n_resets += 1

        s = self._session = sessions[session_id]
        self._session_id = session_id
        T = self.max_turns
        self._history = np.full(self.history_len, -1, np.int64)
        self._history[: len(s.history)] = s.history
        self._candidates = np.asarray(s.candidates, np.int64)
        self._target_position = s.candidates.index(s.target)
        self._recommended = np.full(T, -1, np.int64)
        self._responses = np.full(T, -1, np.int64)
        self._scores = np.zeros(T, np.float32)
        self._peer = np.zeros(3, np.float32)
        self._candidate_titles: list[str] | None = None
        self._used_positions: set[int] = set()
        self._memory: list[prompts.MemoryTurn] = []
        self._records: list[dict[str, Any]] = []
        self._turn = 1
        self._phase = 0
        self._rec: tuple = ()  # this turn's (position, item, text, reason, flags, repeat, q, liked, disliked)
        self.agents = self.possible_agents[:]

        info: dict[str, Any] = {"session_id": session_id, "episode_id": self._episode_id}
        infos = {a: self._with_target(dict(info)) for a in self.agents}
        return self._observe(), infos

    def step(
        self, actions: dict[str, Any]
    ) -> tuple[
        dict[str, dict], dict[str, float], dict[str, bool], dict[str, bool], dict[str, dict]
    ]:
        if not self.agents:
            raise RuntimeError("step() on a finished episode: call reset() first")
        if self._phase == 0:
            return self._step_recommender(actions.get(RECOMMENDER))
        return self._step_user(actions.get(USER))

    def _step_recommender(self, reply: Any):
        s = self._session
        titles = self._titles() if isinstance(reply, str) else None
        parsed = parsing.parse_recommender(reply, self.n_candidates, titles)
        t = self._turn
        position = parsed.position
        if position is None:
            item, repeat, q, liked, disliked = -1, False, 0.0, 0, 0
        else:
            item = s.candidates[position]
            repeat = position in self._used_positions
            self._used_positions.add(position)
            q, liked, disliked = self._peer_stats(position)
            self._peer[:] = (q, liked, disliked)
            self._recommended[t - 1] = position
        text = reply if isinstance(reply, str) else ""
        self._rec = (position, item, text, parsed.reason, parsed.flags, repeat, q, liked, disliked)
        self._phase = 1

        infos: dict[str, dict] = {
            RECOMMENDER: self._with_target(
                {"format_failure": position is None, "flags": parsed.flags, "repeat": repeat}
            ),
            USER: self._with_target({}),
        }
        zero = {RECOMMENDER: 0.0, USER: 0.0}
        false = {RECOMMENDER: False, USER: False}
        return self._observe(), zero, false, dict(false), infos

    def _step_user(self, reply: Any):
        s, cfg, t = self._session, self.config, self._turn
        position, item, rec_text, rec_reason, rec_flags, repeat, q, liked, disliked = self._rec
        rec_failure = position is None
        if rec_failure:  # nothing was shown to the user: its action is ignored
            action, score, user_text, user_reason, user_flags = -1, 0.0, "", "", ()
            user_failure = False
        else:
            parsed = parsing.parse_user(reply)
            action, score, user_reason, user_flags = parsed
            user_failure = parsed.format_failure
            user_text = reply if isinstance(reply, str) else ""
        hit = (not rec_failure) and (not repeat) and item == s.target
        out = turn_outcome(
            hit=hit,
            t=t,
            action=action,
            s=score,
            q=q,
            rec_failure=rec_failure,
            repeat=repeat,
            user_failure=user_failure,
            alpha=cfg.alpha,
            gamma=cfg.gamma,
            format_penalty=cfg.format_penalty,
            exclude_miss_positive=cfg.exclude_miss_positive,
        )
        terminated = action == CLICK
        truncated = not terminated and t == self.max_turns
        self._responses[t - 1] = action
        self._scores[t - 1] = score
        self._memory.append(
            prompts.MemoryTurn(
                t,
                -1 if rec_failure else position,
                item,
                rec_reason,
                action,
                score,
                user_reason,
                repeat,
            )
        )
        record: dict[str, Any] = {
            "episode_id": self._episode_id,
            "session_id": self._session_id,
            "user": s.user,
            "turn": t,
            "rec_text": rec_text,
            "rec_position": -1 if rec_failure else position,
            "rec_item": item,
            "rec_format_failure": rec_failure,
            "repeat": repeat,
            "user_text": user_text,
            "action": action,
            "score": score,
            "user_format_failure": user_failure,
            "score_clamped": parsing.FLAG_SCORE_CLAMPED in user_flags,
            "hit": hit,
            "q": q,
            "n_peers_liked": liked,
            "n_peers_disliked": disliked,
            "reward_rec": out.reward_rec,
            "reward_user": out.reward_user,
            "mask_rec": out.mask_rec,
            "mask_user": out.mask_user,
            "terminated": terminated,
            "truncated": truncated,
            # Added to the contract's schema: the parser's flags, for failure analysis.
            "rec_flags": rec_flags,
            "user_flags": user_flags,
        }
        if cfg.reveal_target:
            record["target"] = s.target
        self._records.append(record)

        if terminated or truncated:
            self.agents = []
        else:
            self._turn += 1
            self._phase = 0
            self._peer[:] = 0.0
        infos = {
            RECOMMENDER: self._with_target({TURN_RECORD_KEY: record, "mask": out.mask_rec}),
            USER: self._with_target(
                {
                    TURN_RECORD_KEY: record,
                    "mask": out.mask_user,
                    "format_failure": user_failure,
                    "flags": user_flags,
                }
            ),
        }
        rewards = {RECOMMENDER: out.reward_rec, USER: out.reward_user}
        terms = {RECOMMENDER: terminated, USER: terminated}
        truncs = {RECOMMENDER: truncated, USER: truncated}
        return self._observe(), rewards, terms, truncs, infos

    # ------------------------------------------------------------------ observations

    @property
    def acting_agent(self) -> str | None:
        """The agent whose reply the next ``step`` reads; None when done, or in a user phase
        after a recommender format failure (nothing to judge)."""
        if not self.agents:
            return None
        if self._phase == 0:
            return RECOMMENDER
        return USER if self._rec[0] is not None else None

    @property
    def turn(self) -> int:
        return self._turn

    @property
    def phase(self) -> int:
        return self._phase

    @property
    def session(self) -> Session | None:
        """The current session (it holds the target: for training code, not for agents)."""
        return self._session

    @property
    def turn_records(self) -> list[dict[str, Any]]:
        """This episode's turn records so far (the dicts given in the infos)."""
        return self._records

    def _observe(self) -> dict[str, dict]:
        # Both agents see the same structured part: the arrays are copied once per step and
        # shared by the two dicts (copying per agent doubled the cost of a step).
        structured = {
            "phase": self._phase,
            "turn": self._turn,
            "history": self._history.copy(),
            "candidates": self._candidates.copy(),
            "recommended": self._recommended.copy(),
            "responses": self._responses.copy(),
            "scores": self._scores.copy(),
            "peer": self._peer.copy(),
        }
        acting = self.acting_agent if self.config.render_prompts else None
        return {
            a: {**structured, "messages": tuple(self.messages(a)) if acting == a else ()}
            for a in self.possible_agents
        }

    def messages(
        self,
        agent: str | None = None,
        *,
        max_history: int | None = None,
        max_memory_turns: int | None = None,
        max_chars: int | None = None,
    ) -> list[dict[str, str]]:
        """Render ``agent``'s chat prompt for the current step (``[]`` if it doesn't act).

        ``agent`` defaults to ``acting_agent``. The limits default to the config's
        (``max_history_items``, ``max_memory_turns``, ``max_prompt_chars``); see
        ``prompts`` for the shortening rule.
        """
        agent = agent or self.acting_agent
        if agent is None or agent != self.acting_agent:
            return []
        cfg, s = self.config, self._session
        limits = {
            "max_history": cfg.max_history_items if max_history is None else max_history,
            "max_memory_turns": cfg.max_memory_turns
            if max_memory_turns is None
            else max_memory_turns,
            "max_chars": cfg.max_prompt_chars if max_chars is None else max_chars,
            "max_reason_chars": cfg.max_rationale_chars,
            "charset": self.charset,
            "item_noun": self.item_noun,
        }
        if agent == RECOMMENDER:
            hint = None
            if cfg.sasrec_hint and s.sasrec_top1 in s.candidates:
                hint = s.candidates.index(s.sasrec_top1)
            return prompts.recommender_messages(
                self.catalog,
                history=s.history,
                candidates=s.candidates,
                memory=self._memory,
                turn=self._turn,
                max_turns=self.max_turns,
                hint_position=hint,
                instruction=cfg.rec_instruction,
                candidate_numbers=cfg.candidate_numbers,
                **limits,
            )
        position, item, _, reason, _, _, _, liked, disliked = self._rec
        return prompts.user_messages(
            self.catalog,
            history=s.history,
            memory=self._memory,
            turn=self._turn,
            max_turns=self.max_turns,
            item=item,
            rec_reason=reason,
            peers=(liked, disliked) if cfg.peer_opinions_in_prompt else None,
            instruction=cfg.user_instruction,
            **limits,
        )

    def _peer_stats(self, position: int) -> tuple[float, int, int]:
        """(q_t, n_liked, n_disliked) of candidate ``position`` in this session, memoised:
        scanning ~50 peers per recommendation would dominate the step time."""
        key = (self._session_id, position)
        stats = self._peer_cache.get(key)
        if stats is None:
            opinions = self.data.peer_opinions(
                self._session.peers, self._session.candidates[position]
            )
            liked = sum(1 for _, _, o in opinions if o > 0)
            stats = (peer_score(opinions), liked, len(opinions) - liked)
            if len(self._peer_cache) >= _PEER_CACHE_SIZE:
                self._peer_cache.clear()
            self._peer_cache[key] = stats
        return stats

    def _titles(self) -> list[str]:
        if self._candidate_titles is None:
            self._candidate_titles = [self.catalog.titles[i] for i in self._session.candidates]
        return self._candidate_titles

    def _with_target(self, info: dict[str, Any]) -> dict[str, Any]:
        if self.config.reveal_target:
            info["target"] = self._session.target
            info["target_position"] = self._target_position
        return info

    # ------------------------------------------------------------------ render / close

    def render(self) -> str | None:
        """A text transcript of the current episode (``render_mode="ansi"``)."""
        if self.render_mode is None:
            logger.warn("render() called without a render_mode; use render_mode='ansi'")
            return None
        if self._session is None:
            return ""
        lines = [
            f"session {self._session_id} (user {self._session.user}), episode {self._episode_id}"
        ]
        for r in self._records:
            if r["rec_format_failure"]:
                rec = "recommender: format failure"
            else:
                rec = f"recommender: [{r['rec_position'] + 1}] {self.catalog.title(r['rec_item'])}"
                if r["repeat"]:
                    rec += " (repeat)"
            line = f"turn {r['turn']}: {rec}"
            if r["action"] >= 0:
                line += f" | user: {parsing.ACTION_NAMES[r['action']]} {r['score']:.2f}"
                if r["user_format_failure"]:
                    line += " (format failure)"
            line += f" | rewards {r['reward_rec']:+.4f} / {r['reward_user']:+.4f}"
            lines.append(line)
        if self.agents:
            lines.append(f"turn {self._turn}: waiting for {self.acting_agent or 'nobody'}")
        return "\n".join(lines)

    def close(self) -> None:
        pass
