import math

import pytest
import torch

from coars_agents.credit import (
    coars_policy_loss,
    credit_advantages,
    distillation_divergence,
    distillation_loss,
    group_normalise,
)


def test_credit_sign_and_exact_clipping():
    teacher = torch.tensor([[-0.5, -3.0, -0.1, -2.0]])
    student = torch.tensor([[-1.0, -0.5, -2.5, -2.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv = credit_advantages(teacher, student, mask)
    # +0.5 stays; -2.5 clips to exactly -1; +2.4 clips to exactly +1; masked token is 0.
    assert adv.tolist() == [[0.5, -1.0, 1.0, 0.0]]


def test_credit_is_detached_and_shapes_checked():
    teacher = torch.zeros(2, 3, requires_grad=True)
    student = torch.zeros(2, 3, requires_grad=True)
    assert not credit_advantages(teacher, student, torch.ones(2, 3)).requires_grad
    with pytest.raises(ValueError, match="align"):
        credit_advantages(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_loss_exact_value_and_length_normalisation():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    rewards = torch.tensor([1.0, -0.6])
    advantages = torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]])
    token_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    turn_mask = torch.tensor([1, 1])
    loss = coars_policy_loss(logprobs, rewards, advantages, token_mask, turn_mask, 0.1)
    turn1 = ((1 + 0.05) * -1.0 + (1 - 0.1) * -2.0) / 2
    turn2 = ((-0.6 + 0.1) * -0.5) / 1
    assert loss.item() == pytest.approx(-(turn1 + turn2) / 2)
    loss.backward()
    # d loss / d logprob = -(R + lambda A) / |y_t| / n_turns on generated tokens, 0 elsewhere.
    expected = torch.tensor([[-1.05 / 4, -0.9 / 4, 0.0], [0.5 / 2, 0.0, 0.0]])
    assert torch.allclose(logprobs.grad, expected)


def test_masked_turns_contribute_nothing_but_backward_runs():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = coars_policy_loss(
        logprobs, torch.tensor([1.0]), torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([0]), 0.1
    )
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(1, 2))


def test_empty_answer_uses_length_one():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    loss = coars_policy_loss(
        logprobs, torch.tensor([1.0]), torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1]), 0.1
    )
    assert loss.item() == 0.0
    loss.backward()


def test_group_normalise_within_groups():
    rewards = torch.tensor([1.0, -1.0, 0.5, 2.0])
    groups = torch.tensor([0, 0, 1, 2])
    out = group_normalise(rewards, groups)
    assert out[0].item() == pytest.approx(1.0, abs=1e-5)
    assert out[1].item() == pytest.approx(-1.0, abs=1e-5)
    assert out[2].item() == 0.0 and out[3].item() == 0.0
    # Mean-centring only: small differences stay small (0.9 vs 0.95 is +-0.025, not +-1).
    centred = group_normalise(torch.tensor([-0.9, -0.95, 0.5, 2.0]), groups, scale=False)
    assert centred.tolist() == pytest.approx([0.025, -0.025, 0.0, 0.0], abs=1e-6)
    assert group_normalise(torch.tensor([-0.9, -0.95]), torch.tensor([0, 0])).tolist() == (
        pytest.approx([1.0, -1.0], abs=1e-4)
    )


def test_regularised_loss_reduces_to_paper_form_and_clips():
    from coars_agents.credit import regularised_policy_loss, token_weights

    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    rewards = torch.tensor([1.0, -0.6])
    advantages = torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]])
    token_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    turn_mask = torch.tensor([1, 1])
    weights = token_weights(rewards, advantages, token_mask, 0.1)
    plain = regularised_policy_loss(logprobs, weights, token_mask, turn_mask)
    paper = coars_policy_loss(logprobs, rewards, advantages, token_mask, turn_mask, 0.1)
    assert plain.item() == pytest.approx(paper.item())
    # PPO clip: a ratio of e (> 1.2) with a positive weight is clipped to 1.2 * w.
    new = torch.tensor([[0.0]], requires_grad=True)
    loss = regularised_policy_loss(
        new,
        torch.tensor([[1.0]]),
        torch.ones(1, 1),
        torch.ones(1),
        old_logprobs=torch.tensor([[-1.0]]),
        clip_ratio=0.2,
    )
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert new.grad.item() == 0.0  # clipped: no gradient pushes further
    # KL to the reference: zero when the policy equals it, positive otherwise.
    same = regularised_policy_loss(
        torch.tensor([[-1.0]]),
        torch.zeros(1, 1),
        torch.ones(1, 1),
        torch.ones(1),
        ref_logprobs=torch.tensor([[-1.0]]),
        kl_coef=0.5,
    )
    apart = regularised_policy_loss(
        torch.tensor([[-1.0]]),
        torch.zeros(1, 1),
        torch.ones(1, 1),
        torch.ones(1),
        ref_logprobs=torch.tensor([[-2.0]]),
        kl_coef=0.5,
    )
    assert same.item() == 0.0
    assert apart.item() == pytest.approx(0.5 * (math.exp(-1.0) + 1.0 - 1.0))


def test_distillation_divergences_exact_values_masks_and_gradient():
    teacher = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]).log().requires_grad_()
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]], requires_grad=True)
    student = torch.log_softmax(logits, dim=-1)  # [0.25, 0.75] and [0.5, 0.5]
    mask = torch.tensor([[1, 0]])
    forward = distillation_divergence(teacher, student, mask, "forward_kl")
    reverse = distillation_divergence(teacher, student, mask, "reverse_kl")
    kl_forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert forward[0].tolist() == pytest.approx([kl_forward, 0.0])  # second token masked
    assert reverse[0].tolist() == pytest.approx([kl_reverse, 0.0])
    forward.sum().backward()
    # Forward KL is a soft-label cross-entropy: d/d logits = p_S - p_T; the teacher is a
    # target (no gradient), the masked position gets none.
    assert logits.grad[0].flatten().tolist() == pytest.approx([0.25 - 0.5, 0.75 - 0.5, 0, 0])
    assert teacher.grad is None
    with pytest.raises(ValueError, match="unknown divergence"):
        distillation_divergence(teacher, student, mask, "js")
    with pytest.raises(ValueError, match="align"):
        distillation_divergence(teacher, student[:, :1], mask, "forward_kl")


def test_distillation_loss_normalises_per_turn_and_drops_masked_turns():
    divergence = torch.tensor([[0.2, 0.4, 0.0], [1.0, 0.0, 0.0], [5.0, 5.0, 0.0]])
    token_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0]])
    turn_mask = torch.tensor([1, 1, 0])
    loss = distillation_loss(divergence, token_mask, turn_mask, coef=0.5)
    assert loss.item() == pytest.approx(0.5 * ((0.6 / 2) + (1.0 / 1) + 0.0) / 3)


def test_forward_kl_ignores_tokens_the_teacher_rules_out():
    """A teacher log-prob of -inf (0 probability) adds 0, not NaN, and no NaN gradient."""
    teacher = torch.tensor([[[0.0, -math.inf]]])  # all mass on token 0
    logits = torch.tensor([[[0.0, 0.0]]], requires_grad=True)
    student = torch.log_softmax(logits, dim=-1)
    kl = distillation_divergence(teacher, student, torch.ones(1, 1), "forward_kl")
    assert kl.item() == pytest.approx(math.log(2.0))
    kl.sum().backward()
    assert logits.grad[0, 0].tolist() == pytest.approx([0.5 - 1.0, 0.5])


def test_token_weights_with_a_credit_mask_put_the_credit_on_those_tokens_only():
    from coars_agents.credit import token_weights

    rewards = torch.tensor([1.0, -0.5])
    advantages = torch.tensor([[0.8, -0.4, 0.2, 0.0], [-1.0, 0.6, 0.0, 0.0]])
    token_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    credit_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]])
    weights = token_weights(rewards, advantages, token_mask, 0.5, credit_mask)
    # Turn 1: R / 3 on its 3 tokens, plus 0.5 * A / 1 on the credit token only.
    expected = torch.tensor(
        [
            [1 / 3 + 0.5 * 0.8, 1 / 3, 1 / 3, 0.0],
            [-0.25 + 0.5 * -1.0 / 2, -0.25 + 0.5 * 0.6 / 2, 0.0, 0.0],
        ]
    )
    assert torch.allclose(weights, expected)
    # With the credit on every trained token it is the paper's weight.
    paper = token_weights(rewards, advantages, token_mask, 0.5)
    assert torch.allclose(token_weights(rewards, advantages, token_mask, 0.5, token_mask), paper)
