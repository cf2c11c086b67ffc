"""LLMPolicy on tiny random models: log-probs, batching, sampling, constraints, adapters.

``COARS_TEST_DEVICE=cuda`` runs the tiny-model tests on a GPU (still float32/float64)."""

import math
import os
import re

import pytest
import torch

from coars_agents.constrained import (
    Choice,
    Free,
    Literal,
    Template,
    TemplateState,
    recommender_template,
    user_template,
)
from coars_agents.models import tiny_test_model
from coars_agents.policy import (
    Generation,
    LLMPolicy,
    LoraSettings,
    PromptTooLongError,
    SamplingConfig,
)

REC_RE = re.compile(r"Item: (\d+)\nReason: [^\n]*")
USER_RE = re.compile(r"Action: (click|star|skip|dislike)\nScore: (\d\.\d\d)\nReason: [^\n]*")
# PEFT calls a transformers method that transformers 5 deprecates: not ours to fix.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
]

DEVICE = os.environ.get("COARS_TEST_DEVICE", "cpu")
LOGPROB_ATOL_FP32 = 1e-4  # generation (KV cache, step by step) vs score (one full pass)

PROMPTS = [
    [{"role": "user", "content": "History: 1. Song A"}],
    [
        {"role": "system", "content": "You are a music recommender."},
        {"role": "user", "content": "History: 1. Song A\n2. Song B\nCandidates: 1. Song C"},
    ],
    [{"role": "user", "content": "Pick one item, please, from the list."}],
]


def make_policy(seed: int, dtype: torch.dtype = torch.float32, **kwargs) -> LLMPolicy:
    model, tokenizer = tiny_test_model(seed=seed, dtype=dtype)
    return LLMPolicy(model.to(DEVICE), tokenizer, **kwargs)


@pytest.fixture(scope="module")
def policy():
    return make_policy(0)


@pytest.fixture(scope="module")
def policy64():
    return make_policy(1, torch.float64)


def rescore(policy, gens, **kw):
    return policy.score([g.prompt_ids for g in gens], [g.completion_ids for g in gens], **kw)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(max_new_tokens=24, temperature=0.7, top_p=0.9, seed=3),
        SamplingConfig(max_new_tokens=24, greedy=True),
    ],
)
def test_generation_logprobs_equal_score(policy, sampling):
    gens = policy.generate(PROMPTS, sampling=sampling)
    for g, lp in zip(gens, rescore(policy, gens)):
        assert isinstance(g, Generation) and len(g.completion_ids) > 0
        assert g.logprobs.dtype == torch.float32 and g.logprobs.shape == lp.shape
        torch.testing.assert_close(g.logprobs, lp.cpu(), atol=LOGPROB_ATOL_FP32, rtol=0)


def test_constrained_logprobs_are_the_raw_distribution(policy):
    # masks, temperature and top-p change what is sampled, never the reported log-probs
    sampling = SamplingConfig(max_new_tokens=60, temperature=2.0, top_p=0.8, seed=5)
    gens = policy.generate(PROMPTS, sampling=sampling, constraint=recommender_template(20, 16))
    for g, lp in zip(gens, rescore(policy, gens)):
        torch.testing.assert_close(g.logprobs, lp.cpu(), atol=LOGPROB_ATOL_FP32, rtol=0)
        assert (g.logprobs[g.forced] < 0).all(), "forced tokens keep their raw (< 1) probability"


def test_batched_greedy_equals_unbatched(policy64):
    sampling = SamplingConfig(max_new_tokens=20, greedy=True)
    batched = policy64.generate(PROMPTS, sampling=sampling)
    for messages, b in zip(PROMPTS, batched):
        (single,) = policy64.generate([messages], sampling=sampling)
        assert single.completion_ids == b.completion_ids
        torch.testing.assert_close(single.logprobs, b.logprobs, atol=1e-9, rtol=0)


def test_sampling_is_deterministic_per_seed_and_independent_of_the_batch(policy64):
    s = SamplingConfig(max_new_tokens=16, temperature=1.0, seed=11)
    a = policy64.generate(PROMPTS, sampling=s)
    b = policy64.generate(PROMPTS, sampling=s)
    assert [g.completion_ids for g in a] == [g.completion_ids for g in b]
    (first,) = policy64.generate(PROMPTS[:1], sampling=s)
    assert first.completion_ids == a[0].completion_ids, "row 0 does not depend on rows 1, 2"
    other = policy64.generate(PROMPTS, sampling=SamplingConfig(max_new_tokens=16, seed=12))
    assert [g.completion_ids for g in other] != [g.completion_ids for g in a]


def test_sampling_draws_from_the_masked_tempered_softmax():
    from coars_agents.policy import _choose

    logits = torch.tensor([0.0, math.log(2.0), math.log(5.0), 3.0, -1.0])
    mask = torch.tensor([True, True, True, False, True])  # token 3 is not allowed
    n = 20_000
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    for temperature in (1.0, 0.5):
        sampling = SamplingConfig(temperature=temperature)
        tokens = _choose(logits.expand(n, -1), mask.expand(n, -1), sampling, generators)
        expected = (logits / temperature).masked_fill(~mask, -math.inf).softmax(-1)
        freq = torch.bincount(tokens, minlength=5).double() / n
        assert freq[3] == 0
        se = (expected * (1 - expected) / n).sqrt()
        assert ((freq - expected).abs() <= 4 * se + 1e-12).all(), (freq, expected)


def test_shared_prefix_reuse_changes_nothing(policy64):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]]
    s = SamplingConfig(max_new_tokens=12, seed=2)
    shared = policy64.generate(prompts, sampling=s)
    policy64.share_prefixes = False
    try:
        plain = policy64.generate(prompts, sampling=s)
    finally:
        policy64.share_prefixes = True
    for a, b in zip(shared, plain):
        assert a.completion_ids == b.completion_ids
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-9, rtol=0)
    assert shared[0].completion_ids != shared[2].completion_ids, "rollouts of one prompt differ"


def test_chunking_changes_nothing(policy64):
    s = SamplingConfig(max_new_tokens=8, seed=4)
    whole = policy64.generate(PROMPTS, sampling=s)
    policy64.max_batch_size = 2
    try:
        chunked = policy64.generate(PROMPTS, sampling=s)
    finally:
        policy64.max_batch_size = None
    assert [g.completion_ids for g in whole] == [g.completion_ids for g in chunked]


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(max_new_tokens=40, seed=6),
        SamplingConfig(max_new_tokens=40, greedy=True),
        SamplingConfig(max_new_tokens=7, seed=6),  # the budget cuts a literal run short
    ],
)
def test_fast_forwarded_literals_change_nothing_but_the_forward_passes(policy64, sampling):
    # Mixed templates in one batch, so the rows' literals do not line up.
    templates = [recommender_template(20, 8), user_template(8), recommender_template(20, 8)]
    widths: list[int] = []  # tokens per row fed by each forward pass
    forward = policy64._forward

    def counting_forward(input_ids, *args, **kwargs):
        widths.append(input_ids.shape[1])
        return forward(input_ids, *args, **kwargs)

    def run(fast: bool) -> tuple[list[Generation], list[int]]:
        widths.clear()
        policy64.fast_forward_literals = fast
        gens = policy64.generate(PROMPTS, sampling=sampling, constraint=templates)
        return gens, widths[1:]  # without the prefill

    policy64._forward = counting_forward
    try:
        fast, fast_widths = run(True)
        slow, slow_widths = run(False)
    finally:
        policy64.fast_forward_literals = True
        del policy64._forward
    for a, b in zip(fast, slow):
        assert a.completion_ids == b.completion_ids and a.text == b.text
        assert a.forced.tolist() == b.forced.tolist() and a.finish_reason == b.finish_reason
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-9, rtol=0)
    assert set(slow_widths) == {1} and max(fast_widths) > 1
    assert sum(fast_widths) == sum(slow_widths), "the same tokens, in fewer passes"
    assert len(fast_widths) < len(slow_widths)
    for g, lp in zip(fast, rescore(policy64, fast)):  # still the log-probs of a full pass
        torch.testing.assert_close(g.logprobs, lp.cpu().float(), atol=1e-6, rtol=0)


def test_literal_runs_leave_a_closing_literal_to_one_token_steps(policy):
    from coars_agents.constrained import Choice, Template

    template = Template.from_format("Pick: {x} done.", x=Choice(["a", "b"]))
    state = TemplateState(template, policy.vocab)
    opening = policy.vocab.encode("Pick:")
    assert state.literal_run() == opening
    state.advance(opening[0])
    assert state.literal_run() == opening[1:]
    for token in opening[1:]:
        state.advance(token)
    assert state.literal_run() == ()  # the choice
    while state.index == 1:
        state.advance(int(state.allowed().nonzero()[0]))
    assert not state.done and state.literal_run() == ()  # " done." would complete the template


@pytest.mark.parametrize("seed", range(6))
def test_constrained_outputs_always_match_the_templates(policy, seed):
    tokenizer = policy.tokenizer
    for temperature in (1.0, 5.0):
        sampling = SamplingConfig(max_new_tokens=48, temperature=temperature, seed=seed)
        prompts = PROMPTS * 3
        rec = policy.generate(prompts, sampling=sampling, constraint=recommender_template(20, 16))
        user = policy.generate(prompts, sampling=sampling, constraint=user_template(16))
        for g in rec:
            assert g.finish_reason in ("template", "eos")
            m = REC_RE.fullmatch(g.text)
            assert m and 1 <= int(m.group(1)) <= 20, g.text
            assert g.fields["item"] == m.group(1)
            assert tokenizer.decode([t for t, f in zip(g.completion_ids, g.forced) if f]) == (
                "Item:\nReason:"
            )
        for g in user:
            m = USER_RE.fullmatch(g.text)
            assert m, g.text
            assert g.fields["action"] == m.group(1) and g.fields["score"] == m.group(2)
        # the forced mask is exactly "the template allowed one token"
        for g, template in [(rec[0], recommender_template(20, 16)), (user[0], user_template(16))]:
            state = TemplateState(template, policy.vocab)
            for tok, forced in zip(g.completion_ids, g.forced.tolist()):
                mask = state.allowed()
                assert mask[tok] and forced == (mask.sum().item() == 1)
                state.advance(tok)
            assert state.done


def test_per_row_constraints(policy):
    gens = policy.generate(
        PROMPTS[:2],
        sampling=SamplingConfig(max_new_tokens=48),
        constraint=[recommender_template(5, 8), None],
    )
    assert REC_RE.fullmatch(gens[0].text) and not gens[1].forced.any()


def test_stop_strings_stop(policy):
    greedy = SamplingConfig(max_new_tokens=30, greedy=True)
    (full,) = policy.generate(PROMPTS[:1], sampling=greedy)
    assert full.finish_reason == "length"
    stop = full.text[8:10]
    (cut,) = policy.generate(
        PROMPTS[:1], sampling=SamplingConfig(max_new_tokens=30, greedy=True, stop=("@@@", stop))
    )
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert full.completion_ids[: len(cut.completion_ids)] == cut.completion_ids
    assert len(cut.completion_ids) < len(full.completion_ids)


def test_eos_and_length_finish(policy):
    greedy = SamplingConfig(max_new_tokens=5, greedy=True)
    (g,) = policy.generate(PROMPTS[:1], sampling=greedy)
    assert g.finish_reason == "length" and len(g.completion_ids) == 5
    eos = g.completion_ids[2]
    eos_policy = LLMPolicy(policy.lm, policy.tokenizer, eos_token_ids=[eos])
    (e,) = eos_policy.generate(PROMPTS[:1], sampling=greedy)
    assert e.finish_reason == "eos"
    assert e.completion_ids == g.completion_ids[: g.completion_ids.index(eos) + 1]


def test_long_prompts_are_shortened_or_rejected(policy):
    long = [{"role": "user", "content": "song " * 600}]
    with pytest.raises(PromptTooLongError):
        policy.generate([long], sampling=SamplingConfig(max_new_tokens=4))
    calls = []

    def shortener(index, messages):
        calls.append(index)
        content = messages[-1]["content"]
        return [{"role": "user", "content": content[: len(content) // 2]}]

    gens = policy.generate(
        [PROMPTS[0], long], sampling=SamplingConfig(max_new_tokens=4), shortener=shortener
    )
    assert set(calls) == {1} and len(gens[1].prompt_ids) <= policy.prompt_limit(4)
    assert policy.prompt_limit(4) == 512 - 4


def test_a_shortener_must_shorten(policy):
    long = [{"role": "user", "content": "song " * 600}]
    with pytest.raises(PromptTooLongError):
        policy.generate([long], shortener=lambda i, m: m)


def test_unseeded_sampling_leaves_the_global_rng_alone(policy):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    policy.generate(PROMPTS[:1], sampling=SamplingConfig(max_new_tokens=2, seed=None))
    assert torch.equal(torch.rand(3), expected)


def test_score_handles_padding_and_grad(policy):
    prompts = [policy.render(m) for m in PROMPTS]
    completions = [[5, 6, 7], [], [9]]
    out = policy.score(prompts, completions)
    assert [o.shape[0] for o in out] == [3, 0, 1]
    assert out[0].grad_fn is None
    # a row's log-probs do not depend on the other rows
    alone = policy.score(prompts[:1], completions[:1])[0]
    torch.testing.assert_close(out[0], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("share_prefixes", [True, False])
def test_full_distributions_hold_each_scored_tokens_log_prob(policy64, share_prefixes):
    """``full_distributions`` returns the whole log-softmax per completion position; the
    completion token's entry is what plain scoring returns, on both scoring paths (prompts
    repeated: the shared-prefill path; ``share_prefixes`` off: the padded path)."""
    p0, p1, _ = (policy64.render(m) for m in PROMPTS)
    prompts, completions = [p0, p1, p0], [[5, 6, 7], [9], []]
    policy64.share_prefixes = share_prefixes
    try:
        plain = policy64.score(prompts, completions)
        tables = policy64.score(prompts, completions, full_distributions=True)
    finally:
        policy64.share_prefixes = True
    vocab = policy64.lm.config.vocab_size
    assert [tuple(t.shape) for t in tables] == [(3, vocab), (1, vocab), (0, vocab)]
    for table, lp, c in zip(tables, plain, completions):
        torch.testing.assert_close(table.exp().sum(-1), torch.ones(len(c), dtype=table.dtype))
        gathered = table.gather(-1, torch.tensor(c, dtype=torch.long)[:, None])[:, 0]
        torch.testing.assert_close(gathered, lp, atol=1e-6, rtol=0)
    # Position n is the distribution of token n given the prompt and tokens < n: the first
    # one does not depend on the completion, the second does.
    other = policy64.score([p0], [[8, 6]], full_distributions=True)[0]
    torch.testing.assert_close(other[0], tables[0][0], atol=1e-6, rtol=0)
    assert not torch.allclose(other[1], tables[0][1], atol=1e-3)


def test_rows_sharing_a_prompt_score_and_backpropagate_as_if_scored_alone():
    """A group's rollouts share their prompt: it is prefilled once (its KV cache shared by
    the completions), with the same log-probs and adapter gradients as separate rows."""
    shared = make_policy(1, torch.float64)
    shared.add_adapter("a", LoraSettings(r=4, alpha=8))
    perturb(shared, "a", seed=5)  # a non-identity adapter, so its gradients are not trivial
    p0, p1, p2 = (shared.render(m) for m in PROMPTS)
    prompts = [p1, p1, p0, p1, p2, p0]  # repeats, in no order, of three prompt lengths
    completions = [[5, 6, 7], [8], [9, 10], [], [11, 12, 13, 14], [9, 10]]

    def grads_of(rows: list[list[int]], comps: list[list[int]]) -> list[torch.Tensor]:
        shared.model.zero_grad(set_to_none=True)
        out = shared.score(rows, comps, adapter="a", requires_grad=True)
        # distinct weights per row, so that a wrong row-to-prompt mapping shows
        sum((k + 1) * o.sum() for k, o in enumerate(out)).backward()
        grads = [p.grad.clone() for p in shared.trainable_parameters("a")]
        return out, grads

    out, grads = grads_of(prompts, completions)
    assert [o.shape[0] for o in out] == [3, 1, 2, 0, 4, 2]
    torch.testing.assert_close(out[2], out[5], atol=0, rtol=0)  # same prompt, same completion
    reference_grads = [torch.zeros_like(g) for g in grads]
    for k, (prompt, completion) in enumerate(zip(prompts, completions)):
        alone, alone_grads = grads_of([prompt], [completion])
        torch.testing.assert_close(out[k].detach(), alone[0].detach(), atol=1e-10, rtol=0)
        for total, g in zip(reference_grads, alone_grads):
            total += (k + 1) * g
    # Equal up to summation order. The tiny Llama's RMSNorm computes in float32 even in a
    # float64 model, so the order shows at ~1e-7 of the largest gradient; a row scored
    # against the wrong prompt, or a padded position that leaked, would show at ~1.
    for g, ref in zip(grads, reference_grads):
        torch.testing.assert_close(g, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
    assert sum(g.abs().sum() for g in grads) > 0


def _attention_nan_on_empty_rows(module, query, key, value, attention_mask, scaling=None, **_):
    """Plain softmax attention that, like fused CUDA kernels, returns NaN (and NaN gradients)
    for a query row that may attend to nothing."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) * (scaling or query.shape[-1] ** -0.5)
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    return (torch.softmax(scores, -1) @ value).transpose(1, 2).contiguous(), None


def test_no_row_starts_with_padding_in_scoring_or_generation(policy):
    """Regression (GPU, bf16): left-padded scoring batches gave NaN adapter gradients."""
    masking = pytest.importorskip("transformers.masking_utils")
    from transformers import AttentionInterface

    AttentionInterface.register("nan_on_empty_rows", _attention_nan_on_empty_rows)
    masking.AttentionMaskInterface.register("nan_on_empty_rows", masking.sdpa_mask)
    strict = make_policy(0)
    strict.lm.set_attn_implementation("nan_on_empty_rows")
    strict.add_adapter("a", LoraSettings(r=4, alpha=8))
    prompts = [policy.render(m) for m in PROMPTS]  # three different prompt lengths
    completions = [[5, 6, 7], [], [9, 10]]
    out = strict.score(prompts, completions, adapter="a", requires_grad=True)
    sum(o.sum() for o in out).backward()
    grads = [p.grad for p in strict.trainable_parameters("a") if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # The same with a repeated prompt, which takes the shared-prefill path.
    strict.model.zero_grad(set_to_none=True)
    shared_rows = [prompts[1], prompts[0], prompts[1]]
    shared_completions = [[5, 6, 7], [8], [9]]
    shared = strict.score(shared_rows, shared_completions, adapter="a", requires_grad=True)
    sum(o.sum() for o in shared).backward()
    grads = [p.grad for p in strict.trainable_parameters("a") if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # and the layout changes nothing: same log-probs as the default attention, row by row
    rows = zip(out + shared, prompts + shared_rows, completions + shared_completions)
    for o, prompt, completion in rows:
        alone = policy.score([prompt], [completion])[0]
        torch.testing.assert_close(o.detach(), alone, atol=1e-5, rtol=0)
    # Generation pads its prompts the same way: finite, and as the default attention decodes.
    greedy = SamplingConfig(max_new_tokens=8, greedy=True)
    with strict.use_adapter(None):
        strict_gens = strict.generate_ids(prompts, sampling=greedy)
    for gen, reference in zip(strict_gens, policy.generate_ids(prompts, sampling=greedy)):
        assert torch.isfinite(gen.logprobs).all()
        assert gen.completion_ids == reference.completion_ids


# ----------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------


def perturb(policy, name, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters(name):
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))


@pytest.fixture(scope="module")
def adapted():
    policy = make_policy(2)
    policy.add_adapter("recommender", LoraSettings(r=4, alpha=8))
    policy.add_adapter("user")
    return policy


def test_merged_adapters_decode_like_the_adapters_and_are_freed():
    policy = make_policy(3, torch.float64)
    policy.add_adapter("recommender", LoraSettings(r=4, alpha=8))
    policy.add_adapter("user")
    perturb(policy, "recommender", 1)
    perturb(policy, "user", 2)
    base = {n: p.detach().clone() for n, p in policy.lm.named_parameters() if ".lora_" not in n}
    prompts = [policy.render(m) for m in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.9, seed=5)
    for name in ("recommender", "user", None):
        plain = policy.generate_ids(prompts, sampling=sampling, adapter=name)
        with policy.merged_adapters():
            merged = policy.generate_ids(prompts, sampling=sampling, adapter=name)
        for a, b in zip(plain, merged):
            assert a.completion_ids == b.completion_ids
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
    # the adapters differ from each other, so the test can tell which one was merged
    rec = policy.generate_ids(prompts, sampling=sampling, adapter="recommender")
    user = policy.generate_ids(prompts, sampling=sampling, adapter="user")
    assert [g.completion_ids for g in rec] != [g.completion_ids for g in user]
    assert not policy._merged
    for n, p in policy.lm.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"merging changed the live base weight {n}"
    with pytest.raises(KeyError, match="no adapter"):
        with policy.merged_adapters(["critic"]):
            pass


def test_new_adapters_equal_the_base(adapted):
    prompts = [adapted.render(m) for m in PROMPTS]
    comp = [[5, 6, 7]] * 3
    fresh = make_policy(3)
    fresh.add_adapter("agent")
    base = fresh.score(prompts, comp, adapter=None)
    torch.testing.assert_close(fresh.score(prompts, comp, adapter="agent")[0], base[0])


def test_adapter_switching(adapted, tmp_path):
    perturb(adapted, "recommender", 0)
    perturb(adapted, "user", 1)
    s = SamplingConfig(max_new_tokens=10, greedy=True)
    base = adapted.generate(PROMPTS, sampling=s, adapter=None)
    rec = adapted.generate(PROMPTS, sampling=s, adapter="recommender")
    user = adapted.generate(PROMPTS, sampling=s, adapter="user")
    texts = lambda gens: [g.completion_ids for g in gens]  # noqa: E731
    assert texts(base) != texts(rec) and texts(rec) != texts(user) and texts(base) != texts(user)
    assert adapted.active_adapter is None
    with adapted.use_adapter("user"):
        assert texts(adapted.generate(PROMPTS, sampling=s)) == texts(user)
        assert texts(adapted.generate(PROMPTS, sampling=s, adapter=None)) == texts(base)
        assert adapted.active_adapter == "user"
    assert adapted.active_adapter is None
    assert texts(adapted.generate(PROMPTS, sampling=s)) == texts(base)
    adapted.use_adapter("recommender")
    assert texts(adapted.generate(PROMPTS, sampling=s)) == texts(rec)
    adapted.use_adapter(None)
    with pytest.raises(KeyError):
        adapted.use_adapter("critic")


def test_only_the_selected_adapter_gets_gradients(adapted):
    base = [p for n, p in adapted.model.named_parameters() if "lora_" not in n]
    assert base and all(not p.requires_grad for p in base), "the base model is frozen"
    rec, user = adapted.trainable_parameters("recommender"), adapted.trainable_parameters("user")
    lora_ids = {id(p) for p in rec + user}
    assert rec and user and not ({id(p) for p in rec} & {id(p) for p in user})
    assert all(not p.requires_grad for p in adapted.model.parameters() if id(p) not in lora_ids)
    assert all(p.requires_grad for p in rec + user)
    n_rec = sum(p.numel() for p in rec)
    n_user = sum(p.numel() for p in user)
    assert n_user == 4 * n_rec  # r=16 vs r=4

    adapted.model.zero_grad(set_to_none=True)
    prompts = [adapted.render(m) for m in PROMPTS]
    lps = adapted.score(
        prompts, [[5, 6, 7], [8], [9, 10]], adapter="recommender", requires_grad=True
    )
    # the graph outlives the adapter switch at the end of score()
    torch.stack([lp.sum() for lp in lps]).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rec if "lora_B" in str(p))
    assert sum(p.grad.abs().sum() for p in rec) > 0
    assert all(p.grad is None for p in user)
    assert all(p.grad is None for p in adapted.lm.parameters() if id(p) not in lora_ids)
    adapted.model.zero_grad(set_to_none=True)


def test_wrapping_a_peft_model(adapted, tmp_path):
    from peft import PeftModel

    adapted.save_adapter("recommender", tmp_path / "rec")
    model, tokenizer = tiny_test_model(seed=2)
    peft_model = PeftModel.from_pretrained(model.to(DEVICE), tmp_path / "rec", adapter_name="rec")
    wrapped = LLMPolicy(peft_model, tokenizer)
    assert wrapped.active_adapter == "rec" and wrapped.adapter_names == ["rec"]
    prompts = [adapted.render(m) for m in PROMPTS]
    comp = [[5, 6, 7], [8, 9], [10]]
    expected = adapted.score(prompts, comp, adapter="recommender")
    for a, b in zip(expected, wrapped.score(prompts, comp)):
        assert torch.equal(a, b)
    assert all(p.requires_grad for p in wrapped.trainable_parameters("rec"))


def test_save_load_round_trip(adapted, tmp_path):
    perturb(adapted, "user", 7)
    prompts = [adapted.render(m) for m in PROMPTS]
    comp = [[5, 6, 7], [8, 9], [10]]
    expected = adapted.score(prompts, comp, adapter="user")
    adapted.save_adapter("user", tmp_path / "user")
    assert (tmp_path / "user" / "adapter_config.json").exists()

    other = make_policy(2)
    other.load_adapter("user", tmp_path / "user")
    for a, b in zip(expected, other.score(prompts, comp, adapter="user")):
        assert torch.equal(a, b)
    # loading over an existing adapter overwrites it in place
    perturb(other, "user", 8)
    other.load_adapter("user", tmp_path / "user")
    for a, b in zip(expected, other.score(prompts, comp, adapter="user")):
        assert torch.equal(a, b)
    assert other.active_adapter is None


# ----------------------------------------------------------------------------------------------
# The real model (offline GGUF)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_constrained_answers():
    pytest.importorskip("gguf")
    policy = LLMPolicy.from_pretrained("smollm2")
    rec_prompt = [
        {"role": "system", "content": "You recommend songs. Answer as: Item: <n>\nReason: <why>"},
        {
            "role": "user",
            "content": "History: Yesterday; Let It Be.\nCandidates:\n1. Hey Jude\n"
            "2. Toxic\n3. Something\nWhich candidate next?",
        },
    ]
    user_prompt = [
        {
            "role": "system",
            "content": "You are a music fan judging a recommendation. Answer as: "
            "Action: <click|star|skip|dislike>\nScore: <0-1>\nReason: <why>",
        },
        {"role": "user", "content": "You love the Beatles. Recommended: Hey Jude."},
    ]
    sampling = SamplingConfig(max_new_tokens=40, temperature=0.7, seed=0)
    rec = policy.generate(
        [rec_prompt] * 2, sampling=sampling, constraint=recommender_template(3, 16)
    )
    user = policy.generate([user_prompt] * 2, sampling=sampling, constraint=user_template(16))
    for g in rec:
        m = REC_RE.fullmatch(g.text)
        assert m and 1 <= int(m.group(1)) <= 3, g.text
    for g in user:
        assert USER_RE.fullmatch(g.text), g.text
    for g, lp in zip(rec + user, rescore(policy, rec + user)):
        torch.testing.assert_close(g.logprobs, lp.cpu(), atol=LOGPROB_ATOL_FP32, rtol=0)
    print([g.text for g in rec + user])


# ----------------------------------------------------------------------------------------------
# The exact distribution over a choice's options
# ----------------------------------------------------------------------------------------------

# " 7" / " 77" / " 777" and " do" / " dog" end where a longer option continues (tiny tokenizer)
PICK_OPTIONS = ("7", "77", "777", "cat", "cats", "do", "dog", "dogs", "zebra")


def pick_template(next_literal: bool) -> Template:
    if next_literal:
        return Template.from_format(
            "Pick: {x}\nWhy: {r}", x=Choice(PICK_OPTIONS), r=Free(2, stop=None)
        )
    return Template((Literal("Pick:"), Choice(PICK_OPTIONS, "x"), Free(2, stop=None, name="r")))


def reference_choice_probs(policy, prompt_ids, template, name, temperature, top_p):
    """Token by token through TemplateState, one full forward pass per step (no KV cache):
    the product of the masked, tempered, top-p filtered probabilities of the option's tokens,
    then of the next literal's first token where the option could continue."""
    from coars_agents.policy import _top_p_filter

    probs = {}
    for option in PICK_OPTIONS:
        state = TemplateState(template, policy.vocab)
        seq, logp = list(prompt_ids), 0.0
        path = [*policy.vocab.encode("Pick:"), *policy.vocab.encode(" " + option)]
        while name not in state.fields:
            if not path:  # the option is complete but may continue: end it
                path = [state.steps[state.index + 1].tokens[0]]
            token = path.pop(0)
            logits = policy.lm(torch.tensor([seq], device=policy.device)).logits[0, -1].double()
            scores = logits.masked_fill(~state.allowed().to(logits.device), -math.inf)
            scores = _top_p_filter((scores / temperature)[None], top_p)[0]
            logp += float(torch.log_softmax(scores, -1)[token])
            state.advance(token)
            seq.append(token)
        probs[option] = math.exp(logp)
    return probs


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_choice_probabilities_equal_the_token_by_token_product(policy64, temperature, top_p):
    template = pick_template(next_literal=True)
    prompts = [policy64.render(m) for m in PROMPTS]
    exact = policy64.choice_probabilities(
        prompts, template, "x", temperature=temperature, top_p=top_p
    )
    for prompt, probs in zip(prompts, exact):
        expected = reference_choice_probs(policy64, prompt, template, "x", temperature, top_p)
        assert probs.keys() == expected.keys()
        for option in PICK_OPTIONS:
            assert probs[option] == pytest.approx(
                expected[option], rel=1e-6, abs=1e-9
            )  # fp32 logits
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
    if top_p < 1.0:  # top-p removes unlikely options altogether
        assert any(p == 0.0 for probs in exact for p in probs.values())


def test_choice_probabilities_are_what_sampling_draws(policy64):
    # A free segment right after the choice: "the option ends" is a set of tokens there.
    template = pick_template(next_literal=False)
    prompt = policy64.render(PROMPTS[1])
    (probs,) = policy64.choice_probabilities([prompt], template, "x", temperature=0.8)
    n = 4000
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.8, seed=4)
    gens = policy64.generate_ids([prompt] * n, sampling=sampling, constraint=template)
    counts = {o: 0 for o in PICK_OPTIONS}
    for g in gens:
        counts[g.fields["x"]] += 1
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
    for option, p in probs.items():
        se = math.sqrt(p * (1 - p) / n)
        assert abs(counts[option] / n - p) <= 4.5 * se + 1e-9, (option, counts[option], p)


def test_choice_probabilities_of_the_recommender_template(policy):
    prompts = [policy.render(m) for m in PROMPTS]
    template = recommender_template(20, 4, exclude=(3, 7))
    chunked = LLMPolicy(policy.model, policy.tokenizer, max_batch_size=2)
    for probs in (
        policy.choice_probabilities(prompts, template, "item"),
        chunked.choice_probabilities(prompts, template, "item"),
    ):
        assert [sorted(p, key=int) for p in probs] == [
            [str(i) for i in range(1, 21) if i not in (3, 7)]
        ] * len(prompts)
        assert all(sum(p.values()) == pytest.approx(1.0, abs=1e-5) for p in probs)
    one = policy.choice_probabilities(prompts, template, "item")
    two = chunked.choice_probabilities(prompts, template, "item")
    for a, b in zip(one, two):
        assert a == pytest.approx(b, abs=1e-6), "chunking changes nothing"


def test_choice_decisions_need_literals_before_the_choice(policy):
    from coars_agents.constrained import choice_decisions

    with pytest.raises(ValueError, match="only literals"):
        choice_decisions(Template((Free(2, name="r"), Choice(("a", "b"), "x"))), policy.vocab, "x")
    with pytest.raises(ValueError, match="no choice named 'y'"):
        choice_decisions(pick_template(True), policy.vocab, "y")
    with pytest.raises(ValueError, match="temperature"):
        policy.choice_probabilities([[1, 2]], pick_template(True), "x", temperature=0)
