"""Pure split helpers: long-tail class counts, stratified subsampling and splitting.

Randomness only comes from the ``np.random.Generator`` passed in (or made by
:func:`split_rng` from a seed and a purpose tag); the global NumPy and torch generators
are never seeded or drawn from.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = [
    "allocate",
    "long_tail_counts",
    "split_rng",
    "stratified_holdout",
    "stratified_sample",
    "subsample_per_class",
]

#: relative slack added before flooring so that e.g. ``100 * 0.29`` floors to 29, not 28
_EPS = 1e-9


def split_rng(seed: int, purpose: str) -> np.random.Generator:
    """A generator for one step of the split, independent of the other steps.

    Each step (class order, test holdout, validation split, ...) gets its own stream from
    ``(seed, crc32(purpose))``, so that changing one option (say ``val_fraction``) does not
    change the random choices of the other steps.
    """
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF,
                                  zlib.crc32(purpose.encode())])


def long_tail_counts(available: Sequence[int], ratio: float, profile: str, order: np.ndarray) -> np.ndarray:
    """Per-class sample counts of a long-tailed subset.

    The class at rank ``r`` (``order[r]``; rank 0 is the head, ``C-1`` the tail) gets

    * ``exp``: ``floor(n_max * ratio ** (-r / (C - 1)))``,
    * ``step``: ``n_max`` for the first ``ceil(C / 2)`` ranks, ``floor(n_max / ratio)`` for the rest,

    with ``n_max = max(available)``; each count is then clipped to the class's availability
    and raised to at least 1 (unless the class has no sample at all).

    Args:
        available: samples available per class id.
        ratio: head-to-tail ratio, at least 1.
        profile: ``"exp"`` or ``"step"``.
        order: permutation of the class ids; ``order[r]`` is the class at rank ``r``.

    Returns:
        int64 array of counts, indexed by class id.
    """
    available = np.asarray(available, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    c = len(available)
    if available.ndim != 1 or c == 0:
        raise ValueError("available must be a non-empty 1-D sequence")
    if sorted(order.tolist()) != list(range(c)):
        raise ValueError(f"order must be a permutation of 0..{c - 1}, got {order.tolist()}")
    if not ratio >= 1 or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a finite number >= 1, got {ratio}")
    if (available < 0).any():
        raise ValueError("available counts must be >= 0")
    n_max = int(available.max())
    ranks = np.arange(c)
    if profile == "exp":
        exponent = -ranks / (c - 1) if c > 1 else np.zeros(c)
        target = np.floor(n_max * np.power(float(ratio), exponent) * (1 + _EPS))
    elif profile == "step":
        target = np.where(ranks < math.ceil(c / 2), n_max, math.floor(n_max / ratio * (1 + _EPS)))
    else:
        raise ValueError(f"profile must be 'exp' or 'step', got {profile!r}")
    counts = np.empty(c, dtype=np.int64)
    counts[order] = target.astype(np.int64)
    return np.minimum(np.maximum(counts, 1), available)


def allocate(total: int, sizes: np.ndarray, caps: np.ndarray | None = None) -> np.ndarray:
    """Split ``total`` over groups proportionally to ``sizes`` (largest remainder), at most ``caps``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    caps = sizes.copy() if caps is None else np.minimum(np.asarray(caps, dtype=np.int64), sizes)
    n = int(sizes.sum())
    total = int(min(total, caps.sum()))
    if n == 0 or total <= 0:
        return np.zeros(len(sizes), dtype=np.int64)
    quota = sizes * (total / n)
    out = np.minimum(np.floor(quota + _EPS).astype(np.int64), caps)
    while out.sum() < total:  # hand out the rest by largest remainder, skipping full groups
        room = out < caps
        remainder = np.where(room, quota - out, -np.inf)
        k = min(int(total - out.sum()), int(room.sum()))
        best = np.argsort(-remainder, kind="stable")[:k]
        out[best] += 1
    return out


def _groups(labels: np.ndarray | None, n: int) -> list[np.ndarray]:
    if labels is None:
        return [np.arange(n)]
    labels = np.asarray(labels)
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def stratified_holdout(labels: np.ndarray | None, fraction: float, rng: np.random.Generator,
                       n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..N-1`` into kept and held-out parts, stratified by label.

    ``round(fraction * N)`` samples are held out, spread over the classes proportionally
    (largest remainder); a class never loses its last sample to the held-out part.
    With ``labels=None`` (then give ``n``) the split is uniform.

    Returns:
        ``(kept, held)``: sorted int64 position arrays.
    """
    n = len(labels) if labels is not None else int(n)
    groups = _groups(labels, n)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    caps = np.maximum(sizes - 1, 0) if labels is not None else sizes
    counts = allocate(round(fraction * n), sizes, caps)
    held = [rng.permutation(g)[:k] for g, k in zip(groups, counts)]
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(n), held, assume_unique=True)
    return kept.astype(np.int64), held.astype(np.int64)


def stratified_sample(labels: np.ndarray | None, size: int, rng: np.random.Generator,
                      n: int | None = None) -> np.ndarray:
    """``size`` positions out of ``0..N-1`` keeping the class proportions (sorted int64 array)."""
    n = len(labels) if labels is not None else int(n)
    if size >= n:
        return np.arange(n, dtype=np.int64)
    groups = _groups(labels, n)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    counts = allocate(size, sizes, sizes)
    picked = [rng.permutation(g)[:k] for g, k in zip(groups, counts)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def subsample_per_class(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions of a random subset with ``counts[c]`` samples of class ``c`` (sorted int64 array)."""
    labels = np.asarray(labels)
    picked = []
    for c, k in enumerate(np.asarray(counts).tolist()):
        members = np.flatnonzero(labels == c)
        if k > len(members):
            raise ValueError(f"class {c} has {len(members)} samples, {k} requested")
        picked.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, dtype=np.int64)
