"""Which samples: class-stratified subsets of a split, and client partitions (iid, dirichlet, shards).

Pure index arithmetic on label arrays, shared by image and text datasets: nothing here reads
files, trains, touches the simulated clock or prints. Every random draw comes from a
``simulator.rng`` keyed generator the caller passes in or (for ``partition``) from
``generator(seed, "data", "partition", kind)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from simulator.lazy import lazy_module
from simulator.rng import generator

torch = lazy_module("torch")  # imported on first use: sflsim validate reads this module without torch

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards")
# Dirichlet partitions are re-drawn until every client has min_size samples, at most this often.
DIRICHLET_MAX_ATTEMPTS = 1000


# --------------------------------------------------------------------------------------------
# Subsets of a split (train_limit / test_limit) and the validation split (data.validation)
# --------------------------------------------------------------------------------------------
def stratified_subset(labels: np.ndarray, limit: int, rng: np.random.Generator,
                      every_class: bool = False) -> np.ndarray:
    """Sorted indices of `limit` samples keeping class proportions (largest-remainder rounding).

    Within a class the samples are drawn uniformly without replacement. Returns all indices
    when `limit` >= len(labels). ``every_class``: every class present in ``labels`` gets at
    least one sample (taken from the classes with the most; ValueError when ``limit`` is
    smaller than the number of classes); the draws are the same as without it whenever
    proportional rounding already gives every class one.
    """
    n = labels.size
    if limit >= n:
        return np.arange(n, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    if every_class and limit < classes.size:
        raise ValueError(f"{limit} samples cannot hold one of each of the {classes.size} classes")
    quota = counts * (limit / n)
    take = np.floor(quota).astype(np.int64)
    short = limit - int(take.sum())
    # Ties in the remainder go to the lower class index (stable sort).
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    if every_class:
        for k in np.flatnonzero(take == 0):
            take[int(np.argmax(take))] -= 1  # the largest share gives one up (lowest class index on ties)
            take[k] = 1
    picks = [
        rng.choice(np.flatnonzero(labels == k), size=int(t), replace=False)
        for k, t in zip(classes, take)
        if t > 0
    ]
    return np.sort(np.concatenate(picks)).astype(np.int64)


class ValidationSplitError(ValueError):
    """A validation split that cannot be drawn from these labels (too many or too few samples);
    the runner reports it as a ``ScenarioError`` on ``data.validation``."""


def validation_size(asked, n: int) -> int:
    """Samples a ``data.validation`` of ``asked`` holds out of ``n`` training samples: an integer
    as it is, a fraction in (0, 1) of ``n`` rounded half up."""
    if isinstance(asked, (bool, np.bool_)) or not isinstance(asked, (int, np.integer, float)):
        raise ValidationSplitError(f"expected a number of samples or a fraction in (0, 1), got {asked!r}")
    if isinstance(asked, (int, np.integer)):
        if asked < 1:
            raise ValidationSplitError(f"expected at least 1 sample, got {asked}")
        return int(asked)
    if not 0.0 < asked < 1.0:
        raise ValidationSplitError(f"a fraction must lie in (0, 1), got {asked!r}")
    return int(math.floor(asked * n + 0.5))


def hold_out(labels: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held): sorted indices of the samples left for training and of ``size`` held out.

    The held-out samples are a class-stratified draw (``stratified_subset`` with every class
    present: proportional per class, largest-remainder rounding, uniform within a class).
    ``ValidationSplitError`` when ``size`` is smaller than the number of classes, or leaves no
    sample of some class (or none at all) for training.
    """
    y = np.asarray(labels)
    n = int(y.size)
    classes, counts = np.unique(y, return_counts=True)
    if size < classes.size:
        raise ValidationSplitError(f"{size:,} samples cannot hold one of each of the {classes.size} classes; "
                                   f"give at least {classes.size}")
    if size >= n:
        raise ValidationSplitError(f"{size:,} samples would leave none of the {n:,} training samples for the "
                                   f"clients; give fewer than {n:,}")
    held = stratified_subset(y, size, rng, every_class=True)
    left = counts - np.array([int(np.count_nonzero(y[held] == k)) for k in classes])
    empty = [int(k) for k, c in zip(classes, left) if c == 0]
    if empty:
        raise ValidationSplitError(f"{size:,} of the {n:,} training samples would take every training sample of "
                                   f"class(es) {', '.join(map(str, empty[:10]))} (the split holds each class in "
                                   "proportion, and at least one of each); give fewer")
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask).astype(np.int64), held


def check_limit(key: str, limit: Optional[int]) -> None:
    """A train_limit / test_limit is None or a positive integer (ValueError naming ``key``)."""
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1
    ):
        raise ValueError(f"{key} must be a positive integer or None, got {limit!r}")


# --------------------------------------------------------------------------------------------
# Client partitions
# --------------------------------------------------------------------------------------------
def _as_labels(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError("labels must be non-negative")
    return arr.astype(np.int64, copy=False)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def partition(
    labels: np.ndarray,
    num_clients: int,
    kind: str,
    *,
    seed: int,
    alpha: Optional[float] = None,
    shards_per_client: Optional[int] = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split sample indices among clients; returns sorted, disjoint int64 arrays covering all.

    kind:
      ``iid``        shuffle, then split into nearly equal parts (sizes differ by at most 1).
      ``dirichlet``  per class, proportions ~ Dir(alpha) over clients; a client already above
                     the mean size gets no more (the NIID-Bench / FedLab recipe, Li et al.
                     2022, after Hsu et al. 2019); re-drawn until every client has min_size
                     samples, at most DIRICHLET_MAX_ATTEMPTS times.
      ``shards``     shuffle, stable-sort by label, cut into num_clients * shards_per_client
                     nearly equal contiguous shards, give each client shards_per_client random
                     shards (McMahan et al. 2017). A shard holds one label unless it spans a
                     class boundary, and at most num_classes - 1 shards do.
    ``alpha`` is used only by dirichlet and ``shards_per_client`` only by shards; they are
    ignored otherwise. Draws come from ``generator(seed, "data", "partition", kind)``.
    """
    y = _as_labels(labels)
    n = y.size
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if kind not in PARTITIONS:
        raise ValueError(f"unknown partition kind {kind!r}; known: {', '.join(PARTITIONS)}")
    if not _is_int(min_size) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative integer, got {min_size!r}")
    if n < num_clients * max(min_size, 1):
        raise ValueError(
            f"cannot give {num_clients} clients at least {max(min_size, 1)} sample(s) each "
            f"from {n} samples"
        )
    rng = generator(seed, "data", "partition", kind)

    if kind == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif kind == "dirichlet":
        if alpha is None or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"dirichlet partition needs a finite alpha > 0, got {alpha!r}")
        parts = _dirichlet(y, num_clients, float(alpha), min_size, rng)
    else:
        if not _is_int(shards_per_client) or shards_per_client < 1:
            raise ValueError(
                f"shards partition needs shards_per_client >= 1, got {shards_per_client!r}"
            )
        num_shards = num_clients * int(shards_per_client)
        if num_shards > n:
            raise ValueError(
                f"{num_clients} clients x {shards_per_client} shards = {num_shards} shards "
                f"but only {n} samples"
            )
        shuffled = rng.permutation(n)
        by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
        shards = np.array_split(by_label, num_shards)
        order = rng.permutation(num_shards)
        s = int(shards_per_client)
        parts = [
            np.concatenate([shards[j] for j in order[i * s : (i + 1) * s]])
            for i in range(num_clients)
        ]

    out = [np.sort(p).astype(np.int64) for p in parts]
    small = [i for i, p in enumerate(out) if p.size < min_size]
    if small:
        raise ValueError(
            f"{kind} partition left client(s) {small[:10]} with fewer than {min_size} samples"
        )
    return out


def _dirichlet(
    y: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    n = y.size
    by_class = [np.flatnonzero(y == k) for k in np.unique(y)]
    smallest = 0
    for _attempt in range(DIRICHLET_MAX_ATTEMPTS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            # Clients already holding more than an equal share get nothing more of this class.
            p = p * (sizes < n / num_clients)
            total = p.sum()
            if not total > 0:  # every weight underflowed: fall back to the open clients
                p = (sizes < n / num_clients).astype(np.float64)
                total = p.sum()
            cuts = (np.cumsum(p / total) * idx.size).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(idx, cuts)):
                buckets[j].append(piece)
                sizes[j] += piece.size
        smallest = int(sizes.min())
        if smallest >= min_size:
            return [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
    raise ValueError(
        f"dirichlet partition (alpha={alpha}, {num_clients} clients, {n} samples) left some "
        f"client with fewer than min_size={min_size} samples in {DIRICHLET_MAX_ATTEMPTS} "
        f"draws (last smallest client: {smallest}); use a larger alpha, fewer clients or a "
        "smaller min_size"
    )


def label_histogram(labels, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) int64 counts of each label in each client's part."""
    y = _as_labels(labels)
    if y.size and y.max() >= num_classes:
        raise ValueError(f"labels go up to {y.max()} but num_classes is {num_classes}")
    if not parts:
        return np.zeros((0, num_classes), dtype=np.int64)
    return np.stack(
        [np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts]
    ).astype(np.int64)
