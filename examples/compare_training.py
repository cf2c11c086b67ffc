"""CoARS against outcome-only RL and no training: one table over datasets and seeds.

Every (dataset, method, seed) is one job: a :class:`CoARSTrainer` run with the shared
settings (``--total-steps``, ``--learning-rate``, ...), then a greedy evaluation of the final
adapters on held-out sessions of ``--final-split``. Methods:

- ``untrained``: the base model with fresh adapters (no step taken);
- ``outcome``: the RL baseline of METHOD.md (every recommender turn gets +1 / -1 for the
  episode's final hit, no credit term, the user agent is not trained);
- ``coars``: the interaction rewards plus the self-distilled credit term, both agents;
- METHOD.md's ablations of CoARS: ``coars-no-credit`` (no self-distillation: lambda_rec =
  lambda_user = 0), ``coars-rec-only`` and ``coars-user-only`` (only that agent's adapter
  learns). Not run by default: pass them to ``--methods``.

Outputs in ``--out-dir``: one folder per job (the trainer's logs and checkpoints, and
``result.json``), ``results.csv`` (one row per job), ``summary.csv`` / ``summary.md`` (mean
and 95% t-interval over seeds per dataset and method) and ``learning_curves_<env>.png``.
Finished jobs are skipped when the command is run again, so an interrupted comparison
resumes where it stopped.

    # CPU smoke scale (a random tiny model: tests the pipeline, learns nothing useful)
    python examples/compare_training.py --model tiny --total-steps 2 --final-sessions 8
    # a GPU run: docs/results/synthetic_h200_15steps.md has the recorded one's command
    python examples/compare_training.py --env-ids RecDialog-synthetic RecDialog-ml100k \\
        --model smollm2 --workers 9 --total-steps 60 --sessions-per-step 16 \\
        --rollouts-per-session 4 --group-normalise --reason-tokens 4 --learning-rate 5e-4 \\
        --micro-batch-size 16 --merged-rollouts --mixed-precision bf16 --final-sessions 300
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
import tyro

from coars_agents.coars import CoARSConfig, CoARSTrainer, load_run_data
from coars_agents.evaluate import SCRIPTED_RECOMMENDERS, evaluate, plot_learning_curves

Method = Literal[
    "untrained", "outcome", "coars", "coars-no-credit", "coars-rec-only", "coars-user-only"
]

METHOD_SETTINGS: dict[str, dict[str, object]] = {
    "untrained": dict(total_steps=0, eval_every=0),
    "outcome": dict(reward_mode="outcome"),
    "coars": dict(reward_mode="interaction"),
    "coars-no-credit": dict(reward_mode="interaction", credit_coef_rec=0.0, credit_coef_user=0.0),
    "coars-rec-only": dict(reward_mode="interaction", train_agents="recommender"),
    "coars-user-only": dict(reward_mode="interaction", train_agents="user"),
}
"""What each method changes in the shared trainer settings (``Args.train``)."""
METHODS: tuple[str, ...] = get_args(Method)

TABLE_METRICS = (
    ("eval/oracle/hit@1", "Hit@1"),
    ("eval/oracle/turn1_hit@1", "turn-1 Hit@1"),
    ("eval/turn1_target_prob", "turn-1 P(target)"),
    ("eval/ndcg@5", "NDCG@5"),
    ("eval/llm/hit@1", "Hit@1 (LLM user)"),
    ("eval/llm/user_f1", "user F1"),
    ("eval/llm/wrong_click_rate", "wrong-click rate"),
    ("eval/oracle/rec_format_failure_rate", "rec. format failures"),
    ("eval/llm/user_format_failure_rate", "user format failures"),
)
"""(result key, column name) of the summary table; Hit@1 is against the oracle user. turn-1
P(target) (the expected turn-1 Hit@1) and NDCG@5 come from the recommender's exact turn-1
choice distribution (``coars_agents.evaluate.turn1_choice_ranking``)."""

# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1); 1.96 beyond.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass
class Args:
    """Command line of examples/compare_training.py."""

    env_ids: tuple[str, ...] = ("RecDialog-synthetic",)
    """Datasets (env ids) to compare on."""
    methods: tuple[Method, ...] = ("untrained", "outcome", "coars")
    """Methods (rows of the table): see :data:`METHOD_SETTINGS`."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One training run per seed and method (the seed drives data sampling, rollouts and
    the adapters' initialisation; the data split itself uses the trainer's default)."""
    out_dir: str = "runs/compare"
    """Folder of all jobs, tables and plots."""
    final_split: Literal["valid", "test"] = "test"
    """Split of the final evaluation (training's periodic evaluations use ``eval_split``)."""
    final_sessions: int = 300
    """Held-out sessions of the final evaluation (one seeded subset, the same for every job
    and reference row: paired comparisons)."""
    final_alignment_users: int = 50
    """Users whose alignment sets the final evaluation judges (user F1)."""
    workers: int = 1
    """Jobs run in parallel processes (on one GPU too: small models leave it mostly idle)."""
    threads_per_job: int = 0
    """Torch CPU threads of each job (0: the machine's cores divided by ``workers``). Set it
    when other processes share the machine: a lone job given every core competes with them
    for the host work of decoding (on a GPU, 1-2 threads a job are enough)."""
    references: tuple[str, ...] = ("random", "genre")
    """Scripted recommenders evaluated against the oracle user on the same held-out sessions,
    as reference rows (``coars_agents.evaluate.SCRIPTED_RECOMMENDERS``; ``none``: no rows).
    Checked before any job starts, so a typo cannot cost a finished comparison its table."""
    report_only: bool = False
    """Run nothing: tabulate the finished jobs found in ``out_dir`` and plot their curves."""
    deadline_minutes: float = 0.0
    """Do not start a job later than this many minutes after launch (0: no limit); the
    tables then cover the jobs that finished."""
    train: CoARSConfig = field(
        default_factory=lambda: CoARSConfig(
            total_steps=60, sessions_per_step=16, eval_every=10, eval_sessions=64, tensorboard=False
        )
    )
    """Shared trainer settings (env_id, seed, reward_mode and output_dir are set per job)."""


def job_config(args: Args, env_id: str, method: Method, seed: int) -> CoARSConfig:
    """The trainer configuration of one job."""
    return dataclasses.replace(
        args.train,
        env_id=env_id,
        seed=seed,
        output_dir=str(Path(args.out_dir) / _slug(env_id) / method / f"seed{seed}"),
        **METHOD_SETTINGS[method],  # type: ignore[arg-type]
    )


def run_job(args: Args, env_id: str, method: Method, seed: int, threads: int) -> dict:
    """Train (unless untrained), evaluate the final adapters, write and return result.json."""
    import torch

    torch.set_num_threads(threads)
    if (done := finished_result(args, env_id, method, seed)) is not None:
        return done
    config = job_config(args, env_id, method, seed)
    start = time.perf_counter()
    trainer = CoARSTrainer(config)
    trainer.train()
    trained = time.perf_counter()
    # The same held-out sessions for every method and seed (paired comparisons).
    final = trainer.evaluate(
        args.final_sessions,
        data=load_run_data(config, args.final_split),
        subset_seed=0,
        alignment_users=args.final_alignment_users,
    )
    result = {
        "env_id": env_id,
        "method": method,
        "seed": seed,
        "steps": trainer.step,
        "train_seconds": trained - start,
        "eval_seconds": time.perf_counter() - trained,
        "split": args.final_split,
        **final,
    }
    result_path = Path(config.output_dir) / "result.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval over seeds (NaN half-width with one seed)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = _T95.get(len(values) - 1, 1.96) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method): seeds, steps, minutes, and per metric the mean over
    seeds with its 95% t-interval (columns ``<name>``, ``<name> low``, ``<name> high``)."""
    rows = []
    for (env_id, method), group in results.groupby(["env_id", "method"], sort=False):
        row = {
            "dataset": env_id,
            "method": method,
            "seeds": len(group),
            "steps": int(group["steps"].max()),  # the most any seed took (time limits differ)
            "eval sessions": int(group["eval/sessions"].max()),
            "train min": float(group["train_seconds"].mean() / 60),
        }
        for key, name in TABLE_METRICS:
            values = group[key].to_numpy(dtype=float) if key in group else np.array([])
            mean, low, high = t_interval(values)
            # Every table metric is a rate: an interval beyond [0, 1] says nothing more.
            row[name], row[f"{name} low"], row[f"{name} high"] = mean, max(low, 0), min(high, 1)
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table: ``mean [low, high]`` per metric."""
    names = [name for _, name in TABLE_METRICS]
    head = ["dataset", "method", "seeds", "steps", "eval sessions", "train min", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        cells = [
            r["dataset"],
            r["method"],
            str(r["seeds"]),
            str(r["steps"]),
            str(r["eval sessions"]),
        ]
        cells.append(f"{r['train min']:.1f}")
        for name in names:
            mean, low, high = r[name], r[f"{name} low"], r[f"{name} high"]
            if math.isnan(mean):
                cells.append("-")
            elif math.isnan(low):
                cells.append(f"{mean:.3f}")
            else:
                cells.append(f"{mean:.3f} [{low:.3f}, {high:.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reference_names(references: tuple[str, ...]) -> tuple[str, ...]:
    """The scripted reference rows to evaluate: ``references`` checked, ``("none",)`` -> ()."""
    if tuple(references) == ("none",):
        return ()
    unknown = [name for name in references if name not in SCRIPTED_RECOMMENDERS]
    if unknown:
        raise ValueError(
            f"unknown reference recommender(s) {unknown}; choose from "
            f"{', '.join(SCRIPTED_RECOMMENDERS)}, or 'none' for no reference rows"
        )
    return tuple(references)


def main(args: Args) -> pd.DataFrame:
    """Run (or resume) every job, then write the tables and learning curves."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(e, m, s) for e in args.env_ids for m in args.methods for s in args.seeds]
    if args.threads_per_job < 0:
        raise ValueError(f"threads_per_job must be >= 0 (0: automatic), got {args.threads_per_job}")
    threads = args.threads_per_job or max(1, (os.cpu_count() or 1) // args.workers)
    references = reference_names(args.references)
    for job in jobs:  # a bad combination (e.g. a scripted partner) fails before any job runs
        job_config(args, *job)
    start, results, failed = time.monotonic(), [], []

    def finished(job: tuple, outcome: Callable[[], dict | None]) -> None:
        try:
            result = outcome()
        except Exception as error:  # one failed job (e.g. out of GPU memory) loses no other
            failed.append(job)
            report = _record_failure(args, job, error)
            print(f"FAILED {job}: {type(error).__name__}: {error} (see {report})", flush=True)
            return
        if result is not None:
            (Path(job_config(args, *job).output_dir) / "error.txt").unlink(missing_ok=True)
            results.append(result)
            write_tables(out, results)  # after every job: a killed comparison keeps its table
            print(f"done {job}: Hit@1 {result['eval/oracle/hit@1']:.3f}", flush=True)

    if args.report_only:
        results = [r for job in jobs if (r := finished_result(args, *job)) is not None]
    elif args.workers == 1:
        for job in jobs:
            finished(job, functools.partial(_guarded_job, args, *job, threads, start))
    else:
        # Spawned processes: CUDA cannot be shared with forked ones.
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = {job: pool.submit(_guarded_job, args, *job, threads, start) for job in jobs}
            for job, future in futures.items():
                finished(job, future.result)
    results += [reference_result(args, e, name) for e in args.env_ids for name in references]
    summary = write_tables(out, results)
    print(to_markdown(summary))
    for env_id in args.env_ids:
        runs = {
            method: [d for s in args.seeds if (d := _run_dir(args, env_id, method, s)) is not None]
            for method in args.methods
            if method != "untrained"
        }
        runs = {method: dirs for method, dirs in runs.items() if dirs}
        if runs:
            png = plot_learning_curves(runs, out / f"learning_curves_{_slug(env_id)}.png")
            print(f"wrote {png}")
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(jobs)} jobs failed: {failed}. Each one's error is in its "
            "folder's error.txt; the tables cover the finished jobs. Run the same command "
            "again to retry only the failed and unfinished jobs (e.g. with fewer --workers "
            "or a smaller --micro-batch-size after running out of memory)."
        )
    return pd.DataFrame(results)


def reference_result(args: Args, env_id: str, name: str) -> dict:
    """A scripted recommender against the oracle user on the final sessions (as a row)."""
    config = dataclasses.replace(args.train, env_id=env_id)
    data = load_run_data(config, args.final_split)
    env = dict(max_turns=config.max_turns, max_history_items=config.history_items)
    n = min(args.final_sessions, len(data.sessions))
    # subset_seed=0: the very sessions of the jobs' final evaluations.
    result = evaluate(
        data, name, "oracle", n_sessions=n, env_overrides=env, subset_seed=0, progress=False
    )
    row = {"env_id": env_id, "method": f"ref:{name}", "seed": 0, "steps": 0}
    row |= {"train_seconds": 0.0, "eval_seconds": result.config["seconds"], "eval/sessions": n}
    for metric in ("hit@1", "turn1_hit@1", "rec_format_failure_rate"):
        row[f"eval/oracle/{metric}"] = float(result[metric].mean)
    row["eval/ndcg@5"] = float(result["ndcg@5"].mean)  # the scripted ranking
    return row


def write_tables(out: Path, results: list[dict]) -> pd.DataFrame:
    """``results.csv`` (one row per job), ``summary.csv`` and ``summary.md``."""
    frame = pd.DataFrame(results)
    frame.to_csv(out / "results.csv", index=False)
    summary = summarise(frame) if len(frame) else pd.DataFrame()
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(to_markdown(summary) if len(summary) else "no finished job\n")
    return summary


def finished_result(args: Args, env_id: str, method: Method, seed: int) -> dict | None:
    """A job's ``result.json``, or None when it has not finished."""
    path = Path(job_config(args, env_id, method, seed).output_dir) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _run_dir(args: Args, env_id: str, method: Method, seed: int) -> str | None:
    folder = job_config(args, env_id, method, seed).output_dir
    return folder if (Path(folder) / "metrics.jsonl").is_file() else None


def _guarded_job(args: Args, env_id: str, method: Method, seed: int, threads: int, start: float):
    if args.deadline_minutes and time.monotonic() - start > 60 * args.deadline_minutes:
        return None
    return run_job(args, env_id, method, seed, threads)


def _record_failure(args: Args, job: tuple, error: BaseException) -> Path:
    """Write a failed job's traceback to ``<job folder>/error.txt``; a retry overwrites it."""
    folder = Path(job_config(args, *job).output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    (folder / "error.txt").write_text(trace)
    return folder / "error.txt"


def _slug(env_id: str) -> str:
    return env_id.removeprefix("RecDialog-")


if __name__ == "__main__":
    main(tyro.cli(Args, config=(tyro.conf.OmitArgPrefixes,)))
