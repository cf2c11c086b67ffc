"""Micro benchmark: RecDialogEnv steps per second with scripted agents, no logging.

Agents: a random recommender (uniform candidate position, structured ``int``) and a rule
user (structured dict: click if peers mostly liked the item, star if some did, else skip).
Time is measured around ``env.step`` / ``reset`` only (agent time excluded) and reported
next to the wall time of the whole loop; each figure is the best of ``--repeats`` runs. Prompts are not rendered (``render_prompts=False``) unless
``--prompts`` is given.

    python benchmarks/bench_env.py                 # generated data (ML-1M-like sizes)
    python benchmarks/bench_env.py --env-id RecDialog-synthetic   # through the data pipeline
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from coars_env.data.common import DialogData, Session
from coars_env.dialog.env import RECOMMENDER, USER, RecDialogEnv
from coars_env.vector import VectorRecDialogEnv


def generated_data(
    n_items: int = 3_700,
    n_users: int = 6_000,
    n_sessions: int = 2_000,
    n_candidates: int = 20,
    history: int = 10,
    n_peers: int = 50,
    seed: int = 0,
) -> DialogData:
    """Random sessions with ML-1M-like sizes: 20 candidates, 10 history items, 50 peers."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        {
            "raw_id": np.arange(n_items),
            "title": [f"Movie {i} (19{i % 100:02d})" for i in range(n_items)],
            "year": pd.array([1900 + i % 100 for i in range(n_items)], dtype="Int64"),
            "genres": ["Drama|Comedy"] * n_items,
            "summary": ["A film."] * n_items,
        }
    )
    sessions = []
    for i in range(n_sessions):
        chosen = rng.choice(n_items, history + n_candidates, replace=False)
        candidates = tuple(int(x) for x in chosen[history:])
        peers = rng.choice(n_users, n_peers, replace=False)
        weights = np.sort(rng.random(n_peers))[::-1]
        sessions.append(
            Session(
                session_id=i,
                user=int(rng.integers(n_users)),
                history=tuple(int(x) for x in chosen[:history]),
                target=candidates[int(rng.integers(n_candidates))],
                candidates=candidates,
                seed=i,
                sasrec_top1=candidates[0],
                peers=tuple((int(p), float(w)) for p, w in zip(peers, weights)),
            )
        )
    # ~60 opinions per user over popular-ish items: most (peer, item) lookups miss
    opinions = {}
    for user in range(n_users):
        for item in rng.choice(n_items, 60, replace=False):
            opinions[(user, int(item))] = 1 if rng.random() < 0.7 else -1
    return DialogData(
        name="bench-ml",
        split="test",
        sessions=sessions,
        items=items,
        opinions=opinions,
        item_features=np.zeros((n_items, 8), np.float32),
        popularity=np.ones(n_items, np.int64),
        has_ratings=True,
    )


def rule_user(obs: dict) -> dict:
    q = float(obs["peer"][0])
    if q > 0.5:
        return {"action": 0, "score": 0.9}
    if q > 0.0:
        return {"action": 1, "score": 0.6}
    return {"action": 2, "score": 0.4}


def bench_single(data: DialogData, steps: int, prompts: bool, seed: int = 0) -> tuple[float, float]:
    env = RecDialogEnv(data, render_prompts=prompts)
    rng = np.random.default_rng(seed)
    n_cands = env.n_candidates
    obs, _ = env.reset(seed=seed)
    env_time = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        if not env.agents:
            t0 = time.perf_counter()
            obs, _ = env.reset()
            env_time += time.perf_counter() - t0
        if env.phase == 0:
            actions = {RECOMMENDER: int(rng.integers(n_cands))}
        else:
            actions = {USER: rule_user(obs[USER])}
        t0 = time.perf_counter()
        obs, *_ = env.step(actions)
        env_time += time.perf_counter() - t0
    wall = time.perf_counter() - start
    return steps / env_time, steps / wall


def bench_vector(
    data: DialogData, num_envs: int, steps: int, prompts: bool, seed: int = 0
) -> tuple[float, float]:
    venv = VectorRecDialogEnv(data, num_envs=num_envs, autoreset=True, render_prompts=prompts)
    rng = np.random.default_rng(seed)
    n_cands = venv.envs[0].n_candidates
    obs, _ = venv.reset(seed=seed)
    env_time = 0.0
    n_calls = max(1, steps // num_envs)
    start = time.perf_counter()
    for _ in range(n_calls):
        if venv.acting_agent == RECOMMENDER:
            replies = rng.integers(n_cands, size=num_envs).tolist()
        else:
            replies = [rule_user(o[USER]) for o in obs]
        t0 = time.perf_counter()
        obs, *_ = venv.step(replies)
        env_time += time.perf_counter() - t0
    wall = time.perf_counter() - start
    return n_calls * num_envs / env_time, n_calls * num_envs / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    parser.add_argument("--prompts", action="store_true", help="render chat prompts every step")
    parser.add_argument(
        "--env-id", default=None, help="load data through coars_env (e.g. RecDialog-synthetic)"
    )
    args = parser.parse_args()

    if args.env_id:
        import coars_env

        data = coars_env.load_dialog_data(args.env_id, split="test")
    else:
        data = generated_data()
    print(f"data: {data.name}/{data.split}, {len(data.sessions)} sessions, {len(data.items)} items")
    # Best of --repeats (as timeit does): other processes on a shared machine only slow down.
    single = max(bench_single(data, args.steps, args.prompts, seed=r) for r in range(args.repeats))
    print(
        f"1 env:        {single[0]:10,.0f} env steps/s (agents excluded) | {single[1]:10,.0f} incl. agents"
    )
    vector = max(
        bench_vector(data, args.num_envs, args.steps, args.prompts, seed=r)
        for r in range(args.repeats)
    )
    print(
        f"{args.num_envs} lock-step: {vector[0]:10,.0f} env steps/s (agents excluded) | "
        f"{vector[1]:10,.0f} incl. agents"
    )


if __name__ == "__main__":
    main()
