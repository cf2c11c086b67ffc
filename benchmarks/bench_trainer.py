"""Training-step throughput: TRL's GRPOTrainer against one CoARS-style step, same sizes.

Both methods train a LoRA adapter (r=16, alpha=32, all linear layers, dropout 0: the CoARS
default, :class:`coars_agents.policy.LoraSettings`) on the same frozen model, with the same
batch (``--batch`` completions per step, in groups of ``--group`` completions of one prompt),
the same prompt length and the same completion length:

- ``trl_grpo``: ``trl.GRPOTrainer`` (transformers ``generate``, no vLLM, beta 0, one
  iteration per generation, no gradient checkpointing) on a synthetic dataset of plain-text
  prompts of exactly ``--prompt-tokens`` tokens and a trivial reward function;
- ``coars``: :func:`coars_step`: batched generation with :class:`LLMPolicy`, the teacher's
  log-probs without gradient on ``prompt + reference`` (a fixed ``--reference-tokens``
  reference text standing in for the hindsight trajectory ``d``), the student's log-probs
  with gradient on the prompt, the credit and loss of :mod:`coars_agents.credit`, backward,
  gradient clipping and an AdamW step on the adapter.

Completions have exactly ``--completion-tokens`` tokens in both methods (EOS is ignored;
``--allow-eos`` lets them stop early), so the work per sample is the same. Each method
runs ``--warmup`` untimed steps, then ``--steps`` timed ones; by default each method runs
in its own Python process, so its peak memory is its own.

Reported per method: samples (completions) per second, completion tokens per second, mean
step time, peak RSS during the steps (and peak CUDA memory on a GPU) and the ratio of its
samples/s to TRL's. ``--json PATH`` writes the headline numbers (see ``run_all.py``).

Run::

    python benchmarks/bench_trainer.py                       # tiny random model, < 1 minute
    python benchmarks/bench_trainer.py --model smollm2 --batch 8 --prompt-tokens 256 \\
        --completion-tokens 32 --steps 2

To benchmark the real CoARS trainer instead of the hook, pass its step as ``step_fn`` to
:func:`run_coars` (one function with :func:`coars_step`'s signature).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.nn.utils.rnn import pad_sequence  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchjson  # noqa: E402

from coars_agents.credit import coars_policy_loss, credit_advantages  # noqa: E402
from coars_agents.models import default_device, load_model, tiny_test_model  # noqa: E402
from coars_agents.policy import LLMPolicy, LoraSettings, SamplingConfig  # noqa: E402

ADAPTER = "bench"
"""Name of the LoRA adapter the CoARS hook trains."""

METHODS = ("trl_grpo", "coars")

WORDS = (
    "the user liked rock pop jazz music songs artist album recent because similar history "
    "fits taste listened often new old good great bad not my style movie film item reason "
    "click star skip a of to and in is it that for on with as at by"
).split()
"""Words for the synthetic prompts; those that are one token (with a leading space) in the
model's tokenizer are used, so that a prompt of n words is exactly n tokens."""


@dataclass
class BenchConfig:
    """Sizes and settings of one benchmark run (the CLI flags, one for one)."""

    model: str = "tiny"
    """``tiny`` (random ~1M-parameter Llama), ``smollm2`` (offline SmolLM2-135M-Instruct) or a
    local ``save_pretrained`` directory."""
    random_weights: bool = False
    """Build the model from its config with random weights (same architecture and speed; for
    machines without the weights). Needs a directory with ``config.json`` and a tokenizer."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    batch: int = 8
    """Completions per training step (TRL's ``per_device_train_batch_size``)."""
    group: int = 4
    """Completions per prompt (TRL's ``num_generations``); must divide ``batch``."""
    prompt_tokens: int = 64
    completion_tokens: int = 16
    reference_tokens: int = 64
    """Length of the teacher's extra context (the hindsight reference ``d``), CoARS only."""
    steps: int = 2
    """Timed training steps per method."""
    warmup: int = 1
    """Untimed steps before them."""
    allow_eos: bool = False
    """Let completions stop at EOS (lengths then differ between methods)."""
    lr: float = 1e-5
    seed: int = 0
    methods: str = "trl_grpo,coars"
    """Comma-separated subset of ``trl_grpo,coars``."""
    isolate: bool = True
    """Run each method in its own process (clean peak memory; costs one import per method)."""
    threads: int = 0
    """``torch.set_num_threads`` (0: torch's default, one per core). On a shared CPU, 1 thread
    avoids the stalls of oversubscribed thread pools."""

    def method_list(self) -> list[str]:
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in names if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
        return names

    def check(self) -> None:
        if self.batch < 1 or self.group < 1 or self.batch % self.group:
            raise ValueError(f"--group ({self.group}) must divide --batch ({self.batch})")
        if min(self.prompt_tokens, self.completion_tokens, self.steps) < 1 or self.warmup < 0:
            raise ValueError("sizes must be positive (warmup >= 0)")
        self.method_list()


QUICK = {
    "batch": 4,
    "group": 2,
    "prompt_tokens": 16,
    "completion_tokens": 8,
    "reference_tokens": 16,
    "steps": 1,
    "warmup": 1,
}
"""Sizes used by ``--quick`` (the tiny model; a few seconds per method after imports)."""


# ----------------------------------------------------------------------------------------------
# Model and synthetic data
# ----------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    return default_device() if name == "auto" else torch.device(name)


def load_bench_model(cfg: BenchConfig) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) on the benchmark device, in eval mode, base weights frozen."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if cfg.model == "tiny":
        model, tokenizer = tiny_test_model(seed=cfg.seed)
        model = model.to(device)
    elif cfg.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from coars_agents.models import default_dtype, prepare_tokenizer

        config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
        if hasattr(config, "quantization_config"):  # e.g. a config saved from a GGUF model
            del config.quantization_config
        tokenizer = prepare_tokenizer(
            AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
        )
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config)
        model = model.to(device=device, dtype=default_dtype(device)).eval()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    else:
        model, tokenizer = load_model(cfg.model, device=device)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None and str(quantizer.quantization_config.quant_method) in (
            "gguf",
            "QuantizationMethod.GGUF",
        ):
            # GGUF weights are dequantised to float on load, but the quantizer marker stays
            # and makes transformers' Trainer (hence TRL) refuse to train the model.
            quantizer.remove_quantization_config(model)
    model.requires_grad_(False)
    return model, tokenizer


def one_token_words(tokenizer: Any) -> list[str]:
    """The words of :data:`WORDS` that ``" " + word`` encodes to exactly one token."""
    words = [
        w for w in WORDS if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
    ]
    if not words:
        raise RuntimeError("no single-token words for this tokenizer: extend WORDS")
    return words


def synthetic_texts(tokenizer: Any, n_tokens: int, count: int, seed: int) -> list[str]:
    """``count`` different plain texts of exactly ``n_tokens`` tokens each (as the tokenizer
    encodes them with its default special tokens, which is how TRL tokenizes plain prompts)."""
    words = one_token_words(tokenizer)
    rng = random.Random(seed)
    n_special = len(tokenizer(" " + words[0])["input_ids"]) - 1  # e.g. a BOS token
    texts = []
    for _ in range(count):
        text = "".join(" " + rng.choice(words) for _ in range(max(1, n_tokens - n_special)))
        got = len(tokenizer(text)["input_ids"])
        if got != n_tokens:
            raise RuntimeError(f"synthetic text has {got} tokens, wanted {n_tokens}")
        texts.append(text)
    return texts


def trivial_reward(completions: Sequence[str], **_: Any) -> list[float]:
    """Reward of the benchmark (cost ~0, but not constant, so that advantages are not all
    zero): the fraction of distinct characters in the completion."""
    return [len(set(str(text))) / max(1, len(str(text))) for text in completions]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _cuda_peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


# ----------------------------------------------------------------------------------------------
# CoARS-style step (the hook)
# ----------------------------------------------------------------------------------------------

StepFn = Callable[..., dict[str, float]]
"""A training step with :func:`coars_step`'s signature; returns phase timings in seconds."""


def coars_step(
    policy: LLMPolicy,
    prompts: Sequence[Sequence[int]],
    completion_len: int,
    *,
    optimizer: torch.optim.Optimizer,
    reference_ids: Sequence[int],
    seed: int = 0,
    credit_coef: float = 0.1,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One CoARS training step for one agent, computationally: what a real step does.

    1. sample one completion per prompt (rows repeating a prompt share its prefill) with
       :meth:`LLMPolicy.generate_ids` (``generate`` without chat rendering: the prompts are
       already token ids);
    2. trivial rewards (the interaction reward's cost is negligible next to the model);
    3. teacher log-probs, no gradient, on ``prompt + reference_ids`` (``x + d``);
    4. student log-probs with gradient on ``prompt`` (``x``);
    5. :func:`credit_advantages` and :func:`coars_policy_loss` (lambda = ``credit_coef``),
       backward, gradient clipping, ``optimizer.step()``.

    Returns seconds per phase (``generate``, ``teacher``, ``student``, ``update``) and the
    number of completion tokens generated.
    """
    device = policy.device
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    sampling = SamplingConfig(max_new_tokens=completion_len, seed=seed)
    generations = policy.generate_ids(prompts, sampling=sampling)
    completions = [g.completion_ids for g in generations]
    rewards = torch.tensor(trivial_reward([g.text for g in generations]), device=device)
    _sync(device)
    t1 = time.perf_counter()

    teacher_contexts = [list(p) + list(reference_ids) for p in prompts]
    teacher = policy.score(teacher_contexts, completions, requires_grad=False)
    _sync(device)
    t2 = time.perf_counter()

    student = policy.score(prompts, completions, requires_grad=True)
    _sync(device)
    t3 = time.perf_counter()

    student_lp = pad_sequence(student, batch_first=True)
    teacher_lp = pad_sequence(teacher, batch_first=True)
    lengths = torch.tensor([len(c) for c in completions], device=device)
    token_mask = torch.arange(student_lp.shape[1], device=device)[None, :] < lengths[:, None]
    token_mask = token_mask.to(student_lp.dtype)
    advantages = credit_advantages(teacher_lp, student_lp, token_mask)
    turn_mask = torch.ones(len(completions), device=device)
    loss = coars_policy_loss(student_lp, rewards, advantages, token_mask, turn_mask, credit_coef)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    t4 = time.perf_counter()

    times.update(generate=t1 - t0, teacher=t2 - t1, student=t3 - t2, update=t4 - t3)
    times["completion_tokens"] = float(sum(len(c) for c in completions))
    return times


def run_coars(cfg: BenchConfig, step_fn: StepFn = coars_step) -> dict[str, Any]:
    """Time ``cfg.steps`` calls of ``step_fn`` (after ``cfg.warmup`` untimed ones)."""
    model, tokenizer = load_bench_model(cfg)
    device = resolve_device(cfg.device)
    # With eos_token_ids=(-1,) no token ends a completion: every one has completion_tokens.
    eos = None if cfg.allow_eos else (-1,)
    policy = LLMPolicy(model, tokenizer, eos_token_ids=eos)
    policy.add_adapter(ADAPTER, LoraSettings())
    policy.use_adapter(ADAPTER)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(ADAPTER), lr=cfg.lr)

    n_prompts = cfg.batch // cfg.group
    texts = synthetic_texts(
        tokenizer, cfg.prompt_tokens, n_prompts * (cfg.warmup + cfg.steps), cfg.seed
    )
    prompt_ids = [tokenizer(t)["input_ids"] for t in texts]
    reference = synthetic_texts(tokenizer, cfg.reference_tokens, 1, cfg.seed + 1)[0]
    reference_ids = tokenizer(reference, add_special_tokens=False)["input_ids"]

    phases: dict[str, float] = {}
    step_times: list[float] = []
    tokens = 0.0
    _reset_cuda_peak(device)
    with benchjson.PeakMemory() as mem:
        for step in range(cfg.warmup + cfg.steps):
            batch_prompts = prompt_ids[step * n_prompts : (step + 1) * n_prompts]
            rows = [p for p in batch_prompts for _ in range(cfg.group)]  # GRPO-style groups
            start = time.perf_counter()
            out = step_fn(
                policy,
                rows,
                cfg.completion_tokens,
                optimizer=optimizer,
                reference_ids=reference_ids,
                seed=cfg.seed + step,
            )
            elapsed = time.perf_counter() - start
            if step >= cfg.warmup:
                step_times.append(elapsed)
                tokens += out.get("completion_tokens", 0.0)
                for key, value in out.items():
                    if key != "completion_tokens":
                        phases[key] = phases.get(key, 0.0) + value / cfg.steps
    return _method_result(
        "coars",
        cfg,
        step_times,
        tokens,
        mem,
        _cuda_peak_mb(device),
        phases_s={k: round(v, 4) for k, v in phases.items()},
    )


# ----------------------------------------------------------------------------------------------
# TRL GRPO
# ----------------------------------------------------------------------------------------------


def run_trl_grpo(cfg: BenchConfig) -> dict[str, Any]:
    """Time ``cfg.steps`` steps of ``trl.GRPOTrainer.train`` (after ``cfg.warmup`` untimed)."""
    import trl
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    model, tokenizer = load_bench_model(cfg)
    device = resolve_device(cfg.device)
    n_prompts = cfg.batch // cfg.group
    total = cfg.warmup + cfg.steps
    texts = synthetic_texts(tokenizer, cfg.prompt_tokens, n_prompts * total, cfg.seed)
    dataset = Dataset.from_list([{"prompt": t} for t in texts])

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        """Wall time from ``on_step_begin`` (before generation) to ``on_step_end`` (after the
        optimizer step) of every step past the warmup."""

        def __init__(self) -> None:
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            _sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            _sync(device)
            if state.global_step > cfg.warmup:
                step_times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        args = trl.GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=cfg.batch,
            num_generations=cfg.group,
            max_completion_length=cfg.completion_tokens,
            generation_kwargs=None if cfg.allow_eos else {"min_new_tokens": cfg.completion_tokens},
            max_steps=total,
            learning_rate=cfg.lr,
            temperature=1.0,
            beta=0.0,
            num_iterations=1,
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            use_vllm=False,
            use_cpu=device.type == "cpu",
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            shuffle_dataset=False,
            dataloader_num_workers=0,
            seed=cfg.seed,
        )
        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=trivial_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=LoraSettings().to_peft(),
            callbacks=[StepTimer()],
        )
        trainer.remove_callback(PrinterCallback)  # no log dict printed at every step
        _reset_cuda_peak(device)
        with benchjson.PeakMemory() as mem:
            trainer.train()
    logs = [entry for entry in trainer.state.log_history if "completions/mean_length" in entry]
    timed = logs[cfg.warmup :] or logs
    mean_len = sum(e["completions/mean_length"] for e in timed) / len(timed) if timed else None
    tokens = mean_len * cfg.batch * len(step_times) if mean_len is not None else 0.0
    return _method_result(
        "trl_grpo", cfg, step_times, tokens, mem, _cuda_peak_mb(device), trl_version=trl.__version__
    )


# ----------------------------------------------------------------------------------------------
# Results and the command line
# ----------------------------------------------------------------------------------------------


def _method_result(
    method: str,
    cfg: BenchConfig,
    step_times: list[float],
    tokens: float,
    mem: benchjson.PeakMemory,
    cuda_peak_mb: float | None,
    **extra: Any,
) -> dict[str, Any]:
    if len(step_times) != cfg.steps:
        raise RuntimeError(f"{method}: timed {len(step_times)} steps, expected {cfg.steps}")
    seconds = sum(step_times)
    return {
        "method": method,
        "samples_per_s": cfg.batch * len(step_times) / seconds,
        "completion_tokens_per_s": tokens / seconds,
        "mean_completion_tokens": tokens / (cfg.batch * len(step_times)),
        "step_s": seconds / len(step_times),
        "peak_rss_mb": mem.peak_mb,
        "rss_before_mb": mem.before_mb,
        "rss_delta_mb": (
            mem.peak_mb - mem.before_mb
            if mem.peak_mb is not None and mem.before_mb is not None
            else None
        ),
        "rss_source": mem.source,
        "peak_cuda_mb": cuda_peak_mb,
        **extra,
    }


RUNNERS: dict[str, Callable[[BenchConfig], dict[str, Any]]] = {
    "trl_grpo": run_trl_grpo,
    "coars": run_coars,
}


def run_method(cfg: BenchConfig, method: str) -> dict[str, Any]:
    """Run one method, in this process or (``cfg.isolate``) in a child process.

    A failure is returned as ``{"method": ..., "error": ...}`` so the other method still runs.
    """
    if not cfg.isolate:
        try:
            return RUNNERS[method](cfg)
        except Exception as exc:  # noqa: BLE001 - reported, and main exits non-zero
            traceback.print_exc()
            return {"method": method, "error": f"{type(exc).__name__}: {exc}"}
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        out = Path(tmp) / f"{method}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            *config_argv(cfg),
            "--child-method",
            method,
            "--child-json",
            str(out),
        ]
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0 or not out.exists():
            return {"method": method, "error": f"child process exit code {proc.returncode}"}
        return json.loads(out.read_text())


def config_argv(cfg: BenchConfig) -> list[str]:
    """The CLI flags that reproduce ``cfg`` (for child processes)."""
    argv = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table: method, samples/s, tokens/s, step time, peak memory, ratio to TRL.

    "RSS +MiB" is the peak RSS during the steps minus the RSS just before them (model
    loaded, libraries imported): the memory the training steps themselves add.
    """
    base = next(
        (r["samples_per_s"] for r in results if r["method"] == "trl_grpo" and "error" not in r),
        None,
    )
    header = (
        "| method | samples/s | completion tok/s | step s | peak RSS MiB | RSS +MiB "
        "| peak CUDA MiB | samples/s vs trl_grpo |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        ratio = f"{r['samples_per_s'] / base:.2f}x" if base else "n/a"
        cuda = _mib(r.get("peak_cuda_mb"))
        lines.append(
            f"| {r['method']} | {r['samples_per_s']:.2f} | {r['completion_tokens_per_s']:.1f} "
            f"| {r['step_s']:.3f} | {_mib(r.get('peak_rss_mb'))} "
            f"| {_mib(r.get('rss_delta_mb'))} | {cuda} | {ratio} |"
        )
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=defaults.model, help="tiny | smollm2 | a local save_pretrained directory"
    )
    parser.add_argument(
        "--random-weights",
        action=argparse.BooleanOptionalAction,
        default=defaults.random_weights,
        help="a directory's architecture with random weights (speed only)",
    )
    parser.add_argument("--device", default=defaults.device, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=defaults.batch, help="completions per step")
    parser.add_argument(
        "--group",
        type=int,
        default=defaults.group,
        help="completions per prompt (GRPO num_generations)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens)
    parser.add_argument("--completion-tokens", type=int, default=defaults.completion_tokens)
    parser.add_argument(
        "--reference-tokens",
        type=int,
        default=defaults.reference_tokens,
        help="teacher's extra context (CoARS only)",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed steps")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed steps")
    parser.add_argument(
        "--allow-eos", action=argparse.BooleanOptionalAction, default=defaults.allow_eos
    )
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--methods", default=defaults.methods, help="comma-separated subset of " + ",".join(METHODS)
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=defaults.isolate,
        help="one process per method",
    )
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch threads (0: default)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes for smoke runs: " + json.dumps(QUICK)
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--child-method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(BenchConfig)}
    if args.quick:
        values.update(QUICK)
    cfg = BenchConfig(**values)
    cfg.check()
    return cfg, args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table; write ``--json``. Returns the result dict."""
    cfg, args = parse_args(argv)
    if args.child_method:  # one method, inside a child process of run_method
        result = RUNNERS[args.child_method](cfg)
        args.child_json.write_text(json.dumps(result))
        return result

    if "trl_grpo" in cfg.method_list():
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed (pip install -e '.[bench]'): skipping trl_grpo")
            cfg.methods = ",".join(m for m in cfg.method_list() if m != "trl_grpo")
    results = [run_method(cfg, m) for m in cfg.method_list()]

    print(
        f"\nbench_trainer: model={cfg.model} device={resolve_device(cfg.device)} batch={cfg.batch} "
        f"group={cfg.group} prompt={cfg.prompt_tokens} completion={cfg.completion_tokens} "
        f"reference={cfg.reference_tokens} steps={cfg.steps} (+{cfg.warmup} warmup) "
        f"torch threads={cfg.threads or torch.get_num_threads()}"
    )
    print(format_table(results))

    by_method = {r["method"]: r for r in results}
    ok = {m: r for m, r in by_method.items() if "error" not in r}
    metrics: dict[str, float | None] = {}
    for r in results:
        for key in (
            "samples_per_s",
            "completion_tokens_per_s",
            "step_s",
            "peak_rss_mb",
            "rss_delta_mb",
            "peak_cuda_mb",
        ):
            metrics[f"{r['method']}_{key}"] = r.get(key)
    ratios: dict[str, float | None] = {}
    if "coars" in ok and "trl_grpo" in ok:
        ratios["coars_vs_trl_grpo_samples_per_s"] = (
            ok["coars"]["samples_per_s"] / ok["trl_grpo"]["samples_per_s"]
        )
    details = {"methods": by_method}
    if args.json is not None:
        benchjson.write_result(
            args.json, "trainer", metrics, ratios=ratios, config=asdict(cfg), details=details
        )
    failed = [m for m in by_method if m not in ok]
    if failed:
        raise SystemExit(f"bench_trainer: {', '.join(failed)} failed")
    return {
        "benchmark": "trainer",
        "metrics": metrics,
        "ratios": ratios,
        "config": asdict(cfg),
        "details": details,
    }


if __name__ == "__main__":
    main()
