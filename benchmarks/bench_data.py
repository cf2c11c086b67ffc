"""The real-data pipeline: SASRec quality and the cost of training it and building sessions.

For each dataset (default ML-100K and ML-1M, read from ``$COARS_DATA_DIR`` or ``--data-dir``):

- load + k-core + leave-one-out split (timed);
- train SASRec on the training sequences (timed, the cache is bypassed);
- full-ranking HR@10 / NDCG@10 on the test targets, seen items excluded, next to a
  popularity ranker;
- build sessions + candidates + peers + alignment sets for all three splits (timed), in
  ``sasrec`` and in ``random`` candidate mode, and report on the test sessions: Hit@1 of
  SASRec's top-1 among the 20 candidates, SASRec top-20 coverage of the target.

Caveat: the shared ML-1M copy (``interactions.tsv``) has no timestamps, so its targets are
a seeded random hold-out, not the chronological last items: its numbers are not comparable
to published (chronological) ML-1M results.

    python benchmarks/bench_data.py                       # ml-100k and ml-1m
    python benchmarks/bench_data.py --quick               # ml-100k, a few epochs (smoke run)
    python benchmarks/bench_data.py --datasets ml-1m --epochs 20 --json results/bench_data.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchjson  # noqa: E402

from coars_env.data.prepare import (  # noqa: E402
    DataConfig,
    build_splits,
    effective_sasrec_config,
    load_split_data,
)
from coars_env.data.sasrec import SASRec, SASRecConfig, ranking_metrics  # noqa: E402

# Epochs per dataset (sasrec.py: every training interaction is a target once per epoch).
DEFAULT_EPOCHS = {"ml-100k": 40, "ml-1m": 20}


def popularity_metrics(split, prefixes: list, targets: list, k: int) -> dict[str, float]:
    counts = np.bincount(np.concatenate(split.train), minlength=split.n_items).astype(np.float32)
    counts += np.linspace(0, 1e-3, split.n_items, dtype=np.float32)  # strict order, no ties
    return ranking_metrics(torch.from_numpy(np.tile(counts, (len(targets), 1))), targets, prefixes, k)


def run_dataset(name: str, args: argparse.Namespace) -> dict:
    epochs = args.epochs or DEFAULT_EPOCHS.get(name, 20)
    sasrec = SASRecConfig(epochs=epochs, num_threads=args.threads, seed=args.seed)
    cfg = DataConfig(dataset=name, data_dir=args.data_dir, sasrec=sasrec, seed=args.seed, use_cache=False)
    out: dict = {"dataset": name, "epochs": epochs, "threads": args.threads}

    started = time.perf_counter()
    split = load_split_data(cfg)
    out["load_split_s"] = time.perf_counter() - started
    print(f"[{name}] {split.n_users:,} users, {split.n_items:,} items, loaded in {out['load_split_s']:.1f} s")

    sasrec = effective_sasrec_config(cfg, split)  # shuffled sequences for random hold-out data
    out["shuffle_sequences"] = sasrec.shuffle_sequences
    started, cpu_started = time.perf_counter(), time.process_time()
    model = SASRec(split.n_items, sasrec).fit(split, progress=not args.no_progress)
    out["train_s"] = time.perf_counter() - started
    # CPU seconds next to wall seconds: on a shared machine the ratio shows the contention.
    out["train_cpu_s"] = time.process_time() - cpu_started
    print(f"[{name}] SASRec trained in {out['train_s']:.1f} s ({epochs} epochs, {args.threads} thread(s))")

    test = split.targets["test"]
    prefixes, targets = list(test["prefix"]), test["target"].tolist()
    started = time.perf_counter()
    scores = model.score(prefixes)
    out["score_all_test_users_s"] = time.perf_counter() - started
    for key, value in ranking_metrics(scores, targets, prefixes, k=10).items():
        out[f"sasrec_{key}"] = value
    for key, value in popularity_metrics(split, prefixes, targets, k=10).items():
        out[f"pop_{key}"] = value

    for mode in ("sasrec", "random"):
        mode_cfg = dataclasses.replace(cfg, candidate_mode=mode)
        started = time.perf_counter()
        prepared = build_splits(mode_cfg, split, model)
        out[f"build_{mode}_s"] = time.perf_counter() - started
        stats = prepared.test.stats
        out[f"{mode}_candidates_hit1"] = stats["sasrec_top1_hit"]
        out[f"{mode}_n_test_sessions"] = stats["n_sessions"]
        out["sasrec_top20_coverage"] = stats["sasrec_top20_coverage"]
        if mode == "sasrec":
            out["summary"] = prepared.summary
            print(prepared.summary)
        print(f"[{name}] {mode} candidates: all splits built in {out[f'build_{mode}_s']:.1f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m"])
    parser.add_argument("--epochs", type=int, default=None, help=f"SASRec epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is robust on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="data root (default $COARS_DATA_DIR)")
    parser.add_argument("--quick", action="store_true", help="ml-100k only, 3 epochs: a smoke run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", default=None, help="write the result file here")
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.epochs = ["ml-100k"], args.epochs or 3

    results = [run_dataset(name, args) for name in args.datasets]

    print()
    header = (
        f"{'dataset':<9} {'epochs':>6} {'train s':>8} {'HR@10':>7} {'NDCG@10':>8} {'pop HR@10':>9} "
        f"{'cov@20':>7} {'Hit@1 sasrec-20':>15} {'Hit@1 random-20':>15} {'build s':>8}"
    )
    print(header)
    for r in results:
        print(
            f"{r['dataset']:<9} {r['epochs']:>6} {r['train_s']:>8.1f} {r['sasrec_HR@10']:>7.4f} "
            f"{r['sasrec_NDCG@10']:>8.4f} {r['pop_HR@10']:>9.4f} {r['sasrec_top20_coverage']:>7.4f} "
            f"{r['sasrec_candidates_hit1']:>15.4f} {r['random_candidates_hit1']:>15.4f} {r['build_sasrec_s']:>8.1f}"
        )
    print("(build s: sessions + candidates + peers + alignment for train/valid/test, sasrec mode)")
    if any(r["dataset"] == "ml-1m" for r in results):
        print("ml-1m here has no timestamps: random hold-out targets, not comparable to published numbers")

    if args.json:
        metrics: dict[str, float] = {}
        for r in results:
            tag = r["dataset"].replace("-", "")
            for key in (
                "train_s", "train_cpu_s", "sasrec_HR@10", "sasrec_NDCG@10", "pop_HR@10", "sasrec_top20_coverage",
                "sasrec_candidates_hit1", "random_candidates_hit1", "build_sasrec_s", "build_random_s",
            ):
                metrics[f"{tag}_{key.replace('@', '_at_')}"] = r[key]
        benchjson.write_result(
            args.json, "data", metrics,
            config={"datasets": args.datasets, "epochs": args.epochs, "threads": args.threads, "seed": args.seed},
            details={"runs": results},
        )


if __name__ == "__main__":
    main()
