"""LLMPolicy: batched generation with raw log-probs, batched scoring, LoRA adapters per agent.

One :class:`LLMPolicy` wraps a causal LM and its tokenizer. It is used three ways:

- **acting** (:meth:`LLMPolicy.generate`): chat prompts in, :class:`Generation` out, with the
  prompt and completion token ids, the log-prob of every generated token under the *raw*
  model distribution (temperature 1, no top-p, no constraint mask, whatever the sampling
  settings: that is the distribution the trainer differentiates), a ``forced`` mask for
  tokens a constraint template left no choice about, and the finish reason;
- **scoring** (:meth:`LLMPolicy.score`): per-token log-probs of given completions under given
  contexts in one batched forward pass, with or without gradient. The trainer uses it for the
  student (``x``) and teacher (``x + d``) log-probs and for the loss. It agrees with the
  generation log-probs to ``atol=1e-4`` in float32 (tested); in bfloat16 the two passes round
  differently (differences of a few 1e-2 are normal).
- **adapters**: one LoRA adapter per agent (``"recommender"``, ``"user"``) on one frozen
  base (:meth:`add_adapter`, :meth:`use_adapter`, ``adapter=`` per call; ``adapter=None``
  is the base model). Using two separate models instead is a choice of the layer above:
  an ``LLMPolicy`` without adapters is just the base model.

The decoding loop is our own (``model(input_ids, cache=..., use_cache=True)`` step by step),
so that sampling, stop strings, constraints and raw log-probs are under our control:

- padding just before each prompt's last token (never a row that starts with padding,
  which breaks fused GPU attention kernels), an attention mask, position ids from the mask
  (``cumsum - 1``), so a row gives the same numbers whatever else is in the batch;
- one :class:`torch.Generator` per row, seeded from ``(sampling.seed, row index)``, and
  inverse-CDF sampling: a row's sample does not depend on the batch it is in;
- finished rows leave the batch (their KV cache rows are dropped), so long answers do not
  keep paying for short ones;
- **shared-prefix reuse**: identical prompts in one call (several rollouts of one session,
  GRPO-style groups) are prefilled once and the KV cache is expanded. Reuse across turns
  (extending an earlier turn's cache) is not implemented: each call prefills its prompts.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from coars_agents.constrained import Template, TemplateState, TokenVocab, choice_decisions

Messages = list[dict[str, str]]
"""A chat prompt: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``."""

Shortener = Callable[[int, Messages], "Messages | None"]
"""``(index of the prompt in the batch, messages) -> shorter messages``, or ``None`` when they
cannot be shortened further. The env's prompt module re-renders with fewer history items or
memory turns; the policy calls it until the prompt fits (see :meth:`LLMPolicy.generate`)."""


class _Active:
    """Sentinel: use the adapter made active by :meth:`LLMPolicy.use_adapter`."""

    def __repr__(self) -> str:
        return "ACTIVE"


ACTIVE = _Active()
"""Default of ``adapter=``: whatever :meth:`LLMPolicy.use_adapter` selected (initially the base
model). Pass ``None`` for the base model or a name for that adapter, for one call."""

AdapterArg = str | None | _Active


class PromptTooLongError(ValueError):
    """A prompt does not fit in the context left for it (see :meth:`LLMPolicy.prompt_limit`)."""


@dataclass
class SamplingConfig:
    """How tokens are chosen. Log-probs are always those of the raw distribution."""

    temperature: float = 1.0
    """Softmax temperature for sampling; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens holding this much probability
    (after the constraint mask and the temperature); 1 disables it."""
    max_new_tokens: int = 128
    """Upper bound on generated tokens per prompt (finish reason ``"length"`` when reached). With
    a constraint template it must leave room for the whole template."""
    stop: tuple[str, ...] = ()
    """Generation of a row ends when its decoded completion contains one of these strings; the
    text is cut before it (the tokens are kept). Ignored with a constraint template, which
    decides by itself where an answer ends."""
    greedy: bool = False
    """Take the most likely allowed token (ignores temperature, top_p and seed)."""
    seed: int | None = 0
    """Row ``i`` samples from a generator seeded with ``(seed, i)``: same seed, same outputs,
    independently of batching. ``None``: a fresh random seed per call."""

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling settings {self}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        else:
            self.stop = tuple(self.stop)


@dataclass
class Generation:
    """One generated answer.

    Attributes:
        text: decoded completion (special tokens skipped), cut before a matched stop string or
            before the stop string that ended the template's last free segment.
        prompt_ids: the rendered prompt's token ids.
        completion_ids: all generated token ids (EOS and stop-string tokens included: they are
            what was sampled).
        logprobs: float32[len(completion_ids)], log-prob of each generated token under the raw
            model distribution (temperature 1, no top-p, no mask), on CPU.
        forced: bool[len(completion_ids)], True where a constraint allowed only that token.
        finish_reason: ``"eos"`` (an EOS token), ``"stop"`` (a stop string), ``"length"``
            (``max_new_tokens``), or ``"template"`` (the constraint template is complete).
            With a constraint, the text follows the template unless it is ``"length"``.
        fields: with a constraint template, each choice / free segment's text by name
            (``{"item": "7", "reason": "..."}``); empty otherwise.
    """

    text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: torch.Tensor
    forced: torch.Tensor
    finish_reason: str
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class LoraSettings:
    """LoRA hyper-parameters of one agent's adapter (mapped to ``peft.LoraConfig``)."""

    r: int = 16
    """Rank of the update ``B @ A``."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """LoRA dropout; 0 so log-probs are reproducible between rollout, scoring and training."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get an adapter; ``"all-linear"``: every linear layer except ``lm_head``."""
    init_lora_weights: bool | str = True
    """PEFT's initialisation; ``True`` zeroes ``B``, so a new adapter equals the base model."""

    def to_peft(self) -> LoraConfig:
        """The ``peft.LoraConfig`` of these settings (causal LM task)."""
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            init_lora_weights=self.init_lora_weights,
            bias="none",
            task_type="CAUSAL_LM",
        )


class _AdapterSwitch:
    """Returned by :meth:`LLMPolicy.use_adapter`: the switch already happened; as a context
    manager it switches back on exit."""

    def __init__(self, policy: LLMPolicy, previous: str | None) -> None:
        self._policy, self._previous = policy, previous

    def __enter__(self) -> LLMPolicy:
        return self._policy

    def __exit__(self, *exc: object) -> None:
        self._policy._activate(self._previous)


_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")


class LLMPolicy:
    """A causal LM + tokenizer that generates, scores and carries LoRA adapters.

    Args:
        model: a ``transformers`` causal LM (its weights are frozen: only adapters train), or
            a ``peft.PeftModel`` around one (its active adapter stays active).
        tokenizer: its tokenizer, with a chat template (padding side is set to left).
        max_prompt_tokens: optional cap on prompt length, below ``context_length -
            max_new_tokens`` (see :meth:`prompt_limit`).
        max_batch_size: rows per forward pass in :meth:`generate` / :meth:`score` (larger
            inputs are chunked); ``None``: everything in one pass.
        eos_token_ids: ids that end a generation; default: the tokenizer's and the generation
            config's EOS plus the usual chat end tokens present in the vocabulary.
        shortener: default prompt shortener for :meth:`generate`.
        share_prefixes: prefill identical prompts of one call once and expand the KV cache,
            in generation and in scoring (same results up to float rounding, less compute;
            off only to measure or to debug).
        fast_forward_literals: in constrained decoding, feed the template's literal text
            (``"\\nReason:"``, ...) in one forward pass when every row of the batch is inside
            one, instead of one pass per token (same results, fewer decoding steps; off only
            to measure or to debug).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_prompt_tokens: int | None = None,
        max_batch_size: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        shortener: Shortener | None = None,
        share_prefixes: bool = True,
        fast_forward_literals: bool = True,
    ) -> None:
        self.model: torch.nn.Module = model  # the PeftModel once an adapter exists
        # The transformers model, called directly (PEFT injects its LoRA layers in place).
        self.lm: PreTrainedModel = model.get_base_model() if isinstance(model, PeftModel) else model
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.max_prompt_tokens = max_prompt_tokens
        self.max_batch_size = max_batch_size
        self.shortener = shortener
        self.share_prefixes = share_prefixes
        self.fast_forward_literals = fast_forward_literals
        self.lm.requires_grad_(False)
        self.lm.eval()  # no dropout anywhere: log-probs must be reproducible

        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids else self._default_eos()
        self.n_logits = self.lm.get_output_embeddings().weight.shape[0]
        # Output rows beyond the tokenizer are padding: never sample them.
        self._valid = torch.arange(self.n_logits) < len(tokenizer)
        self._vocab: TokenVocab | None = None
        params = inspect.signature(self.lm.forward).parameters
        # transformers >= 5 calls the KV cache `cache`; older versions `past_key_values`.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._active: str | None = None
        # Decoding-only copies of the base with one adapter merged in (see merged_adapters).
        self._merged: dict[str, PreTrainedModel] = {}
        if isinstance(model, PeftModel):
            self._activate(model.active_adapter)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> LLMPolicy:
        """:func:`coars_agents.models.load_model` then ``LLMPolicy(model, tokenizer, **kwargs)``."""
        from coars_agents.models import load_model

        model, tokenizer = load_model(name_or_path, device=device, dtype=dtype)
        return cls(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------------------------------
    # Basics
    # ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def context_length(self) -> int:
        """Longest sequence the model handles (``config.max_position_embeddings``)."""
        n = getattr(self.lm.config, "max_position_embeddings", None)
        return int(n) if n else int(self.tokenizer.model_max_length)

    def prompt_limit(self, max_new_tokens: int) -> int:
        """Longest allowed prompt: ``context_length - max_new_tokens``, capped by
        ``max_prompt_tokens``."""
        limit = self.context_length - max_new_tokens
        return min(limit, self.max_prompt_tokens) if self.max_prompt_tokens else limit

    def render(self, messages: Messages) -> list[int]:
        """Prompt token ids: the chat template with the assistant generation prompt."""
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        # The template already holds any BOS it wants: do not let the tokenizer add another.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def vocab(self) -> TokenVocab:
        """Token texts and special-token mask for constrained decoding (built on first use)."""
        if self._vocab is None:
            self._vocab = TokenVocab(self.tokenizer, self.n_logits, self.eos_token_ids)
        return self._vocab

    def _default_eos(self) -> tuple[int, ...]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen_eos = getattr(getattr(self.lm, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
        special = set(self.tokenizer.all_special_ids)
        for token in _END_TOKENS:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid in special:
                ids.add(tid)
        if not ids:
            raise ValueError("the tokenizer has no EOS token: pass eos_token_ids")
        return tuple(sorted(ids))

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None = None,
        logits_to_keep: int = 0,
        module: PreTrainedModel | None = None,
    ) -> torch.Tensor:
        """Logits of the last ``logits_to_keep`` positions (all when 0), from ``module``
        (default: the model with its LoRA layers)."""
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
        )
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if logits_to_keep and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        logits = (module or self.lm)(**kwargs).logits
        return logits[:, -logits_to_keep:] if logits_to_keep else logits

    def _new_cache(self) -> DynamicCache:
        try:
            return DynamicCache(config=self.lm.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _prefill(
        self, prompts: list[list[int]], module: PreTrainedModel | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
        """Prefill ``prompts`` (padded by :meth:`_pad_prompts`): the logits at each prompt's
        last position, the attention mask, the position ids and the KV cache, one row per
        prompt. With ``share_prefixes``, each distinct prompt is computed once and its rows
        (cache included) are expanded from it: a session's rollouts cost one prefill, in
        generation and in scoring, and gradients flow back through the shared rows."""
        if self.share_prefixes:
            unique: dict[tuple[int, ...], int] = {}
            row_to_unique = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
            distinct = [list(u) for u in unique]
        else:
            row_to_unique, distinct = list(range(len(prompts))), prompts
        ids, mask = (t.to(self.device) for t in self._pad_prompts(distinct))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        last = self._forward(ids, mask, positions, cache, logits_to_keep=1, module=module)[:, -1]
        if len(distinct) < len(prompts):
            expand = torch.tensor(row_to_unique, device=self.device)
            cache.batch_select_indices(expand)
            last, mask, positions = last[expand], mask[expand], positions[expand]
        return last, mask, positions, cache

    def _chunks(self, n: int) -> Iterator[range]:
        size = self.max_batch_size or max(n, 1)
        for start in range(0, n, size):
            yield range(start, min(start + size, n))

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def generate(
        self,
        batch_of_messages: Sequence[Messages],
        *,
        adapter: AdapterArg = ACTIVE,
        sampling: SamplingConfig | None = None,
        constraint: Template | Sequence[Template | None] | None = None,
        shortener: Shortener | None = None,
    ) -> list[Generation]:
        """Generate one answer per chat prompt, batched.

        Prompt length rule: a prompt longer than :meth:`prompt_limit` ``(max_new_tokens)`` is
        passed to ``shortener`` (this argument, else the policy's) with its batch index, again
        and again until it fits; when there is no shortener, or it returns ``None``, a
        :class:`PromptTooLongError` is raised. Prompts are never truncated silently (cutting
        the left would drop the system prompt and the candidates).

        Args:
            batch_of_messages: chat prompts, rendered with the tokenizer's chat template and
                the assistant generation prompt.
            adapter: ``ACTIVE`` (default), ``None`` (base model) or an adapter name.
            sampling: :class:`SamplingConfig` (default: its defaults).
            constraint: a template for every row, one per row (``None`` entries free), or None.
            shortener: see above.
        """
        sampling = sampling or SamplingConfig()
        shortener = shortener or self.shortener
        limit = self.prompt_limit(sampling.max_new_tokens)
        prompts = []
        for i, messages in enumerate(batch_of_messages):
            ids = self.render(messages)
            while len(ids) > limit:
                shorter = shortener(i, messages) if shortener else None
                if shorter is None:
                    raise PromptTooLongError(
                        f"prompt {i} has {len(ids)} tokens, more than the {limit} left by the "
                        f"context ({self.context_length}) minus max_new_tokens "
                        f"({sampling.max_new_tokens}); pass a shortener to re-render it shorter"
                    )
                shorter_ids = self.render(shorter)
                if len(shorter_ids) >= len(ids):
                    raise PromptTooLongError(f"the shortener did not shorten prompt {i}")
                messages, ids = shorter, shorter_ids
            prompts.append(ids)
        return self.generate_ids(prompts, adapter=adapter, sampling=sampling, constraint=constraint)

    def generate_ids(
        self,
        prompt_ids_list: Sequence[Sequence[int]],
        *,
        adapter: AdapterArg = ACTIVE,
        sampling: SamplingConfig | None = None,
        constraint: Template | Sequence[Template | None] | None = None,
    ) -> list[Generation]:
        """:meth:`generate` on already tokenised prompts (no rendering, no shortening)."""
        sampling = sampling or SamplingConfig()
        prompts = [list(map(int, p)) for p in prompt_ids_list]
        n = len(prompts)
        if isinstance(constraint, Template) or constraint is None:
            templates: list[Template | None] = [constraint] * n
        else:
            templates = list(constraint)
            if len(templates) != n:
                raise ValueError(f"{len(templates)} constraints for {n} prompts")
        limit = self.prompt_limit(sampling.max_new_tokens)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) > limit:
                raise PromptTooLongError(f"prompt {i} has {len(p)} tokens, limit {limit}")
        # (secrets, not torch.seed(): that would reseed torch's global generator)
        base_seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)

        out: list[Generation] = []
        with self._adapter_scope(adapter), torch.no_grad():
            for rows in self._chunks(n):
                out += self._generate_chunk(
                    [prompts[i] for i in rows],
                    [templates[i] for i in rows],
                    [_row_seed(base_seed, i) for i in rows],
                    sampling,
                )
        return out

    def _generate_chunk(
        self,
        prompts: list[list[int]],
        templates: list[Template | None],
        seeds: list[int],
        sampling: SamplingConfig,
    ) -> list[Generation]:
        device, n = self.device, len(prompts)
        greedy = sampling.greedy or sampling.temperature == 0

        module = self._merged.get(self._active) if self._active is not None else None
        last, attention_mask, position_ids, cache = self._prefill(prompts, module)
        logits = last.float()
        next_pos = position_ids[:, -1] + 1

        states = [TemplateState(t, self.vocab) if t is not None else None for t in templates]
        generators = None
        if not greedy:
            # CPU generators: each draws one number per row and step (see _choose).
            generators = [torch.Generator().manual_seed(s) for s in seeds]
        completions: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        forced: list[list[bool]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        stop_at: list[int | None] = [None] * n
        active = list(range(n))  # batch position -> row

        for _ in range(sampling.max_new_tokens):
            raw = torch.log_softmax(logits, dim=-1)  # the raw distribution, for the log-probs
            mask = self._step_mask([states[r] for r in active]).to(device)
            gens = [generators[r] for r in active] if generators is not None else None
            tokens = _choose(logits, mask, sampling, gens)
            token_lp = raw.gather(1, tokens[:, None]).squeeze(1)
            is_forced = mask.sum(-1) == 1
            for j, (tok, lp, frc) in enumerate(
                zip(tokens.tolist(), token_lp.tolist(), is_forced.tolist())
            ):
                r = active[j]
                completions[r].append(tok)
                logprobs[r].append(lp)
                forced[r].append(frc)
                finish[r], stop_at[r] = self._finished(tok, states[r], completions[r], sampling)

            keep = [j for j, r in enumerate(active) if finish[r] is None]
            if not keep:
                break
            if len(keep) < len(active):  # drop finished rows from the batch and the cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention_mask, next_pos, tokens = (
                    attention_mask[index],
                    next_pos[index],
                    tokens[index],
                )
                active = [active[j] for j in keep]
            # The chosen tokens, then the literal tokens that every row is forced to emit next.
            run = self._shared_literal_run(
                [states[r] for r in active], active, completions, sampling.max_new_tokens
            )
            step_ids = tokens[:, None]
            if run:
                step_ids = torch.cat([step_ids, torch.tensor(run, device=device)], dim=1)
            width = step_ids.shape[1]
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones(len(active), width)], dim=-1
            )
            positions = next_pos[:, None] + torch.arange(width, device=device)
            logits = self._forward(
                step_ids, attention_mask, positions, cache, logits_to_keep=width, module=module
            ).float()
            for j in range(width - 1):  # record the literal tokens as if decoded one by one
                token_lp = torch.log_softmax(logits[:, j], dim=-1).gather(
                    1, step_ids[:, j + 1, None]
                )
                if generators is not None:  # the draw a one-token step would have spent
                    for r in active:
                        torch.rand(1, generator=generators[r], dtype=torch.float64)
                for i, lp in enumerate(token_lp[:, 0].tolist()):
                    r, tok = active[i], run[i][j]
                    completions[r].append(tok)
                    logprobs[r].append(lp)
                    forced[r].append(True)
                    finish[r], stop_at[r] = self._finished(tok, states[r], completions[r], sampling)
                    assert finish[r] is None, "a literal run never ends a row"
            logits = logits[:, -1]
            next_pos = next_pos + width

        results = []
        for r in range(n):
            text = self.tokenizer.decode(completions[r], skip_special_tokens=True)
            state = states[r]
            if finish[r] is None:
                finish[r] = "length"
            elif stop_at[r] is not None:
                text = text[: stop_at[r]]
            elif state is not None:
                text = state.trim(text)
            results.append(
                Generation(
                    text=text,
                    prompt_ids=prompts[r],
                    completion_ids=completions[r],
                    logprobs=torch.tensor(logprobs[r], dtype=torch.float32),
                    forced=torch.tensor(forced[r], dtype=torch.bool),
                    finish_reason=finish[r],
                    fields=dict(state.fields) if state is not None else {},
                )
            )
        return results

    def _shared_literal_run(
        self,
        states: list[TemplateState | None],
        rows: list[int],
        completions: list[list[int]],
        max_new_tokens: int,
    ) -> list[tuple[int, ...]]:
        """Literal tokens that every row emits next, one tuple per row (all of one length k),
        or ``[]`` when k = 0: the longest common length of their literal runs, short of each
        row's token budget (so no row finishes inside the run)."""
        if not (self.fast_forward_literals and states and all(s is not None for s in states)):
            return []
        runs = [s.literal_run() for s in states]  # type: ignore[union-attr]
        budget = min(max_new_tokens - len(completions[r]) - 1 for r in rows)
        k = min([len(run) for run in runs] + [budget])
        return [run[:k] for run in runs] if k > 0 else []

    def _step_mask(self, states: list[TemplateState | None]) -> torch.Tensor:
        """Allowed tokens per batch row (CPU bool[b, n_logits])."""
        mask = self._valid.expand(len(states), -1).clone()
        for j, state in enumerate(states):
            if state is not None:
                mask[j] = state.allowed()
        return mask

    def _finished(
        self,
        token: int,
        state: TemplateState | None,
        completion: list[int],
        sampling: SamplingConfig,
    ) -> tuple[str | None, int | None]:
        """(finish reason or None, where to cut the text for a stop string)."""
        if state is not None:
            state.advance(token)
            if state.done:
                return ("eos" if state.ended_by == "eos" else "template"), None
        elif token in self.eos_token_ids:
            return "eos", None
        elif sampling.stop:
            text = self.tokenizer.decode(completion, skip_special_tokens=True)
            hits = [text.find(s) for s in sampling.stop if s in text]
            if hits:
                return "stop", min(hits)
        if len(completion) >= sampling.max_new_tokens:
            return "length", None
        return None, None

    def _pad_prompts(self, seqs: list[list[int]], extra: int = 0) -> tuple[torch.Tensor, ...]:
        """Prompts padded to a common width (plus ``extra`` free columns), on the CPU.

        The padding goes just before each prompt's last token, not before the prompt: the
        last tokens line up in the last prompt column, and no row starts with padding. A
        query row that may attend to nothing (a left pad) gets NaN gradients, and from some
        kernels NaN outputs, in fused GPU attention, even where its output is never used.
        The masked gap changes nothing: position ids count only unmasked tokens.
        """
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width + extra), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            if s:
                ids[i, : len(s) - 1] = torch.tensor(s[:-1], dtype=torch.long)
                mask[i, : len(s) - 1] = 1
                ids[i, width - 1] = s[-1]
                mask[i, width - 1] = 1
        return ids, mask

    # ------------------------------------------------------------------------------------------
    # Scoring
    # ------------------------------------------------------------------------------------------

    def score(
        self,
        prompt_ids_list: Sequence[Sequence[int]],
        completion_ids_list: Sequence[Sequence[int]],
        *,
        adapter: AdapterArg = ACTIVE,
        requires_grad: bool = False,
        full_distributions: bool = False,
    ) -> list[torch.Tensor]:
        """Per-token log-probs of each completion given its prompt (raw distribution).

        One forward pass per batch (chunked by ``max_batch_size``): each prompt is padded just
        before its last token and completions are right-padded to common widths, so every
        completion starts at the same column, only ``max completion length + 1`` positions go
        through ``lm_head``, and no row begins with padding (fully masked rows break the
        backward pass of fused GPU attention kernels). Rows of a chunk that share a prompt
        (a session's rollouts) share one prefill of it and its KV cache.

        Args:
            prompt_ids_list: contexts (e.g. the student's ``x`` or the teacher's ``x + d``).
            completion_ids_list: the tokens to score (e.g. ``Generation.completion_ids``).
            adapter: ``ACTIVE`` (default), ``None`` (base model) or an adapter name.
            requires_grad: build the autograd graph (for the loss); otherwise ``no_grad``.
            full_distributions: return each position's whole next-token log-distribution
                instead of the completion token's log-prob (for distillation losses that
                compare two distributions; the token's log-prob is its entry there).

        Returns:
            float32 tensors of shape ``(len(completion),)`` on the model's device, or
            ``(len(completion), vocabulary)`` with ``full_distributions``.
        """
        if len(prompt_ids_list) != len(completion_ids_list):
            raise ValueError("need one completion per prompt")
        out: list[torch.Tensor] = []
        grad = nullcontext() if requires_grad else torch.no_grad()
        with self._adapter_scope(adapter), grad:
            for rows in self._chunks(len(prompt_ids_list)):
                out += self._score_chunk(
                    [list(map(int, prompt_ids_list[i])) for i in rows],
                    [list(map(int, completion_ids_list[i])) for i in rows],
                    full_distributions,
                )
        return out

    def _score_chunk(
        self, prompts: list[list[int]], completions: list[list[int]], full: bool = False
    ) -> list[torch.Tensor]:
        if any(not p for p in prompts):
            raise ValueError("prompts must be non-empty")
        if self.share_prefixes and len({tuple(p) for p in prompts}) < len(prompts):
            return self._score_shared_prompts(prompts, completions, full)
        p_width = max(len(p) for p in prompts)
        c_width = max(1, max(len(c) for c in completions))
        # Prompts end in column p_width - 1, so every completion starts at column p_width.
        ids, mask = self._pad_prompts(prompts, extra=c_width)
        for i, c in enumerate(completions):
            if c:
                ids[i, p_width : p_width + len(c)] = torch.tensor(c)
                mask[i, p_width : p_width + len(c)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        # Positions p_width-1 .. p_width+c_width-2 predict the completion tokens.
        logits = self._forward(ids, mask, position_ids, logits_to_keep=c_width + 1)[:, :-1]
        return _completion_logprobs(logits, ids[:, p_width:], completions, full)

    def _score_shared_prompts(
        self, prompts: list[list[int]], completions: list[list[int]], full: bool = False
    ) -> list[torch.Tensor]:
        """:meth:`_score_chunk` for a chunk in which some rows share a prompt (a session's
        rollouts): :meth:`_prefill` computes each distinct prompt once, then the completions
        run on the expanded cache. Prompts are most of the tokens, so a group of G rollouts
        costs about 1/G of the forward and backward compute."""
        device, n = self.device, len(prompts)
        # The last prompt position predicts each completion's first token.
        first, mask, positions, cache = self._prefill(prompts)
        c_width = max(1, max(len(c) for c in completions))
        step_ids = torch.full((n, c_width), self.tokenizer.pad_token_id, dtype=torch.long)
        step_mask = torch.zeros_like(step_ids)
        for i, c in enumerate(completions):
            if c:
                step_ids[i, : len(c)] = torch.tensor(c)
                step_mask[i, : len(c)] = 1
        step_ids, step_mask = step_ids.to(device), step_mask.to(device)
        attention = torch.cat([mask, step_mask], dim=-1)
        step_positions = positions[:, -1:] + 1 + torch.arange(c_width, device=device)
        rest = self._forward(step_ids, attention, step_positions, cache, logits_to_keep=c_width)
        logits = torch.cat([first[:, None], rest[:, :-1]], dim=1)
        return _completion_logprobs(logits, step_ids, completions, full)

    def choice_probabilities(
        self,
        prompt_ids_list: Sequence[Sequence[int]],
        template: Template,
        name: str,
        *,
        adapter: AdapterArg = ACTIVE,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[dict[str, float]]:
        """The exact probability of each option of the choice ``name``, per prompt, under
        constrained sampling of ``template`` at ``temperature`` and ``top_p``.

        It is the distribution :meth:`generate` draws that choice from (the constraint mask,
        then temperature, then top-p, at every step; see
        :func:`coars_agents.constrained.choice_decisions`), computed without sampling: e.g.
        the recommender's distribution over the candidates, for a full ranking and an
        expected Hit@1 with no sampling noise. Only literals may precede the choice.

        Cost: one prefill per prompt, then one extra row per trie node where the choice
        branches (3 for candidates "1".."20" with digit-level tokenizers), which share the
        prompt's KV cache: memory grows with ``max_batch_size`` x branching nodes.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        prefix, decisions = choice_decisions(template, self.vocab, name)
        allowed = {d.path: d.allowed for steps in decisions.values() for d in steps}  # per node
        paths = sorted(allowed)
        node_of = {path: k for k, path in enumerate(paths)}
        options = list(decisions)
        prompts = [list(map(int, p)) + list(prefix) for p in prompt_ids_list]
        if any(len(p) == len(prefix) for p in prompts):
            raise ValueError("prompts must be non-empty")
        out: list[dict[str, float]] = []
        with self._adapter_scope(adapter), torch.no_grad():
            for rows in self._chunks(len(prompts)):
                logits = self._node_logits([prompts[i] for i in rows], paths)
                # Each node's sampling distribution once, for every row of the chunk.
                node_logp = [
                    torch.log_softmax(
                        _sampling_scores(
                            logits[:, k], allowed[path].to(logits.device), temperature, top_p
                        ).double(),
                        dim=-1,
                    )
                    for k, path in enumerate(paths)
                ]
                logp = torch.zeros(len(rows), len(options), dtype=torch.float64)
                for o, option in enumerate(options):
                    for d in decisions[option]:
                        taken = node_logp[node_of[d.path]][:, d.taken.to(logits.device)]
                        logp[:, o] += torch.logsumexp(taken, dim=-1).cpu()
                out += [dict(zip(options, row)) for row in logp.exp().tolist()]
        return out

    def _node_logits(self, prompts: list[list[int]], paths: list[tuple[int, ...]]) -> torch.Tensor:
        """Float logits (len(prompts), len(paths), n_logits) of the next token after each
        prompt followed by each path; the prompts are prefilled once and their KV cache is
        shared by their paths."""
        device, n, k = self.device, len(prompts), len(paths)
        ids, mask = (t.to(device) for t in self._pad_prompts(prompts))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        module = self._merged.get(self._active) if self._active is not None else None
        root = self._forward(ids, mask, positions, cache, logits_to_keep=1, module=module)
        out = root[:, -1].float()[:, None].repeat(1, k, 1)
        longer = [j for j, p in enumerate(paths) if p]
        if not longer:
            return out
        width = max(len(paths[j]) for j in longer)
        # Row (prompt i, path j) for every non-empty path, each path right-padded to width.
        expand = torch.arange(n, device=device).repeat_interleave(len(longer))
        cache.batch_select_indices(expand)
        step_ids = torch.full((len(longer), width), self.tokenizer.pad_token_id, dtype=torch.long)
        step_mask = torch.zeros_like(step_ids)
        for row, j in enumerate(longer):
            step_ids[row, : len(paths[j])] = torch.tensor(paths[j])
            step_mask[row, : len(paths[j])] = 1
        step_ids, step_mask = step_ids.repeat(n, 1).to(device), step_mask.repeat(n, 1).to(device)
        attention = torch.cat([mask[expand], step_mask], dim=-1)
        step_positions = positions[expand, -1:] + 1 + torch.arange(width, device=device)
        logits = self._forward(
            step_ids, attention, step_positions, cache, logits_to_keep=width, module=module
        ).float()
        last = torch.tensor([len(paths[j]) - 1 for j in longer], device=device).repeat(n)
        picked = logits[torch.arange(len(last), device=device), last]
        out[:, longer] = picked.view(n, len(longer), -1)
        return out

    # ------------------------------------------------------------------------------------------
    # Adapters
    # ------------------------------------------------------------------------------------------

    @property
    def peft_model(self) -> PeftModel | None:
        """The ``peft.PeftModel`` once an adapter exists, else None."""
        return self.model if isinstance(self.model, PeftModel) else None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.peft_model.peft_config) if self.peft_model is not None else []

    @property
    def active_adapter(self) -> str | None:
        """The adapter used by calls with ``adapter=ACTIVE`` (None: the base model)."""
        return self._active

    def add_adapter(self, name: str, settings: LoraSettings | None = None) -> None:
        """Add a new LoRA adapter ``name`` on the shared frozen base. Does not activate it."""
        if name in self.adapter_names:
            raise ValueError(f"adapter {name!r} exists")
        self._add_peft_adapter(name, (settings or LoraSettings()).to_peft())

    def _add_peft_adapter(self, name: str, config: PeftConfig) -> None:
        if self.peft_model is None:
            self.model = get_peft_model(self.lm, config, adapter_name=name)
        else:
            self.peft_model.add_adapter(name, config)
        self._activate(self._active)  # PEFT may have switched adapters: restore ours

    def use_adapter(self, name: str | None) -> _AdapterSwitch:
        """Make ``name`` (None: the base model) the active adapter, now.

        Also a context manager that restores the previous one:
        ``with policy.use_adapter("user"): policy.generate(...)``.
        """
        previous = self._active
        self._activate(name)
        return _AdapterSwitch(self, previous)

    @contextmanager
    def _adapter_scope(self, adapter: AdapterArg) -> Iterator[None]:
        if isinstance(adapter, _Active) or adapter == self._active:
            yield
            return
        with self.use_adapter(adapter):
            yield

    def _activate(self, name: str | None) -> None:
        peft_model = self.peft_model
        if peft_model is None:
            if name is not None:
                raise KeyError(f"no adapter {name!r}: add_adapter first")
        elif name is None:
            peft_model.base_model.disable_adapter_layers()
        else:
            if name not in peft_model.peft_config:
                raise KeyError(f"no adapter {name!r}; have {self.adapter_names}")
            peft_model.set_adapter(name)
            peft_model.base_model.enable_adapter_layers()
        if peft_model is not None:
            # PEFT ties requires_grad to the active adapter. We keep every adapter trainable:
            # an adapter only gets gradients from forward passes run while it was active, and a
            # graph built under one adapter stays valid after switching to another.
            for p in self._adapter_parameters(None):
                p.requires_grad_(True)
        self._active = name

    @contextmanager
    def merged_adapters(self, names: Sequence[str] | None = None) -> Iterator[None]:
        """Within this block, :meth:`generate` decodes with copies of the base that have the
        adapter merged into their weights: no LoRA layers in the decoding loop.

        Why: with small models on GPUs, decoding is bound by the Python work per step, and
        PEFT's LoRA wrappers (7 per decoder layer) are a large part of it. Scoring and
        training still use the adapters themselves. The copies are made on entry and freed
        on exit; they do not see updates to an adapter inside the block. Cost: one extra
        model per adapter while the block lasts. Outputs match the unmerged model up to
        floating-point rounding.

        Args:
            names: adapters to merge (default: all).
        """
        peft_model = self.peft_model
        names = list(self.adapter_names if names is None else names)
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            raise KeyError(f"no adapter {unknown}; have {self.adapter_names}")
        try:
            for name in names:
                # A deep copy with both adapters, from which PEFT merges one and removes all
                # LoRA layers; the live model and its adapters are untouched.
                merged = copy.deepcopy(peft_model).merge_and_unload(adapter_names=[name])
                self._merged[name] = merged.requires_grad_(False).eval()
            yield
        finally:
            self._merged.clear()

    def _adapter_parameters(
        self, name: str | None, matrix: str = r"\w+"
    ) -> list[torch.nn.Parameter]:
        if self.peft_model is None:
            return []
        adapter = re.escape(name) if name else r"[^.]+"
        pattern = re.compile(r"\.lora_" + matrix + r"\." + adapter + r"(\.|$)")
        return [p for n, p in self.peft_model.named_parameters() if pattern.search(n)]

    def trainable_parameters(self, name: str) -> list[torch.nn.Parameter]:
        """The parameters of adapter ``name`` (what its optimizer should hold)."""
        if name not in self.adapter_names:
            raise KeyError(f"no adapter {name!r}; have {self.adapter_names}")
        return self._adapter_parameters(name)

    def adapter_is_identity(self, name: str) -> bool:
        """Whether adapter ``name`` leaves the base model unchanged: every LoRA ``B`` matrix
        is zero, as PEFT initialises it (so a fresh adapter's outputs are the base model's)."""
        if name not in self.adapter_names:
            raise KeyError(f"no adapter {name!r}; have {self.adapter_names}")
        return not any(bool(p.detach().any()) for p in self._adapter_parameters(name, "B"))

    def save_adapter(self, name: str, path: str | Path) -> None:
        """Write adapter ``name`` to ``path`` in PEFT's format (``adapter_config.json`` +
        ``adapter_model.safetensors``; loadable by ``PeftModel.from_pretrained`` too)."""
        if name not in self.adapter_names:
            raise KeyError(f"no adapter {name!r}; have {self.adapter_names}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.peft_model, adapter_name=name)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            str(path / "adapter_model.safetensors"),
        )
        self.peft_model.peft_config[name].save_pretrained(str(path))

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load the adapter saved at ``path`` as ``name`` (created if missing, else overwritten
        in place; it must then have the same shapes)."""
        path = Path(path)
        if name not in self.adapter_names:
            self._add_peft_adapter(name, PeftConfig.from_pretrained(str(path)))
        state = load_file(str(path / "adapter_model.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.peft_model, state, adapter_name=name)
        if result.unexpected_keys:
            raise ValueError(f"unexpected keys in {path}: {result.unexpected_keys[:5]}")
        missing = [
            k for k in result.missing_keys if re.search(rf"\.lora_\w+\.{re.escape(name)}\.", k)
        ]
        if missing:
            raise ValueError(f"adapter at {path} lacks {missing[:5]}")
        self._activate(self._active)


# ----------------------------------------------------------------------------------------------
# Sampling helpers
# ----------------------------------------------------------------------------------------------


def _row_seed(seed: int, row: int) -> int:
    """A well-mixed 63-bit seed for row ``row`` (so seeds (1, 0) and (0, 1) are unrelated)."""
    return int(np.random.SeedSequence([seed, row]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _choose(
    logits: torch.Tensor,
    mask: torch.Tensor,
    sampling: SamplingConfig,
    generators: list[torch.Generator] | None,
) -> torch.Tensor:
    """Next token per row: constraint mask, then temperature, then top-p, then inverse-CDF
    sampling with one uniform number from each row's own generator.

    One number per row (not one per vocabulary entry, as Gumbel-max needs) keeps sampling
    cheap next to the forward pass: 64 rows x 49k tokens of noise per step cost as much as
    the model itself on a CPU. Row-wise softmax and cumsum keep a row's sample independent
    of the batch it is in."""
    if generators is None:  # greedy
        return logits.masked_fill(~mask, -math.inf).argmax(-1)
    scores = _sampling_scores(logits, mask, sampling.temperature, sampling.top_p)
    cdf = scores.double().softmax(-1).cumsum(-1)
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    target = uniform.to(cdf.device)[:, None] * cdf[:, -1:]
    # right=True: the first token whose cumulative mass exceeds the target, never one of
    # probability zero (a masked token's mass adds nothing to the cumsum).
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tokens.clamp(max=scores.shape[-1] - 1)


def _completion_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, completions: list[list[int]], full: bool
) -> list[torch.Tensor]:
    """Per row, the log-probs of its completion's tokens (``full``: the whole log-softmax
    at each of its positions) from ``logits`` ``(n, width, V)`` aligned with ``targets``."""
    if full:
        tables = torch.log_softmax(logits.float(), dim=-1)
        return [tables[i, : len(c)] for i, c in enumerate(completions)]
    n, width = targets.shape
    # cross_entropy = -log_softmax gathered, without materialising a second (n, c, V) tensor
    logprobs = -F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view(n, width)
    return [logprobs[i, : len(c)] for i, c in enumerate(completions)]


def _sampling_scores(
    logits: torch.Tensor, mask: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """The logits sampling draws from (up to a constant): the constraint mask, then the
    temperature, then top-p. Shared by :func:`_choose` and
    :meth:`LLMPolicy.choice_probabilities`, so the two always agree."""
    scores = logits.masked_fill(~mask, -math.inf) / temperature
    return _top_p_filter(scores, top_p) if top_p < 1.0 else scores


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of top tokens whose probability reaches ``top_p`` (at least one)."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probs = sorted_scores.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
    sorted_scores = sorted_scores.masked_fill(before >= top_p, -math.inf)
    return torch.full_like(scores, -math.inf).scatter(-1, order, sorted_scores)
