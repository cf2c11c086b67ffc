"""``VectorRecDialogEnv``: B RecDialog episodes stepped in lock-step (for batched LLM rollouts).

Every turn is a recommender phase then a user phase, in every episode, so at each call
all live episodes wait for the same agent (``acting_agent``): one call returns B prompts
for one policy, the next call takes its B replies::

    venv = VectorRecDialogEnv(data, num_envs=64, render_prompts=True)
    obs, infos = venv.reset(seed=0)
    while not venv.all_done:
        agent = venv.acting_agent                       # "recommender" or "user"
        prompts = venv.messages()                       # B chat prompts, None = no reply needed
        replies = [None if p is None else policy[agent](p) for p in prompts]
        obs, rewards, terms, truncs, infos = venv.step(replies)

Randomness: slot ``i`` is a ``RecDialogEnv`` reset with a seed derived from ``(seed, i)``
(``SeedSequence([seed, i])``); its later episodes continue that env's own stream. So what
happens in slot ``i`` depends on ``(seed, i)`` and its replies only, never on B.

Finished episodes: with ``autoreset=False`` (default) an episode that ends stays done
(``dones[i]``; its entries in later steps are empty dicts and its replies are ignored)
until ``reset()`` or ``reset_episode(i)``. With ``autoreset=True`` it is reset in the
same step (Gymnasium's "same-step" mode, which keeps all slots in phase): the step
returns the new episode's first observation, the finished episode's rewards and
terminations, and each agent's info gains ``final_observation`` and ``reset_info``.
``episode_id`` of slot ``i``'s ``k``-th episode (from 0) is ``i + k * num_envs``: unique
within this vector env.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from coars_env.data.common import DialogData
from coars_env.dialog.config import EnvConfig
from coars_env.dialog.env import RECOMMENDER, USER, RecDialogEnv

Obs = dict[str, dict[str, Any]]


def episode_seed(seed: int, index: int) -> int:
    """The reset seed of slot ``index`` under base ``seed`` (independent of B)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


class VectorRecDialogEnv:
    """``num_envs`` independent ``RecDialogEnv`` episodes advanced together.

    Args:
        data, config, overrides: as for ``RecDialogEnv`` (one config for all slots).
        num_envs: B.
        autoreset: reset finished episodes in the same step (see the module doc).
    """

    def __init__(
        self,
        data: DialogData,
        config: EnvConfig | None = None,
        num_envs: int = 1,
        *,
        autoreset: bool = False,
        **overrides: Any,
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        first = RecDialogEnv(data, config, **overrides)
        # Slots share the read-only parts (item texts, charset, spaces) of the first env.
        self.envs: list[RecDialogEnv] = [first] + [_fresh_copy(first) for _ in range(num_envs - 1)]
        self.num_envs = num_envs
        self.autoreset = autoreset
        self.possible_agents = list(first.possible_agents)
        self.config = first.config
        self.seed: int | None = None
        self.dones = np.ones(num_envs, dtype=bool)
        self._n_episodes = np.zeros(num_envs, dtype=np.int64)

    def observation_space(self, agent: str):
        """One episode's observation space (the same for every slot)."""
        return self.envs[0].observation_space(agent)

    def action_space(self, agent: str):
        """The action space of ``agent`` in each sub-environment (text: its answer)."""
        return self.envs[0].action_space(agent)

    # ------------------------------------------------------------------ reset

    def reset(
        self, seed: int | None = None, options: dict | Sequence[dict | None] | None = None
    ) -> tuple[list[Obs], list[dict[str, dict]]]:
        """Start a new episode in every slot.

        ``seed`` None draws a base seed from OS entropy (kept in ``self.seed``). ``options``
        is one dict for every slot or a list of B dicts (e.g. ``{"session_id": j}`` per
        slot, for evaluation); ``episode_id`` is set by the vector env.
        """
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint32)[0])
        self.seed = int(seed)
        self._n_episodes[:] = 0
        per_slot = self._per_slot_options(options)
        results = [
            self._reset_slot(i, episode_seed(self.seed, i), per_slot[i])
            for i in range(self.num_envs)
        ]
        return [r[0] for r in results], [r[1] for r in results]

    def reset_episode(
        self, index: int, seed: int | None = None, options: dict | None = None
    ) -> tuple[Obs, dict[str, dict]]:
        """Start a new episode in slot ``index`` only (its stream continues unless ``seed``).

        Keep slots in phase: reset a slot when the live ones are at a recommender phase
        (e.g. right after a step that ended episodes), or ``acting_agent`` becomes mixed.
        """
        return self._reset_slot(index, seed, options)

    def _reset_slot(self, i: int, seed: int | None, options: dict | None):
        options = dict(options or {})
        options["episode_id"] = i + int(self._n_episodes[i]) * self.num_envs
        self._n_episodes[i] += 1
        obs, infos = self.envs[i].reset(seed=seed, options=options)
        self.dones[i] = False
        return obs, infos

    def _per_slot_options(self, options) -> list[dict | None]:
        if options is None or isinstance(options, dict):
            return [options] * self.num_envs
        options = list(options)
        if len(options) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} option dicts, got {len(options)}")
        return options

    # ------------------------------------------------------------------ step

    @property
    def acting_agent(self) -> str | None:
        """The agent whose replies the next ``step`` reads (None when every slot is done)."""
        agents = {
            RECOMMENDER if env.phase == 0 else USER
            for env, d in zip(self.envs, self.dones)
            if not d
        }
        if len(agents) > 1:
            raise RuntimeError("slots are out of phase (a slot was reset mid-turn)")
        return agents.pop() if agents else None

    @property
    def needs_action(self) -> np.ndarray:
        """bool[B]: slots whose reply the next step reads (live, and something to judge)."""
        return (
            np.array([env.acting_agent is not None for env in self.envs], dtype=bool) & ~self.dones
        )

    @property
    def all_done(self) -> bool:
        return bool(self.dones.all())

    def messages(self, **limits: Any) -> list[list[dict[str, str]] | None]:
        """The acting agent's chat prompt per slot (None where no reply is needed).

        Renders on demand (works with ``render_prompts=False``); ``limits`` as for
        ``RecDialogEnv.messages``.
        """
        return [
            None if done or env.acting_agent is None else env.messages(**limits)
            for env, done in zip(self.envs, self.dones)
        ]

    def step(
        self, replies: Sequence[Any]
    ) -> tuple[list[Obs], list[dict], list[dict], list[dict], list[dict]]:
        """Apply one reply per slot (for ``acting_agent``; ignored where not needed).

        Returns per-slot lists ``(observations, rewards, terminations, truncations,
        infos)``, each entry the dict a ``RecDialogEnv.step`` returns (empty dicts for
        slots that were already done).
        """
        if len(replies) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} replies, got {len(replies)}")
        agent = self.acting_agent
        out_obs: list[Obs] = []
        out_rew: list[dict] = []
        out_term: list[dict] = []
        out_trunc: list[dict] = []
        out_info: list[dict] = []
        for i, (env, reply) in enumerate(zip(self.envs, replies)):
            if self.dones[i]:
                for out in (out_obs, out_rew, out_term, out_trunc, out_info):
                    out.append({})
                continue
            obs, rew, term, trunc, info = env.step({agent: reply})
            if not env.agents:
                self.dones[i] = True
                if self.autoreset:
                    final_obs = obs
                    obs, reset_info = self._reset_slot(i, None, None)
                    for a in info:
                        info[a]["final_observation"] = final_obs[a]
                        info[a]["reset_info"] = reset_info[a]
            out_obs.append(obs)
            out_rew.append(rew)
            out_term.append(term)
            out_trunc.append(trunc)
            out_info.append(info)
        return out_obs, out_rew, out_term, out_trunc, out_info

    def close(self) -> None:
        """Close every sub-environment."""
        for env in self.envs:
            env.close()


def _fresh_copy(env: RecDialogEnv) -> RecDialogEnv:
    """A new, never-reset env sharing ``env``'s read-only parts (data, catalog, spaces)."""
    clone = copy.copy(env)
    clone.agents = []
    clone.np_random = None
    clone.np_random_seed = None
    clone._n_resets = 0
    clone._session = None
    return clone
