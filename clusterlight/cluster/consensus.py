"""Consensus of several clusterings of the same points: alignment, majority vote, agreement.

An ensemble of clusterers names its clusters arbitrarily: cluster 3 of one member may be cluster 7
of another. The functions here put every member into one label space and combine the votes.

- :func:`align_labelings` -- maps each member's labels onto a pivot member's labels, one-to-one,
  with the Hungarian algorithm on their co-occurrence counts. Ground truth is never involved.
- :func:`align_to` -- the same onto any reference labelling (e.g. the current vote).
- :func:`consensus` -- align to the pivot, vote, then re-align every member to the vote
  (``iters`` times): the reference no longer depends on one member's mistakes.
- :func:`vote` -- the majority label of each point and the fraction of members that cast it.
- :func:`select_agreed` -- the points whose majority reaches an agreement threshold.
- :func:`consensus_responsibilities` -- the same for soft partitions: each member's
  responsibilities are relabelled to the consensus vote of their argmaxes and averaged.

Conventions: a labelling is an integer array ``[M, N]`` (M members, N points) with values in
``[0, K)``, or ``-1`` for a point a member leaves unassigned (HDBSCAN noise). Unassigned points
cast no vote and stay ``-1`` after alignment; agreement fractions divide by M, so an abstention
counts against agreement. Inputs may be numpy arrays, lists or tensors; outputs are numpy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["align_labelings", "align_to", "consensus", "consensus_responsibilities", "select_agreed", "vote",
           "vote_counts"]


def _as_labelings(labelings: Any) -> np.ndarray:
    if hasattr(labelings, "detach"):
        labelings = labelings.detach().cpu().numpy()
    lab = np.asarray(labelings)
    if lab.ndim != 2:
        raise ValueError(f"labelings must be a 2-D array [members, points], got shape {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer) and not np.all(lab == np.round(lab)):
        raise ValueError("labelings must hold integer labels")
    lab = lab.astype(np.int64, copy=False)
    if lab.size and lab.min() < -1:
        raise ValueError("labelings may only use -1 for unassigned points")
    return lab


def _check_k(lab: np.ndarray, k: int) -> int:
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if lab.size and lab.max() >= k:
        raise ValueError(f"labelings contain label {int(lab.max())} but k is {k}")
    return k


def _matching(labels: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Permutation ``p`` of ``[0, K)`` maximising the points with ``p[labels] == reference``."""
    both = (labels >= 0) & (reference >= 0)
    counts = np.bincount(labels[both] * k + reference[both], minlength=k * k).reshape(k, k)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.empty(k, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def _apply(labels: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    return np.where(labels >= 0, mapping[np.clip(labels, 0, None)], -1)


def align_to(labelings: Any, reference: Any, k: int) -> np.ndarray:
    """Relabel every row of ``labelings`` ``[M, N]`` one-to-one to best agree with ``reference`` ``[N]``.

    The mapping of each member is the Hungarian assignment on the ``K x K`` co-occurrence counts of
    its labels and the reference's (points unassigned in either are left out of the counts).
    ``-1`` stays ``-1``.
    """
    lab = _as_labelings(labelings)
    ref = _as_labelings(np.asarray(reference).reshape(1, -1))[0]
    if ref.shape[0] != lab.shape[1]:
        raise ValueError(f"reference has {ref.shape[0]} points, labelings {lab.shape[1]}")
    k = _check_k(np.concatenate([lab.reshape(-1), ref]), k)
    return np.stack([_apply(row, _matching(row, ref, k)) for row in lab]) if len(lab) else lab.copy()


def align_labelings(labelings: Any, k: int, pivot: int = 0) -> np.ndarray:
    """Put every member's labels into the label space of member ``pivot``.

    Args:
        labelings: ``[M, N]`` integer labels in ``[0, K)`` or ``-1`` (unassigned).
        k: the number of clusters K.
        pivot: the member whose labels are kept as they are.

    Returns:
        ``[M, N]`` int64 array; row ``pivot`` is unchanged, every other row is a one-to-one
        relabelling of the input row (Hungarian matching on co-occurrence counts with the pivot);
        ``-1`` stays ``-1``.
    """
    lab = _as_labelings(labelings)
    k = _check_k(lab, k)
    if not -len(lab) <= pivot < len(lab):
        raise ValueError(f"pivot {pivot} out of range for {len(lab)} members")
    return align_to(lab, lab[pivot], k)


def vote_counts(aligned: Any, k: int | None = None) -> np.ndarray:
    """``[N, K]`` number of members voting for each label (unassigned members do not vote)."""
    lab = _as_labelings(aligned)
    m, n = lab.shape
    k = int(lab.max()) + 1 if k is None and lab.size else int(k or 1)
    k = max(k, 1)
    _check_k(lab, k)
    valid = lab >= 0
    flat = (np.broadcast_to(np.arange(n), (m, n)) * k + lab)[valid]
    return np.bincount(flat, minlength=n * k).reshape(n, k)


def vote(aligned: Any, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote of aligned labelings.

    Args:
        aligned: ``[M, N]`` labels in one label space (see :func:`align_labelings`), ``-1`` = no vote.
        k: number of labels (default: the largest label + 1).

    Returns:
        ``(labels, agreement)``: ``labels[i]`` is the most voted label of point ``i`` (ties go to the
        smallest label; ``-1`` when no member voted), ``agreement[i]`` the fraction of all M members
        that voted for it (float64 in [0, 1]).
    """
    lab = _as_labelings(aligned)
    m, n = lab.shape
    if m == 0:
        raise ValueError("vote needs at least one member")
    counts = vote_counts(lab, k)
    top = counts.max(axis=1) if counts.shape[1] else np.zeros(n, dtype=np.int64)
    labels = counts.argmax(axis=1).astype(np.int64) if counts.shape[1] else np.full(n, -1, dtype=np.int64)
    labels[top == 0] = -1
    return labels, top / m


def select_agreed(aligned: Any, threshold: float = 1.0) -> np.ndarray:
    """Points whose majority label has at least ``threshold`` of the M members' votes.

    ``threshold=1`` keeps the points on which every member agrees (and none abstains); ``0.5`` keeps
    strict-or-tied majorities of half the ensemble. A point nobody voted for is never selected.
    Returns a bool array ``[N]``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    lab = _as_labelings(aligned)
    m = lab.shape[0]
    counts = vote_counts(lab)
    top = counts.max(axis=1) if counts.shape[1] else np.zeros(lab.shape[1], dtype=np.int64)
    # integer comparison: top / m >= threshold, without rounding trouble at e.g. 5/6
    needed = int(np.ceil(threshold * m - 1e-9))
    return (top >= max(needed, 1))


def consensus(labelings: Any, k: int, pivot: int = 0, iters: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Align to ``pivot``, vote, then ``iters`` times re-align every member to the vote and re-vote.

    Returns ``(aligned, labels, agreement)`` of the last round. With ``iters=0`` this is plain
    pivot alignment. The label space stays the pivot's: the vote is taken in it and re-alignment to
    the vote is one-to-one, so a fixed point is reached quickly.
    """
    aligned = align_labelings(labelings, k, pivot)
    labels, agreement = vote(aligned, k)
    for _ in range(max(0, int(iters))):
        new = align_to(labelings, labels, k)
        if np.array_equal(new, aligned):
            break
        aligned = new
        labels, agreement = vote(aligned, k)
    return aligned, labels, agreement


def consensus_responsibilities(resps: Any, iters: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Average soft partitions of the same points after putting them in one label space.

    Args:
        resps: ``[M, N, K]`` responsibilities (rows sum to 1) of M members.
        iters: re-alignment rounds of :func:`consensus` on the members' argmax labels (pivot 0).

    Returns:
        ``(resp, agreement)``: ``resp`` ``[N, K]`` the mean over members of each member's columns
        permuted by the one-to-one map that best aligns its argmax labels with the consensus vote
        (member 0's label space), and ``agreement`` ``[N]`` the fraction of members whose aligned
        argmax is the vote. A member's column that no point takes as argmax is mapped to a label
        left over by the matching (the Hungarian assignment is on all K labels).
    """
    if hasattr(resps, "detach"):
        resps = resps.detach().cpu().numpy()
    r = np.asarray(resps, dtype=np.float64)
    if r.ndim != 3 or r.shape[0] < 1 or r.shape[2] < 1:
        raise ValueError(f"resps must be a [members, points, clusters] array, got shape {r.shape}")
    k = r.shape[2]
    labels = r.argmax(axis=2)
    _, vote_labels, agreement = consensus(labels, k, pivot=0, iters=iters)
    out = np.zeros(r.shape[1:], dtype=np.float64)
    for member, lab in zip(r, labels):
        mapping = _matching(lab, vote_labels, k)  # member's label -> consensus label
        out[:, mapping] += member
    return out / len(r), agreement
