"""The benchmark harness: bench_trainer at a tiny size, and run_all's bookkeeping."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as a module (the folder is not a package); the
    environment variables and ``sys.path`` entries it sets are undone after the test."""
    for var in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(var, "1" if var == "HF_HUB_OFFLINE" else "false")
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trainer_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny bench_trainer run (TRL too when installed), in one process, 1 step each."""
    methods = "trl_grpo,coars" if importlib.util.find_spec("trl") else "coars"
    out = tmp_path_factory.mktemp("bench") / "trainer.json"
    cmd = [
        sys.executable,
        str(BENCH_DIR / "bench_trainer.py"),
        "--quick",
        "--no-isolate",
        "--device",
        "cpu",
        "--methods",
        methods,
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_trainer_coars_hook(trainer_result: dict) -> None:
    assert trainer_result["benchmark"] == "trainer"
    assert trainer_result["config"]["steps"] == 1
    assert trainer_result["metrics"]["coars_samples_per_s"] > 0
    coars = trainer_result["details"]["methods"]["coars"]
    assert coars["mean_completion_tokens"] == trainer_result["config"]["completion_tokens"]
    assert set(coars["phases_s"]) == {"generate", "teacher", "student", "update"}


@pytest.mark.slow
def test_bench_trainer_trl_grpo(trainer_result: dict) -> None:
    pytest.importorskip("trl")
    metrics = trainer_result["metrics"]
    assert metrics["trl_grpo_samples_per_s"] > 0
    trl = trainer_result["details"]["methods"]["trl_grpo"]
    assert trl["mean_completion_tokens"] == trainer_result["config"]["completion_tokens"]
    ratio = trainer_result["ratios"]["coars_vs_trl_grpo_samples_per_s"]
    assert ratio == pytest.approx(
        metrics["coars_samples_per_s"] / metrics["trl_grpo_samples_per_s"]
    )


def test_synthetic_prompts_have_exact_length(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load("bench_trainer", monkeypatch)
    from coars_agents.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    texts = bench.synthetic_texts(tokenizer, 37, 3, seed=0)
    assert len(set(texts)) == 3
    assert all(len(tokenizer(t)["input_ids"]) == 37 for t in texts)


def test_run_all_missing_and_fake_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_all = _load("run_all", monkeypatch)
    missing = run_all.run_script("nope", tmp_path / "bench_nope.py", tmp_path, True, 60)
    assert missing.status == "skipped: not found"

    fake = tmp_path / "bench_trainer.py"
    fake.write_text(
        "import argparse, json\n"
        "p = argparse.ArgumentParser(); p.add_argument('--json'); p.add_argument('--quick',"
        " action='store_true')\n"
        "a = p.parse_args()\n"
        "assert a.quick\n"
        "json.dump({'benchmark': 'trainer', 'metrics': {'coars_samples_per_s': 3.0,"
        " 'trl_grpo_samples_per_s': 2.0}}, open(a.json, 'w'))\n"
    )
    outcome = run_all.run_script("trainer", fake, tmp_path, True, 60)
    assert outcome.status == "ok"
    assert outcome.ratios["coars_vs_trl_grpo_samples_per_s"] == pytest.approx(1.5)
    table = run_all.format_tables([missing, outcome])
    assert "skipped: not found" in table and "1.5x" in table

    broken = tmp_path / "bench_broken.py"
    broken.write_text("# accepts '--quick'\nraise SystemExit(3)\n")
    assert run_all.run_script("broken", broken, tmp_path, True, 60).status == "failed (exit 3)"

    no_quick = tmp_path / "bench_slow.py"
    no_quick.write_text("raise SystemExit(4)\n")
    assert run_all.run_script("slow", no_quick, tmp_path, True, 60).status.startswith("skipped")
