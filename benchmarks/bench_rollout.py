"""Rollout throughput: whole dialogues through ``coars_agents.rollout.rollout`` at batch size B.

``bench_generation.py`` measures ``LLMPolicy.generate`` against a naive ``model.generate``
loop on fixed prompts; this script measures one level up, what training and evaluation
actually run: B env sessions in lock-step, an LLM recommender and an LLM user (the same
base model), constrained decoding, prompts rendered and fitted by the env, replies parsed,
rewards computed. For each B in ``--batch-sizes`` it plays ``--episodes`` episodes
(``ceil(episodes / B)`` rollouts of B sessions, distinct session ids) after one warm-up
rollout, and reports

- ``rollout_tokens_per_s_b<B>``: generated tokens (both agents, template tokens included)
  per second of wall time, prefill, env and parsing included;
- ``rollout_episodes_per_min_b<B>``: finished dialogues per minute.

Ratios: ``b<max>_vs_b1_tokens_per_s``. Decoding is temperature sampling (T = 1, as in
training) with fixed seeds, so runs are reproducible; every dialogue lasts at most
``--max-turns`` turns.

    python benchmarks/bench_rollout.py                       # SmolLM2 on ML-100K (or synthetic)
    python benchmarks/bench_rollout.py --quick --json out.json   # smoke: tiny model, synthetic
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchjson  # noqa: E402

import coars_env  # noqa: E402
from coars_agents.policy import LLMPolicy, SamplingConfig  # noqa: E402
from coars_agents.rollout import LLMAgent, rollout  # noqa: E402
from coars_env.vector import VectorRecDialogEnv  # noqa: E402

QUICK_DATA = {
    "sasrec": {"hidden": 16, "blocks": 1, "heads": 1, "max_len": 16, "epochs": 1, "seed": 1},
    "alignment_users": 0,
}


def load_policy(model: str, device: str | None) -> LLMPolicy:
    if model == "tiny":
        from coars_agents.models import tiny_test_model

        m, tok = tiny_test_model(0, hidden_size=64, num_layers=2, max_position_embeddings=4096)
        return LLMPolicy(m.to(device or "cpu"), tok)
    return LLMPolicy.from_pretrained(model, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2', 'tiny', a path or hub id")
    parser.add_argument("--env", default=None, help="env id (default: ml100k if its data is here)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--episodes", type=int, default=32, help="episodes per batch size")
    parser.add_argument("--max-turns", type=int, default=2)
    parser.add_argument("--reason-tokens", type=int, default=24)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--data-pickle", default=None, help="a pickled DialogData to use")
    parser.add_argument("--quick", action="store_true", help="tiny model, synthetic, B = 1, 4")
    parser.add_argument("--json", default=None, help="write the result file here")
    args = parser.parse_args()
    env_kw: dict = {"max_turns": args.max_turns}
    if args.quick:  # a smoke run: tiny model, short prompts, one turn
        args.model, args.env = "tiny", "RecDialog-synthetic"
        args.batch_sizes, args.episodes, args.max_turns, args.reason_tokens = [1, 4], 4, 1, 8
        args.threads = args.threads or 1
        env_kw = {"max_turns": 1, "max_summary_chars": 0, "max_history_items": 3}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.env is None:
        root = os.environ.get("COARS_DATA_DIR")
        has_ml100k = root and (Path(root) / "ml-100k").is_dir()
        args.env = "RecDialog-ml100k" if has_ml100k else "RecDialog-synthetic"

    t0 = time.perf_counter()
    data_kw = QUICK_DATA if args.quick else {}
    if args.data_pickle:
        data = pickle.loads(Path(args.data_pickle).read_bytes())
    else:
        data = coars_env.load_dialog_data(args.env, "test", 0, progress=False, **data_kw)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    policy = load_policy(args.model, args.device)
    t_model = time.perf_counter() - t0
    print(
        f"data {args.env} ({len(data.sessions)} sessions) in {t_data:.1f}s; model {args.model} "
        f"in {t_model:.1f}s on {policy.device}",
        flush=True,
    )

    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.reason_tokens + 24, seed=0)
    agents = {
        role: LLMAgent(policy, role, sampling=sampling, reason_tokens=args.reason_tokens)
        for role in ("recommender", "user")
    }
    n_sessions = len(data.sessions)

    def play(batch: int, first_session: int, seed: int) -> tuple[int, int, float, int]:
        """One rollout of ``batch`` sessions: (episodes, generated tokens, seconds, turns)."""
        venv = VectorRecDialogEnv(data, num_envs=batch, **env_kw)
        ids = [(first_session + k) % n_sessions for k in range(batch)]
        start = time.perf_counter()
        episodes = rollout(venv, agents, seed=seed, options=[{"session_id": s} for s in ids])
        seconds = time.perf_counter() - start
        tokens = sum(
            len(t.completion_ids) for ep in episodes for t in ep.recommender + ep.user_agent
        )
        return len(episodes), tokens, seconds, sum(ep.num_turns for ep in episodes)

    play(1, 0, seed=999)  # warm-up: constraint tables, allocator, kernels
    metrics: dict[str, float | None] = {}
    details: dict[str, dict] = {}
    for batch in args.batch_sizes:
        n_rollouts = max(1, math.ceil(args.episodes / batch))
        episodes = tokens = turns = 0
        seconds = 0.0
        for r in range(n_rollouts):
            e, tok, sec, tu = play(batch, r * batch, seed=r)
            episodes, tokens, seconds, turns = episodes + e, tokens + tok, seconds + sec, turns + tu
        metrics[f"rollout_tokens_per_s_b{batch}"] = tokens / seconds
        metrics[f"rollout_episodes_per_min_b{batch}"] = 60.0 * episodes / seconds
        details[f"b{batch}"] = {
            "episodes": episodes,
            "rollouts": n_rollouts,
            "generated_tokens": tokens,
            "turns": turns,
            "seconds": seconds,
        }
        print(
            f"B={batch:3d}: {episodes} episodes, {turns} turns, {tokens} tokens in {seconds:.1f}s "
            f"-> {tokens / seconds:.1f} tok/s, {60 * episodes / seconds:.1f} episodes/min",
            flush=True,
        )

    ratios: dict[str, float | None] = {}
    b_max, b_min = max(args.batch_sizes), min(args.batch_sizes)
    if b_max != b_min:
        ratios[f"b{b_max}_vs_b{b_min}_tokens_per_s"] = (
            metrics[f"rollout_tokens_per_s_b{b_max}"] / metrics[f"rollout_tokens_per_s_b{b_min}"]
        )
        print(f"B={b_max} vs B={b_min}: {ratios[f'b{b_max}_vs_b{b_min}_tokens_per_s']:.2f}x")
    if args.json:
        benchjson.write_result(
            args.json,
            "rollout",
            metrics,
            ratios=ratios,
            config={
                "model": args.model,
                "env": args.env,
                "batch_sizes": args.batch_sizes,
                "episodes": args.episodes,
                "max_turns": args.max_turns,
                "reason_tokens": args.reason_tokens,
                "decoding": "temperature 1.0, constrained",
                "device": str(policy.device),
                "dtype": str(policy.lm.dtype),
            },
            details=details,
        )


if __name__ == "__main__":
    main()
