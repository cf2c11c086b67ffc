"""Bridge CoARS episodes to other LLM-RL trainers: TRL's GRPOTrainer, or your own loop.

Two routes (``--mode``), both runnable offline on a tiny random model (they learn nothing
useful at that scale: they show the plumbing). The guide is docs/guides/trl.md.

``grpo`` (default), single-turn recommender training with TRL:

1. ``session_prompts``: one dataset row per training session: the recommender's turn-1
   chat prompt (``prompt``, conversational format) and the ``session_id``. The candidate
   order is fixed by the session seed, so a session always gives the same prompt.
2. ``EnvRecommenderReward``: a TRL reward function. For each completion it replays turn 1
   of its session in a ``RecDialogEnv`` (the env parses the text with
   ``coars_env.dialog.parsing`` and computes the rewards with ``coars_env.dialog.rewards``)
   against a fixed user (default: the oracle user, who clicks the target only) and returns
   the recommender's ``R_rec``: +1 for the target (click), about -0.5..-1 for a miss,
   the format penalty on top for an unreadable answer. ``formula_recommender_reward`` does
   the same from ``parse_recommender`` + ``turn_outcome`` without stepping an env.
3. ``trl.GRPOTrainer(model, reward_funcs=[reward], train_dataset=dataset, ...)``.

``rollout``, multi-turn: ``coars_agents.rollout.rollout`` plays whole dialogues (an LLM
recommender against a scripted user, or two LLMs), and ``flatten_recommender_turns`` turns
every recommender turn into one training sample (prompt ids, completion ids, the raw
log-probs of the sampled tokens, the turn's reward and return-to-go, the env's mask):
what a custom policy-gradient loop, or a TRL ``rollout_func``, consumes.

Run::

    python examples/trl_rollout_bridge.py                       # GRPO, tiny model, 2 steps
    python examples/trl_rollout_bridge.py --mode rollout        # multi-turn samples
    python examples/trl_rollout_bridge.py --model smollm2 --max-steps 50   # a real (small) LLM

Needs ``pip install trl`` for ``--mode grpo`` (an optional dependency of CoARS).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import tyro

import coars_env
from coars_env.agents import OracleUser
from coars_env.dialog.env import RECOMMENDER, USER, RecDialogEnv
from coars_env.dialog.parsing import ACTION_NAMES, parse_recommender
from coars_env.dialog.rewards import CLICK, SKIP, turn_outcome

Messages = list[dict[str, str]]


@dataclass
class Config:
    """Options of the TRL / rollout bridge example (every field is a CLI flag)."""

    mode: Literal["grpo", "rollout"] = "grpo"
    """``grpo``: single-turn GRPO with TRL; ``rollout``: multi-turn samples via coars_agents."""
    env_id: str = "RecDialog-synthetic"
    """Environment id (``coars_env.list_envs()``)."""
    seed: int = 0
    """Data, model initialisation, sampling and trainer seed."""
    model: str = "tiny"
    """``tiny`` (random 1M-parameter test model), ``smollm2`` (offline GGUF), a path or a hub id."""
    num_sessions: int = 8
    """Training sessions used (GRPO dataset rows; dialogues in rollout mode)."""
    num_generations: int = 4
    """GRPO group size: completions per prompt."""
    max_steps: int = 2
    """GRPO optimizer steps."""
    max_completion_length: int = 12
    """Tokens generated per answer (``Item: 7`` is about 4 tokens; a reason needs more)."""
    learning_rate: float = 1e-5
    """GRPO learning rate."""
    answer_prefix: str = ""
    """Start of the answer appended to each prompt (e.g. ``"Item: "``); empty: chat prompts."""
    reward: Literal["env", "formula"] = "env"
    """Reward function: replay the turn in the env, or parse + formula without an env."""
    max_turns: int = 3
    """Turns per dialogue in rollout mode."""
    history_items: int = 5
    """Visible history items in prompts (short prompts for the tiny model's context)."""
    output_dir: str = "runs/trl_bridge"
    """TRL's output directory (nothing is saved: ``save_strategy="no"``)."""


# ----------------------------------------------------------------------------- data


def env_options(cfg: Config, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``coars_env.make`` options: short prompts (no item summaries), plus ``overrides``."""
    options = {"max_turns": cfg.max_turns, "max_history_items": cfg.history_items}
    return {**options, "max_summary_chars": 0, **(overrides or {})}


def make_env(
    cfg: Config, split: str = "train", overrides: Mapping[str, Any] | None = None
) -> RecDialogEnv:
    """The text env on ``split`` (options: ``env_options``)."""
    return coars_env.make(cfg.env_id, split=split, seed=cfg.seed, **env_options(cfg, overrides))


def session_prompts(
    env: RecDialogEnv,
    session_ids: Sequence[int],
    *,
    tokenizer: Any = None,
    answer_prefix: str = "",
) -> list[dict[str, Any]]:
    """One row per session: the recommender's turn-1 prompt, the session id, the prefix.

    Without ``answer_prefix`` the prompt is TRL's conversational format (a list of chat
    messages: TRL applies the chat template). With one (e.g. ``"Item: "``), the prompt is
    the chat template rendered by ``tokenizer`` plus the start of the answer, so the model
    only has to continue it (a standard trick for small models); the reward functions put
    the prefix back before parsing. Extra columns (``session_id``, ``answer_prefix``)
    reach the reward functions as keyword arguments.
    """
    rows = []
    for session_id in session_ids:
        obs, _ = env.reset(options={"session_id": int(session_id)})
        messages = [dict(m) for m in obs[RECOMMENDER]["messages"]]
        prompt: str | Messages = messages
        if answer_prefix:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            prompt = text + answer_prefix
        rows.append(
            {"prompt": prompt, "session_id": int(session_id), "answer_prefix": answer_prefix}
        )
    return rows


def completion_text(completion: str | Messages, answer_prefix: str = "") -> str:
    """The answer text of a TRL completion (a string, or a list with one assistant
    message), with the prompt's answer prefix put back in front."""
    if isinstance(completion, str):
        return answer_prefix + completion
    text = "".join(m["content"] for m in completion if m.get("role", "assistant") == "assistant")
    return answer_prefix + text


def _prefixes(kwargs: Mapping[str, Any], n: int) -> list[str]:
    """The ``answer_prefix`` column of a reward call ("" when the dataset has none)."""
    return list(kwargs.get("answer_prefix") or [""] * n)


# ----------------------------------------------------------------------------- rewards


class EnvRecommenderReward:
    """TRL reward function: the recommender's turn-1 ``R_rec``, as the env computes it.

    Each completion is played as turn 1 of its session (``session_id`` column) against
    ``user`` (a policy on the user's structured observation; default: ``OracleUser``, who
    clicks the target and only the target). Parsing, repeats, format penalties and the
    reward formula are the env's own, so training and evaluation agree.
    """

    def __init__(self, env: RecDialogEnv, user: Callable[[Mapping[str, Any]], Any] | None = None):
        self.env = env
        self.user = user or OracleUser(env.data, target_lookup=lambda obs: env.session.target)
        self.__name__ = "coars_r_rec"  # TRL logs rewards under this name
        self.records: list[dict[str, Any]] = []  # turn records of the last call

    def __call__(
        self, prompts: list, completions: list, session_id: list[int], **kwargs: Any
    ) -> list[float]:
        rewards, self.records = [], []
        prefixes = _prefixes(kwargs, len(completions))
        for completion, sid, prefix in zip(completions, session_id, prefixes):
            obs, _ = self.env.reset(options={"session_id": int(sid)})
            obs, _, _, _, _ = self.env.step({RECOMMENDER: completion_text(completion, prefix)})
            reply = self.user(obs[USER]) if self.env.acting_agent == USER else None
            _, reward, _, _, infos = self.env.step({USER: reply})
            rewards.append(float(reward[RECOMMENDER]))
            self.records.append(infos[RECOMMENDER]["turn_record"])
        return rewards


def formula_recommender_reward(
    env: RecDialogEnv,
) -> Callable[..., list[float]]:
    """TRL reward function without stepping the env: parse, then METHOD.md's ``R_rec``.

    The user is modelled as the oracle's click/skip: a hit is a click (``s = 1``), a miss a
    skip with the middle skip score (``s = 0.375``); an unreadable answer is a format
    failure (``s = 0`` plus the env config's format penalty). Cheaper than the env route,
    but it ignores the user's graded reaction to misses.
    """
    sessions, cfg = env.data.sessions, env.config
    titles = {
        i: [env.catalog.titles[item] for item in s.candidates] for i, s in enumerate(sessions)
    }

    def coars_formula_r_rec(
        prompts: list, completions: list, session_id: list[int], **kwargs: Any
    ) -> list[float]:
        rewards = []
        prefixes = _prefixes(kwargs, len(completions))
        for completion, sid, prefix in zip(completions, session_id, prefixes):
            session = sessions[int(sid)]
            parsed = parse_recommender(
                completion_text(completion, prefix), len(session.candidates), titles[int(sid)]
            )
            failure = parsed.position is None
            hit = not failure and session.candidates[parsed.position] == session.target
            out = turn_outcome(
                hit=hit,
                t=1,
                action=-1 if failure else (CLICK if hit else SKIP),
                s=0.0 if failure else (1.0 if hit else 0.375),
                q=0.0,
                rec_failure=failure,
                alpha=cfg.alpha,
                gamma=cfg.gamma,
                format_penalty=cfg.format_penalty,
            )
            rewards.append(out.reward_rec)
        return rewards

    return coars_formula_r_rec


# ----------------------------------------------------------------------------- tool calling


class RecommendationToolEnv:
    """A whole CoARS dialogue as a TRL ``environment_factory`` environment (tool calling).

    TRL (``GRPOTrainer(environment_factory=...)``, experimental) makes one instance per
    rollout, calls ``reset(**dataset_row)`` (the row's ``session_id`` picks the session),
    exposes the public methods (here ``recommend``) as tools the model may call during
    generation, appends each tool result to the conversation, and calls ``get_reward``
    at the end. Each ``recommend`` call is one turn: the recommendation goes to the env as
    text (parsed like any recommender answer), the fixed user replies, and the tool
    returns the reply. The reward is the dialogue's summed ``R_rec``.

    Build the ``RecDialogEnv`` once per instance from shared ``DialogData``
    (``coars_env.load_dialog_data``) so that instances do not reload the data.
    """

    def __init__(
        self, env: RecDialogEnv, user: Callable[[Mapping[str, Any]], Any] | None = None
    ) -> None:
        self.env = env
        self.user = user or OracleUser(env.data, target_lookup=lambda obs: env.session.target)
        self.total_reward = 0.0

    def reset(self, session_id: int | None = None, **kwargs: Any) -> str:
        """Start the dialogue of ``session_id``; returns a hint appended to the prompt."""
        options = {"session_id": int(session_id)} if session_id is not None else None
        self.env.reset(options=options)
        self.total_reward = 0.0
        return (
            "\nUse the tool `recommend` with a candidate number to recommend it; the user "
            "answers. Keep recommending until the user clicks or the conversation ends."
        )

    def recommend(self, item: int) -> str:
        """Recommend one candidate to the user and get the user's reaction.

        Args:
            item: The candidate number (1-20) from the candidate list.

        Returns:
            The user's reaction (click, star, skip or dislike, with a score in [0, 1]).
        """
        if not self.env.agents:
            return "The conversation is over."
        obs, _, _, _, _ = self.env.step({RECOMMENDER: f"Item: {item}"})
        reply = self.user(obs[USER]) if self.env.acting_agent == USER else None
        _, rewards, terminations, truncations, infos = self.env.step({USER: reply})
        self.total_reward += float(rewards[RECOMMENDER])
        record = infos[RECOMMENDER]["turn_record"]
        if record["rec_format_failure"]:
            answer = f"'{item}' is not a candidate number."
        else:
            answer = (
                f"The user's reaction: {ACTION_NAMES[record['action']]} ({record['score']:.2f})."
            )
        if terminations[RECOMMENDER] or truncations[RECOMMENDER]:
            answer += " The conversation is over."
        return answer

    def get_reward(self) -> float:
        """The dialogue's summed recommender reward ``R_rec``."""
        return self.total_reward


# ----------------------------------------------------------------------------- models


def load(cfg: Config):
    """(model, tokenizer): the tiny test model, or ``coars_agents.models.load_model``."""
    from coars_agents.models import load_model, tiny_test_model

    if cfg.model == "tiny":
        model, tokenizer = tiny_test_model(cfg.seed, max_position_embeddings=2048)
        tokenizer.model_max_length = 2048
        return model, tokenizer
    return load_model(cfg.model, device="cpu" if not torch.cuda.is_available() else None)


# ----------------------------------------------------------------------------- GRPO


def run_grpo(cfg: Config, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Single-turn GRPO on the recommender's turn-1 prompts with TRL's ``GRPOTrainer``."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    env = make_env(cfg, overrides=overrides)
    rng = np.random.default_rng(cfg.seed)
    ids = rng.choice(len(env.data.sessions), size=cfg.num_sessions, replace=False)
    model, tokenizer = load(cfg)
    rows = session_prompts(env, ids, tokenizer=tokenizer, answer_prefix=cfg.answer_prefix)
    dataset = Dataset.from_list(rows)
    reward_env = make_env(
        cfg, overrides=overrides
    )  # its own env: the reward replays sessions in it
    if cfg.reward == "env":
        reward = EnvRecommenderReward(reward_env)
    else:
        reward = formula_recommender_reward(reward_env)
    args = GRPOConfig(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.num_generations,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        learning_rate=cfg.learning_rate,
        temperature=1.0,
        beta=0.0,  # no KL to a reference model (none is loaded)
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        seed=cfg.seed,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    for entry in logs:
        print(
            f"step {entry.get('step')}: reward {entry['reward']:+.4f} "
            f"(std {entry.get('reward_std', float('nan')):.4f})"
        )
    return {"log_history": trainer.state.log_history, "reward_logs": logs, "dataset": dataset}


# ----------------------------------------------------------------------------- multi-turn


def flatten_recommender_turns(episodes: Sequence[Any]) -> list[dict[str, Any]]:
    """One sample per recommender turn of ``coars_agents.rollout.Episode`` records.

    Keys: ``session_id``, ``turn``, ``prompt_ids``, ``completion_ids``, ``logprobs`` (raw
    log-probs of the sampled tokens, as the policy generated them), ``reward`` (the turn's
    ``R_rec``), ``return_to_go`` (undiscounted sum of this and later turns' ``R_rec``),
    ``mask`` (the env's ``mask_rec``: 0 = leave the turn out of training) and ``text``.
    """
    samples = []
    for episode in episodes:
        by_turn = {record["turn"]: record for record in episode.turns}
        rewards = [float(record["reward_rec"]) for record in episode.turns]
        to_go = np.cumsum(rewards[::-1])[::-1]
        for agent_turn in episode.recommender:
            record = by_turn[agent_turn.turn]
            samples.append(
                {
                    "session_id": episode.session_id,
                    "turn": agent_turn.turn,
                    "prompt_ids": list(agent_turn.prompt_ids),
                    "completion_ids": list(agent_turn.completion_ids),
                    "logprobs": agent_turn.logprobs.tolist(),
                    "reward": float(record["reward_rec"]),
                    "return_to_go": float(to_go[agent_turn.turn - 1]),
                    "mask": float(record["mask_rec"]),
                    "text": agent_turn.text,
                }
            )
    return samples


def run_rollout(cfg: Config, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Multi-turn dialogues: an LLM recommender against the oracle user, flattened."""
    from coars_agents.policy import LLMPolicy, SamplingConfig
    from coars_agents.rollout import LLMAgent, rollout

    venv = coars_env.make_vector(
        cfg.env_id,
        num_envs=cfg.num_sessions,
        split="train",
        seed=cfg.seed,
        **env_options(cfg, overrides),
    )
    model, tokenizer = load(cfg)
    policy = LLMPolicy(model, tokenizer)  # freezes the model: LLMPolicy trains LoRA adapters
    recommender = LLMAgent(
        policy,
        RECOMMENDER,
        sampling=SamplingConfig(max_new_tokens=cfg.max_completion_length, seed=cfg.seed),
        reason_tokens=4,
    )
    user = OracleUser(venv.envs[0].data)  # finds each session (and target) by its candidates
    episodes = rollout(venv, {RECOMMENDER: recommender, USER: user}, seed=cfg.seed)
    samples = flatten_recommender_turns(episodes)
    hits = np.mean([episode.hit for episode in episodes])
    print(f"{len(episodes)} dialogues, {len(samples)} recommender turns, Hit@1 {hits:.3f}")
    for sample in samples[: min(3, len(samples))]:
        print(
            f"session {sample['session_id']} turn {sample['turn']}: {sample['text']!r} "
            f"reward {sample['reward']:+.3f} return-to-go {sample['return_to_go']:+.3f}"
        )
    return {"episodes": episodes, "samples": samples}


def main(cfg: Config, env_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the chosen route; returns what it produced (logs, samples).

    ``env_overrides``: extra ``EnvConfig`` / ``DataConfig`` fields for the envs
    (programmatic only; e.g. the tests' small SASRec and temporary cache).
    """
    torch.manual_seed(cfg.seed)
    if cfg.mode == "grpo":
        return run_grpo(cfg, env_overrides)
    return run_rollout(cfg, env_overrides)


if __name__ == "__main__":
    main(tyro.cli(Config))
