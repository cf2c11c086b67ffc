"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018), plain PyTorch.

CoARS uses SASRec for three things (METHOD.md): the candidate generator (its top-ranked
non-target items are the hard negatives of a session), the single-shot baseline
(``Session.sasrec_top1``), and the user representation that finds peers (``encode``).

Model: item embedding (scaled by sqrt(hidden), as in the paper) plus a learned absolute
positional embedding, ``blocks`` pre-LayerNorm transformer blocks with causal multi-head
self-attention and a point-wise feed-forward layer, dropout, and a final LayerNorm.
Sequences are left-padded to ``max_len`` so the most recent item always sits at the last
position; the score of item ``i`` after a prefix is the dot product of the last position's
hidden state with ``i``'s (shared) input embedding.

Training (``loss="bce"``, the paper's objective): every position of every training sequence
predicts the next item, with binary cross-entropy on the true next item and on ONE negative
sampled uniformly from the items the user never interacted with in training. ``loss="ce"``
(full softmax over all items) is offered as an option; it usually ranks better and costs
more per step on large catalogues. Only ``SplitData.train`` is used, so validation and test
targets never influence the model.

Users' sequences longer than ``max_len + 1`` are cut, from the end, into non-overlapping
windows, so that every training interaction is a prediction target once per epoch (the
original code keeps only the last ``max_len`` items per user; with ``max_len=50`` on ML-1M
that would waste most of the data).

All randomness (initialisation, dropout, batch order, negatives) comes from ``seed``; the
caller's global RNG state is left untouched.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from coars_env.data.common import SplitData

PAD = 0  # embedding row 0 is padding; item i lives in row i + 1


@dataclass
class SASRecConfig:
    """Hyper-parameters of SASRec and its training loop."""

    hidden: int = 64
    """Width of item/position embeddings and of every hidden state."""
    blocks: int = 2
    """Number of self-attention blocks."""
    heads: int = 1
    """Attention heads per block (``hidden`` must be divisible by it)."""
    max_len: int = 50
    """Longest sequence the model reads: longer prefixes keep their last ``max_len`` items."""
    epochs: int = 40
    """Passes over all training windows."""
    batch_size: int = 128
    """Training windows per optimisation step."""
    lr: float = 1e-3
    """Adam learning rate."""
    dropout: float = 0.2
    """Dropout on embeddings, attention and feed-forward outputs."""
    weight_decay: float = 0.0
    """L2 penalty (Adam weight decay) on all parameters."""
    loss: Literal["bce", "ce"] = "bce"
    """"bce": one sampled negative per position (the paper); "ce": full softmax over items."""
    shuffle_sequences: bool = False
    """Train on each user's sequence in a seeded random order instead of the given one. For
    data whose order is not time order and whose targets are a random hold-out (the shared
    ML-1M copy): its file order is structured, and a model of it ranks randomly held-out
    targets worse than popularity. One fixed permutation (not a new one every epoch):
    measured on ML-100K with a random hold-out, it converges much faster. Leave it off for
    sequential data (chronological splits, Last.fm)."""
    seed: int = 0
    """Seeds initialisation, dropout, batch order and negative sampling."""
    device: str = "cpu"
    """Torch device for training and inference ("cpu", "cuda", ...)."""
    num_threads: int | None = None
    """CPU threads for torch in fit/score/encode (None: leave torch's setting alone). On a
    CPU shared with other jobs, 1 is much faster than oversubscribed threads that spin."""
    eval_batch_size: int = 1024
    """Prefixes per forward pass in ``score``/``encode``."""

    def cache_fields(self) -> dict:
        """The fields that change the trained weights (device and threads do not)."""
        out = asdict(self)
        for key in ("device", "num_threads", "eval_batch_size"):
            out.pop(key)
        return out


class _Dropout(nn.Module):
    """Inverted dropout whose masks come from a numpy ``Generator`` set by ``fit``.

    Why not ``nn.Dropout``: torch's CPU ``bernoulli_`` dominated a training step (about a
    third of it); numpy's PCG64 draws the same masks 2-3x faster, and the explicit generator
    keeps training reproducible from ``SASRecConfig.seed`` alone.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.rng: np.random.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0.0:
            return x
        if self.rng is None:  # training outside ``fit``: fall back to torch's own RNG
            return F.dropout(x, self.p, training=True)
        # 1/(1-p) where kept, 0 where dropped, built in place in one float buffer.
        mask = torch.from_numpy(self.rng.random(x.shape, dtype=np.float32))
        mask = mask.ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * mask.to(x.device)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then point-wise FFN.

    Dropout acts on the attention output and inside/after the FFN, not on the attention
    weights (that mask would be ``[B, heads, L, L]``, the costliest one on CPU).
    """

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        self.heads = heads
        self.ln_attn = nn.LayerNorm(hidden, eps=1e-8)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln_ffn = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), _Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.drop = _Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, length, hidden = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(hidden, dim=-1)
        # [B, L, H] -> [B, heads, L, H/heads]
        q, k, v = (t.view(b, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        att = att.transpose(1, 2).reshape(b, length, hidden)
        x = x + self.drop(self.proj(att))
        return x + self.drop(self.ffn(self.ln_ffn(x)))


class SASRecNet(nn.Module):
    """The network alone: ``forward(seq)`` gives hidden states ``[B, L, hidden]``."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.emb_drop = _Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            [_Block(cfg.hidden, cfg.heads, cfg.dropout) for _ in range(cfg.blocks)]
        )
        self.ln_out = nn.LayerNorm(cfg.hidden, eps=1e-8)
        self.scale = math.sqrt(cfg.hidden)
        nn.init.normal_(self.item_emb.weight, std=cfg.hidden**-0.5)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq``: int64 ``[B, L]`` of embedding rows (item + 1, 0 = padding), left-padded.

        Hidden states at padding positions are meaningless and must not be read: padding
        keys are masked out of attention, so they never reach a real position, which lets
        us skip re-zeroing them after every block (a measurable saving on CPU).
        """
        length = seq.shape[1]
        pos = torch.arange(length, device=seq.device)
        x = self.emb_drop(torch.add(self.pos_emb(pos), self.item_emb(seq), alpha=self.scale))
        # Causal mask that also hides padding keys; the diagonal stays open so that a
        # padding query never has an empty row (which would give NaN).
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        mask = causal & (seq != PAD)[:, None, None, :]
        mask = mask | torch.eye(length, dtype=torch.bool, device=seq.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_out(x)

    def set_dropout_rng(self, rng: np.random.Generator | None) -> None:
        """Give every dropout layer the generator its masks are drawn from (None: torch's)."""
        for module in self.modules():
            if isinstance(module, _Dropout):
                module.rng = rng

    def item_weights(self) -> torch.Tensor:
        """Output item embeddings ``[n_items, hidden]`` (shared with the input table)."""
        return self.item_emb.weight[1:]


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: unchanged), then restore."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)


def _pad_left(seqs: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """Last ``length`` items of each sequence as embedding rows (item + 1), left-padded with 0."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for row, seq in enumerate(seqs):
        tail = np.asarray(seq, dtype=np.int64)[-length:]
        if len(tail):
            out[row, length - len(tail) :] = tail + 1
    return out


def _training_windows(train: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each user's sequence into (input, next-item) windows of ``max_len`` targets.

    Returns ``inputs`` and ``targets`` (embedding rows, 0 = padding, ``[W, max_len]``) and
    the user of each window. Windows are taken from the end of the sequence, so the most
    recent one is always complete and the oldest one is left-padded.
    """
    inputs, targets, users = [], [], []
    for user, seq in enumerate(train):
        seq = np.asarray(seq, dtype=np.int64) + 1
        end = len(seq)
        while end >= 2:
            start = max(0, end - 1 - max_len)
            window = seq[start:end]
            inp = np.zeros(max_len, dtype=np.int64)
            tgt = np.zeros(max_len, dtype=np.int64)
            inp[max_len - (len(window) - 1) :] = window[:-1]
            tgt[max_len - (len(window) - 1) :] = window[1:]
            inputs.append(inp)
            targets.append(tgt)
            users.append(user)
            end = start + 1  # the next window predicts up to (and including) window[0]
    if not inputs:
        raise ValueError("no user has two or more training interactions: nothing to train on")
    return np.stack(inputs), np.stack(targets), np.asarray(users, dtype=np.int64)


class _Seen:
    """Fast vectorised membership test for (user, item) pairs of the training data."""

    def __init__(self, train: list[np.ndarray], n_items: int) -> None:
        self.n_items = n_items
        keys = [u * n_items + np.asarray(s, dtype=np.int64) for u, s in enumerate(train) if len(s)]
        self.keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.int64)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + items
        idx = np.searchsorted(self.keys, keys).clip(max=max(len(self.keys) - 1, 0))
        return self.keys[idx] == keys if len(self.keys) else np.zeros(keys.shape, dtype=bool)


class SASRec:
    """A trainable SASRec recommender over dense item indices ``0..n_items-1``.

    Typical use::

        model = SASRec(split.n_items, SASRecConfig(epochs=20)).fit(split)
        scores = model.score([[3, 17, 5], [8]])   # [2, n_items]
        reps = model.encode([[3, 17, 5], [8]])     # [2, hidden]
    """

    def __init__(self, n_items: int, cfg: SASRecConfig | None = None) -> None:
        self.cfg = cfg or SASRecConfig()
        self.n_items = n_items
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            self.net = SASRecNet(n_items, self.cfg).to(self.cfg.device)
        self.net.eval()
        self.losses: list[float] = []  # mean training loss per epoch

    # ------------------------------------------------------------------ training
    def fit(self, split: SplitData, *, progress: bool = True) -> SASRec:
        """Train on ``split.train`` only (validation/test targets are never read)."""
        if split.n_items != self.n_items:
            raise ValueError(f"model has {self.n_items} items, split has {split.n_items}")
        cfg = self.cfg
        sequences = split.train
        if cfg.shuffle_sequences:
            order_rng = np.random.default_rng([cfg.seed, 2])
            sequences = [np.asarray(seq)[order_rng.permutation(len(seq))] for seq in sequences]
        inputs, targets, users = _training_windows(sequences, cfg.max_len)
        seen = _Seen(split.train, self.n_items)
        rng = np.random.default_rng(cfg.seed)
        opt = torch.optim.Adam(
            self.net.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay,
            fused=True,  # one kernel per step instead of several per parameter
        )
        device = torch.device(cfg.device)
        n_batches = math.ceil(len(inputs) / cfg.batch_size)
        bar = tqdm(
            total=cfg.epochs * n_batches, desc=f"SASRec {split.name}", disable=not progress,
            unit="batch", mininterval=2.0,
        )
        # Separate streams: batch order + negatives, and dropout masks.
        dropout_rng = np.random.default_rng([cfg.seed, 1])
        self.net.set_dropout_rng(dropout_rng)
        try:
            with _threads(cfg.num_threads), torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # only used if something falls back to torch's RNG
                self.net.train()
                for _ in range(cfg.epochs):
                    order = rng.permutation(len(inputs))
                    total, count = 0.0, 0
                    for start in range(0, len(order), cfg.batch_size):
                        rows = order[start : start + cfg.batch_size]
                        loss = self._step(inputs[rows], targets[rows], users[rows], seen, rng, device)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        total += float(loss.detach()) * len(rows)
                        count += len(rows)
                        bar.update(1)
                    self.losses.append(total / max(count, 1))
                    bar.set_postfix(loss=f"{self.losses[-1]:.4f}")
        finally:
            bar.close()
            self.net.set_dropout_rng(None)
            self.net.eval()
        return self

    def _step(
        self,
        inp: np.ndarray,
        tgt: np.ndarray,
        users: np.ndarray,
        seen: _Seen,
        rng: np.random.Generator,
        device: torch.device,
    ) -> torch.Tensor:
        """Loss of one batch of windows."""
        seq = torch.from_numpy(inp).to(device)
        pos = torch.from_numpy(tgt).to(device)
        valid = pos != PAD
        hidden = self.net(seq)[valid]  # [N, H] at real positions only
        pos_rows = pos[valid]
        if self.cfg.loss == "ce":
            logits = hidden @ self.net.item_weights().T
            return F.cross_entropy(logits, pos_rows - 1)
        if self.cfg.loss != "bce":
            raise ValueError(f"unknown loss {self.cfg.loss!r} (expected 'bce' or 'ce')")
        neg = self._negatives(np.repeat(users, valid.sum(1).cpu().numpy()), seen, rng)
        emb = self.net.item_emb
        pos_logit = (hidden * emb(pos_rows)).sum(-1)
        neg_logit = (hidden * emb(torch.from_numpy(neg + 1).to(device))).sum(-1)
        return F.binary_cross_entropy_with_logits(
            pos_logit, torch.ones_like(pos_logit)
        ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))

    def _negatives(self, users: np.ndarray, seen: _Seen, rng: np.random.Generator) -> np.ndarray:
        """One uniform item per entry that the user never interacted with in training."""
        neg = rng.integers(0, self.n_items, size=len(users))
        for _ in range(20):  # rejection sampling; a handful of rounds empties it in practice
            bad = np.flatnonzero(seen.contains(users, neg))
            if not len(bad):
                break
            neg[bad] = rng.integers(0, self.n_items, size=len(bad))
        return neg

    # ----------------------------------------------------------------- inference
    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors in place
    def _last_hidden(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        """Final-position hidden state of each prefix, ``[B, hidden]`` on ``cfg.device``."""
        cfg = self.cfg
        self.net.eval()
        out = []
        with _threads(cfg.num_threads):
            for start in range(0, len(prefixes), cfg.eval_batch_size):
                chunk = prefixes[start : start + cfg.eval_batch_size]
                seq = torch.from_numpy(_pad_left(chunk, cfg.max_len)).to(cfg.device)
                last = self.net(seq)[:, -1]
                out.append(last * (seq[:, -1:] != PAD))  # an empty prefix gives exactly zero
        if not out:
            return torch.zeros(0, cfg.hidden, device=cfg.device)
        return torch.cat(out)

    def encode(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        """User representation after each prefix: the final position's hidden state.

        Returns a float32 CPU tensor ``[B, hidden]``. An empty prefix gives a zero vector.
        """
        return self._last_hidden(prefixes).float().cpu()

    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors in place
    def score(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        """Next-item scores (higher = better) for every item, float32 CPU ``[B, n_items]``.

        Seen items are NOT masked: callers decide what to exclude. An empty prefix scores
        every item 0.
        """
        hidden = self._last_hidden(prefixes)
        return (hidden @ self.net.item_weights().T).float().cpu()

    def item_embeddings(self) -> np.ndarray:
        """The item embedding matrix, float32 ``[n_items, hidden]`` (row i = item i)."""
        return self.net.item_weights().detach().float().cpu().numpy().copy()

    # --------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """Write config, item count and weights atomically (temp file + ``os.replace``)."""
        buf = io.BytesIO()
        state = {k: v.cpu() for k, v in self.net.state_dict().items()}
        torch.save(
            {"cfg": asdict(self.cfg), "n_items": self.n_items, "state": state, "losses": self.losses},
            buf,
        )
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> SASRec:
        """Read a model written by ``save``; raises on a missing or corrupt file."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        cfg = SASRecConfig(**blob["cfg"])
        if device is not None:
            cfg.device = device
        model = cls(int(blob["n_items"]), cfg)
        model.net.load_state_dict(blob["state"])
        model.net.to(cfg.device).eval()
        model.losses = list(blob.get("losses", []))
        return model


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ranking_metrics(
    scores: torch.Tensor,
    targets: Sequence[int],
    exclude: Sequence[Sequence[int]],
    k: int = 10,
) -> dict[str, float]:
    """Full-ranking HR@k and NDCG@k (one target per row), with ``exclude[b]`` masked out.

    ``scores``: ``[B, n_items]``; the target itself is never masked, even if it is listed in
    ``exclude`` (repeat consumption). Ties are broken pessimistically (a tied item counts as
    ranked above the target), so a constant scorer does not look good by accident.
    """
    scores = scores.clone().float()
    rows = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
    cols = np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude]) if len(rows) else rows
    tgt = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    target_score = scores[torch.arange(len(tgt)), tgt].clone()
    if len(rows):
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
    scores[torch.arange(len(tgt)), tgt] = target_score
    rank = (scores >= target_score[:, None]).sum(1) - 1  # 0 = best; target counts itself once
    hit = rank < k
    ndcg = torch.where(hit, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros_like(rank, dtype=torch.float))
    return {f"HR@{k}": float(hit.float().mean()), f"NDCG@{k}": float(ndcg.mean())}
