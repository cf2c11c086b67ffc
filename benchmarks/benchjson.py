"""Helpers shared by the benchmark scripts: the ``--json`` result file, machine facts, peak memory.

Every ``benchmarks/bench_*.py`` script follows the convention documented at the top of
``benchmarks/run_all.py``; :func:`write_result` writes a file in that format. A script may
also write the dictionary itself: this module is a convenience, not a requirement.

Import it from a script in this folder with a plain ``import benchjson`` (a script's own
folder is on ``sys.path`` when it runs as ``python benchmarks/bench_x.py``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
"""Version of the result-file format described in ``run_all.py``."""


def machine_info() -> dict[str, Any]:
    """CPU model, core count, RAM, Python / torch versions, torch threads and GPU name."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_gb": _ram_gb(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # a benchmark without torch
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def write_result(
    path: str | Path,
    benchmark: str,
    metrics: dict[str, float | int | None],
    *,
    ratios: dict[str, float | None] | None = None,
    config: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one benchmark's result file (format: see ``run_all.py``) and return the dict.

    Args:
        path: where to write the JSON (parent folders are created).
        benchmark: short name, e.g. ``"trainer"`` for ``bench_trainer.py``.
        metrics: flat headline numbers; the unit is the name's suffix (``_per_s``, ``_mb``, ``_s``).
        ratios: the script's own headline ratios (``{"coars_vs_trl_grpo": 0.8}``).
        config: the sizes the numbers were measured at.
        details: anything else (per-method breakdowns, versions).
    """
    result = {
        "schema": SCHEMA_VERSION,
        "benchmark": benchmark,
        "metrics": metrics,
        "ratios": ratios or {},
        "config": config or {},
        "machine": machine_info(),
        "details": details or {},
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def rss_mb() -> float | None:
    """Current resident set size of this process in MiB (None without ``psutil``)."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def max_rss_mb() -> float:
    """Peak resident set size of this process since it started, in MiB (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    )  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak RSS over a block of code: ``with PeakMemory() as mem: ...; mem.peak_mb``.

    With ``psutil`` a background thread samples the RSS every ``interval`` seconds, so the
    peak belongs to the block alone (``source == "psutil"``). Without it the process-wide
    ``getrusage`` peak is reported (``source == "getrusage"``), which includes anything
    earlier in the process, such as model loading.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.before_mb: float | None = None
        self.peak_mb: float | None = None
        self.source = "psutil"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        self.before_mb = rss_mb()
        if self.before_mb is None:
            self.source = "getrusage"
            return self
        self.peak_mb = self.before_mb
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            current = rss_mb()
            if current is not None and (self.peak_mb is None or current > self.peak_mb):
                self.peak_mb = current
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.peak_mb = max_rss_mb()
            return
        self._stop.set()
        self._thread.join()
        current = rss_mb()
        if current is not None and self.peak_mb is not None:
            self.peak_mb = max(self.peak_mb, current)
