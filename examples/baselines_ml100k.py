"""The training-free baselines on ML-100K: writes docs/results/baselines_ml100k.{md,csv}.

Systems, all on the same seeded random subset of test sessions:

- ``random`` recommender vs the oracle user (clicks only the target), T = 5;
- ``genre`` (content: the candidate whose genres the history shares most) vs the oracle user;
- ``SASRec`` (scripted: top-1 first, then history similarity) vs the oracle user, T = 5;
  its turn-1 Hit@1 is the single-shot SASRec top-1;
- ``zero-shot``: the LLM recommends once (T = 1); the same LLM with the plain user prompt is
  the user side, which gives the zero-shot user agent's alignment F1;
- ``AFL-style``: LLM recommender + LLM user with memory and reflection prompts, T = 5;
- ``AFL-style recommender vs oracle user``: the same recommender against a user that
  clicks only the target (a Hit@1 that a lenient LLM user cannot inflate).

LLM decoding is greedy and constrained (every answer parses). Usage::

    python examples/baselines_ml100k.py --n-sessions 200              # SmolLM2 on CPU: hours
    python examples/baselines_ml100k.py --n-sessions 200 --device cuda
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import pandas as pd

import coars_env
from coars_agents.baselines import afl, zero_shot
from coars_agents.evaluate import (
    EvalResult,
    comparison_frame,
    comparison_table,
    evaluate,
    to_markdown,
)
from coars_agents.policy import LLMPolicy, SamplingConfig

COLUMNS = (
    "hit@1",
    "turn1_hit@1",
    "avg_turns",
    "click_rate",
    "wrong_click_rate",
    "user_f1",
    "user_precision",
    "user_recall",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="RecDialog-ml100k")
    parser.add_argument("--n-sessions", type=int, default=200)
    parser.add_argument("--n-alignment-users", type=int, default=None, help="default: all")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", help="LLM dtype (float32, bfloat16)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reason-tokens", type=int, default=24)
    parser.add_argument("--systems", default="random,genre,sasrec,zero-shot,afl,afl-oracle")
    parser.add_argument("--out", default="docs/results", help="where the .md and .csv go")
    parser.add_argument("--runs", default="runs/baselines_ml100k", help="per-system outputs")
    parser.add_argument("--data-pickle", default=None, help="a pickled DialogData to use")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--env-options", default="", help="EnvConfig overrides as JSON")
    parser.add_argument("--data-options", default="", help="DataConfig overrides as JSON")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.data_pickle:
        data = pickle.loads(Path(args.data_pickle).read_bytes())
    else:
        data_kw = json.loads(args.data_options) if args.data_options else {}
        data = coars_env.load_dialog_data(args.env, "test", 0, **data_kw)
    print(
        f"data {data.name}/{data.split}: {len(data.sessions)} sessions, "
        f"{len(data.alignment)} alignment users ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )

    systems = args.systems.split(",")
    policy = None
    if any(s in systems for s in ("zero-shot", "afl", "afl-oracle")):
        if args.model == "tiny":  # a random test model: smoke runs of this script only
            from coars_agents.models import tiny_test_model

            model, tokenizer = tiny_test_model(0, max_position_embeddings=8192)
            policy = LLMPolicy(model.to(args.device or "cpu"), tokenizer)
        else:
            policy = LLMPolicy.from_pretrained(
                args.model, device=args.device, dtype=getattr(torch, args.dtype)
            )
    sampling = SamplingConfig(greedy=True, max_new_tokens=args.reason_tokens + 24)
    llm = {"sampling": sampling, "reason_tokens": args.reason_tokens}
    env_kw = json.loads(args.env_options) if args.env_options else {}
    common = {
        "env_overrides": env_kw,
        "n_sessions": args.n_sessions,
        "n_alignment_users": args.n_alignment_users,
        "batch_size": args.batch_size,
    }

    results: list[EvalResult] = []
    runs = Path(args.runs)
    for system in systems:
        t = time.perf_counter()
        if system == "random":
            r = evaluate(data, "random", "oracle", name="random", log_dir=runs / system, **common)
        elif system == "genre":
            r = evaluate(data, "genre", "oracle", name="genre", log_dir=runs / system, **common)
        elif system == "sasrec":
            r = evaluate(data, "sasrec", "oracle", name="SASRec", log_dir=runs / system, **common)
        elif system == "zero-shot":
            r = zero_shot(policy, user="llm", **llm).evaluate(data, log_dir=runs / system, **common)
        elif system == "afl":
            r = afl(policy, **llm).evaluate(data, log_dir=runs / system, **common)
        elif system == "afl-oracle":
            b = afl(policy, **llm)
            r = evaluate(
                data,
                b.recommender,
                "oracle",
                name="AFL-style recommender vs oracle user",
                log_dir=runs / system,
                **{**common, "env_overrides": {**b.env_overrides, **env_kw}},
            )
        else:
            raise ValueError(f"unknown system {system!r}")
        results.append(r)
        print(
            f"{r.name}: hit@1 {r['hit@1']}, turn1 {r['turn1_hit@1']}, "
            f"user_f1 {r['user_f1']} ({time.perf_counter() - t:.0f}s)",
            flush=True,
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "baselines_ml100k"
    comparison_frame(results).to_csv(stem.with_suffix(".csv"), index=False)
    table = comparison_table(results, COLUMNS)
    model = "none" if policy is None else f"{args.model} ({args.dtype}, {policy.device})"
    header = [
        "# Training-free baselines on ML-100K",
        "",
        f"- data: `{data.name}` test split, {results[0].config['n_sessions']} of "
        f"{len(data.sessions)} sessions (seeded random subset, seed 0); alignment: "
        f"{_alignment_users(results) or 'no'} users x 20 items",
        f"- LLM: {model}; greedy, constrained decoding; rationale budget {args.reason_tokens} "
        "tokens",
        "- 95% CIs: Wilson (proportions), normal (means), user bootstrap (F1)",
        f"- command: `python examples/baselines_ml100k.py {' '.join(_argv())}`",
        "",
    ]
    (stem.with_suffix(".md")).write_text("\n".join(header) + "\n" + to_markdown(table))
    (runs / "summary.json").write_text(
        json.dumps({r.name: r.config for r in results}, indent=2, default=str)
    )
    print(to_markdown(table))
    print(pd.read_csv(stem.with_suffix(".csv")).head())


def _alignment_users(results: list[EvalResult]) -> int | None:
    return next((r.config["n_alignment_users"] for r in results if r.alignment), None)


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
