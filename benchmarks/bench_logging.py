"""Cost of trajectory logging: env steps/s and peak memory with logging on vs off.

Same data and scripted agents as ``bench_env.py`` (its ML-1M-sized generated data, random
recommender, rule user). "off" steps a bare ``RecDialogEnv`` / ``VectorRecDialogEnv``;
"on" wraps it in ``coars_env.logs.LoggingWrapper`` / ``VectorLoggingWrapper`` writing
to a ``TrajectoryLogger`` (JSONL file in a temp folder, default ``flush_every``). Time is
measured around ``step`` only, so it includes the logging work but not the agents.

Replies are structured actions (``--replies structured``: the records' text fields are
empty) or canonical text replies with a 100-character reason each (``--replies text``,
default: records look like LLM turns). Each configuration is timed ``--repeats`` times,
on and off alternating, and the median is reported (the machine may be shared). Peak
memory is the ``tracemalloc`` peak of Python allocations during a separate, untimed run of
``--mem-steps`` steps (tracemalloc slows everything down), plus the process's peak RSS.

    python benchmarks/bench_logging.py
    python benchmarks/bench_logging.py --steps 20000 --json results/bench_logging.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_env  # noqa: E402  (its generated data and rule user)
import benchjson  # noqa: E402

from coars_env.data.common import DialogData  # noqa: E402
from coars_env.dialog.env import RECOMMENDER, USER, RecDialogEnv  # noqa: E402
from coars_env.dialog.parsing import format_recommender, format_user  # noqa: E402
from coars_env.logs import LoggingWrapper, TrajectoryLogger, VectorLoggingWrapper  # noqa: E402
from coars_env.vector import VectorRecDialogEnv  # noqa: E402

REASON = "It matches the dramas and comedies in the history, and similar users rated it well."


class Agents:
    """bench_env's agents, replying in structured or text form."""

    def __init__(self, n_candidates: int, text: bool, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.n = n_candidates
        self.text = text

    def recommend(self) -> int | str:
        position = int(self.rng.integers(self.n))
        return format_recommender(position, REASON) if self.text else position

    def judge(self, obs: dict) -> dict | str:
        answer = bench_env.rule_user(obs)
        if self.text:
            return format_user(answer["action"], answer["score"], REASON)
        return answer


def run_single(data: DialogData, steps: int, log: bool, text: bool, folder: Path) -> float:
    """Env steps/s of one env (agents excluded), logging on or off."""
    env = RecDialogEnv(data, render_prompts=False)
    logger = TrajectoryLogger(folder / "single.jsonl") if log else None
    stepper = LoggingWrapper(env, logger) if logger else env
    agents = Agents(env.n_candidates, text)
    obs, _ = stepper.reset(seed=0)
    elapsed = 0.0
    for _ in range(steps):
        if not env.agents:
            t0 = time.perf_counter()
            obs, _ = stepper.reset()
            elapsed += time.perf_counter() - t0
        if env.phase == 0:
            actions = {RECOMMENDER: agents.recommend()}
        else:
            actions = {USER: agents.judge(obs[USER])}
        t0 = time.perf_counter()
        obs, *_ = stepper.step(actions)
        elapsed += time.perf_counter() - t0
    if logger:
        logger.close()
    return steps / elapsed


def run_vector(
    data: DialogData, num_envs: int, steps: int, log: bool, text: bool, folder: Path
) -> float:
    """Env steps/s of ``num_envs`` lock-step episodes (autoreset), logging on or off."""
    venv = VectorRecDialogEnv(data, num_envs=num_envs, autoreset=True, render_prompts=False)
    logger = TrajectoryLogger(folder / "vector.jsonl") if log else None
    stepper = VectorLoggingWrapper(venv, logger) if logger else venv
    agents = Agents(venv.envs[0].n_candidates, text)
    obs, _ = stepper.reset(seed=0)
    calls = max(1, steps // num_envs)
    elapsed = 0.0
    for _ in range(calls):
        if venv.acting_agent == RECOMMENDER:
            replies = [agents.recommend() for _ in range(num_envs)]
        else:
            replies = [agents.judge(o[USER]) for o in obs]
        t0 = time.perf_counter()
        obs, *_ = stepper.step(replies)
        elapsed += time.perf_counter() - t0
    if logger:
        logger.close()
    return calls * num_envs / elapsed


def peak_traced_mb(data: DialogData, steps: int, log: bool, text: bool, folder: Path) -> float:
    """tracemalloc peak (MiB) of Python allocations over ``steps`` single-env steps."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    run_single(data, steps, log, text, folder)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40_000)
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mem-steps", type=int, default=5_000)
    parser.add_argument("--replies", choices=["text", "structured"], default="text")
    parser.add_argument("--json", default=None, help="write the result file here (run_all.py)")
    args = parser.parse_args()
    text = args.replies == "text"

    data = bench_env.generated_data()
    print(
        f"data: {data.name}, {len(data.sessions)} sessions, {len(data.items)} items; "
        f"replies: {args.replies}; {args.steps} steps x {args.repeats} repeats"
    )
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for _ in range(args.repeats):
            for log in (False, True):  # alternate, so drifting machine load hits both
                name = "on" if log else "off"
                sps = run_single(data, args.steps, log, text, folder)
                results.setdefault(f"single_{name}", []).append(sps)
                sps = run_vector(data, args.num_envs, args.steps, log, text, folder)
                results.setdefault(f"vector_{name}", []).append(sps)
        log_bytes = (folder / "single.jsonl").stat().st_size
        mem_off = peak_traced_mb(data, args.mem_steps, False, text, folder)
        mem_on = peak_traced_mb(data, args.mem_steps, True, text, folder)
        log_bytes_per_step = log_bytes / args.steps

    med = {k: statistics.median(v) for k, v in results.items()}
    single_ratio = med["single_on"] / med["single_off"]
    vector_ratio = med["vector_on"] / med["vector_off"]
    print(
        f"1 env:     off {med['single_off']:10,.0f} steps/s | on {med['single_on']:10,.0f}"
        f" steps/s | on/off {single_ratio:.3f}"
    )
    print(
        f"{args.num_envs} envs:   off {med['vector_off']:10,.0f} steps/s | on "
        f"{med['vector_on']:10,.0f} steps/s | on/off {vector_ratio:.3f}"
    )
    print(
        f"peak traced memory over {args.mem_steps} steps: off {mem_off:.3f} MiB | "
        f"on {mem_on:.3f} MiB; log file {2 * log_bytes_per_step:.0f} bytes per turn "
        "(episode summaries included)"
    )
    print(f"process peak RSS: {benchjson.max_rss_mb():.0f} MiB")
    if args.json:
        benchjson.write_result(
            args.json,
            "logging",
            {
                "single_off_steps_per_s": med["single_off"],
                "single_on_steps_per_s": med["single_on"],
                "vector_off_steps_per_s": med["vector_off"],
                "vector_on_steps_per_s": med["vector_on"],
                "peak_traced_off_mb": mem_off,
                "peak_traced_on_mb": mem_on,
                "log_bytes_per_step": log_bytes_per_step,
                "max_rss_mb": benchjson.max_rss_mb(),
            },
            ratios={"single_on_vs_off": single_ratio, "vector_on_vs_off": vector_ratio},
            config={
                "steps": args.steps,
                "num_envs": args.num_envs,
                "repeats": args.repeats,
                "replies": args.replies,
            },
            details={"runs": results},
        )


if __name__ == "__main__":
    main()
