"""SASRec: shapes, determinism, training data, persistence, and that it actually learns."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pandas as pd
import pytest
import torch

from coars_env.data.common import SplitData
from coars_env.data.sasrec import SASRec, SASRecConfig, ranking_metrics

TINY = SASRecConfig(
    hidden=16, blocks=1, heads=2, max_len=12, epochs=2, batch_size=16, seed=3, num_threads=1
)


def cyclic_split(n_users: int = 40, n_items: int = 30, length: int = 14, seed: int = 0) -> SplitData:
    """Every user walks the item cycle 0 -> 1 -> ... -> n_items-1 -> 0 from a random start.

    The next item is a deterministic function of the last one, so a working sequential
    model must rank it first; a popularity ranker cannot (all items are equally common).
    """
    rng = np.random.default_rng(seed)
    train, ratings, rows = [], [], {"valid": [], "test": []}
    for user in range(n_users):
        walk = (int(rng.integers(n_items)) + np.arange(length + 2)) % n_items
        train.append(walk[:length].astype(np.int64))
        ratings.append(np.full(length, 4.0))
        prefix = tuple(int(i) for i in walk[:length])
        rows["valid"].append((user, int(walk[length]), prefix))
        rows["test"].append((user, int(walk[length + 1]), prefix + (int(walk[length]),)))
    items = pd.DataFrame(
        {
            "raw_id": np.arange(n_items),
            "title": [f"Item {i}" for i in range(n_items)],
            "year": pd.array([pd.NA] * n_items, dtype="Int64"),
            "genres": "",
            "summary": "",
        }
    )
    targets = {k: pd.DataFrame(v, columns=["user", "target", "prefix"]) for k, v in rows.items()}
    return SplitData(
        name="cyclic", items=items, users=pd.DataFrame({"raw_id": np.arange(n_users)}),
        train=train, train_ratings=ratings, targets=targets, has_ratings=True, has_timestamps=True,
    )


def weights(model: SASRec) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.net.state_dict().items()}


def test_shapes_and_empty_prefix() -> None:
    split = cyclic_split()
    model = SASRec(split.n_items, TINY).fit(split, progress=False)
    prefixes = [[1, 2, 3], [5], [], list(range(30))]
    scores, reps = model.score(prefixes), model.encode(prefixes)
    assert scores.shape == (4, split.n_items) and scores.dtype == torch.float32
    assert reps.shape == (4, TINY.hidden)
    assert model.item_embeddings().shape == (split.n_items, TINY.hidden)
    assert torch.isfinite(scores).all() and torch.isfinite(reps).all()
    assert torch.count_nonzero(reps[2]) == 0  # empty prefix: zero representation, no NaN
    # A prefix longer than max_len reads only its last max_len items.
    assert torch.allclose(model.score([list(range(30))]), model.score([list(range(30))[-TINY.max_len :]]))
    # Batched inference equals one-by-one inference.
    single = torch.cat([model.score([p]) for p in prefixes])
    assert torch.allclose(scores, single, atol=1e-5)
    assert len(model.losses) == TINY.epochs


def test_deterministic_and_leaves_global_rng_alone() -> None:
    split = cyclic_split()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = SASRec(split.n_items, TINY).fit(split, progress=False)
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream untouched
    b = SASRec(split.n_items, TINY).fit(split, progress=False)
    c = SASRec(split.n_items, SASRecConfig(**{**TINY.__dict__, "seed": 4})).fit(split, progress=False)
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a.losses == b.losses


def test_shuffled_sequences_deterministic_and_different() -> None:
    split = cyclic_split()
    shuffled = SASRecConfig(**{**TINY.__dict__, "shuffle_sequences": True})
    a = SASRec(split.n_items, shuffled).fit(split, progress=False)
    b = SASRec(split.n_items, shuffled).fit(split, progress=False)
    plain = SASRec(split.n_items, TINY).fit(split, progress=False)
    assert a.losses == b.losses and a.losses != plain.losses


def test_trains_on_training_sequences_only() -> None:
    split = cyclic_split()
    other = cyclic_split()
    # Scramble validation/test targets: training must not notice.
    for frame in other.targets.values():
        frame["target"] = (frame["target"] + 7) % other.n_items
    a = SASRec(split.n_items, TINY).fit(split, progress=False)
    b = SASRec(other.n_items, TINY).fit(other, progress=False)
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_both_losses_learn_a_deterministic_sequence() -> None:
    split = cyclic_split(n_users=60, n_items=30, length=14)
    test = split.targets["test"]
    for loss in ("bce", "ce"):
        cfg = SASRecConfig(
            hidden=32, blocks=1, heads=1, max_len=12, epochs=30, batch_size=32, loss=loss,
            dropout=0.1, num_threads=1,
        )
        model = SASRec(split.n_items, cfg).fit(split, progress=False)
        prefixes = list(test["prefix"])
        # Seen items are excluded, as in every evaluation here (SASRec's shared input/output
        # embeddings make the current item score high, and it is never a sampled negative).
        got = ranking_metrics(model.score(prefixes), test["target"].tolist(), prefixes, k=1)
        # A popularity ranker gets ~1/16 here; the cycle makes the next item predictable.
        assert got["HR@1"] >= 0.8, (loss, got)


def test_save_load_roundtrip_and_corrupt_file(tmp_path) -> None:
    split = cyclic_split()
    model = SASRec(split.n_items, TINY).fit(split, progress=False)
    path = tmp_path / "model.pt"
    model.save(path)
    again = SASRec.load(path)
    prefixes = [[1, 2, 3], [7, 8]]
    assert torch.equal(model.score(prefixes), again.score(prefixes))
    assert again.cfg == model.cfg and again.losses == model.losses
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind
    path.write_bytes(b"not a checkpoint")
    with pytest.raises((pickle.UnpicklingError, RuntimeError, EOFError)):
        SASRec.load(path)


def test_ranking_metrics_exact() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.1],  # target 2 ranks 3rd; item 0 excluded -> 2nd
            [0.1, 0.2, 0.3, 0.4],  # target 3 ranks 1st
            [0.5, 0.5, 0.5, 0.5],  # ties count against the target: rank 4
        ]
    )
    got = ranking_metrics(scores, [2, 3, 1], [[0], [3], []], k=2)
    # Row 1 lists its own target as seen (repeat consumption): the target is never masked.
    assert got["HR@2"] == pytest.approx(2 / 3)
    assert got["NDCG@2"] == pytest.approx((1 / np.log2(3) + 1.0) / 3)


def popularity_scores(split: SplitData, n_rows: int) -> torch.Tensor:
    counts = np.bincount(np.concatenate(split.train), minlength=split.n_items).astype(np.float32)
    # Tiny tie-breaker by item index so the baseline is a strict ranking, not pessimistic ties.
    counts += np.linspace(0, 1e-3, split.n_items, dtype=np.float32)
    return torch.from_numpy(np.tile(counts, (n_rows, 1)))


# Measured (seed 0, 25 epochs, 1 thread; 80-137 s of training on the shared 2-core dev box
# at load 6-7, so ~1 minute on an idle one): SASRec test HR@10 = 0.137, NDCG@10 = 0.068;
# popularity HR@10 = 0.084 (+0.053). The assertion asks for popularity + 0.02.
ML100K_MARGIN = 0.02


@pytest.mark.slow
def test_sasrec_beats_popularity_on_ml100k(data_dir) -> None:
    from coars_env.data import load_interactions
    from coars_env.data.sessions import split_leave_one_out

    split = split_leave_one_out(load_interactions("ml-100k", data_dir), k_core=5, seed=0)
    test = split.targets["test"]
    prefixes = list(test["prefix"])
    started = time.perf_counter()
    model = SASRec(split.n_items, SASRecConfig(epochs=25, seed=0, num_threads=1)).fit(split, progress=False)
    seconds = time.perf_counter() - started
    ours = ranking_metrics(model.score(prefixes), test["target"].tolist(), prefixes, k=10)
    pop = ranking_metrics(popularity_scores(split, len(test)), test["target"].tolist(), prefixes, k=10)
    print(f"ml-100k: SASRec {ours} vs popularity {pop} ({seconds:.0f} s training)")
    assert ours["HR@10"] >= pop["HR@10"] + ML100K_MARGIN
