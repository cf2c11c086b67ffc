"""Single-agent Gymnasium views of the RecDialog env: one agent learns, the other is fixed.

- ``RecommenderEnv``: the recommender is the learner; the user is a built-in
  (``"oracle"``: ``coars_env.agents.OracleUser``, the default) or any policy callable.
  One ``step`` = one turn: the learner's recommendation, then the user's reply.
- ``UserEnv``: the user is the learner; the recommender is a built-in (``"sasrec"``
  default, ``"popularity"``, ``"random"``) or any policy callable. One ``step`` = the
  learner's judgement of the current recommendation, then the recommender's next one.

The fixed agent is called with its own observation of the underlying ``RecDialogEnv``
(structured keys + ``messages``) and may answer in any form the env accepts (text or
structured). Built-ins read only the structured keys.

Two views (``numeric``):

- **text** (default): observations are the ``RecDialogEnv`` observations of the learner
  (structured keys + ``messages``, its chat prompt); actions are ``Text`` replies (a
  structured action, an ``int`` position or a ``{"action", "score"}`` dict, is
  accepted too, as by the env).
- **numeric** (``numeric=True``), for classic RL (SB3 ``MultiInputPolicy`` etc.), built
  from ``DialogData.item_features`` (F per item; padding rows are zeros):

  recommender: ``Dict(candidates=Box[C, F], history=Box[W, F],
  history_mask=MultiBinary(W), recommended=MultiBinary(C), feedback=Box[C, 5],
  turn=Discrete(T, start=1))``, where ``feedback[c]`` is the one-hot response (click,
  star, skip, dislike) to candidate ``c`` and its score in the last column (zeros if not
  recommended yet); action ``Discrete(C)``, a candidate position.

  user: ``Dict(item=Box[F], history=Box[W, F], history_mask=MultiBinary(W),
  peer=Box[3], turn=Discrete(T, start=1))``; action ``Discrete(4)`` (CLICK=0, STAR=1,
  SKIP=2, DISLIKE=3), each played with a fixed score, by default the middle of the
  action's interval (0.875, 0.625, 0.375, 0.125; ``action_scores=`` to change).

  Prompts are not rendered in the numeric view (``render_prompts=False``), unless the
  caller passes ``render_prompts=True`` for a fixed agent that reads ``messages``.

Rewards are the learner's ``reward_rec`` / ``reward_user`` of the turn (unmasked); the
info holds the turn record (``info["turn_record"]``) and the learner's training ``mask``.
``terminated`` = the user clicked, ``truncated`` = the turn limit. Infos leave out the
env's running ``episode_id`` (Gymnasium wants infos to depend on seed and actions only;
``check_env`` compares two episodes of one instance): it is ``env.unwrapped.episode_id``
and stays in the logs.

Registered ids (``register_gymnasium_envs``): ``coars/RecDialogRecommender-<data>-v0`` and
``coars/RecDialogUser-<data>-v0`` for data in ml1m, ml100k, lastfm, synthetic::

    env = gymnasium.make("coars/RecDialogRecommender-synthetic-v0", numeric=True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from coars_env.agents import (
    GenreRecommender,
    OracleUser,
    PopularityRecommender,
    RandomRecommender,
    SASRecRecommender,
)
from coars_env.data.common import DialogData
from coars_env.dialog.config import EnvConfig
from coars_env.dialog.env import RECOMMENDER, TURN_RECORD_KEY, USER, RecDialogEnv
from coars_env.dialog.parsing import ACTION_NAMES, SCORE_MIDPOINTS
from coars_env.logs import LoggingWrapper, TrajectoryLogger

Policy = Callable[[Mapping[str, Any]], Any]
N_ACTIONS = len(ACTION_NAMES)
# Default score per numeric user action: the middle of its interval.
DEFAULT_ACTION_SCORES: tuple[float, ...] = tuple(SCORE_MIDPOINTS[a] for a in range(N_ACTIONS))

GYM_NAMESPACE = "coars"
GYM_VERSION = 0


class _DialogView(gymnasium.Env):
    """What both views share: the inner env, the fixed agent, logging, numeric features."""

    metadata = {"render_modes": ["ansi"]}
    learner: str = ""

    def __init__(
        self,
        data: DialogData | None,
        env: RecDialogEnv | None,
        *,
        numeric: bool,
        logger: TrajectoryLogger | None,
        config: EnvConfig | None,
        render_mode: str | None,
        overrides: dict[str, Any],
    ) -> None:
        if (data is None) == (env is None):
            raise TypeError("give exactly one of data= (a DialogData) or env= (a RecDialogEnv)")
        if env is None:
            if numeric:
                overrides = {"render_prompts": False, **overrides}
            env = RecDialogEnv(data, config, render_mode=render_mode, **overrides)
        elif config is not None or overrides:
            raise TypeError("config / overrides only apply when building the env from data=")
        self.dialog: RecDialogEnv = env  # the RecDialogEnv itself (state, session, render)
        # Stepping goes through the logging wrapper when there is a logger.
        self._env = LoggingWrapper(env, logger) if logger is not None else env
        self.logger = logger
        self.numeric = numeric
        self.render_mode = env.render_mode
        self.data = env.data
        self.episode_id: int | None = None  # the inner env's episode_id of this episode

        feats = np.asarray(env.data.item_features, np.float32)
        self._features = feats
        # Finite bounds from the data (0 included for padding rows); all-zero features
        # (hand-built test data) get a unit range, since low == high is a degenerate Box.
        self._feature_low = float(min(feats.min(initial=0.0), 0.0))
        self._feature_high = float(max(feats.max(initial=0.0), 0.0))
        if self._feature_high == self._feature_low:
            self._feature_high = self._feature_low + 1.0
        self._history_mask = np.zeros(env.history_len, np.int8)
        self._history_features = np.zeros((env.history_len, feats.shape[1]), np.float32)

    def _feature_box(self, *shape: int) -> spaces.Box:
        return spaces.Box(
            self._feature_low, self._feature_high, (*shape, self._features.shape[1]), np.float32
        )

    def _history_spaces(self) -> dict[str, spaces.Space]:
        W = self.dialog.history_len
        return {"history": self._feature_box(W), "history_mask": spaces.MultiBinary(W)}

    def _cache_history(self, obs: Mapping[str, Any]) -> None:
        """Per-episode numeric history (the history does not change within an episode)."""
        history = np.asarray(obs["history"])
        mask = history >= 0
        self._history_mask = mask.astype(np.int8)
        self._history_features = self._features[np.maximum(history, 0)] * mask[:, None]

    def _reset_inner(self, seed: int | None, options: dict | None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        obs, infos = self._env.reset(seed=seed, options=options)
        if self.numeric:
            self._cache_history(obs[self.learner])
        return obs, infos

    def _learner_info(self, info: dict[str, Any]) -> dict[str, Any]:
        """The learner's info without the env's running episode number.

        Gymnasium requires infos to be a function of (seed, actions) (``check_env`` resets
        one instance twice with the same seed and compares them), but ``episode_id``
        counts resets. It stays in the logs and in ``self.episode_id``.
        """
        if "episode_id" in info:
            self.episode_id = int(info["episode_id"])
        info = {k: v for k, v in info.items() if k != "episode_id"}
        if TURN_RECORD_KEY in info:
            info[TURN_RECORD_KEY] = _without_episode_id(info[TURN_RECORD_KEY])
        return info

    @staticmethod
    def _reset_agent(agent: Any, seed: int | None) -> None:
        reset = getattr(agent, "reset", None)
        if callable(reset):
            reset(seed)

    def render(self) -> str | None:
        return self.dialog.render()

    def close(self) -> None:
        self._env.close()


class RecommenderEnv(_DialogView):
    """The recommender learns; the user is fixed (default: ``OracleUser``).

    Args:
        data: build a ``RecDialogEnv(data, config, **overrides)``; or
        env: use this ``RecDialogEnv`` (then no config / overrides).
        user: ``"oracle"`` (``OracleUser``, given the env's current target) or a policy
            callable on the user's observation.
        numeric: the numeric view (module doc) instead of text.
        logger: log every turn record (``coars_env.logs``).
        render_mode: None or ``"ansi"``.
    """

    learner = RECOMMENDER

    def __init__(
        self,
        data: DialogData | None = None,
        *,
        env: RecDialogEnv | None = None,
        user: str | Policy = "oracle",
        numeric: bool = False,
        logger: TrajectoryLogger | None = None,
        config: EnvConfig | None = None,
        render_mode: str | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(
            data,
            env,
            numeric=numeric,
            logger=logger,
            config=config,
            render_mode=render_mode,
            overrides=overrides,
        )
        if user == "oracle":
            user = OracleUser(self.data, target_lookup=lambda obs: self.dialog.session.target)
        elif not callable(user):
            raise ValueError(f"user must be 'oracle' or a callable policy, got {user!r}")
        self.user = user
        C, T = self.dialog.n_candidates, self.dialog.max_turns
        if numeric:
            self.observation_space = spaces.Dict(
                {
                    "candidates": self._feature_box(C),
                    **self._history_spaces(),
                    "recommended": spaces.MultiBinary(C),
                    "feedback": spaces.Box(0.0, 1.0, (C, N_ACTIONS + 1), np.float32),
                    "turn": spaces.Discrete(T, start=1),
                }
            )
            self.action_space = spaces.Discrete(C)
        else:
            self.observation_space = self.dialog.observation_space(RECOMMENDER)
            self.action_space = self.dialog.action_space(RECOMMENDER)
        self._candidate_features = np.zeros((C, self._features.shape[1]), np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        obs, infos = self._reset_inner(seed, options)
        self._reset_agent(self.user, seed)
        if self.numeric:
            self._candidate_features = self._features[np.asarray(obs[RECOMMENDER]["candidates"])]
        return self._observe(obs[RECOMMENDER]), self._learner_info(infos[RECOMMENDER])

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self.numeric:
            action = int(action)
        obs, _, _, _, _ = self._env.step({RECOMMENDER: action})
        # After a recommender format failure there is nothing to judge: the user phase
        # still runs (the env ignores the reply), so the fixed user is not asked.
        reply = self.user(obs[USER]) if self.dialog.acting_agent == USER else None
        obs, rewards, terms, truncs, infos = self._env.step({USER: reply})
        return (
            self._observe(obs[RECOMMENDER]),
            float(rewards[RECOMMENDER]),
            bool(terms[RECOMMENDER]),
            bool(truncs[RECOMMENDER]),
            self._learner_info(infos[RECOMMENDER]),
        )

    def _observe(self, obs: dict[str, Any]) -> dict[str, Any]:
        if not self.numeric:
            return obs
        C = self.dialog.n_candidates
        recommended = np.zeros(C, np.int8)
        feedback = np.zeros((C, N_ACTIONS + 1), np.float32)
        for position, action, score in zip(obs["recommended"], obs["responses"], obs["scores"]):
            if position < 0:
                continue
            recommended[position] = 1
            if action >= 0:  # later turns overwrite earlier ones (repeats)
                feedback[position] = 0.0
                feedback[position, action] = 1.0
                feedback[position, N_ACTIONS] = score
        return {
            # Copies: Gymnasium users may keep (and modify) what a step returns.
            "candidates": self._candidate_features.copy(),
            "history": self._history_features.copy(),
            "history_mask": self._history_mask.copy(),
            "recommended": recommended,
            "feedback": feedback,
            "turn": int(obs["turn"]),
        }


class UserEnv(_DialogView):
    """The user learns; the recommender is fixed (default: ``SASRecRecommender``).

    Args:
        data / env / numeric / logger / render_mode: as for ``RecommenderEnv``.
        recommender: ``"sasrec"``, ``"popularity"``, ``"genre"``, ``"random"`` (seeded by ``reset``'s
            seed) or a policy callable on the recommender's observation.
        action_scores: numeric view only: the score played with each action code.

    A fixed recommender whose reply is a format failure leaves the user nothing to judge:
    that turn is played through without the learner (its record is logged and listed in
    the next step's ``info["skipped_turn_records"]``; its user reward is 0). ``reset``
    raises ``RuntimeError`` if every turn of an episode ends that way.
    """

    learner = USER

    def __init__(
        self,
        data: DialogData | None = None,
        *,
        env: RecDialogEnv | None = None,
        recommender: str | Policy = "sasrec",
        numeric: bool = False,
        action_scores: tuple[float, ...] = DEFAULT_ACTION_SCORES,
        logger: TrajectoryLogger | None = None,
        config: EnvConfig | None = None,
        render_mode: str | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(
            data,
            env,
            numeric=numeric,
            logger=logger,
            config=config,
            render_mode=render_mode,
            overrides=overrides,
        )
        if recommender == "sasrec":
            recommender = SASRecRecommender(
                self.data, session_lookup=lambda obs: self.dialog.session
            )
        elif recommender == "popularity":
            recommender = PopularityRecommender(self.data)
        elif recommender == "genre":
            recommender = GenreRecommender(self.data)
        elif recommender == "random":
            recommender = RandomRecommender(seed=None)
        elif not callable(recommender):
            raise ValueError(
                "recommender must be 'sasrec', 'popularity', 'genre', 'random' or a callable "
                f"policy, got {recommender!r}"
            )
        self.recommender = recommender
        if len(action_scores) != N_ACTIONS:
            raise ValueError(f"action_scores needs {N_ACTIONS} scores, got {action_scores}")
        self.action_scores = tuple(float(s) for s in action_scores)
        T = self.dialog.max_turns
        if numeric:
            self.observation_space = spaces.Dict(
                {
                    "item": self._feature_box(),
                    **self._history_spaces(),
                    "peer": self.dialog.observation_space(USER)["peer"],
                    "turn": spaces.Discrete(T, start=1),
                }
            )
            self.action_space = spaces.Discrete(N_ACTIONS)
        else:
            self.observation_space = self.dialog.observation_space(USER)
            self.action_space = self.dialog.action_space(USER)

    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        obs, infos = self._reset_inner(seed, options)
        self._reset_agent(self.recommender, seed)
        obs, _, _, _, _, skipped = self._until_user_acts(obs)
        if not self.dialog.agents:
            raise RuntimeError(
                "the fixed recommender failed every turn: the user had nothing to judge"
            )
        info = self._learner_info(infos[USER])
        if skipped:
            info["skipped_turn_records"] = [_without_episode_id(r) for r in skipped]
        return self._observe(obs[USER]), info

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self.numeric:
            code = int(action)
            action = {"action": code, "score": self.action_scores[code]}
        obs, rewards, terms, truncs, infos = self._env.step({USER: action})
        info = self._learner_info(infos[USER])
        reward = float(rewards[USER])
        done = bool(terms[USER] or truncs[USER])
        if not done:
            obs, extra, term, trunc, _, skipped = self._until_user_acts(obs)
            reward += extra
            terms, truncs = {USER: term}, {USER: trunc}
            if skipped:
                info["skipped_turn_records"] = [_without_episode_id(r) for r in skipped]
        return self._observe(obs[USER]), reward, bool(terms[USER]), bool(truncs[USER]), info

    def _until_user_acts(self, obs: dict) -> tuple[dict, float, bool, bool, dict, list[dict]]:
        """Let the fixed recommender act until the user has something to judge or the
        episode ends. Returns (obs, user reward of skipped turns, terminated, truncated,
        last infos, skipped turn records)."""
        reward, term, trunc, infos, skipped = 0.0, False, False, {}, []
        while self.dialog.agents and self.dialog.acting_agent != USER:
            if self.dialog.phase == 0:
                reply = self.recommender(obs[RECOMMENDER])
                obs, _, _, _, infos = self._env.step({RECOMMENDER: reply})
            else:  # user phase after a recommender format failure: nothing to judge
                obs, rewards, terms, truncs, infos = self._env.step({USER: None})
                reward += float(rewards[USER])
                term, trunc = bool(terms[USER]), bool(truncs[USER])
                skipped.append(infos[USER][TURN_RECORD_KEY])
        return obs, reward, term, trunc, infos, skipped

    def _observe(self, obs: dict[str, Any]) -> dict[str, Any]:
        if not self.numeric:
            return obs
        turn = int(obs["turn"])
        position = int(obs["recommended"][turn - 1])
        item = np.zeros(self._features.shape[1], np.float32)
        if position >= 0:
            item = self._features[int(obs["candidates"][position])]
        return {
            "item": item.copy(),
            "history": self._history_features.copy(),
            "history_mask": self._history_mask.copy(),
            "peer": np.asarray(obs["peer"], np.float32),
            "turn": turn,
        }


def _without_episode_id(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "episode_id"}


# ------------------------------------------------------------------ registration


def make_recommender_env(
    env_id: str,
    split: str = "test",
    seed: int = 0,
    *,
    user: str | Policy = "oracle",
    numeric: bool = False,
    logger: TrajectoryLogger | None = None,
    data_dir: str | None = None,
    render_mode: str | None = None,
    **overrides: Any,
) -> RecommenderEnv:
    """``RecommenderEnv`` on ``coars_env.make(env_id, split, seed, ...)`` (the gym entry point)."""
    import coars_env  # lazy: coars_env/__init__.py imports this module to register ids

    if numeric:
        overrides = {"render_prompts": False, **overrides}
    env = coars_env.make(
        env_id, split, seed, data_dir=data_dir, render_mode=render_mode, **overrides
    )
    return RecommenderEnv(env=env, user=user, numeric=numeric, logger=logger)


def make_user_env(
    env_id: str,
    split: str = "test",
    seed: int = 0,
    *,
    recommender: str | Policy = "sasrec",
    numeric: bool = False,
    action_scores: tuple[float, ...] = DEFAULT_ACTION_SCORES,
    logger: TrajectoryLogger | None = None,
    data_dir: str | None = None,
    render_mode: str | None = None,
    **overrides: Any,
) -> UserEnv:
    """``UserEnv`` on ``coars_env.make(env_id, split, seed, ...)`` (the gym entry point)."""
    import coars_env

    if numeric:
        overrides = {"render_prompts": False, **overrides}
    env = coars_env.make(
        env_id, split, seed, data_dir=data_dir, render_mode=render_mode, **overrides
    )
    return UserEnv(
        env=env,
        recommender=recommender,
        numeric=numeric,
        action_scores=action_scores,
        logger=logger,
    )


def gymnasium_ids() -> dict[str, tuple[str, str]]:
    """Gymnasium id -> (entry point, RecDialog env id), for every dataset of ``ENV_IDS``."""
    from coars_env import ENV_IDS

    ids = {}
    for env_id in ENV_IDS:  # "RecDialog-ml1m" -> "ml1m"
        data = env_id.split("-", 1)[1]
        for view, entry in (("Recommender", "make_recommender_env"), ("User", "make_user_env")):
            gym_id = f"{GYM_NAMESPACE}/RecDialog{view}-{data}-v{GYM_VERSION}"
            ids[gym_id] = (f"coars_env.wrappers:{entry}", env_id)
    return ids


def register_gymnasium_envs() -> None:
    """Register ``coars/RecDialogRecommender-<data>-v0`` and ``coars/RecDialogUser-<data>-v0``
    with Gymnasium (idempotent). ``gymnasium.make(id, **kwargs)`` passes ``kwargs`` to
    ``make_recommender_env`` / ``make_user_env`` (split, seed, numeric, EnvConfig fields...)."""
    for gym_id, (entry_point, env_id) in gymnasium_ids().items():
        if gym_id not in gymnasium.registry:
            gymnasium.register(id=gym_id, entry_point=entry_point, kwargs={"env_id": env_id})
