"""CoARS: co-evolving recommender and user LLM agents with self-distilled credit assignment.

One readable trainer (CleanRL / TRL style): :class:`CoARSConfig` holds every knob with a
docstring; :class:`CoARSTrainer` runs the loop of METHOD.md:

1. sample training sessions (seeded by ``(seed, step)``, so resuming needs no RNG state);
2. roll out both LLM agents in lock-step (:func:`coars_agents.rollout.rollout`), optionally
   several rollouts per session;
3. take the interaction rewards and masks from the env's turn records;
4. build hindsight references ``d`` (:mod:`coars_agents.hindsight`): the target and a
   diagnosis of the session's previous trajectory (or, on a first visit, the current one):
   a deterministic template, to which ``diagnosis="llm"`` adds a sentence of *why* per
   turn written by the frozen base (METHOD.md's option);
5. score every generated token under the student (``x``, with gradient) and the teacher
   (``x + d``, no gradient), same network and adapter;
6. ``A = clip(log pi_T - log pi_S, -1, 1)`` and the loss of METHOD.md per agent
   (:mod:`coars_agents.credit`), masked turns and non-generated tokens excluded;
7. an optimizer step on each agent's LoRA adapter.

The defaults are the paper's plain form (alpha = lambda = 0.1, no ratio, no KL). Options
(ours): group-normalised rewards, a PPO-style clipped ratio with several epochs, KL to the
frozen base, a linear lambda schedule, a dense credit (``credit_form``: lambda times the KL
between the teacher's and the student's whole next-token distributions, instead of the
sampled-token A), training one agent only, and outcome-only reward (the RL baseline: final
hit, no credit term).

Built on ``accelerate.Accelerator`` (device placement, mixed precision, gradient
accumulation, gradient all-reduce across data-parallel processes, trackers). Checkpoints
hold the adapters, optimizer states, the step and the hindsight memory; a killed run
resumes from the last one and continues exactly as if uninterrupted.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from coars_agents.credit import (
    credit_advantages,
    distillation_divergence,
    distillation_loss,
    group_normalise,
    regularised_policy_loss,
    token_weights,
)
from coars_agents.hindsight import (
    recommender_reference,
    user_reference,
    with_reference,
    write_diagnoses,
)
from coars_agents.policy import LLMPolicy, LoraSettings, SamplingConfig
from coars_agents.rollout import AgentTurn, Episode, LLMAgent, rollout
from coars_env.agents import make_scripted
from coars_env.data.common import DialogData
from coars_env.dialog.config import EnvConfig
from coars_env.dialog.env import RECOMMENDER, USER
from coars_env.dialog.prompts import Catalog
from coars_env.logs import summarize_episode
from coars_env.metrics import recommendation_metrics
from coars_env.vector import VectorRecDialogEnv

AGENTS = (RECOMMENDER, USER)


@dataclass
class CoARSConfig:
    """Every knob of a CoARS run. Defaults: the CPU preset on the synthetic dataset."""

    # --- experiment -------------------------------------------------------------------------
    env_id: str = "RecDialog-synthetic"
    """Environment id (``coars_env.list_envs()``): RecDialog-synthetic | -ml100k | -ml1m | -lastfm."""
    model: str = "smollm2"
    """Base LLM: ``smollm2`` (offline SmolLM2-135M-Instruct), a local path, a hub id, or
    ``tiny`` (a random 1M-parameter test model; learns nothing useful, for smoke tests)."""
    output_dir: str = "runs/coars"
    """Checkpoints, ``metrics.jsonl``/``metrics.csv``, TensorBoard events and trajectory logs."""
    seed: int = 0
    """Seeds session sampling, rollouts, adapters' initialisation and evaluation subsets."""
    data_seed: int = 0
    """Seeds the data preparation (candidates, SASRec, alignment sets). Kept apart from
    ``seed`` so that runs with different seeds share one dataset and test set."""
    data_dir: str | None = None
    """Dataset root (default: ``COARS_DATA_DIR``, else the per-user cache)."""

    # --- rollouts ---------------------------------------------------------------------------
    total_steps: int = 8
    """Optimizer steps (each on a fresh batch of rollouts). The default is a CPU smoke run
    of a few minutes; learning needs hundreds of steps (see README)."""
    sessions_per_step: int = 4
    """Training sessions sampled per step."""
    rollouts_per_session: int = 1
    """Rollouts per session (the group size G for group-normalised rewards)."""
    max_turns: int = 3
    """T: dialogue turns per session (the paper uses 5; 3 keeps CPU runs short)."""
    history_items: int = 10
    """Visible history items in prompts."""
    num_candidates: int = 20
    """Candidate-set size, target included (the paper: 20). Fewer candidates make shorter
    prompts and an easier first choice (chance 1/N), e.g. for CPU-scale learning runs."""
    item_summaries: bool = False
    """Show items' one-line summaries in prompts (CPU preset: titles, years and genres only;
    summaries make prompts about 60% longer)."""
    candidate_mode: Literal["default", "sasrec", "random"] = "default"
    """Negatives: ``sasrec`` (the paper: SASRec's top-ranked non-targets), ``random`` (the
    AFL/LLaRA protocol); ``default``: random on the synthetic dataset (SASRec's top items
    there share the user's genre, which hides the text signal), SASRec elsewhere."""
    sasrec_hint: bool = False
    """Show SASRec's top-1 candidate to the recommender as a hint (as AFL does)."""
    candidate_numbers: Literal["first", "last"] = "first"
    """Where each candidate's number goes in the recommender's prompt (``EnvConfig``'s
    field): ``first`` (``3. Title ...``) or ``last`` (``- Title ... = candidate 3``)."""
    temperature: float = 1.0
    """Sampling temperature of both agents during training rollouts."""
    user_temperature: float | None = None
    """Sampling temperature of the user agent during training rollouts (None: ``temperature``).
    A way to make it explore rejections (ours): METHOD.md masks its turns that accept a miss,
    so rejections of misses are the only turns that teach it to reject, and the untrained
    SmolLM2 user samples one for 8% of misses at temperature 1, 22% at 2
    (docs/results/synthetic_h200_turn1.md). Log-probs stay those of the raw distribution, as
    for ``temperature``."""
    reason_tokens: int = 24
    """Token budget of each rationale (constrained decoding)."""
    constrained: bool = True
    """Decode through the answer templates, so every answer parses (small models need it)."""
    exclude_recommended: bool = False
    """Constrained decoding never offers the recommender a candidate it already recommended in
    the session (off: avoiding repeats, which the env penalises, is left to the agent)."""
    max_new_tokens: int = 48
    """Upper bound on generated tokens per answer."""
    merged_rollouts: bool = False
    """Decode rollouts and evaluations with per-agent copies of the base that have the adapter
    merged in (``LLMPolicy.merged_adapters``): no LoRA layers in the decoding loop, ~1.4x
    faster decoding steps where they are host-bound (small models on GPUs;
    ``benchmarks/bench_decoding_overhead.py``), for one extra model copy per agent while
    decoding. Scoring and training are unchanged."""

    # --- rewards and credit (METHOD.md) ------------------------------------------------------
    alpha: float = 0.1
    """Peer term weight in R_user."""
    gamma: float = 0.9
    """Stage factor D_t = gamma**(t-1) for hits (ours)."""
    credit_coef_rec: float = 0.1
    """lambda_rec: weight of the self-distilled token credit A for the recommender (0: no
    teacher pass, and A is logged as 0)."""
    credit_coef_user: float = 0.1
    """lambda_user: weight of the token credit for the user agent."""
    credit_form: Literal["sampled", "forward_kl", "reverse_kl"] = "sampled"
    """How the teacher's knowledge reaches the student. ``sampled`` (METHOD.md): the clipped
    log-ratio A of each generated token weighs that token's log-prob. ``forward_kl`` /
    ``reverse_kl`` (ours, an ablation): lambda times the KL between the teacher's and the
    student's whole next-token distributions at each generated position, which moves the
    target's probability even in rollouts that did not sample it (on-policy distillation
    with a privileged teacher). The reward term is unchanged and A is still logged; the
    per-token KL is logged as ``<agent>/mean_distill_kl``. Costs a vocabulary-sized
    log-softmax per generated token in scoring."""
    credit_tokens: Literal["all", "first_choice"] = "all"
    """Which generated tokens carry the credit term. ``all`` (METHOD.md): every trained
    token. ``first_choice`` (ours, an ablation): only the agent's first decision, the first
    run of chosen tokens of its constrained answer (the recommender's candidate number, the
    user's action), with the term normalised by that run's length; the reward term still
    covers every trained token. Why: with 4-token rationales the recommender's answer held a
    third of the KL at weight 1/4.8 in the turn's mean, and the rest sat on rationale tokens
    where the teacher wants the target's title named, which the student cannot learn from x
    (docs/results/synthetic_h200_rec_oracle.md). Needs constrained decoding."""
    teacher: Literal["shared", "base"] = "shared"
    """Whose distribution the teacher context ``x + d`` is scored with. ``shared``
    (METHOD.md): the agent's own adapter, so the teacher learns with the student. ``base``
    (ours, an ablation): the frozen base model, a fixed teacher that training cannot erode.
    Why: the adapter is shared, so a gap between teacher and student can close from the
    teacher's side; in a CPU run at lr 1e-3 with the dense credit, the teacher's turn-1
    P(target) fell from 0.35 to 0.24 within 20 steps as the choice collapsed onto one
    candidate number (docs/results/synthetic_cpu_dense_credit.md). ``rank_teacher`` ranks
    with the same teacher."""
    answer_hint: bool = True
    """Start each d with the aligned answer in the agent's own answer format ("Answer with
    Item: 3"; "Answer with Action: click" for the target, "... dislike" for any other item),
    then the verdicts and diagnoses (ours; :data:`coars_agents.hindsight.ANSWER_HINT`). Why:
    a small teacher reads that line and little else. The frozen SmolLM2-135M's turn-1
    P(target) under d is 0.70 with it and 0.35 without (chance 0.25, 4 candidates); its
    P(accept) after a miss 0.09 with it and 0.98 without, higher than with no d at all
    (0.94), so without the line the user's credit pushes towards accepting everything
    (docs/results/synthetic_cpu_answer_hint.md). The line states the ground truth only,
    never the output being scored; a recommender turn after one that named the target gets
    no line (naming it again is a repeat). ``--no-answer-hint``: the d of sessions 1-12."""
    diagnosis: Literal["template", "llm"] = "template"
    """How d explains each turn. ``template`` (ours): a deterministic line per turn (what
    was recommended, the user's answer, what was wrong). ``llm`` (METHOD.md's option): the
    frozen base model also writes one sentence of *why* after each template line (greedy, at
    most ``diagnosis_tokens`` tokens, cut at the first newline;
    :func:`coars_agents.hindsight.write_diagnoses`). The verdict stays the template's, so a
    poor note adds noise but never flips a fact. Each turn record is written about once and
    the note kept with it in the hindsight memory (and checkpoints); costs one extra batched
    generation per step, logged as ``time/diagnosis_s``."""
    diagnosis_tokens: int = 32
    """Most tokens of one LLM-written diagnosis (``diagnosis="llm"``)."""
    diagnosis_model: str | None = None
    """Who writes the diagnoses (``diagnosis="llm"``): a hub id, a local path, ``smollm2`` or
    ``tiny``, loaded once, frozen and without adapters (e.g. a larger instruct model than the
    agents'). ``None``: the agents' own frozen base. Small models write poor notes (SmolLM2-135M
    mostly restates the verdict)."""
    credit_schedule: Literal["constant", "linear_decay"] = "constant"
    """``linear_decay`` anneals lambda to 0 over ``total_steps`` (ours)."""
    reward_mode: Literal["interaction", "outcome"] = "interaction"
    """``outcome``: the RL baseline: every recommender turn gets +1 if the episode's final
    recommendation hits, else -1; no credit term; the user agent is not trained."""
    group_normalise: bool = False
    """GRPO-style: normalise the recommender's turn rewards within the rollouts of a session,
    over the turns it trains on (masked turns neither count nor change); the user agent's
    too with ``group_normalise_user``."""
    group_normalise_user: bool = False
    """With ``group_normalise``: normalise the user agent's rewards per session as well (ours;
    off by default). A session's rollouts share the recommender's prompt, but the user judges
    a different item in each, so they are no baseline for one another. And with METHOD.md's
    mask, a user's rejection of a miss is compared only with accepted hits (its accepted
    misses are masked): centring gives rejections a negative advantage whenever a group holds
    a hit, and on one H200 the user learned to accept everything
    (docs/results/synthetic_h200_turn1.md). Raw rewards pay rejecting a miss (skip: 0 to
    +0.4, dislike: +0.5 to +1) over accepting it (masked: 0) and accepting a hit (click: +0.6
    to +1) over rejecting it (negative). They did not stop the drift in a CPU check, though:
    see ``user_learning_rate``."""
    user_class_balance: bool = False
    """Weigh the user agent's trained turns so that its judgements of the target (hits) and
    of other items (misses) count equally in each batch (ours): each turn's whole loss, the
    reward and the credit term, is scaled by n / (2 n_hits) or n / (2 n_misses) (a batch
    with one class only is left as it is). Why: under an LLM recommender about 3 in 4 judged
    items are misses (4 candidates), so the batch's class mix, not the hit/miss evidence,
    sets the user's lean; a scripted ``balanced`` partner fixes the mix but is privileged
    (docs/results/synthetic_cpu_user_balanced.md). This is the same balance inside CoARS's
    own loop. Logged: ``user/hit_turns``, ``user/miss_turns``."""
    group_std: bool = True
    """With ``group_normalise``: also divide by the group's standard deviation (GRPO).
    ``--no-group-std`` only subtracts the group mean (Dr. GRPO). Why it matters here: with
    interaction rewards, a group in which every rollout misses differs only by the user
    agent's acceptance scores (e.g. -0.90 vs -0.95), and dividing by that small spread turns
    score noise into rewards of size 1 that drown the credit term (lambda |A| <= 0.1).
    Outcome rewards (+-1) have no such spread: an all-miss group gets 0 either way."""
    train_agents: Literal["both", "recommender", "user"] = "both"
    """Which adapters learn (the ablations train one)."""
    recommender_partner: Literal[
        "llm", "random", "popularity", "genre", "sasrec", "oracle", "balanced"
    ] = "llm"
    """Who recommends in the training rollouts while only the user agent learns
    (``train_agents="user"``): ``llm`` (the recommender LLM, frozen) or a scripted built-in
    of ``coars_env.agents``. ``balanced`` (ours; privileged) names the target with
    probability 1/2 per turn, else a random other candidate, so the user agent sees as many
    hits as misses: without METHOD.md's mask (``exclude_miss_positive="none"``) always
    accepting and always rejecting then earn the same mean reward, and only telling hits
    from misses pays. Under an LLM recommender about 3 in 4 judged items are misses (4
    candidates), which pushes an untrained user to a constant answer
    (docs/results/synthetic_cpu_user_mask.md). Evaluation still uses the LLM agents."""
    user_partner: Literal["llm", "oracle"] = "llm"
    """Who answers in the training rollouts while the user agent does not learn
    (``train_agents="recommender"`` or ``reward_mode="outcome"``): ``llm`` (the user LLM,
    frozen) or ``oracle`` (privileged, scripted: clicks the target and only the target; its
    other answers come from the item's peer score and history similarity), the
    RecSim-style simulated user. Evaluation still uses the LLM agents."""
    exclude_miss_positive: Literal["user", "both", "none"] = "user"
    """Who loses miss-but-positive turns (METHOD.md default: the user agent only; ``none``:
    nobody, so the user agent learns from its accepted misses' negative reward)."""
    train_forced_tokens: bool = False
    """Include template tokens that constrained decoding forced (no choice) in the loss."""

    # --- optimisation -------------------------------------------------------------------------
    learning_rate: float = 2e-4
    """AdamW learning rate of both adapters (of the recommender's when
    ``user_learning_rate`` is set)."""
    user_learning_rate: float | None = None
    """AdamW learning rate of the user adapter (None: ``learning_rate``). Most of the user's
    turns are masked (it accepts most misses), so a step often trains on a handful of turns,
    and Adam moves every weight by about the rate whatever the batch. At 5e-4, after one step
    on 5 turns, every rollout of the next step ended in a click, and after 6 steps the
    SmolLM2 user accepted 99.8% of items, up from 92% (docs/results/synthetic_h200_turn1.md).
    A lower rate keeps such steps small."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping per adapter (0 disables)."""
    micro_batch_size: int = 8
    """Turns per forward/backward pass (bounds memory; gradients accumulate over a step)."""
    min_trained_turns: int = 0
    """An agent's optimizer step waits for this many trained (unmasked) turns, summed over
    processes: a step that brings fewer carries them over to the next step (ours; 0: every
    step updates, the paper's form). For the user agent, whose turns are mostly masked: a
    step on a handful of turns is a full-size Adam step in their direction (see
    ``user_learning_rate``). Carried turns keep their rewards and are rescored with the
    current adapter; checkpoints save them."""
    gradient_accumulation_steps: int = 1
    """Rollout batches per optimizer step (Accelerate's gradient accumulation)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch (> 1 only makes sense with ``clip_ratio > 0``)."""
    clip_ratio: float = 0.0
    """PPO-style ratio clip epsilon; 0 = the paper's plain form."""
    kl_coef: float = 0.0
    """KL(pi || frozen base) penalty per token (k3 estimator); 0 = none (paper)."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: str = "all-linear"
    """LoRA target modules (``all-linear``: every linear layer but the LM head)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Accelerate mixed precision (use bf16 on GPUs)."""

    # --- evaluation, logging, checkpoints ------------------------------------------------------
    eval_every: int = 0
    """Evaluate on ``eval_split`` every N steps (0: only before and after training)."""
    eval_sessions: int = 32
    """Held-out sessions per evaluation (seeded subset)."""
    eval_split: Literal["valid", "test"] = "valid"
    eval_batch_size: int = 32
    """Sessions played in lock-step during evaluation (rows of one generate call)."""
    eval_alignment_users: int = 8
    """Users of the eval split whose alignment sets (20 items each) the user agent judges
    for precision / recall / F1 at every evaluation (0: skip)."""
    rank_every: int = 0
    """Every N steps (and before the first), log the recommender's exact turn-1 choice
    distribution on the ``eval_sessions`` held-out sessions (:meth:`CoARSTrainer.rank_turn1`:
    ``eval/turn1_target_prob``, the expected turn-1 Hit@1, its paired gain over the untrained
    model ``eval/turn1_target_prob_gain`` with a standard error, and NDCG@5 / Hit@5): one
    prefill per session and no dialogue, so a cheap, low-noise learning curve of the first
    choice (0: only with the full evaluations)."""
    rank_teacher: bool = False
    """With each turn-1 ranking, also rank under the hindsight teacher's context (the prompt
    plus d: the target's number and title), logged as ``eval/teacher_turn1_target_prob`` and
    ``eval/teacher_turn1_top_prob``. The gap to the student's ``eval/turn1_target_prob`` is
    what the credit term can teach at turn 1; a teacher that cannot read d (a small model)
    has nothing to pass on, and teacher and student share the adapter, so training can shrink
    the gap from either side. Doubles the ranking's cost. With ``rank_user``, the user
    teacher's judgements too (``eval/teacher_user_accept_hit``, ``..._miss``, ``..._gap``,
    ``..._gap_se``: the user's d says whether the item is the one the user chose next)."""
    rank_user: bool = False
    """With each turn-1 ranking, also the user agent's exact turn-1 P(accept) after the
    recommender names the target and after it names a non-target, on the same sessions
    (:func:`coars_agents.evaluate.turn1_user_judgements`): ``eval/user_accept_hit``,
    ``eval/user_accept_miss`` and their paired gap ``eval/user_accept_gap`` (0: the user cannot
    tell a hit from a miss) with its standard error. A low-noise curve of the user's alignment,
    e.g. to see it drift to accepting everything. Two prefills per session."""
    checkpoint_every: int = 10
    """Save a checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept besides ``best``."""
    time_limit_minutes: float = 0.0
    """Stop after the step that passes this much wall time in this call, with a checkpoint
    (0: no limit); running again resumes. For time-limited jobs and fixed-budget comparisons."""
    resume: bool = True
    """Resume from the newest checkpoint in ``output_dir`` when there is one."""
    tensorboard: bool = True
    """Also log to TensorBoard through Accelerate's tracker."""
    data_overrides: dict[str, object] = field(default_factory=dict)
    """Extra DataConfig fields for ``coars_env.load_dialog_data`` (e.g. candidate_mode)."""

    def __post_init__(self) -> None:
        if self.sessions_per_step < 1 or self.rollouts_per_session < 1 or self.total_steps < 0:
            raise ValueError("sessions_per_step, rollouts_per_session >= 1 and total_steps >= 0")
        if self.ppo_epochs > 1 and self.clip_ratio <= 0:
            raise ValueError(
                "ppo_epochs > 1 needs clip_ratio > 0 (several epochs of the plain "
                "form would just take larger steps on stale samples)"
            )
        if self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")
        if self.credit_tokens != "all" and not self.constrained:
            raise ValueError(
                f"credit_tokens={self.credit_tokens!r} finds the decision through constrained "
                "decoding's forced tokens: set constrained=True or credit_tokens='all'"
            )
        if self.user_class_balance and USER not in self.trained_agents:
            raise ValueError(
                "user_class_balance weighs the user agent's training turns, but the user does "
                f"not learn here (train_agents={self.train_agents!r}, "
                f"reward_mode={self.reward_mode!r})"
            )
        if self.reason_tokens < 1:
            # Caught here, not at the first rollout deep in template compilation.
            raise ValueError(
                f"reason_tokens must be >= 1 (the rationale's budget), got {self.reason_tokens}"
            )
        if self.diagnosis_tokens < 1:
            raise ValueError(f"diagnosis_tokens must be >= 1, got {self.diagnosis_tokens}")
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2, got {self.num_candidates}")
        if self.min_trained_turns < 0:
            raise ValueError(f"min_trained_turns must be >= 0, got {self.min_trained_turns}")
        if self.temperature <= 0 or (
            self.user_temperature is not None and self.user_temperature <= 0
        ):
            raise ValueError(
                "temperature and user_temperature must be > 0 (greedy decoding is for "
                "evaluation; training samples)"
            )
        if min(self.eval_every, self.rank_every, self.checkpoint_every - 1) < 0:
            raise ValueError("eval_every and rank_every must be >= 0, checkpoint_every >= 1")
        # Partners only play training rollouts (none with total_steps 0: an untrained row).
        trained = self.trained_agents
        if self.total_steps > 0 and self.recommender_partner != "llm" and trained != (USER,):
            raise ValueError(
                f"recommender_partner={self.recommender_partner!r} replaces the recommender "
                "LLM in training rollouts, so only the user agent may learn: set "
                "train_agents='user'"
            )
        if self.total_steps > 0 and self.user_partner != "llm" and USER in trained:
            raise ValueError(
                f"user_partner={self.user_partner!r} replaces the user LLM in training "
                "rollouts, so the user agent cannot learn: set train_agents='recommender' "
                "(or reward_mode='outcome')"
            )
        user_rate = self.user_learning_rate
        if self.learning_rate <= 0 or (user_rate is not None and user_rate <= 0):
            raise ValueError("learning rates must be > 0")

    def agent_learning_rate(self, agent: str) -> float:
        """The AdamW learning rate of ``agent``'s adapter."""
        if agent == USER and self.user_learning_rate is not None:
            return self.user_learning_rate
        return self.learning_rate

    @property
    def trained_agents(self) -> tuple[str, ...]:
        if self.reward_mode == "outcome":
            return (RECOMMENDER,)
        return AGENTS if self.train_agents == "both" else (self.train_agents,)


@dataclass
class TurnSample:
    """One agent's generated answer in one turn, ready for scoring."""

    agent: str
    session_id: int
    student_ids: list[int]  # prompt x
    teacher_ids: list[int]  # prompt x + d
    completion_ids: list[int]
    old_logprobs: torch.Tensor
    loss_mask: torch.Tensor  # bool per completion token
    reward: float
    turn_mask: float
    credit_mask: torch.Tensor | None = None  # bool per token: the credit's (None: loss_mask)
    judged_target: bool | None = None  # user turns: was the judged item the target (a hit)?


def load_policy(config: CoARSConfig, device: torch.device, model: str | None = None) -> LLMPolicy:
    """The base model for both agents, or ``model`` (e.g. the diagnosis writer); ``tiny``
    builds a random test model in code."""
    model = model or config.model
    if model == "tiny":
        from coars_agents.models import tiny_test_model

        module, tokenizer = tiny_test_model(config.seed, max_position_embeddings=4096)
        return LLMPolicy(module.to(device), tokenizer)
    return LLMPolicy.from_pretrained(model, device=device)


def load_run_data(config: CoARSConfig, split: str) -> DialogData:
    """One split of ``config.env_id``, prepared with ``data_seed`` and the candidate mode."""
    from coars_env import load_dialog_data

    kwargs = dict(seed=config.data_seed, data_dir=config.data_dir, **config.data_overrides)
    mode = config.candidate_mode
    if mode == "default":
        mode = "random" if "synthetic" in config.env_id else "sasrec"
    kwargs.setdefault("candidate_mode", mode)
    kwargs.setdefault("num_candidates", config.num_candidates)
    return load_dialog_data(config.env_id, split=split, **kwargs)


class CoARSTrainer:
    """Trains a recommender adapter and a user adapter on one shared frozen base.

    Args:
        config: the run's :class:`CoARSConfig`.
        policy: an :class:`LLMPolicy` to train (default: loaded from ``config.model``).
        train_data / eval_data: :class:`DialogData` (default: built from ``config.env_id``).
        diagnosis_policy: the writer of LLM diagnoses (default: loaded from
            ``config.diagnosis_model`` when set, else ``policy``'s frozen base).
    """

    def __init__(
        self,
        config: CoARSConfig,
        policy: LLMPolicy | None = None,
        train_data: DialogData | None = None,
        eval_data: DialogData | None = None,
        diagnosis_policy: LLMPolicy | None = None,
    ) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with="tensorboard" if config.tensorboard else None,
            project_dir=str(self.output_dir),
        )
        set_seed(config.seed)
        self.train_data = train_data or load_run_data(config, "train")
        self.eval_data = eval_data or load_run_data(config, config.eval_split)
        self.policy = policy or load_policy(config, self.accelerator.device)
        if diagnosis_policy is None and config.diagnosis == "llm" and config.diagnosis_model:
            diagnosis_policy = load_policy(config, self.accelerator.device, config.diagnosis_model)
        # Only the agents' policy carries adapters; a separate writer is used as loaded.
        self.diagnosis_policy = diagnosis_policy or self.policy
        lora = LoraSettings(
            r=config.lora_r, alpha=config.lora_alpha, target_modules=config.lora_targets
        )
        for agent in AGENTS:
            if agent not in self.policy.adapter_names:
                torch.manual_seed(config.seed)  # adapters start identically on every process
                self.policy.add_adapter(agent, lora)
        self.optimizers = {
            agent: self.accelerator.prepare_optimizer(
                torch.optim.AdamW(
                    self.policy.trainable_parameters(agent),
                    lr=config.agent_learning_rate(agent),
                    weight_decay=config.weight_decay,
                )
            )
            for agent in config.trained_agents
        }
        env_kwargs = dict(
            max_turns=config.max_turns,
            alpha=config.alpha,
            gamma=config.gamma,
            exclude_miss_positive=config.exclude_miss_positive,
            max_history_items=config.history_items,
            max_summary_chars=160 if config.item_summaries else 0,
            sasrec_hint=config.sasrec_hint,
            candidate_numbers=config.candidate_numbers,
            render_prompts=False,
        )
        # As many sessions as sample_sessions draws: all of them when the split is smaller.
        sessions = min(config.sessions_per_step, len(self.train_data.sessions))
        n_envs = sessions * config.rollouts_per_session
        self.train_env = VectorRecDialogEnv(
            self.train_data, num_envs=n_envs, reveal_target=True, **env_kwargs
        )
        self.env_kwargs = env_kwargs
        self.step = 0
        self.best_hit = -math.inf
        self._turn1_untrained: pd.DataFrame | None = None  # see rank_turn1
        # Hindsight memory: the last trajectory's turn records per training session.
        self.memory: dict[int, list[dict]] = {}
        self._describe: Callable[[int], str] | None = None  # items for LLM diagnoses
        self._partners: dict[str, Callable] = {}  # scripted partners (training_agents)
        # Trained turns waiting for min_trained_turns, per agent (this process's share).
        self.pending: dict[str, list[TurnSample]] = {agent: [] for agent in AGENTS}
        self.history: list[dict] = []

    # ------------------------------------------------------------------ agents

    def training_agents(self) -> dict:
        """The rollout agents of the current step: both LLM agents sampling, with a scripted
        partner in place of the untrained one when the config names one (its random choices
        seeded by the seed, the step and the process, so resuming replays them)."""
        cfg = self.config
        agents: dict = self.agents(greedy=False)
        for role, name in ((RECOMMENDER, cfg.recommender_partner), (USER, cfg.user_partner)):
            if name != "llm":
                if role not in self._partners:  # built once: they index the training data
                    self._partners[role] = make_scripted(name, role, self.train_data)
                entropy = [cfg.seed, self.step, self.accelerator.process_index]
                self._partners[role].reset(
                    int(np.random.SeedSequence(entropy).generate_state(1)[0])
                )
                agents[role] = self._partners[role]
        return agents

    def agents(self, *, greedy: bool, seed_offset: int = 0, use_adapters: bool = True) -> dict:
        """Both roles' :class:`LLMAgent`, each acting with its own adapter (or the base model)."""
        cfg = self.config
        temperatures = {RECOMMENDER: cfg.temperature, USER: cfg.user_temperature}
        return {
            role: LLMAgent(
                self.policy,
                role,
                adapter=role if use_adapters else None,
                sampling=SamplingConfig(
                    temperature=temperatures[role] or cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens,
                    greedy=greedy,
                ),
                constrained=self.config.constrained,
                reason_tokens=self.config.reason_tokens,
                exclude_recommended=self.config.exclude_recommended and role == RECOMMENDER,
            )
            for role in AGENTS
        }

    # ------------------------------------------------------------------ one step

    def sample_sessions(self, step: int) -> list[int]:
        """The step's sessions: a function of (seed, step, process) only, so resuming needs no
        RNG state and data-parallel processes train on different sessions."""
        rng = np.random.default_rng([self.config.seed, step, self.accelerator.process_index])
        n = len(self.train_data.sessions)
        k = min(self.config.sessions_per_step, n)
        return [int(s) for s in rng.choice(n, size=k, replace=False)]

    def credit_coef(self, agent: str) -> float:
        """lambda for ``agent`` at the current step (0 for the outcome-only baseline)."""
        cfg = self.config
        if cfg.reward_mode == "outcome":
            return 0.0
        coef = cfg.credit_coef_rec if agent == RECOMMENDER else cfg.credit_coef_user
        if cfg.credit_schedule == "linear_decay" and cfg.total_steps > 0:
            coef *= max(0.0, 1.0 - self.step / cfg.total_steps)
        return coef

    def write_diagnoses(self, episodes: list[Episode]) -> dict[str, float]:
        """``diagnosis="llm"``: the writer (the frozen base, or ``diagnosis_model``) adds the
        note of every turn record that the coming :meth:`build_samples` puts into a reference
        and that has none yet (the session's remembered trajectory, or the episode's own on a
        first visit)."""
        if self.config.diagnosis != "llm":
            return {}
        t0 = time.perf_counter()
        data = self.train_data
        if self._describe is None:  # title, year and genres: the facts a "why" can use
            self._describe = Catalog(data.items, max_summary_chars=0).line
        records: dict[int, tuple[dict, tuple[int, ...], int]] = {}
        for ep in episodes:
            history = data.sessions[ep.session_id].history[-self.config.history_items :]
            for record in self.memory.get(ep.session_id, ep.turns):
                if "diagnosis" not in record:
                    records.setdefault(id(record), (record, history, int(ep.target)))
        cases = list(records.values())
        notes = write_diagnoses(
            self.diagnosis_policy,
            cases,
            self._describe,
            max_new_tokens=self.config.diagnosis_tokens,
        )
        for (record, _, _), note in zip(cases, notes):
            record["diagnosis"] = note
        return {
            "hindsight/diagnoses_written": float(len(notes)),
            "hindsight/empty_diagnoses": float(sum(not note for note in notes)),
            "time/diagnosis_s": time.perf_counter() - t0,
        }

    def build_samples(self, episodes: list[Episode]) -> list[TurnSample]:
        """Rewards, masks and teacher contexts for every generated answer of trained agents."""
        cfg, data = self.config, self.train_data
        samples: list[TurnSample] = []
        for ep in episodes:
            target_position = ep.candidates.index(ep.target)
            target_title = data.title(ep.target)
            # Earlier trajectory of this session if any, else the current one (first visit).
            reference_turns = self.memory.get(ep.session_id, ep.turns)
            records = {r["turn"]: r for r in ep.turns}
            for agent, generated in ((RECOMMENDER, ep.recommender), (USER, ep.user_agent)):
                if agent not in cfg.trained_agents:
                    continue
                for turn in generated:
                    record = records[turn.turn]
                    if agent == RECOMMENDER:
                        # Once the target was named, naming it again is a repeat (a miss):
                        # no later turn of this episode is told to answer with it.
                        named = any(r["hit"] for t, r in records.items() if t < turn.turn)
                        reference = recommender_reference(
                            target_position,
                            target_title,
                            reference_turns,
                            data.title,
                            answer_hint=cfg.answer_hint and not named,
                        )
                        if cfg.reward_mode == "outcome":
                            reward, mask = (1.0 if ep.hit else -1.0), 1.0
                        else:
                            reward, mask = record["reward_rec"], record["mask_rec"]
                    else:
                        item = record["rec_item"]
                        reference = user_reference(
                            data.title(item),
                            item == ep.target,
                            target_title,
                            reference_turns,
                            data.title,
                            answer_hint=cfg.answer_hint,
                        )
                        reward, mask = record["reward_user"], record["mask_user"]
                    samples.append(
                        self._sample(agent, ep.session_id, turn, reference, reward, mask)
                    )
                    if agent == USER:
                        samples[-1].judged_target = record["rec_item"] == ep.target
        for ep in episodes:
            self.memory[ep.session_id] = ep.turns
        if cfg.group_normalise:
            for agent in AGENTS if cfg.group_normalise_user else (RECOMMENDER,):
                # Masked turns (e.g. the user accepting a miss) are out of training, so they
                # are out of the group statistics too: their rewards in the group mean would
                # hand the very signal the mask removes to the other turns' advantages.
                members = [s for s in samples if s.agent == agent and s.turn_mask > 0]
                if members:
                    normalised = group_normalise(
                        torch.tensor([s.reward for s in members]),
                        torch.tensor([s.session_id for s in members]),
                        scale=cfg.group_std,
                    )
                    for s, r in zip(members, normalised.tolist()):
                        s.reward = r
        if cfg.user_class_balance:
            balance_user_turns([s for s in samples if s.agent == USER])
        return samples

    def _sample(
        self,
        agent: str,
        session_id: int,
        turn: AgentTurn,
        reference: str,
        reward: float,
        mask: float,
    ) -> TurnSample:
        loss_mask = torch.ones(len(turn.completion_ids), dtype=torch.bool)
        if not self.config.train_forced_tokens:
            loss_mask &= ~turn.forced.bool()
        return TurnSample(
            agent=agent,
            session_id=session_id,
            student_ids=turn.prompt_ids,
            teacher_ids=self.policy.render(with_reference(turn.messages, reference)),
            completion_ids=turn.completion_ids,
            old_logprobs=turn.logprobs,
            loss_mask=loss_mask,
            reward=float(reward),
            turn_mask=float(mask),
            credit_mask=first_choice_mask(turn.forced) & loss_mask
            if self.config.credit_tokens == "first_choice"
            else None,
        )

    def score_teacher(
        self, agent: str, samples: list[TurnSample], full_distributions: bool = False
    ) -> list[torch.Tensor]:
        """The teacher's log-probs of the samples' completions in the context x + d (whole
        distributions with ``full_distributions``), under ``config.teacher``'s weights: the
        agent's adapter (``shared``) or the frozen base (``base``). No gradient."""
        return self.policy.score(
            [s.teacher_ids for s in samples],
            [s.completion_ids for s in samples],
            adapter=agent if self.config.teacher == "shared" else None,
            full_distributions=full_distributions,
        )

    def train_agent(self, agent: str, samples: list[TurnSample]) -> dict[str, float]:
        """Teacher/student scoring, the credit term and the loss for one agent's adapter."""
        cfg, acc = self.config, self.accelerator
        optimizer = self.optimizers[agent]
        stats = {
            "loss": 0.0,
            "abs_credit": 0.0,
            "pos_credit": 0.0,
            "distill_kl": 0.0,
            "credit_tokens": 0.0,
            "nonfinite_chunks": 0.0,
            "nonfinite_student_tokens": 0.0,
            "nonfinite_teacher_tokens": 0.0,
            "skipped_steps": 0.0,
        }
        t_score = t_backward = 0.0
        # No samples (e.g. the user never had anything to judge): nothing to score, and no
        # optimizer step on this process unless other processes bring gradients.
        n_chunks = math.ceil(len(samples) / cfg.micro_batch_size)
        # lambda = 0 (outcome-only RL, the no-credit ablation): A is unused, so the teacher
        # pass is skipped and A logged as 0; baselines then cost what they would on their own.
        use_teacher = self.credit_coef(agent) != 0
        # Dense credit: whole distributions from both passes, the KL term instead of lambda A.
        dense = use_teacher and cfg.credit_form != "sampled"
        for _ in range(cfg.ppo_epochs):
            for c in range(n_chunks):
                chunk = samples[c * cfg.micro_batch_size : (c + 1) * cfg.micro_batch_size]
                completions = [s.completion_ids for s in chunk]
                t0 = time.perf_counter()
                teacher = self.score_teacher(agent, chunk, dense) if use_teacher else None
                reference = None
                if cfg.kl_coef > 0:
                    reference = self.policy.score(
                        [s.student_ids for s in chunk], completions, adapter=None
                    )
                with acc.autocast():
                    student = self.policy.score(
                        [s.student_ids for s in chunk],
                        completions,
                        adapter=agent,
                        requires_grad=True,
                        full_distributions=dense,
                    )
                t1 = time.perf_counter()
                pad = lambda xs: torch.nn.utils.rnn.pad_sequence(  # noqa: E731
                    [x.to(acc.device).float() for x in xs], batch_first=True
                )
                token_mask = pad([s.loss_mask for s in chunk])
                credit_mask = pad(
                    [s.loss_mask if s.credit_mask is None else s.credit_mask for s in chunk]
                )
                rewards = torch.tensor([s.reward for s in chunk], device=acc.device)
                turn_mask = torch.tensor([s.turn_mask for s in chunk], device=acc.device)
                divergence = None
                if dense:
                    student_dist, teacher_dist = pad(student), pad(teacher)
                    divergence = distillation_divergence(
                        teacher_dist, student_dist, credit_mask, cfg.credit_form
                    )
                    ids = pad([torch.tensor(c, dtype=torch.long) for c in completions]).long()
                    student_lp = student_dist.gather(-1, ids[..., None])[..., 0]
                    teacher_lp = teacher_dist.gather(-1, ids[..., None])[..., 0]
                else:
                    student_lp = pad(student)
                    teacher_lp = pad(teacher) if teacher is not None else student_lp.detach()
                advantages = credit_advantages(teacher_lp, student_lp, credit_mask)
                # With the dense credit, A is only logged: the KL term carries lambda.
                coef = 0.0 if dense else self.credit_coef(agent)
                weights = token_weights(rewards, advantages, token_mask, coef, credit_mask)
                loss = regularised_policy_loss(
                    student_lp,
                    weights,
                    token_mask,
                    turn_mask,
                    old_logprobs=pad([s.old_logprobs for s in chunk])
                    if cfg.clip_ratio > 0
                    else None,
                    clip_ratio=cfg.clip_ratio,
                    ref_logprobs=pad(reference) if reference is not None else None,
                    kl_coef=cfg.kl_coef,
                )
                if divergence is not None:
                    loss = loss + distillation_loss(
                        divergence, credit_mask, turn_mask, self.credit_coef(agent)
                    )
                t_score += t1 - t0
                if not torch.isfinite(loss):
                    # A NaN/inf log-prob (seen rarely with bf16 on GPUs) would poison the
                    # adapter: skip this chunk, count it and where it came from.
                    stats["nonfinite_chunks"] += 1
                    stats["nonfinite_student_tokens"] += _count_nonfinite(student_lp, token_mask)
                    stats["nonfinite_teacher_tokens"] += _count_nonfinite(teacher_lp, token_mask)
                    _warn_nonfinite(agent, self.step)
                    continue
                # Chunks are parts of one batch: scale so the step sees the batch mean.
                acc.backward(loss * len(chunk) / len(samples))
                t_backward += time.perf_counter() - t1
                stats["loss"] += float(loss.detach()) * len(chunk) / len(samples) / cfg.ppo_epochs
                stats["abs_credit"] += float(advantages.abs().sum())
                stats["pos_credit"] += float(((advantages > 0) & (credit_mask > 0)).sum())
                if divergence is not None:
                    stats["distill_kl"] += float(divergence.detach().sum())
                stats["credit_tokens"] += float(credit_mask.sum())
            params = self.policy.trainable_parameters(agent)
            self._all_reduce_gradients(params)
            if any(p.grad is not None for p in params):
                grads = [p.grad for p in params if p.grad is not None]
                grads_finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
                if not grads_finite:  # same decision on every process: grads were all-reduced
                    stats["skipped_steps"] += 1
                    _warn_nonfinite(agent, self.step)
                else:
                    if cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # Per credit-carrying token: every trained token unless credit_tokens="first_choice".
        credit_tokens = max(1.0, stats.pop("credit_tokens"))
        trained = [s for s in samples if s.turn_mask > 0]
        return {
            f"{agent}/loss": stats["loss"],
            f"{agent}/mean_reward": float(np.mean([s.reward for s in trained])) if trained else 0.0,
            f"{agent}/mean_abs_credit": stats["abs_credit"] / credit_tokens,
            f"{agent}/frac_positive_credit": stats["pos_credit"] / credit_tokens,
            f"{agent}/mean_distill_kl": stats["distill_kl"] / credit_tokens,
            f"{agent}/trained_turns": float(len(trained)),
            f"{agent}/masked_turns": float(len(samples) - len(trained)),
            f"{agent}/nonfinite_chunks": stats["nonfinite_chunks"],
            f"{agent}/nonfinite_student_tokens": stats["nonfinite_student_tokens"],
            f"{agent}/nonfinite_teacher_tokens": stats["nonfinite_teacher_tokens"],
            f"{agent}/skipped_steps": stats["skipped_steps"],
            f"time/{agent}_scoring_s": t_score,
            f"time/{agent}_backward_s": t_backward,
        }

    def _enough_trained_turns(self, batch: list[TurnSample]) -> bool:
        """Does ``batch`` reach ``min_trained_turns`` (summed over processes, so that all
        processes decide alike and none waits alone in the gradient all-reduce)?"""
        if self.config.min_trained_turns == 0:
            return True
        count = torch.tensor(
            float(sum(s.turn_mask > 0 for s in batch)), device=self.accelerator.device
        )
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return bool(count.item() >= self.config.min_trained_turns)

    def _all_reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Data parallel: average adapter gradients over processes (no-op on one process).

        The model is not wrapped in DDP (two adapters share it and are switched between
        passes), so the small LoRA gradients are reduced explicitly, once per step.
        """
        if self.accelerator.num_processes == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    def rollout_batch(self, step: int) -> list[Episode]:
        """The training rollouts of ``step`` (0-based): its sessions, each
        ``rollouts_per_session`` times, seeded by (seed, step); the same episodes every time
        for the same adapters, which is what lets a resumed run replay them."""
        sessions = self.sample_sessions(step)
        options = [
            {"session_id": s} for s in sessions for _ in range(self.config.rollouts_per_session)
        ]
        with self._decoding_models():
            return rollout(
                self.train_env,
                self.training_agents(),
                seed=_step_seed(self.config.seed, step),
                options=options,
            )

    def train_step(self) -> dict[str, float]:
        """One rollout batch and one optimizer step per trained agent."""
        cfg = self.config
        t0 = time.perf_counter()
        episodes = self.rollout_batch(self.step)
        t_generate = time.perf_counter() - t0
        metrics: dict[str, float] = {"step": float(self.step + 1), "time/generation_s": t_generate}
        metrics.update(self.write_diagnoses(episodes))
        samples = self.build_samples(episodes)
        if USER in cfg.trained_agents:  # the class mix of what the user trains on
            judged = [s for s in samples if s.agent == USER and s.turn_mask > 0]
            metrics["user/hit_turns"] = float(sum(bool(s.judged_target) for s in judged))
            metrics["user/miss_turns"] = float(len(judged) - metrics["user/hit_turns"])
        for agent in cfg.trained_agents:
            batch = self.pending[agent] + [s for s in samples if s.agent == agent]
            update = self._enough_trained_turns(batch)
            if update:
                self.pending[agent] = []
                metrics.update(self.train_agent(agent, batch))
            else:  # too few to update on: keep the trained ones for the next step
                self.pending[agent] = [s for s in batch if s.turn_mask > 0]
            metrics[f"{agent}/updated"] = float(update)
            metrics[f"{agent}/carried_turns"] = float(len(self.pending[agent]))
        generated = sum(
            len(t.completion_ids) for ep in episodes for t in ep.recommender + ep.user_agent
        )
        rollout_metrics = recommendation_metrics([summarize_episode(ep.turns) for ep in episodes])
        metrics.update(
            {f"rollout/{name}": float(rollout_metrics[name].mean) for name in _ROLLOUT_METRICS}
        )
        metrics["time/step_s"] = time.perf_counter() - t0
        metrics["throughput/tokens_per_s"] = generated / max(t_generate, 1e-9)
        self.step += 1
        return metrics

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self,
        n_sessions: int | None = None,
        *,
        use_adapters: bool = True,
        data: DialogData | None = None,
        subset_seed: int | None = None,
        alignment_users: int | None = None,
    ) -> dict[str, float]:
        """Greedy dialogues on held-out sessions through :func:`coars_agents.evaluate.evaluate`:
        the recommender against the oracle user (a clean Hit@1: it clicks only the target)
        and against the LLM user agent (wrong clicks, format failures), plus the user agent's
        alignment F1 on ``eval_alignment_users`` users of the split. ``data``: another
        held-out split than ``eval_data`` (e.g. the test split after training);
        ``subset_seed``: which sessions (default: the run's seed); ``alignment_users``:
        overrides ``eval_alignment_users``."""
        from coars_agents.evaluate import evaluate

        cfg = self.config
        data = data or self.eval_data
        n_users = cfg.eval_alignment_users if alignment_users is None else alignment_users
        n = min(n_sessions or cfg.eval_sessions, len(data.sessions))
        agents = self.agents(greedy=True, use_adapters=use_adapters)
        common = dict(
            n_sessions=n,
            seeds=(cfg.seed,),
            batch_size=cfg.eval_batch_size,
            env_overrides=self.env_kwargs,
            subset_seed=cfg.seed if subset_seed is None else subset_seed,
            progress=False,
        )
        with self._decoding_models() if use_adapters else nullcontext():
            vs_oracle = evaluate(
                data,
                agents[RECOMMENDER],
                "oracle",
                alignment=False,
                rank_candidates=False,
                **common,
            )
            vs_llm = evaluate(
                data,
                agents[RECOMMENDER],
                agents[USER],
                alignment=n_users > 0,
                n_alignment_users=n_users,
                rank_candidates=False,
                **common,
            )
        out: dict[str, float] = {"eval/sessions": float(n)}
        out.update(
            self.rank_turn1(n, use_adapters=use_adapters, data=data, subset_seed=subset_seed)
        )
        for opponent, result, names in (
            ("oracle", vs_oracle, _ORACLE_EVAL_METRICS),
            ("llm", vs_llm, _LLM_EVAL_METRICS),
        ):
            for name in names:
                estimate = result.metrics[name]
                if estimate.n > 0:  # e.g. no alignment cases: leave user_f1 out
                    out[f"eval/{opponent}/{name}"] = float(estimate.mean)
            hits = result.episodes["hit"].to_numpy(dtype=float)
            out[f"eval/{opponent}/hit@1_se"] = float(hits.std() / math.sqrt(max(1, len(hits))))
        return out

    def rank_turn1(
        self,
        n_sessions: int | None = None,
        *,
        use_adapters: bool = True,
        data: DialogData | None = None,
        subset_seed: int | None = None,
    ) -> dict[str, float]:
        """The recommender's exact turn-1 choice distribution on held-out sessions (the same
        seeded subset as :meth:`evaluate`), through
        :func:`coars_agents.evaluate.turn1_choice_ranking`: ``eval/turn1_target_prob`` (mean
        probability of the target: the expected turn-1 Hit@1 at temperature 1) with its
        standard error, ``eval/hit@5``, ``eval/ndcg@5``, ``eval/target_rank`` (mean 0-based
        rank), ``eval/turn1_top_prob`` (mean probability of the likeliest candidate: how
        peaked the choice is) and ``eval/turn1_top_position_share`` (the largest share of
        sessions whose likeliest candidate has one same number: 1 when the choice has
        collapsed onto a position; about 1/N plus noise for a content-driven one, as the
        target's position is uniform). No dialogue is played, so neither the user agent nor repeats
        play a part. With ``rank_teacher``, also the teacher's ``eval/teacher_turn1_target_prob``
        and ``eval/teacher_turn1_top_prob`` (the same sessions, the hindsight context added);
        with ``rank_user``, the user agent's ``eval/user_accept_hit``, ``eval/user_accept_miss``,
        ``eval/user_accept_gap`` and ``eval/user_accept_gap_se``; with both, the user teacher's
        too (``eval/teacher_user_accept_hit`` ...: the same judgements under the user's d).

        On the default held-out subset (``eval_data``, ``eval_sessions``, the run's seed) it
        also logs the paired gain over the untrained model, ``eval/turn1_target_prob_gain``
        (the mean per-session change of the target's probability) and its standard error
        ``eval/turn1_target_prob_gain_se`` (a paired test: it removes the spread between
        sessions that both rankings share). The untrained ranking is the first one taken
        while the recommender's adapter is still the identity (kept for the run); a run that
        starts from a trained adapter (e.g. a resume) ranks once with the adapter switched off
        instead."""
        from coars_agents.evaluate import (
            first_visit_reference,
            select_sessions,
            turn1_choice_ranking,
            turn1_ranking_metrics,
            turn1_user_judgements,
            user_first_visit_reference,
            user_judgement_metrics,
        )

        cfg = self.config
        data = data or self.eval_data
        n = min(n_sessions or cfg.eval_sessions, len(data.sessions))
        sessions = select_sessions(
            len(data.sessions), n, cfg.seed if subset_seed is None else subset_seed
        )
        agents = self.agents(greedy=True, use_adapters=use_adapters)
        env_config = EnvConfig(**self.env_kwargs).replace(render_prompts=False)
        rank = functools.partial(
            turn1_choice_ranking,
            data=data,
            config=env_config,
            session_ids=sessions,
            batch_size=cfg.eval_batch_size,
        )
        with self._decoding_models() if use_adapters else nullcontext():
            ranking = rank(agents[RECOMMENDER])
            teacher = None
            if cfg.rank_teacher:
                teacher_agents = (
                    agents
                    if cfg.teacher == "shared"
                    else self.agents(greedy=True, use_adapters=False)
                )
                reference = functools.partial(
                    first_visit_reference, data, answer_hint=cfg.answer_hint
                )
                teacher = rank(teacher_agents[RECOMMENDER], reference=reference)
            judgements = teacher_judgements = None
            if cfg.rank_user:
                judge = functools.partial(
                    turn1_user_judgements,
                    data=data,
                    config=env_config,
                    session_ids=sessions,
                    batch_size=cfg.eval_batch_size,
                    seed=cfg.seed,
                )
                judgements = judge(agents[USER])
                if cfg.rank_teacher:
                    user_d = functools.partial(
                        user_first_visit_reference, data, answer_hint=cfg.answer_hint
                    )
                    teacher_judgements = judge(teacher_agents[USER], reference=user_d)
        metrics = turn1_ranking_metrics(ranking)
        probs = ranking["target_prob"].to_numpy(dtype=float)
        out = {
            **{
                f"eval/{k}": float(metrics[k].mean)
                for k in ("turn1_target_prob", "hit@5", "ndcg@5")
            },
            "eval/turn1_target_prob_se": float(probs.std() / math.sqrt(len(probs))),
            "eval/target_rank": float(ranking["target_rank"].mean()),
            "eval/turn1_top_prob": float(ranking["top_prob"].mean()),
            # A policy that always picks one candidate number whatever the candidates
            # (collapsed onto a position, as RL at a high learning rate can) scores 1 here.
            "eval/turn1_top_position_share": float(
                ranking["top_position"].value_counts(normalize=True).max()
            ),
        }
        default_n = min(cfg.eval_sessions, len(data.sessions))
        if data is self.eval_data and n == default_n and subset_seed in (None, cfg.seed):
            untrained = self._untrained_ranking(
                ranking,
                use_adapters,
                lambda: rank(self.agents(greedy=True, use_adapters=False)[RECOMMENDER]),
            )
            change = probs - untrained["target_prob"].to_numpy(dtype=float)
            out["eval/turn1_target_prob_gain"] = float(change.mean())
            out["eval/turn1_target_prob_gain_se"] = float(change.std() / math.sqrt(len(change)))
        if teacher is not None:
            out["eval/teacher_turn1_target_prob"] = float(teacher["target_prob"].mean())
            out["eval/teacher_turn1_top_prob"] = float(teacher["top_prob"].mean())
        if judgements is not None:
            out.update({f"eval/{k}": v for k, v in user_judgement_metrics(judgements).items()})
        if teacher_judgements is not None:
            taught = user_judgement_metrics(teacher_judgements)
            out.update({f"eval/teacher_{k}": v for k, v in taught.items()})
        return out

    def _untrained_ranking(
        self, ranking: pd.DataFrame, use_adapters: bool, rank_base: Callable[[], pd.DataFrame]
    ) -> pd.DataFrame:
        """The untrained recommender's turn-1 ranking of the default subset, computed once:
        ``ranking`` itself while the adapter is still the identity, else ``rank_base()``, a
        ranking with the adapter switched off (the same model: LoRA only adds to the base)."""
        if self._turn1_untrained is None:
            fresh = not use_adapters or self.policy.adapter_is_identity(RECOMMENDER)
            self._turn1_untrained = ranking if fresh else rank_base()
        if list(self._turn1_untrained["session_id"]) != list(ranking["session_id"]):
            raise RuntimeError("the untrained ranking covers other sessions")  # a bug if so
        return self._turn1_untrained

    def _decoding_models(self) -> AbstractContextManager[None]:
        """Merged per-adapter copies for decoding when ``merged_rollouts`` is set."""
        return self.policy.merged_adapters() if self.config.merged_rollouts else nullcontext()

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dirs(self) -> list[Path]:
        """The ``checkpoints/step_*`` folders, oldest first (``best`` excluded)."""
        root = self.output_dir / "checkpoints"
        return sorted(root.glob("step_*")) if root.exists() else []

    def save_checkpoint(self, name: str | None = None) -> Path:
        """Adapters, optimizer states, step and hindsight memory, written atomically."""
        root = self.output_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / (name or f"step_{self.step:06d}")
        # Every process's carried turns (min_trained_turns), written by the main process; no
        # collective when nothing can be carried.
        gather = self.config.min_trained_turns > 0 and self.accelerator.num_processes > 1
        all_pending = gather_object([self.pending]) if gather else [self.pending]
        if self.accelerator.is_main_process:
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
            for agent in AGENTS:
                self.policy.save_adapter(agent, tmp / "adapters" / agent)
            for agent, optimizer in self.optimizers.items():
                torch.save(optimizer.state_dict(), tmp / f"optimizer_{agent}.pt")
            state = {
                "step": self.step,
                "best_hit": self.best_hit,
                "memory": {str(k): v for k, v in self.memory.items()},
                "config": asdict(self.config),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, default=_json_default))
            if any(pending for per_process in all_pending for pending in per_process.values()):
                torch.save(all_pending, tmp / "pending_turns.pt")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # a half-written checkpoint never has a final name
            if name is None:
                for old in self.checkpoint_dirs()[: -self.config.keep_last]:
                    shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore adapters, optimizer states, step, best score and hindsight memory."""
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        for agent in AGENTS:
            self.policy.load_adapter(agent, path / "adapters" / agent)
        for agent, optimizer in self.optimizers.items():
            optimizer.load_state_dict(torch.load(path / f"optimizer_{agent}.pt", weights_only=True))
        self.step = int(state["step"])
        self.best_hit = float(state["best_hit"])
        self.memory = {int(k): v for k, v in state["memory"].items()}
        self.pending = {agent: [] for agent in AGENTS}
        if (path / "pending_turns.pt").exists():
            # Our own pickled TurnSamples (token ids, tensors), one dict per process.
            all_pending = torch.load(path / "pending_turns.pt", weights_only=False)
            self.pending = all_pending[self.accelerator.process_index]

    # ------------------------------------------------------------------ the loop

    def _log(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        if not self.accelerator.is_main_process:
            return
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.accelerator.log(
            {k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"])
        )

    def train(self) -> list[dict[str, float]]:
        """Run (or resume) training; returns the logged metrics of this call.

        It may be called again (e.g. after raising ``total_steps``), also with several
        processes: it closes its trackers but leaves the process group up. A multi-process
        script ends with ``trainer.accelerator.end_training()``, as Accelerate asks.
        """
        cfg = self.config
        first = len(self.history)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.resume and self.checkpoint_dirs():
            self.load_checkpoint(self.checkpoint_dirs()[-1])
            self._drop_logs_after(self.step)
        if self.accelerator.is_main_process and cfg.tensorboard:
            self.accelerator.init_trackers("tensorboard", config=_flat_config(cfg))
        bar = tqdm(
            total=cfg.total_steps,
            initial=self.step,
            desc="CoARS",
            disable=not self.accelerator.is_main_process,
        )
        started = time.monotonic()
        if cfg.rank_every and self.step == 0 and self.step < cfg.total_steps:
            self._log({"step": 0.0, **self.rank_turn1()})  # where the learning curve starts
        while self.step < cfg.total_steps:
            metrics = self.train_step()
            out_of_time = self._out_of_time(started)
            full_eval = cfg.eval_every and self.step % cfg.eval_every == 0
            # The curve also ends where a time limit ends the training.
            rank = cfg.rank_every and (self.step % cfg.rank_every == 0 or out_of_time)
            if rank and not full_eval:
                metrics.update(self.rank_turn1())  # (a full evaluation includes it)
            if full_eval:
                metrics.update(self.evaluate())
                hit = metrics["eval/oracle/hit@1"]
                if hit > self.best_hit:
                    self.best_hit = hit
                    self.save_checkpoint("best")
            self._log(metrics)
            if out_of_time or self.step % cfg.checkpoint_every == 0 or self.step == cfg.total_steps:
                self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(
                hit=f"{metrics['rollout/hit@1']:.2f}",
                loss=f"{metrics.get('recommender/loss', 0):.3f}",
            )
            if out_of_time:
                break
        bar.close()
        self._write_csv()
        # Not accelerator.end_training(): that also destroys the process group, after which a
        # second train() (or any collective) fails with several processes.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()  # a second train() opens its own
        return self.history[first:]

    def _out_of_time(self, started: float) -> bool:
        """Past ``time_limit_minutes``? Agreed by all processes (one stopping alone would
        leave the others waiting in the gradient all-reduce)."""
        limit = self.config.time_limit_minutes
        if not limit:
            return False
        late = torch.tensor(
            float(time.monotonic() - started > 60 * limit), device=self.accelerator.device
        )
        if self.accelerator.num_processes > 1:
            late = self.accelerator.reduce(late, reduction="sum")
        return bool(late.item() > 0)

    def _drop_logs_after(self, step: int) -> None:
        """On resume, forget metrics of steps after the checkpoint: they are redone."""
        path = self.output_dir / "metrics.jsonl"
        if not (self.accelerator.is_main_process and path.exists()):
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a line torn by the kill
        path.write_text("".join(f"{line}\n" for line in kept))

    def _write_csv(self) -> None:
        path = self.output_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and path.exists():
            import pandas as pd

            pd.read_json(path, lines=True).to_csv(self.output_dir / "metrics.csv", index=False)


_ROLLOUT_METRICS = (
    "hit@1",
    "turn1_hit@1",
    "avg_turns",
    "click_rate",  # 0: the user agent accepts nothing (the collapse seen on GPUs)
    "wrong_click_rate",
    "repeat_rate",
    "rec_format_failure_rate",
    "user_format_failure_rate",
    "reward_rec",
    "reward_user",
)
_ORACLE_EVAL_METRICS = (
    "hit@1",
    "turn1_hit@1",
    "avg_turns",
    "rec_format_failure_rate",
    "repeat_rate",
)
_LLM_EVAL_METRICS = (
    "hit@1",
    "turn1_hit@1",
    "avg_turns",
    "click_rate",
    "wrong_click_rate",
    "rec_format_failure_rate",
    "user_format_failure_rate",
    "user_precision",
    "user_recall",
    "user_f1",
)


def balance_user_turns(samples: list[TurnSample]) -> None:
    """``user_class_balance``: scale the trained user turns' ``turn_mask`` (which weighs each
    turn's whole loss) so that hits and misses carry equal total weight, n / 2 each; masked
    turns stay 0, and a batch with one class only is left as it is."""
    trained = [s for s in samples if s.turn_mask > 0]
    hits = sum(bool(s.judged_target) for s in trained)
    misses = len(trained) - hits
    if not hits or not misses:
        return
    for s in trained:
        s.turn_mask *= len(trained) / (2 * (hits if s.judged_target else misses))


def first_choice_mask(forced: torch.Tensor) -> torch.Tensor:
    """True on the first run of chosen (not forced) tokens of a constrained answer: the
    agent's first decision ("Item: " then the number's tokens; "Action: " then the action's),
    before the next forced literal. All False when nothing was chosen."""
    chosen = ~forced.bool()
    mask = torch.zeros_like(chosen)
    started = False
    for i, free in enumerate(chosen.tolist()):
        if free:
            mask[i], started = True, True
        elif started:
            break
    return mask


def _count_nonfinite(logprobs: torch.Tensor, token_mask: torch.Tensor) -> float:
    return float((~torch.isfinite(logprobs) & (token_mask > 0)).sum())


def _warn_nonfinite(agent: str, step: int) -> None:
    warnings.warn(
        f"non-finite loss or gradient for the {agent} adapter at step {step + 1}: skipped "
        "(counted in the logs as nonfinite_chunks / skipped_steps). If it recurs, try "
        "--mixed-precision no or a float32 model.",
        RuntimeWarning,
        stacklevel=3,
    )


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint32)[0] % 100_000)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _flat_config(config: CoARSConfig) -> dict:
    """TensorBoard hparams take scalars and strings only."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in asdict(config).items()
    }
