"""Self-distilled credit assignment and the CoARS loss, as pure tensor functions.

METHOD.md, "Self-distilled credit assignment": for generated token n of turn t,

    A[t, n] = clip(log pi_T(y | x, d, y_<n) - log pi_S(y | x, y_<n), -1, 1)      (no gradient)
    J_k     = E[ sum_t 1/|y_t| * sum_n (R_k[t] + lambda_k * A[t, n]) * log pi_S(y | x, y_<n) ]

The teacher (context x plus the hindsight reference d) and the student (context x) are
the same network with the same adapter; only the contexts differ. Everything here works
on padded ``[turns, tokens]`` tensors with a 0/1 ``token_mask`` (1 = a token the agent
generated and that carries loss) and a per-turn ``turn_mask`` (0 = the turn is excluded,
e.g. a miss-but-positive turn for the user agent).
"""

from __future__ import annotations

import torch


def credit_advantages(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    token_mask: torch.Tensor,
    clip: float = 1.0,
) -> torch.Tensor:
    """Per-token advantage A = clip(log pi_T - log pi_S, -clip, clip), zero off the mask.

    Detached: the credit term weighs the student's log-probs, it is not differentiated.
    """
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(
            f"teacher and student log-probs must align token by token: "
            f"{tuple(teacher_logprobs.shape)} vs {tuple(student_logprobs.shape)}"
        )
    advantage = (teacher_logprobs - student_logprobs).detach().clamp(-clip, clip)
    return advantage * token_mask.to(advantage.dtype)


def coars_policy_loss(
    logprobs: torch.Tensor,
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor,
    turn_mask: torch.Tensor,
    credit_coef: float = 0.1,
) -> torch.Tensor:
    """Negative of J_k for one batch of turns: the quantity to minimise.

    Args:
        logprobs: ``[turns, tokens]`` student log-probs of the generated tokens, with grad.
        rewards: ``[turns]`` R_k of each turn (interaction reward, possibly normalised).
        advantages: ``[turns, tokens]`` credit A from :func:`credit_advantages`.
        token_mask: ``[turns, tokens]`` 1 on generated tokens that carry loss.
        turn_mask: ``[turns]`` 1 for turns this agent trains on.
        credit_coef: lambda_k.

    Returns the mean over turns of ``-(1/|y_t|) sum_n (R_t + lambda A_tn) log pi``, where
    ``|y_t| = max(1, tokens in the turn)``; masked turns contribute zero but keep the
    graph, so a batch in which every turn is masked still runs backward (data-parallel
    ranks must all call backward).
    """
    token_mask = token_mask.to(logprobs.dtype)
    turn_mask = turn_mask.to(logprobs.dtype)
    weights = (rewards.to(logprobs.dtype)[:, None] + credit_coef * advantages) * token_mask
    lengths = token_mask.sum(dim=1).clamp(min=1.0)
    per_turn = (weights * logprobs).sum(dim=1) / lengths
    n_turns = max(1, logprobs.shape[0])
    # `logprobs.sum() * 0` keeps every turn in the graph even when all are masked.
    return -(per_turn * turn_mask).sum() / n_turns + logprobs.sum() * 0.0


def distillation_divergence(
    teacher_logdist: torch.Tensor,
    student_logdist: torch.Tensor,
    token_mask: torch.Tensor,
    kind: str = "forward_kl",
) -> torch.Tensor:
    """Per-token divergence between the teacher's and the student's whole next-token
    distributions (``[turns, tokens, vocabulary]`` log-probs), zero off the mask (ours: the
    dense alternative to the sampled-token credit A, see ``CoARSConfig.credit_form``).

    ``forward_kl``: KL(pi_T || pi_S), the student covers the teacher's mass (a soft-label
    cross-entropy up to the teacher's entropy); ``reverse_kl``: KL(pi_S || pi_T),
    mode-seeking, the full-distribution form of the expected sampled credit. The teacher is
    detached: it is the target, even when it shares the student's adapter.
    """
    if teacher_logdist.shape != student_logdist.shape:
        raise ValueError(
            f"teacher and student distributions must align: "
            f"{tuple(teacher_logdist.shape)} vs {tuple(student_logdist.shape)}"
        )
    teacher_logdist = teacher_logdist.detach()
    if kind == "forward_kl":
        teacher_probs = teacher_logdist.exp()
        # 0 log 0 = 0: a token the teacher rules out (log-prob -inf, e.g. a masked vocabulary
        # entry) must add nothing rather than NaN.
        terms = torch.where(
            teacher_probs > 0, teacher_probs * (teacher_logdist - student_logdist), 0.0
        )
        per_token = terms.sum(-1)
    elif kind == "reverse_kl":
        per_token = (student_logdist.exp() * (student_logdist - teacher_logdist)).sum(-1)
    else:
        raise ValueError(f"unknown divergence {kind!r}: use 'forward_kl' or 'reverse_kl'")
    return per_token * token_mask.to(per_token.dtype)


def distillation_loss(
    divergence: torch.Tensor, token_mask: torch.Tensor, turn_mask: torch.Tensor, coef: float
) -> torch.Tensor:
    """``lambda * mean over turns of (1/|y_t|) sum_n D_tn``, masked turns contributing 0: the
    dense credit's part of the loss, normalised per turn like :func:`coars_policy_loss`."""
    lengths = token_mask.to(divergence.dtype).sum(dim=1).clamp(min=1.0)
    per_turn = divergence.sum(dim=1) / lengths * turn_mask.to(divergence.dtype)
    return coef * per_turn.sum() / max(1, divergence.shape[0])


def group_normalise(
    rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6, scale: bool = True
) -> torch.Tensor:
    """GRPO-style option: (R - mean_group) / (std_group + eps) within each group id;
    ``scale=False``: R - mean_group only (Dr. GRPO).

    Groups of size one get 0 (no baseline to compare with).
    """
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for group in torch.unique(groups):
        members = groups == group
        values = rewards[members].float()
        if values.numel() < 2:
            continue
        centred = values - values.mean()
        out[members] = centred / (values.std(unbiased=False) + eps) if scale else centred
    return out


def token_weights(
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor,
    credit_coef: float,
    credit_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(R_t + lambda * A_tn) / |y_t|`` per token (zero off the mask): the paper's weight.

    ``credit_mask`` (ours, ``CoARSConfig.credit_tokens``): the credit term only on those
    tokens, normalised by their number: ``R_t / |y_t| + lambda * A_tn / |c_t|``. The
    paper's weight when it equals ``token_mask`` (the default)."""
    token_mask = token_mask.to(advantages.dtype)
    lengths = token_mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    credit_mask = token_mask if credit_mask is None else credit_mask.to(advantages.dtype)
    credit_lengths = credit_mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    reward_part = rewards.to(advantages.dtype)[:, None] * token_mask / lengths
    return reward_part + credit_coef * advantages * credit_mask / credit_lengths


def regularised_policy_loss(
    logprobs: torch.Tensor,
    weights: torch.Tensor,
    token_mask: torch.Tensor,
    turn_mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    clip_ratio: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """The CoARS loss with the optional PPO-style ratio clip and KL penalty (ours).

    With ``clip_ratio == 0`` and ``kl_coef == 0`` this equals :func:`coars_policy_loss`
    (``weights`` from :func:`token_weights`). With ``clip_ratio > 0`` the per-token term
    ``w * log pi`` becomes PPO's ``min(r w, clip(r, 1-eps, 1+eps) w)`` with
    ``r = pi / pi_old``, for several epochs per batch. ``kl_coef > 0`` adds the k3
    estimator of KL(pi || pi_ref) to the frozen base, per generated token.
    """
    token_mask = token_mask.to(logprobs.dtype)
    turn_mask = turn_mask.to(logprobs.dtype)
    if clip_ratio > 0.0:
        if old_logprobs is None:
            raise ValueError("clip_ratio > 0 needs the rollout's old_logprobs")
        ratio = torch.exp(logprobs - old_logprobs.detach())
        clipped = ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
        per_token = torch.minimum(ratio * weights, clipped * weights)
    else:
        per_token = weights * logprobs
    if kl_coef > 0.0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs the reference model's log-probs")
        log_ratio = ref_logprobs.detach() - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1.0
        lengths = token_mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        per_token = per_token - kl_coef * kl * token_mask / lengths
    per_turn = (per_token * token_mask).sum(dim=1)
    n_turns = max(1, logprobs.shape[0])
    return -(per_turn * turn_mask).sum() / n_turns + logprobs.sum() * 0.0
