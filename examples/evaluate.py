"""Evaluate recommender / user pairs with one function (coars_agents.evaluate.evaluate).

Scripted baselines against the oracle user, then the zero-shot and AFL-style LLM baselines on
a few sessions. Everything lands in runs/eval_example/<name>/ (Markdown and CSV tables, PNG
plots, trajectories). The same from the command line::

    coars-eval --env RecDialog-ml100k --recommender sasrec --user oracle --n-sessions 200
    coars-eval --env RecDialog-ml100k --baseline afl --model smollm2 --n-sessions 20
    coars-eval --env RecDialog-ml100k --recommender runs/coars/checkpoints/step_000100 --user llm

Run: ``python examples/evaluate.py [--llm]`` (``--llm`` adds SmolLM2: slow on a CPU).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import coars_env
from coars_agents.baselines import afl, zero_shot
from coars_agents.evaluate import comparison_table, evaluate, to_markdown
from coars_agents.policy import LLMPolicy

OUT = Path("runs/eval_example")


def main() -> None:
    # ML-100K when the real data is at hand (COARS_DATA_DIR), else the embedded synthetic set.
    root = os.environ.get("COARS_DATA_DIR")
    has_ml100k = bool(root) and (Path(root) / "ml-100k").is_dir()
    env_id = "RecDialog-ml100k" if has_ml100k else "RecDialog-synthetic"
    data = coars_env.load_dialog_data(env_id, "test")
    results = [
        evaluate(data, rec, "oracle", n_sessions=200, seeds=(0, 1), log_dir=OUT / rec)
        for rec in ("random", "popularity", "genre", "sasrec")
    ]
    if "--llm" in sys.argv:
        policy = LLMPolicy.from_pretrained("smollm2")
        for baseline in (zero_shot(policy), afl(policy)):
            results.append(
                baseline.evaluate(
                    data,
                    n_sessions=8,
                    batch_size=8,
                    n_alignment_users=2,
                    log_dir=OUT / baseline.name,
                )
            )
    print(to_markdown(comparison_table(results)))


if __name__ == "__main__":
    main()
