"""Run every benchmark in ``benchmarks/`` and print one table of headline ratios.

    python benchmarks/run_all.py                # every bench_*.py, small sizes (--quick)
    python benchmarks/run_all.py --full         # each script's own default sizes
    python benchmarks/run_all.py --only trainer,env --json results/bench_all.json

Convention for benchmark scripts (``benchmarks/bench_<name>.py``)
=================================================================

1. **Command line.** A script runs as ``python benchmarks/bench_<name>.py`` from the repo
   root and accepts

   - ``--json PATH``: write the result file below to ``PATH`` (create parent folders);
   - ``--quick``: small sizes that finish in well under a minute on a 2-core CPU (smoke
     runs, CI, ``run_all.py``). The default sizes are the script's "real" measurement.

   ``run_all.py`` looks for the literal flags in a script's source: without ``--full`` a
   script that lacks ``--quick`` is skipped ("skipped: no --quick"; its full size may take
   long on a shared machine), and a script that lacks ``--json`` still runs but its numbers
   are not collected. Scripts run from the repo root with ``COARS_DATA_DIR`` defaulting to
   ``../shared/datasets`` (as ``scripts/test.sh`` does).

2. **Result file.** One JSON object (``benchmarks/benchjson.py``'s ``write_result`` writes
   it; writing it by hand is fine too)::

       {
         "schema": 1,
         "benchmark": "<name>",                  # e.g. "trainer" for bench_trainer.py
         "metrics": {"<metric>": number|null},   # flat headline numbers
         "ratios":  {"<ratio>": number|null},    # the script's headline ratios
         "config":  {...},                       # sizes the numbers were measured at
         "machine": {...},                       # benchjson.machine_info()
         "details": {...}                        # anything else (breakdowns, versions)
       }

   Only ``benchmark`` and ``metrics`` are required. Metric names end in their unit:
   ``_per_s`` (throughput), ``_s`` (seconds), ``_mb`` (MiB), ``_bytes``. A ratio is
   "how many times faster/larger" (``a_vs_b`` = a / b), so > 1 means ``a`` wins on a
   throughput.

3. **Headline ratios.** ``run_all.py`` prints every entry of ``ratios``. For the issue's
   three comparisons it also computes the ratio from ``metrics`` when the script did not
   report it, from these agreed metric names (see :data:`KNOWN_RATIOS`):

   - ``bench_env.py``: ``single_env_steps_per_s`` and ``vector_env_steps_per_s`` (64 envs)
     -> ``vector_vs_single_env_steps_per_s``;
   - ``bench_generation.py``: ``rollout_tokens_per_s`` and ``naive_tokens_per_s`` (plain
     ``model.generate``) -> ``rollout_vs_naive_tokens_per_s``;
   - ``bench_trainer.py``: ``coars_samples_per_s`` and ``trl_grpo_samples_per_s``
     -> ``coars_vs_trl_grpo_samples_per_s``.

4. **Exit status.** 0 on success. A script that cannot run here (an optional dependency
   missing) should still exit 0, print why, and leave the affected metrics out or null.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

EXPECTED = ("env", "generation", "trainer", "data")
"""Benchmarks the issue asks for; a missing one gets a "skipped: not found" row."""

KNOWN_RATIOS: dict[str, list[tuple[str, str, str]]] = {
    "env": [
        ("vector_vs_single_env_steps_per_s", "vector_env_steps_per_s", "single_env_steps_per_s")
    ],
    "generation": [("rollout_vs_naive_tokens_per_s", "rollout_tokens_per_s", "naive_tokens_per_s")],
    "trainer": [
        ("coars_vs_trl_grpo_samples_per_s", "coars_samples_per_s", "trl_grpo_samples_per_s")
    ],
}
"""benchmark -> [(ratio name, numerator metric, denominator metric)], computed when the
script's own ``ratios`` lacks that name."""


@dataclass
class Outcome:
    """What happened to one benchmark script."""

    name: str
    status: str
    """``ok``, ``skipped: not found``, ``failed (exit N)``, ``timeout``, ``ok (no --json)``..."""
    seconds: float = 0.0
    result: dict[str, Any] | None = None
    ratios: dict[str, float | None] = field(default_factory=dict)
    log: str = ""


def discover(only: list[str] | None) -> list[tuple[str, Path]]:
    """``(name, path)`` of the expected benchmarks plus any other ``bench_*.py``, sorted."""
    names = set(EXPECTED) | {p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py")}
    if only:
        names &= set(only)
    ordered = [n for n in EXPECTED if n in names] + sorted(names - set(EXPECTED))
    return [(n, BENCH_DIR / f"bench_{n}.py") for n in ordered]


def derived_ratios(name: str, result: dict[str, Any]) -> dict[str, float | None]:
    """The script's ``ratios``, plus :data:`KNOWN_RATIOS` computed from its ``metrics``."""
    ratios = dict(result.get("ratios") or {})
    metrics = result.get("metrics") or {}
    for ratio, num, den in KNOWN_RATIOS.get(name, []):
        if ratio in ratios:
            continue
        a, b = metrics.get(num), metrics.get(den)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            ratios[ratio] = a / b
    return ratios


def run_script(name: str, path: Path, out_dir: Path, quick: bool, timeout: float) -> Outcome:
    """Run one script as a subprocess and read its ``--json`` file."""
    if not path.exists():
        return Outcome(name, "skipped: not found")
    source = path.read_text(errors="replace")
    takes_json = '"--json"' in source or "'--json'" in source
    takes_quick = '"--quick"' in source or "'--quick'" in source
    if quick and not takes_quick:
        return Outcome(name, "skipped: no --quick (run_all.py --full runs it)")
    json_path = out_dir / f"bench_{name}.json"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(path)]
    if quick:
        cmd.append("--quick")
    if takes_json:
        cmd += ["--json", str(json_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    default_data = REPO_ROOT.parent / "shared" / "datasets"
    if "COARS_DATA_DIR" not in env and default_data.is_dir():
        env["COARS_DATA_DIR"] = str(default_data)
    print(f"[run_all] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        log = out.decode(errors="replace") if isinstance(out, bytes) else out
        (out_dir / f"bench_{name}.log").write_text(log)
        return Outcome(name, f"timeout ({timeout:.0f} s)", time.perf_counter() - start, log=log)
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    (out_dir / f"bench_{name}.log").write_text(log)
    if proc.returncode != 0:
        return Outcome(name, f"failed (exit {proc.returncode})", seconds, log=log)
    if not takes_json:
        return Outcome(name, "ok (no --json: numbers not collected)", seconds, log=log)
    if not json_path.exists():
        return Outcome(name, "failed: no JSON written", seconds, log=log)
    try:
        result = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        return Outcome(name, f"failed: bad JSON ({exc})", seconds, log=log)
    return Outcome(name, "ok", seconds, result, derived_ratios(name, result), log)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}x"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_tables(outcomes: list[Outcome]) -> str:
    """Markdown: one row per script (status, time), then one row per headline ratio."""
    lines = ["| benchmark | status | seconds |", "|---|---|---:|"]
    for o in outcomes:
        lines.append(f"| bench_{o.name}.py | {o.status} | {o.seconds:.1f} |")
    lines += ["", "| benchmark | ratio | value |", "|---|---|---:|"]
    for o in outcomes:
        if not o.ratios and o.result is None:
            lines.append(f"| {o.name} | - | {o.status} |")
        elif not o.ratios:  # no ratio: show a few headline metrics instead
            shown = list((o.result.get("metrics") or {}).items())[:4]
            text = ", ".join(f"{k}={_num(v)}" for k, v in shown) or "no metrics"
            lines.append(f"| {o.name} | (no ratios) | {text} |")
        for ratio, value in o.ratios.items():
            lines.append(f"| {o.name} | {ratio} | {_fmt(value)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Outcome]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--full", action="store_true", help="run each script at its default sizes (no --quick)"
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated benchmark names (env,generation,trainer,...)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per script")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="keep each script's JSON and log here (default: a temp folder)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",")] if args.only else None

    with tempfile.TemporaryDirectory(prefix="bench_all_") as tmp:
        out_dir = args.out_dir or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        outcomes = [
            run_script(name, path, out_dir, not args.full, args.timeout)
            for name, path in discover(only)
        ]

    for o in outcomes:
        if o.status.startswith(("failed", "timeout")):
            print(f"\n--- bench_{o.name}.py: {o.status}; last lines of its output ---")
            print("\n".join(o.log.splitlines()[-20:]))
    print()
    print(format_tables(outcomes))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    o.name: {
                        "status": o.status,
                        "seconds": o.seconds,
                        "ratios": o.ratios,
                        "result": o.result,
                    }
                    for o in outcomes
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
    return outcomes


if __name__ == "__main__":
    outcomes = main()
    sys.exit(1 if any(o.status.startswith(("failed", "timeout")) for o in outcomes) else 0)
