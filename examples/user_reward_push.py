"""Which way does METHOD.md's user reward push a user agent that cannot tell hits from misses?

The user agent learns from its own judgements with R_user, and its accepted misses carry no
loss (METHOD.md masks them: the data may not record that the user would have liked the item).
This analysis computes, exactly and without sampling, the user's turn-1 distribution over its
action and its score on held-out sessions, after the recommender names the target (a hit) and
after it names another candidate (a miss; :func:`coars_agents.evaluate.turn1_user_judgements`
draws it). Per case c (hit or miss), the expected policy-gradient step on the log-odds of
accepting (click or star) is then

    push_c = P_c(accept) (1 - P_c(accept)) (E[R | c, accept] - E[R | c, reject])

where a masked judgement counts as reward 0 (it adds nothing to the loss; with
``--exclude-miss-positive none`` no judgement is masked) and each action's
reward is averaged over the user's own score distribution for that action. Training mixes the
cases in the proportion of hits among the judged turns, f (the recommender's hit rate): the
total push f push_hit + (1 - f) push_miss is positive towards accepting everything and
negative towards rejecting everything. It crosses zero at f* = -push_miss / (push_hit -
push_miss): a recommender that hits less often than f* drives the user to reject, one that hits
more often drives it to accept, as long as the user judges both cases alike.

Left out: the credit term (lambda = 0.1) and the rationale tokens, so this is the reward's push
on the decision alone, at one prompt per session; the score distribution of each action is
computed with that action written out in the prompt. Evaluation only: it reads the targets.

    python examples/user_reward_push.py              # SmolLM2, 40 validation sessions, CPU: ~13 min
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tyro

from coars_agents.coars import CoARSConfig, CoARSTrainer
from coars_agents.constrained import DEFAULT_USER_FORMAT, Choice, Free, Template, score_choices
from coars_agents.evaluate import select_sessions, turn1_user_judgements, user_turn1_prompts
from coars_env.dialog.config import EnvConfig
from coars_env.dialog.env import USER
from coars_env.dialog.parsing import ACTION_NAMES
from coars_env.dialog.rewards import POSITIVE_ACTIONS, reward_user

ACCEPTING = [ACTION_NAMES[a] for a in sorted(POSITIVE_ACTIONS)]


@dataclass
class Args:
    """Command line of examples/user_reward_push.py."""

    sessions: int = 40
    """Held-out sessions (of ``train.eval_split``), each judged once as a hit and once as a
    miss."""
    train: CoARSConfig = field(
        default_factory=lambda: CoARSConfig(
            eval_alignment_users=0, tensorboard=False, output_dir="runs/user_reward_push"
        )
    )
    """Model, data, reward (alpha, exclude_miss_positive) and user settings (the trainer's
    fields; nothing is trained). ``resume`` loads the user adapter of the latest checkpoint in ``output_dir``,
    to analyse a trained user."""


def score_distributions(trainer: CoARSTrainer, prompts: list[list[int]]) -> dict[str, list]:
    """Per action, the user's exact distribution over that action's scores, per prompt."""
    policy, agent = trainer.policy, trainer.agents(greedy=True)[USER]
    out = {}
    for action, scores in score_choices().items():
        template = Template.from_format(
            DEFAULT_USER_FORMAT.replace("{action}", action),
            score=Choice(list(scores)),
            reason=Free(agent.reason_tokens, stop="\n"),
        )
        out[action] = policy.choice_probabilities(prompts, template, "score", adapter=USER)
    return out


def push_table(trainer: CoARSTrainer, n_sessions: int) -> pd.DataFrame:
    """One row per (session, case): P(accept), the mean trained reward of accepting and of
    rejecting, and the push on the log-odds of accepting."""
    cfg, data = trainer.config, trainer.eval_data
    agent = trainer.agents(greedy=True)[USER]
    env_config = EnvConfig(**trainer.env_kwargs).replace(render_prompts=False)
    masked = cfg.exclude_miss_positive != "none"  # accepted misses carry no loss
    sessions = select_sessions(len(data.sessions), n_sessions, cfg.seed)
    judged = turn1_user_judgements(
        agent, data, env_config, sessions, cfg.eval_batch_size, seed=cfg.seed
    )
    # The very prompts the judgements were computed on, for the score distributions.
    pairs = list(zip(judged["session_id"], judged["position"]))
    prompts, _ = user_turn1_prompts(agent, data, env_config, pairs, cfg.eval_batch_size)
    scores = score_distributions(trainer, prompts)
    rows = []
    for i, row in enumerate(judged.itertuples()):
        hit = row.kind == "hit"
        mean_reward = {}
        for action in ACTION_NAMES:
            if masked and not hit and action in ACCEPTING:
                mean_reward[action] = 0.0  # masked: no loss
                continue
            mean_reward[action] = sum(
                p * reward_user(hit, float(s), row.q, alpha=cfg.alpha)
                for s, p in scores[action][i].items()
            )
        p_action = {a: getattr(row, f"p_{a}") for a in ACTION_NAMES}
        accept = row.p_accept
        reject = 1.0 - accept
        r_accept = sum(p_action[a] * mean_reward[a] for a in ACCEPTING) / max(accept, 1e-12)
        r_reject = sum(
            p_action[a] * mean_reward[a] for a in ACTION_NAMES if a not in ACCEPTING
        ) / max(reject, 1e-12)
        rows.append(
            {
                "session_id": row.session_id,
                "kind": row.kind,
                "p_accept": accept,
                "reward_accept": r_accept,
                "reward_reject": r_reject,
                "push": accept * reject * (r_accept - r_reject),
                **{
                    f"score_{a}": sum(float(s) * p for s, p in scores[a][i].items())
                    for a in p_action
                },
                "q": row.q,
            }
        )
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """Mean per case, and the break-even hit rate f* (nan when both cases push one way)."""
    means = table.drop(columns="session_id").groupby("kind").mean()
    out = {f"{kind}/{col}": float(means.loc[kind, col]) for kind in means.index for col in means}
    push_hit, push_miss = out["hit/push"], out["miss/push"]
    crosses = push_hit * push_miss < 0
    out["break_even_hit_rate"] = -push_miss / (push_hit - push_miss) if crosses else float("nan")
    return out


def main(args: Args) -> dict[str, float]:
    trainer = CoARSTrainer(args.train)
    if args.train.resume and trainer.checkpoint_dirs():
        trainer.load_checkpoint(trainer.checkpoint_dirs()[-1])
    table = push_table(trainer, args.sessions)
    summary = summarize(table)
    out = Path(args.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "user_reward_push.csv", index=False)
    (out / "user_reward_push.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("| case | P(accept) | E[R | accept] | E[R | reject] | push on log-odds(accept) |")
    print("|---|---|---|---|---|")
    for kind in ("hit", "miss"):
        cells = [summary[f"{kind}/{c}"] for c in ("p_accept", "reward_accept", "reward_reject")]
        print(
            f"| {kind} | "
            + " | ".join(f"{v:.3f}" for v in cells)
            + f" | {summary[f'{kind}/push']:+.4f} |"
        )
    f_star = summary["break_even_hit_rate"]
    verdict = (
        f"the user is pushed to accept everything when more than {f_star:.3f} of its judged "
        f"turns are hits, to reject everything when fewer"
        if np.isfinite(f_star)
        else "both cases push the same way"
    )
    print(f"\n{len(table) // 2} sessions: {verdict}. Table: {out / 'user_reward_push.csv'}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args, config=(tyro.conf.OmitArgPrefixes,)))
