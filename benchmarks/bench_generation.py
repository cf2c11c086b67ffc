"""Generation throughput: LLMPolicy.generate (batched, own decoding loop) vs model.generate.

For each batch size ``b`` in ``--batch-sizes``, the first ``b`` of a fixed set of distinct chat
prompts (recommender-style, ~150 tokens with SmolLM2's tokenizer) are decoded greedily with
:meth:`coars_agents.policy.LLMPolicy.generate` in one call; the baseline decodes
``--naive-prompts`` of them one at a time with ``model.generate(do_sample=False)`` (its
throughput does not depend on ``b``). Both stop at the same EOS ids or after
``--max-new-tokens``. Throughput = generated tokens / wall time, prefill included.

"Same outputs" counts the prompts whose greedy tokens equal the baseline's exactly; in float32
a batched and an unbatched forward pass may round differently, so a near-tie can now and then
flip one greedy token (the log-probs agree to ~1e-5).

``--model random-smollm2`` is SmolLM2-135M's architecture with random weights and the tiny
test tokenizer (ids beyond it are never sampled): the same compute per token, for machines
without the GGUF file. Its greedy outputs are near ties everywhere (random weights), so
"same outputs" means little there, above all in bfloat16.

``--group G`` adds a GRPO-style row: ``b`` rows made of ``b / G`` prompts x ``G`` samples,
with shared-prefix reuse (each prompt prefilled once) on and off.

    python benchmarks/bench_generation.py                          # SmolLM2, CPU, ~2 minutes
    python benchmarks/bench_generation.py --model tiny --max-new-tokens 32
    python benchmarks/bench_generation.py --model random-smollm2 --device cuda   # no files
    python benchmarks/bench_generation.py --json results/generation.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchjson  # noqa: E402

from coars_agents.models import (  # noqa: E402
    default_device,
    default_dtype,
    load_model,
    tiny_test_model,
)
from coars_agents.policy import LLMPolicy, Messages, SamplingConfig  # noqa: E402

ARTISTS = (
    "Radiohead Coldplay Muse Blur Oasis Pulp Suede Travis Keane Elbow Doves Gorillaz Bjork "
    "Portishead Massive-Attack Tricky Moby Air Daft-Punk Justice Phoenix Beck Pavement Wilco"
).split()


def prompts(n: int) -> list[Messages]:
    """``n`` distinct recommender prompts (history and candidates rotate with the index)."""
    out = []
    for i in range(n):
        history = ", ".join(ARTISTS[(i + k) % len(ARTISTS)] for k in range(8))
        candidates = "\n".join(
            f"{k + 1}. {ARTISTS[(3 * i + 5 * k) % len(ARTISTS)]}" for k in range(10)
        )
        out.append(
            [
                {"role": "system", "content": "You are a music recommender."},
                {
                    "role": "user",
                    "content": f"The user listened to: {history}.\nCandidates:\n{candidates}\n"
                    "Answer as: Item: <number>\nReason: <one sentence>",
                },
            ]
        )
    return out


def random_smollm2(
    device: str | None, width: int = 576
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M's architecture (depth, vocabulary; hidden size ``width``, 576 in the real
    model), random weights, the tiny test tokenizer."""
    _, tokenizer = tiny_test_model()
    heads = 9 if width % 9 == 0 else 4
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=width,
        intermediate_size=max(8, width * 8 // 3),
        num_hidden_layers=30,
        num_attention_heads=heads,
        num_key_value_heads=3 if heads == 9 else 2,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    dev = torch.device(device) if device else default_device()
    model = LlamaForCausalLM(config).to(device=dev, dtype=default_dtype(dev)).eval()
    return model, tokenizer


def timed(fn, repeats: int = 1):
    """(result, fastest wall time of ``repeats`` calls)."""
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="smollm2", help="'smollm2', 'tiny', 'random-smollm2', a path or hub id"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--naive-prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8, help="0 disables the GRPO-style row")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="time each configuration this many times and keep the fastest "
        "(default: 2 on CUDA, where the first run of new shapes pays for kernel selection; 1 on CPU)",
    )
    parser.add_argument("--json", default=None, help="write the result file here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.model == "tiny":
        model, tokenizer = tiny_test_model()
        model = model.to(args.device or "cpu")
    elif args.model == "random-smollm2":
        model, tokenizer = random_smollm2(args.device)
    else:
        model, tokenizer = load_model(args.model, device=args.device)
    policy = LLMPolicy(model, tokenizer)
    repeats = args.repeats or (2 if policy.device.type == "cuda" else 1)
    print(
        f"loaded {args.model} in {time.perf_counter() - t0:.1f}s on {policy.device} ({model.dtype})"
    )

    n_max = max(args.batch_sizes + [args.naive_prompts])
    messages = prompts(n_max)
    prompt_ids = [policy.render(m) for m in messages]
    print(f"prompt tokens: mean {sum(map(len, prompt_ids)) / n_max:.0f}")
    greedy = SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=True)
    policy.generate_ids(prompt_ids[:2], sampling=SamplingConfig(max_new_tokens=2))  # warm-up

    # Baseline: one model.generate call per prompt.
    naive_tokens: list[list[int]] = []
    naive_time = 0.0
    for ids in prompt_ids[: args.naive_prompts]:
        x = torch.tensor([ids], device=policy.device)
        with torch.no_grad():
            out, dt = timed(
                lambda x=x: model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=args.max_new_tokens,
                    do_sample=False,
                    eos_token_id=list(policy.eos_token_ids),
                    pad_token_id=tokenizer.pad_token_id,
                    # LLMPolicy never samples output rows beyond the tokenizer: same here
                    suppress_tokens=list(range(len(tokenizer), policy.n_logits)) or None,
                ),
                repeats,
            )
        naive_time += dt
        naive_tokens.append(out[0, len(ids) :].tolist())
    naive_rate = sum(map(len, naive_tokens)) / naive_time
    print(f"naive model.generate, 1 prompt at a time: {naive_rate:.1f} tok/s")

    rows = []
    for b in args.batch_sizes:
        gens, dt = timed(lambda b=b: policy.generate_ids(prompt_ids[:b], sampling=greedy), repeats)
        n_tokens = sum(len(g.completion_ids) for g in gens)
        k = min(b, len(naive_tokens))
        same = sum(gens[i].completion_ids == naive_tokens[i] for i in range(k))
        rows.append(
            dict(batch=b, tokens=n_tokens, seconds=dt, tok_per_s=n_tokens / dt, same=f"{same}/{k}")
        )
        print(
            f"LLMPolicy.generate batch {b:3d}: {n_tokens / dt:7.1f} tok/s "
            f"({n_tokens} tokens in {dt:.1f}s, x{n_tokens / dt / naive_rate:.1f} vs naive), "
            f"same greedy outputs as naive: {same}/{k}"
        )

    group_rows = {}
    if args.group:
        b = max(args.batch_sizes)
        grouped = [p for p in prompt_ids[: max(1, b // args.group)] for _ in range(args.group)]
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, seed=0)
        for share in (True, False):
            policy.share_prefixes = share
            gens, dt = timed(lambda: policy.generate_ids(grouped, sampling=sampling), repeats)
            n_tokens = sum(len(g.completion_ids) for g in gens)
            group_rows[share] = n_tokens / dt
            print(
                f"GRPO-style {len(grouped)} rows = {len(grouped) // args.group} prompts x "
                f"{args.group} samples, share_prefixes={share}: {n_tokens / dt:.1f} tok/s"
            )
        policy.share_prefixes = True

    if args.json:
        metrics = {"naive_tok_per_s": naive_rate}
        metrics.update({f"batch{r['batch']}_tok_per_s": r["tok_per_s"] for r in rows})
        if group_rows:
            metrics["group_shared_tok_per_s"] = group_rows[True]
            metrics["group_unshared_tok_per_s"] = group_rows[False]
        benchjson.write_result(
            args.json,
            "generation",
            metrics,
            ratios={f"batch{r['batch']}_vs_naive": r["tok_per_s"] / naive_rate for r in rows},
            config=vars(args),
            details={"rows": rows},
        )


if __name__ == "__main__":
    main()
