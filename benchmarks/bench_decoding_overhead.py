"""Per-step cost of decoding with LoRA adapters: PEFT's LoRA layers vs merged copies.

Small models on GPUs decode at the speed of the Python work per step, not of the arithmetic
(docs/results/gpu_h200_first_runs.md). This benchmark measures that work. The model has
SmolLM2-135M's depth (30 layers), attention heads and vocabulary, but a width of only
``--width`` (default 16), so the arithmetic is negligible and what remains is the host
overhead per decoding step. It decodes ``--rows`` rows for ``--new-tokens`` tokens, greedily,
with :meth:`LLMPolicy.generate_ids`:

- ``base``: no adapter (PEFT's layers present but switched off);
- ``peft``: a LoRA adapter (r = 16, every linear layer) active, as in training rollouts;
- ``merged``: the same adapter merged into a copy of the base
  (:meth:`LLMPolicy.merged_adapters`), i.e. the trainer's ``--merged-rollouts``.

The headline ratio ``merged_vs_peft`` is how many times faster a decoding step is with the
merged copy. ``--width 576`` gives SmolLM2's true shape, for a GPU.

    python benchmarks/bench_decoding_overhead.py                 # CPU, ~1 minute
    python benchmarks/bench_decoding_overhead.py --quick
    python benchmarks/bench_decoding_overhead.py --device cuda --width 576 --rows 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchjson  # noqa: E402
from bench_generation import random_smollm2  # noqa: E402

from coars_agents.policy import LLMPolicy, LoraSettings, SamplingConfig  # noqa: E402


def narrow_smollm2(width: int, device: str) -> LLMPolicy:
    """SmolLM2-135M's depth, heads and vocabulary at ``width`` (random weights), with a
    perturbed LoRA adapter ``"recommender"`` so that merging changes the weights."""
    model, tokenizer = random_smollm2(device, width)
    # EOS = an id beyond the tokenizer, which is never sampled: every row decodes to the end.
    policy = LLMPolicy(model, tokenizer, eos_token_ids=[model.config.vocab_size - 1])
    policy.add_adapter("recommender", LoraSettings(r=16, alpha=32))
    with torch.no_grad():
        for p in policy.trainable_parameters("recommender"):
            p.add_(0.01 * torch.randn_like(p))
    return policy


def ms_per_step(policy: LLMPolicy, prompts: list[list[int]], new_tokens: int, repeats: int):
    """(fastest ms per decoding step over ``repeats`` calls, tokens of the last call)."""
    sampling = SamplingConfig(max_new_tokens=new_tokens, greedy=True)
    best, gens = float("inf"), []
    for _ in range(repeats):
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        gens = policy.generate_ids(prompts, sampling=sampling)
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    steps = max(len(g.completion_ids) for g in gens)
    return 1000 * best / steps, [g.completion_ids for g in gens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=16, help="hidden size (576 = SmolLM2)")
    parser.add_argument("--rows", type=int, default=64, help="rows decoded together")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="16 rows, 8 tokens, 1 repeat")
    parser.add_argument("--json", default=None, help="write the result file here")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.new_tokens, args.repeats = 16, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    policy = narrow_smollm2(args.width, args.device)
    vocab = len(policy.tokenizer)
    prompts = [
        [(7 * r + 3 * i) % (vocab - 10) + 5 for i in range(args.prompt_tokens)]
        for r in range(args.rows)
    ]
    policy.generate_ids(prompts[:2], sampling=SamplingConfig(max_new_tokens=2))  # warm-up

    policy.use_adapter(None)
    base, _ = ms_per_step(policy, prompts, args.new_tokens, args.repeats)
    policy.use_adapter("recommender")
    peft, peft_tokens = ms_per_step(policy, prompts, args.new_tokens, args.repeats)
    t0 = time.perf_counter()
    with policy.merged_adapters(["recommender"]):
        merge_s = time.perf_counter() - t0
        merged, merged_tokens = ms_per_step(policy, prompts, args.new_tokens, args.repeats)
    same = sum(a == b for a, b in zip(peft_tokens, merged_tokens))

    print(f"decoding {args.rows} rows, width {args.width}, 30 layers, on {policy.device}:")
    print(f"  base (no adapter)     {base:7.1f} ms / step")
    print(f"  LoRA via PEFT layers  {peft:7.1f} ms / step")
    print(f"  LoRA merged (copy)    {merged:7.1f} ms / step  (x{peft / merged:.2f} vs PEFT)")
    print(f"  merging took {1000 * merge_s:.0f} ms; same greedy tokens: {same}/{args.rows}")
    if args.json:
        benchjson.write_result(
            args.json,
            "decoding_overhead",
            {
                "base_ms_per_step": base,
                "peft_ms_per_step": peft,
                "merged_ms_per_step": merged,
                "merge_s": merge_s,
            },
            ratios={"merged_vs_peft": peft / merged, "peft_vs_base": base / peft},
            config=vars(args),
            details={"same_greedy_tokens": same},
        )


if __name__ == "__main__":
    main()
