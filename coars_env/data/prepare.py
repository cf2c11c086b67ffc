"""SplitData -> DialogData: SASRec candidates, peers, opinions and alignment sets.

``prepare(cfg)`` loads and splits the dataset, trains SASRec on the training sequences
(or loads it from the cache), and builds the three splits at once; ``build_dialog_data``
returns one of them. Everything is deterministic given ``DataConfig.seed`` and
``SASRecConfig.seed``.

Sessions (METHOD.md, "The setting"):

- ``valid``/``test``: one session per user with a target in ``SplitData.targets[split]``;
  the visible history is the last ``history_window`` items of the target's ``prefix``.
- ``train``: one session per user with at least two training items: the last training
  item is the target, the earlier ones the prefix. That target IS part of SASRec's
  training data (and of the opinions): fine for RL training sessions, whose only job is
  to give the agents realistic dialogues with a known answer, but these sessions are not
  an evaluation set.

SASRec trains on the training sequences only. When the split is a seeded random hold-out
(no timestamps: the shared ML-1M copy), it trains on each user's sequence in a seeded random
order (``DataConfig.shuffle_unordered``): there, file order is not time order, the targets
are random items of the user's history, and a model of the (structured) file order ranks
them worse than popularity does (measured: test HR@10 0.033 vs popularity 0.075).

Candidates (``num_candidates`` = 20, the target exactly once, shuffled with
``np.random.default_rng(Session.seed)``):

- ``"sasrec"``: the target plus the top-ranked SASRec items, excluding the target and
  every item of the prefix (the items the user is known to have had before the target,
  a superset of the visible history). SASRec scores the full prefix (its last
  ``max_len`` items). How often SASRec's own top-20 over unseen items contains the
  target is reported (``DialogData.stats["sasrec_top20_coverage"]`` and the summary).
- ``"random"``: the target plus uniform random items the user never interacted with
  anywhere in the data (training, validation or test), as in AFL/LLaRA.

Peers: a session's user is represented by SASRec's ``encode`` of the visible history only
(never of held-out items); the pool is every user with training data, represented by
``encode`` of their training sequence. The ``n_peers`` most similar OTHER users by cosine
are kept, most similar first, weight = cosine clipped to [0, 1]. Opinions come from
training data only: +1 = rating >= 4 (or any interaction without ratings), -1 = rating
<= 2; ``DialogData.peer_score`` turns them into q_t.

Alignment sets (METHOD.md, "User alignment"), for the ``valid`` and ``test`` splits (the
``train`` split has none): for a seeded random subset of at most ``alignment_users``
eligible users of the split, the last ``alignment_positives`` distinct liked items of
the training sequence are held out as positives (every occurrence removed from the
visible history), and ``alignment_negatives`` random items the user never interacted
with are negatives. Only training items have ratings in ``SplitData``, which is why the
positives come from the training sequence; consequently a user's ``train`` session
target can be one of its positives: a user agent RL-trained on ``train`` sessions has
been rewarded on some of these (user, item) pairs (with a different visible history), so
read a trained agent's alignment F1 with that in mind. Users with too few liked items, no
history left, or too few never-seen items are skipped and counted in the summary.

Cache (``cache_dir``, default ``$XDG_CACHE_HOME/coars/prepared`` or
``~/.cache/coars/prepared``): SASRec weights (``sasrec-<key>.pt``) and the prepared splits
(``prepared-<key>.pkl``), keyed by a hash of the dataset name, the data files' sizes and
mtimes (or the SplitData's contents when one is passed in), the relevant configuration,
the seeds and the source of ``coars_env/data``. Files are written atomically; a file that
fails to load is rebuilt with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from coars_env.data.common import (
    OPINION_DISLIKED,
    OPINION_LIKED,
    AlignmentCase,
    DialogData,
    Session,
    SplitData,
)
from coars_env.data.sasrec import SASRec, SASRecConfig, atomic_write_bytes

SPLITS = ("train", "valid", "test")
_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}
CANDIDATE_MODES = ("sasrec", "random")
CACHE_VERSION = 1  # bump when the cached formats change
_CHUNK = 1024  # sessions scored at once: bounds memory to CHUNK x n_items floats


@dataclass
class DataConfig:
    """What data to use and how to turn it into dialogue sessions."""

    dataset: str = "ml-100k"
    """Dataset name for ``coars_env.data.load_interactions``: synthetic, ml-100k, ml-1m, lastfm."""
    data_dir: str | None = None
    """Data root (else ``$COARS_DATA_DIR``, else ``~/.cache/coars``); overridden by an explicit argument."""
    download: bool = True
    """Let the MovieLens loaders download the official zip when no local copy exists."""
    k_core: int = 5
    """k-core filter applied before the split (0 disables)."""
    seed: int = 0
    """Seeds the split (random hold-out datasets), session seeds, random candidates, alignment."""
    history_window: int = 10
    """Visible history: the last this-many items before the target, oldest first."""
    num_candidates: int = 20
    """Candidate-set size, target included."""
    candidate_mode: Literal["sasrec", "random"] = "sasrec"
    """"sasrec": target + top-ranked unseen SASRec items; "random": target + never-interacted items."""
    n_peers: int = 50
    """Similar users kept per session, most similar first."""
    peer_k: int = 20
    """At most this many peers with an opinion on an item count towards q_t."""
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    """The candidate generator / user encoder and its training."""
    shuffle_unordered: bool = True
    """When the split is a seeded random hold-out (no timestamps, e.g. the shared ML-1M
    copy), train SASRec with ``shuffle_sequences=True``: file order is not time order there,
    and a model of file order ranks the randomly held-out targets worse than popularity."""
    alignment_users: int = 200
    """Alignment cases per evaluation split (valid, test) at most; 0 disables them."""
    alignment_positives: int = 10
    """Held-out liked items per alignment case."""
    alignment_negatives: int = 10
    """Never-interacted items per alignment case."""
    cache_dir: str | None = None
    """Where trained SASRec weights and prepared splits are cached (None: the per-user cache)."""
    use_cache: bool = True
    """Read and write the cache; False always rebuilds and writes nothing."""
    progress: bool = True
    """Show a tqdm bar while SASRec trains."""

    def __post_init__(self) -> None:
        if isinstance(self.sasrec, dict):  # e.g. from JSON
            self.sasrec = SASRecConfig(**self.sasrec)
        if self.candidate_mode not in CANDIDATE_MODES:
            raise ValueError(f"candidate_mode must be one of {CANDIDATE_MODES}, got {self.candidate_mode!r}")
        if self.num_candidates < 2:
            raise ValueError("num_candidates must be at least 2")


@dataclass
class PreparedData:
    """The three splits of one dataset, built together (SASRec trained once)."""

    train: DialogData
    valid: DialogData
    test: DialogData
    dataset_summary: str = ""
    from_cache: bool = False  # set on load, not stored

    def split(self, name: str) -> DialogData:
        """The DialogData of split ``name`` ("train", "valid" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    @property
    def summary(self) -> str:
        """Dataset summary followed by each split's summary."""
        parts = [self.dataset_summary] + [self.split(s).summary for s in SPLITS]
        return "\n".join(p for p in parts if p)


# --------------------------------------------------------------------------- entry points


def build_dialog_data(cfg: DataConfig, split: str, data_dir: str | os.PathLike | None = None) -> DialogData:
    """DialogData for one split ("train", "valid" or "test"); see :func:`prepare`."""
    return prepare(cfg, data_dir).split(split)


def prepare(
    cfg: DataConfig,
    data_dir: str | os.PathLike | None = None,
    *,
    split_data: SplitData | None = None,
) -> PreparedData:
    """Load, split, train/load SASRec and build all three splits, through the cache.

    ``split_data``: use this SplitData instead of loading ``cfg.dataset`` (its contents then
    key the cache). ``data_dir`` overrides ``cfg.data_dir``.
    """
    root = data_dir if data_dir is not None else cfg.data_dir
    if split_data is None:
        data_key = {"dataset": cfg.dataset, "files": _file_fingerprint(cfg.dataset, root)}
    else:
        data_key = {"dataset": split_data.name, "content": split_data_fingerprint(split_data)}
    data_key.update(k_core=cfg.k_core, split_seed=cfg.seed, code=_source_fingerprint(), v=CACHE_VERSION)
    sasrec_key = _hash(
        {"data": data_key, "sasrec": cfg.sasrec.cache_fields(), "shuffle_unordered": cfg.shuffle_unordered}
    )
    prepared_key = _hash({"sasrec": sasrec_key, "cfg": _prepare_fields(cfg)})
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    prepared_path = cache / f"prepared-{prepared_key}.pkl"

    if cfg.use_cache:
        cached = _load_pickle(prepared_path, PreparedData)
        if cached is not None:
            cached.from_cache = True
            return cached
    if split_data is None:
        split_data = load_split_data(cfg, root)
    model = train_sasrec(
        effective_sasrec_config(cfg, split_data),
        split_data,
        cache / f"sasrec-{sasrec_key}.pt" if cfg.use_cache else None,
        progress=cfg.progress,
    )
    prepared = build_splits(cfg, split_data, model)
    if cfg.use_cache:
        atomic_write_bytes(prepared_path, pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL))
    return prepared


def load_split_data(cfg: DataConfig, data_dir: str | os.PathLike | None = None) -> SplitData:
    """``load_interactions`` + ``split_leave_one_out`` with the config's settings."""
    from coars_env.data import load_interactions
    from coars_env.data.sessions import split_leave_one_out

    data = load_interactions(cfg.dataset, data_dir, seed=cfg.seed, download=cfg.download)
    return split_leave_one_out(data, k_core=cfg.k_core, seed=cfg.seed)


def is_random_holdout(split_data: SplitData) -> bool:
    """Whether the split's targets are a seeded random hold-out rather than the last items.

    ``sessions.split_leave_one_out`` says so in a note (and a warning) when a dataset has no
    timestamps and no split of its own; tests pin that wording.
    """
    return not split_data.has_timestamps and any("random hold-out" in note for note in split_data.notes)


def effective_sasrec_config(cfg: DataConfig, split_data: SplitData) -> SASRecConfig:
    """``cfg.sasrec``, with ``shuffle_sequences`` switched on for unordered data (see DataConfig)."""
    if cfg.shuffle_unordered and is_random_holdout(split_data) and not cfg.sasrec.shuffle_sequences:
        return dataclasses.replace(cfg.sasrec, shuffle_sequences=True)
    return cfg.sasrec


def train_sasrec(
    cfg: SASRecConfig, split_data: SplitData, path: Path | None = None, *, progress: bool = True
) -> SASRec:
    """Load SASRec from ``path`` if it holds a valid model, else train it and save it there.

    The caller keys ``path`` (see :func:`prepare`); a file that fails to load, or was made
    for another item count or config, is retrained with a warning.
    """
    if path is not None and path.exists():
        try:
            model = SASRec.load(path, device=cfg.device)
            if model.n_items != split_data.n_items or model.cfg.cache_fields() != cfg.cache_fields():
                raise ValueError("cached model does not match the data or config")
            model.cfg.num_threads = cfg.num_threads
            model.cfg.eval_batch_size = cfg.eval_batch_size
            return model
        except Exception as exc:  # corrupt or stale cache: rebuild, never crash
            warnings.warn(f"SASRec cache {path} unusable ({exc!r}); retraining", stacklevel=2)
    model = SASRec(split_data.n_items, cfg).fit(split_data, progress=progress)
    if path is not None:
        model.save(path)
    return model


# ------------------------------------------------------------------------------ building


def build_splits(cfg: DataConfig, split_data: SplitData, model: SASRec) -> PreparedData:
    """Build train/valid/test DialogData from a split and a trained SASRec (no cache)."""
    context = _Context(cfg, split_data, model)
    splits = {name: _build_split(context, name) for name in SPLITS}
    return PreparedData(**splits, dataset_summary=_describe(split_data))


class _Context:
    """What all three splits share: opinions, features, the peer pool, known interactions."""

    def __init__(self, cfg: DataConfig, split_data: SplitData, model: SASRec) -> None:
        if split_data.n_items < cfg.num_candidates:
            raise ValueError(
                f"{split_data.name}: {split_data.n_items} items cannot fill {cfg.num_candidates} candidates"
            )
        self.cfg = cfg
        self.data = split_data
        self.model = model
        self.opinions = opinions_from_training(split_data)
        self.item_features = model.item_embeddings().astype(np.float32)
        lengths = [len(s) for s in split_data.train]
        all_train = np.concatenate(split_data.train) if sum(lengths) else np.zeros(0, np.int64)
        self.popularity = np.bincount(all_train, minlength=split_data.n_items).astype(np.int64)
        # Peer pool: users with training data, represented by their training sequences.
        self.pool_users = np.asarray([u for u, n in enumerate(lengths) if n > 0], dtype=np.int64)
        reps = model.encode([split_data.train[u] for u in self.pool_users])
        self.pool_reps = torch.nn.functional.normalize(reps, dim=1)
        self.pool_column = np.full(split_data.n_users, -1, dtype=np.int64)
        self.pool_column[self.pool_users] = np.arange(len(self.pool_users))
        # Everything each user is known to have interacted with (for "never interacted").
        known: list[list[np.ndarray]] = [[np.asarray(s, dtype=np.int64)] for s in split_data.train]
        for frame in split_data.targets.values():
            for user, target in zip(frame["user"].to_numpy(), frame["target"].to_numpy()):
                known[int(user)].append(np.asarray([target], dtype=np.int64))
        self.known = [np.unique(np.concatenate(parts)) for parts in known]

    def peers(self, users: np.ndarray, histories: list[tuple[int, ...]]) -> list[tuple[tuple[int, float], ...]]:
        """The ``n_peers`` most similar other pool users for each (user, visible history)."""
        n_peers = min(self.cfg.n_peers, len(self.pool_users) - 1)
        out: list[tuple[tuple[int, float], ...]] = []
        if n_peers <= 0:
            return [() for _ in histories]
        for start in range(0, len(histories), _CHUNK):
            reps = torch.nn.functional.normalize(self.model.encode(histories[start : start + _CHUNK]), dim=1)
            sims = reps @ self.pool_reps.T  # [chunk, pool]
            cols = self.pool_column[users[start : start + _CHUNK]]
            rows = np.flatnonzero(cols >= 0)
            sims[torch.from_numpy(rows), torch.from_numpy(cols[rows])] = -torch.inf  # never oneself
            values, index = sims.topk(n_peers, dim=1)
            peer_users = self.pool_users[index.numpy()]
            weights = values.clamp(0.0, 1.0).numpy().astype(float)
            out.extend(
                tuple(zip(p.tolist(), w.tolist())) for p, w in zip(peer_users, weights)
            )
        return out


def opinions_from_training(split_data: SplitData) -> dict[tuple[int, int], int]:
    """(user, item) -> +1 liked / -1 disliked, from the training sequences only.

    Liked: rating >= 4, or any interaction when the dataset has no ratings; disliked:
    rating <= 2; ratings strictly between 2 and 4 (and missing ones) give no opinion. For a
    repeated (user, item) pair the latest training interaction wins.
    """
    lengths = np.asarray([len(s) for s in split_data.train])
    if lengths.sum() == 0:
        return {}
    users = np.repeat(np.arange(len(lengths)), lengths)
    items = np.concatenate(split_data.train).astype(np.int64)
    if split_data.has_ratings:
        ratings = np.concatenate(split_data.train_ratings).astype(np.float64)
        opinion = np.where(ratings >= 4, OPINION_LIKED, np.where(ratings <= 2, OPINION_DISLIKED, 0))
    else:
        opinion = np.full(len(items), OPINION_LIKED)
    keep = opinion != 0
    return dict(zip(zip(users[keep].tolist(), items[keep].tolist()), opinion[keep].tolist()))


def session_seed(seed: int, split: str, user: int, stream: int = 0) -> int:
    """A per-(seed, split, user) seed; ``stream`` separates independent uses of it."""
    parts = [seed, _SPLIT_CODE[split], user] + ([stream] if stream else [])
    return int(np.random.SeedSequence(parts).generate_state(1, dtype=np.uint64)[0] >> 1)


def _session_rows(data: SplitData, split: str) -> tuple[np.ndarray, np.ndarray, list[tuple[int, ...]]]:
    """(users, targets, prefixes) of a split's sessions, in user order."""
    if split == "train":
        users = [u for u, s in enumerate(data.train) if len(s) >= 2]
        targets = [int(data.train[u][-1]) for u in users]
        prefixes = [tuple(int(i) for i in data.train[u][:-1]) for u in users]
        return np.asarray(users, dtype=np.int64), np.asarray(targets, dtype=np.int64), prefixes
    frame = data.targets.get(split)
    if frame is None or len(frame) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), []
    prefixes = [tuple(int(i) for i in p) for p in frame["prefix"]]
    users = frame["user"].to_numpy(np.int64, copy=True)
    return users, frame["target"].to_numpy(np.int64, copy=True), prefixes


def _random_unseen(rng: np.random.Generator, n_items: int, forbidden: np.ndarray, k: int) -> np.ndarray:
    """``k`` distinct uniform items outside ``forbidden`` (sorted, unique), or fewer if impossible."""
    free = np.setdiff1d(np.arange(n_items, dtype=np.int64), forbidden, assume_unique=True)
    return rng.choice(free, size=min(k, len(free)), replace=False)


def _build_split(ctx: _Context, split: str) -> DialogData:
    cfg, data, model = ctx.cfg, ctx.data, ctx.model
    started = time.perf_counter()
    users, targets, prefixes = _session_rows(data, split)
    histories = [p[-cfg.history_window :] if cfg.history_window > 0 else () for p in prefixes]
    n_neg = cfg.num_candidates - 1
    seeds = [session_seed(cfg.seed, split, int(u)) for u in users]

    negatives = np.zeros((len(users), n_neg), dtype=np.int64)
    covered = np.zeros(len(users), dtype=bool)
    top1 = np.zeros(len(users), dtype=np.int64)
    candidates = np.zeros((len(users), cfg.num_candidates), dtype=np.int64)
    for start in range(0, len(users), _CHUNK):
        stop = min(start + _CHUNK, len(users))
        scores = model.score(prefixes[start:stop])  # [chunk, n_items]
        rows = np.repeat(np.arange(stop - start), [len(p) for p in prefixes[start:stop]])
        cols = np.fromiter((i for p in prefixes[start:stop] for i in p), dtype=np.int64, count=len(rows))
        # Seen items get a huge finite penalty (not -inf) so that, if a user has seen almost
        # the whole catalogue, top-k falls back to seen items rather than to the target.
        masked = scores.clone()
        masked[torch.from_numpy(rows), torch.from_numpy(cols)] = -1e30
        top = masked.topk(cfg.num_candidates, dim=1).indices.numpy()
        tgt = targets[start:stop]
        covered[start:stop] = (top == tgt[:, None]).any(axis=1)
        if cfg.candidate_mode == "sasrec":
            masked[torch.arange(stop - start), torch.from_numpy(tgt)] = -torch.inf
            negatives[start:stop] = masked.topk(n_neg, dim=1).indices.numpy()
        else:
            for b in range(start, stop):
                rng = np.random.default_rng(session_seed(cfg.seed, split, int(users[b]), stream=1))
                forbidden = np.union1d(ctx.known[int(users[b])], [targets[b]])
                drawn = _random_unseen(rng, data.n_items, forbidden, n_neg)
                if len(drawn) < n_neg:
                    raise ValueError(f"user {users[b]} has fewer than {n_neg} never-interacted items")
                negatives[b] = drawn
        for b in range(start, stop):
            cands = np.append(negatives[b], targets[b])
            candidates[b] = cands[np.random.default_rng(seeds[b]).permutation(len(cands))]
        cand_scores = torch.gather(scores, 1, torch.from_numpy(candidates[start:stop]))
        top1[start:stop] = candidates[start:stop][np.arange(stop - start), cand_scores.argmax(1).numpy()]

    peers = ctx.peers(users, histories)
    sessions = [
        Session(
            session_id=j,
            user=int(users[j]),
            history=tuple(histories[j]),
            target=int(targets[j]),
            candidates=tuple(int(i) for i in candidates[j]),
            seed=seeds[j],
            sasrec_top1=int(top1[j]),
            peers=peers[j],
        )
        for j in range(len(users))
    ]
    alignment, skipped = _alignment(ctx, split, users) if split != "train" else ([], {})
    stats = _split_stats(ctx, sessions, covered, alignment, skipped)
    stats["build_seconds"] = time.perf_counter() - started
    dialog = DialogData(
        name=data.name,
        split=split,
        sessions=sessions,
        items=data.items,
        opinions=ctx.opinions,
        item_features=ctx.item_features,
        popularity=ctx.popularity,
        has_ratings=data.has_ratings,
        alignment=alignment,
        peer_k=cfg.peer_k,
        stats=stats,
    )
    dialog.summary = _split_summary(cfg, split, stats)
    return dialog


def _alignment(ctx: _Context, split: str, users: np.ndarray) -> tuple[list[AlignmentCase], dict[str, int]]:
    """Alignment cases for a seeded subset of the split's eligible users; skip counts by reason."""
    cfg, data = ctx.cfg, ctx.data
    skipped = {"few_liked": 0, "no_history": 0, "few_unseen": 0}
    if cfg.alignment_users <= 0 or len(users) == 0:
        return [], skipped
    drafts: list[tuple[int, tuple[int, ...], np.ndarray]] = []
    for user in np.unique(users):
        seq = np.asarray(data.train[user], dtype=np.int64)
        ratings = np.asarray(data.train_ratings[user], dtype=np.float64)
        liked = ratings >= 4 if data.has_ratings else np.ones(len(seq), dtype=bool)
        positives: list[int] = []
        for item in seq[liked][::-1]:  # most recent first, distinct items
            if int(item) not in positives:
                positives.append(int(item))
                if len(positives) == cfg.alignment_positives:
                    break
        if len(positives) < cfg.alignment_positives:
            skipped["few_liked"] += 1
            continue
        rest = seq[~np.isin(seq, positives)]
        if len(rest) == 0 or cfg.history_window <= 0:
            skipped["no_history"] += 1
            continue
        if data.n_items - len(ctx.known[user]) < cfg.alignment_negatives:
            skipped["few_unseen"] += 1
            continue
        drafts.append((int(user), tuple(int(i) for i in rest[-cfg.history_window :]), np.asarray(positives[::-1])))
    skipped["eligible"] = len(drafts)  # not a skip reason: reported next to them
    pick_rng = np.random.default_rng(session_seed(cfg.seed, split, 0, stream=3))
    if len(drafts) > cfg.alignment_users:
        chosen = np.sort(pick_rng.choice(len(drafts), size=cfg.alignment_users, replace=False))
        drafts = [drafts[i] for i in chosen]
    peers = ctx.peers(np.asarray([d[0] for d in drafts], dtype=np.int64), [d[1] for d in drafts])
    cases = []
    for (user, history, positives), user_peers in zip(drafts, peers):
        rng = np.random.default_rng(session_seed(cfg.seed, split, user, stream=2))
        negatives = _random_unseen(rng, data.n_items, ctx.known[user], cfg.alignment_negatives)
        items = np.concatenate([positives, negatives])
        labels = np.r_[np.ones(len(positives), np.int64), np.zeros(len(negatives), np.int64)]
        order = rng.permutation(len(items))
        cases.append(
            AlignmentCase(
                user=user,
                history=history,
                items=tuple(int(i) for i in items[order]),
                labels=tuple(int(v) for v in labels[order]),
                peers=user_peers,
            )
        )
    return cases, skipped


# ------------------------------------------------------------------------------ reporting


def _split_stats(
    ctx: _Context,
    sessions: list[Session],
    covered: np.ndarray,
    alignment: list[AlignmentCase],
    skipped: dict[str, int],
) -> dict[str, float]:
    n = len(sessions)
    weights = np.asarray([w for s in sessions for _, w in s.peers], dtype=np.float64)
    target_q = [any((p, s.target) in ctx.opinions for p, _ in s.peers) for s in sessions]
    stats: dict[str, float] = {
        "n_sessions": n,
        "sasrec_top20_coverage": float(covered.mean()) if n else 0.0,
        "sasrec_top1_hit": float(np.mean([s.sasrec_top1 == s.target for s in sessions])) if n else 0.0,
        "random_top1_hit": 1.0 / ctx.cfg.num_candidates,
        "peers_per_session": float(np.mean([len(s.peers) for s in sessions])) if n else 0.0,
        "peer_weight_mean": float(weights.mean()) if len(weights) else 0.0,
        "target_has_peer_opinion": float(np.mean(target_q)) if n else 0.0,
        "alignment_kept": len(alignment),
        "alignment_eligible": skipped.get("eligible", 0),
        "alignment_skipped": sum(v for k, v in skipped.items() if k != "eligible"),
    }
    for reason in ("few_liked", "no_history", "few_unseen"):
        if reason in skipped:
            stats[f"alignment_skipped_{reason}"] = skipped[reason]
    return stats


def _split_summary(cfg: DataConfig, split: str, stats: dict[str, float]) -> str:
    mode = {
        "sasrec": f"target + {cfg.num_candidates - 1} top-ranked unseen SASRec items",
        "random": f"target + {cfg.num_candidates - 1} random never-interacted items",
    }[cfg.candidate_mode]
    k = cfg.num_candidates
    lines = [
        f"split {split}: {int(stats['n_sessions']):,} sessions, history window {cfg.history_window}, "
        f"{k} candidates ({cfg.candidate_mode}: {mode})",
        f"  SASRec top-{k} (unseen items) contains the target in {stats['sasrec_top20_coverage']:.3f} "
        f"of sessions; SASRec top-1 among the candidates is the target in {stats['sasrec_top1_hit']:.3f} "
        f"(random: {stats['random_top1_hit']:.3f})",
        f"  peers: {stats['peers_per_session']:.1f} per session (n_peers {cfg.n_peers}, peer_k {cfg.peer_k}), "
        f"mean weight {stats['peer_weight_mean']:.3f}; a peer has an opinion on the target in "
        f"{stats['target_has_peer_opinion']:.3f} of sessions",
    ]
    if split != "train":
        lines.append(
            f"  alignment: {int(stats['alignment_kept'])} users kept (max {cfg.alignment_users}) of "
            f"{int(stats['alignment_eligible'])} eligible; {int(stats['alignment_skipped'])} skipped "
            f"({int(stats.get('alignment_skipped_few_liked', 0))} with < {cfg.alignment_positives} liked "
            f"training items, {int(stats.get('alignment_skipped_no_history', 0))} with no history left, "
            f"{int(stats.get('alignment_skipped_few_unseen', 0))} with < {cfg.alignment_negatives} unseen items)"
        )
    return "\n".join(lines)


def _describe(split_data: SplitData) -> str:
    from coars_env.data.sessions import describe

    return describe(split_data)


# --------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/coars/prepared``, or ``~/.cache/coars/prepared``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "coars" / "prepared"


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _prepare_fields(cfg: DataConfig) -> dict:
    """DataConfig fields that change the prepared splits (not paths, cache or display)."""
    out = asdict(cfg)
    for key in ("data_dir", "download", "sasrec", "shuffle_unordered", "cache_dir", "use_cache", "progress"):
        out.pop(key)
    return out


def _file_fingerprint(dataset: str, data_dir: str | os.PathLike | None) -> list:
    """(relative path, size, mtime) of every file in the dataset's folder, if it has one."""
    if dataset == "synthetic":
        return []
    from coars_env.data import resolve_data_root

    root = resolve_data_root(data_dir)
    folder = root / dataset
    if dataset.startswith("recbole:"):
        folder = Path(dataset.split(":", 1)[1]).expanduser()
        folder = folder if folder.is_absolute() or folder.is_dir() else root / folder
    if not folder.is_dir():
        return [str(folder), "missing"]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _source_fingerprint() -> str:
    """Hash of coars_env/data/*.py: a code change (loader, split, SASRec) invalidates caches."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def split_data_fingerprint(split_data: SplitData) -> str:
    """Content hash of a SplitData (sequences, ratings, targets, item count)."""
    digest = hashlib.sha256()
    digest.update(f"{split_data.name}|{split_data.n_items}|{split_data.n_users}|{split_data.has_ratings}".encode())
    for seq, ratings in zip(split_data.train, split_data.train_ratings):
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
        digest.update(np.asarray(ratings, dtype=np.float64).tobytes())
        digest.update(b"|")
    for name in sorted(split_data.targets):
        frame = split_data.targets[name]
        digest.update(name.encode())
        digest.update(frame["user"].to_numpy(np.int64).tobytes())
        digest.update(frame["target"].to_numpy(np.int64).tobytes())
        digest.update(repr(list(frame["prefix"])).encode())
    return digest.hexdigest()[:20]


def _load_pickle(path: Path, kind: type) -> object | None:
    """The object pickled at ``path`` if it loads and has type ``kind``, else None (warned)."""
    if not path.exists():
        return None
    try:
        with path.open("rb") as fh:
            obj = pickle.load(fh)
        if not isinstance(obj, kind):
            raise TypeError(f"expected {kind.__name__}, found {type(obj).__name__}")
        return obj
    except Exception as exc:  # corrupt, truncated or from an incompatible version: rebuild
        warnings.warn(f"cache file {path} unusable ({exc!r}); rebuilding it", stacklevel=3)
        return None
