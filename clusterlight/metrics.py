"""Clustering metrics: a functional core and a DDP-safe torchmetrics ``Metric``.

Conventions used throughout
---------------------------
* ``pred`` holds cluster ids in ``[0, K)``, ``target`` holds class ids in ``[0, C)``.
  The number of clusters ``K`` may be larger or smaller than the number of classes ``C``.
* Clusters are matched to classes one-to-one with the Hungarian algorithm on the
  rectangular ``K x C`` count matrix (maximising the number of correctly matched
  samples). With ``K > C`` the surplus clusters stay unmatched (mapped to ``-1``) and all
  their samples count as errors; with ``K < C`` some classes get no cluster at all.
* The functional helpers accept tensors, numpy arrays or lists (``torch.as_tensor``),
  work on CPU and return Python floats (or CPU tensors where a vector is returned).
  Empty inputs give ``nan``.

The :class:`ClusteringMetrics` metric collects ``(pred, target, index, is_ood, score)``
over an epoch and computes everything at once. Under DDP the ``DistributedSampler``
pads the dataset with duplicated samples; :meth:`ClusteringMetrics.compute`
removes them by dataset ``index`` after the states are gathered.

Notes on torchmetrics (1.9) quirks handled here
-----------------------------------------------
* ``normalized_mutual_info_score`` returns ``0`` when both labelings consist of a single
  cluster (e.g. one class and full collapse); scikit-learn defines that case as ``1``
  (identical partitions). :func:`normalized_mutual_info` follows scikit-learn.
* ``binary_auroc`` treats float scores outside ``[0, 1]`` as logits and applies a
  sigmoid, which saturates in float32 and turns distinct large scores into ties
  (scores ``50, 60, 70, 80`` give 0.5 instead of 0.75). :func:`ood_auroc` therefore
  passes dense ranks scaled to ``[0, 1]``, which preserve order and ties exactly.
  With a single class present it returns ``0`` with a warning; we return ``nan``.
* The clustering functionals build a sparse tensor and make torch emit a
  "Sparse invariant checks are implicitly disabled" warning; it is silenced here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.functional.clustering import (
    adjusted_rand_score,
    normalized_mutual_info_score,
)
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "OODAUROC",
    "ClusterKL",
    "ClusteringMetrics",
    "MatchedAccuracy",
    "TailAccuracy",
    "adjusted_rand_index",
    "cluster_kl",
    "confusion_after_matching",
    "contingency",
    "group_accuracy",
    "match_clusters",
    "matched_accuracy",
    "normalized_mutual_info",
    "ood_auroc",
    "per_class_recall",
]

KL_EPS = 1e-8
"""Mass added to every bin (then renormalised) before the size-profile KL divergence."""


# --------------------------------------------------------------------------- helpers
def _labels(x: Any, name: str) -> Tensor:
    """Return ``x`` as a flat int64 CPU tensor, rejecting non-integral values."""
    t = torch.as_tensor(x).detach().cpu().reshape(-1)
    if t.dtype == torch.bool:
        return t.long()
    if t.is_floating_point() and t.numel() and not bool(torch.all(t == torch.round(t))):
        raise ValueError(f"{name} must hold integer labels")
    return t.long()


def _pair(pred: Any, target: Any) -> tuple[Tensor, Tensor]:
    """Convert and check a ``(pred, target)`` pair of equal length."""
    p, t = _labels(pred, "pred"), _labels(target, "target")
    if p.numel() != t.numel():
        raise ValueError(f"pred and target differ in length: {p.numel()} vs {t.numel()}")
    return p, t


def _size(labels: Tensor, given: int | None, name: str) -> int:
    """Number of label values: ``given`` (checked to cover ``labels``) or ``max + 1``."""
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{name} contains negative labels")
    top = int(labels.max()) + 1 if labels.numel() else 0
    if given is None:
        return top
    if given < top:
        raise ValueError(f"{name} contains label {top - 1} but only {given} values were declared")
    return int(given)


# --------------------------------------------------------------------------- functional core
def contingency(
    pred: Any, target: Any, num_clusters: int | None = None, num_classes: int | None = None
) -> Tensor:
    """Count matrix ``M[k, c]``: samples in cluster ``k`` with class ``c`` (int64, ``K x C``).

    ``num_clusters``/``num_classes`` default to ``max label + 1``; labels must be non-negative.
    """
    p, t = _pair(pred, target)
    k = _size(p, num_clusters, "pred")
    c = _size(t, num_classes, "target")
    return torch.bincount(p * c + t, minlength=k * c).reshape(k, c)


def _match_counts(counts: Tensor) -> Tensor:
    """Hungarian matching on a ``K x C`` count matrix: cluster -> class, ``-1`` if unmatched."""
    mapping = torch.full((counts.shape[0],), -1, dtype=torch.long)
    if counts.numel():
        rows, cols = linear_sum_assignment(counts.numpy(), maximize=True)
        mapping[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return mapping


def match_clusters(
    pred: Any, target: Any, num_clusters: int | None = None, num_classes: int | None = None
) -> Tensor:
    """One-to-one cluster -> class matching maximising the number of agreeing samples.

    Returns a LongTensor ``mapping`` of length ``K`` with ``mapping[k]`` the class matched to
    cluster ``k`` or ``-1`` when ``k`` is unmatched (only possible when ``K > C``).
    Uses ``scipy.optimize.linear_sum_assignment(counts, maximize=True)`` on the rectangular
    count matrix of :func:`contingency`.
    """
    return _match_counts(contingency(pred, target, num_clusters, num_classes))


def matched_accuracy(pred: Any, target: Any) -> float:
    """Clustering accuracy: fraction of samples whose Hungarian-matched cluster equals the class."""
    counts = contingency(pred, target)
    n = int(counts.sum())
    if n == 0:
        return math.nan
    mapping = _match_counts(counts)
    hit = mapping >= 0
    rows = torch.arange(counts.shape[0])[hit]
    return float(counts[rows, mapping[hit]].sum()) / n


def per_class_recall(
    pred: Any, target: Any, num_classes: int, num_clusters: int | None = None
) -> Tensor:
    """Recall of every class after Hungarian matching (float64 tensor of length ``num_classes``).

    ``recall[c]`` is the fraction of class-``c`` samples that fall in the cluster matched to
    ``c`` (0 when no cluster is matched to ``c``); ``nan`` for classes absent from ``target``.
    """
    counts = contingency(pred, target, num_clusters, num_classes)
    mapping = _match_counts(counts)
    support = counts.sum(0).double()
    correct = torch.zeros(num_classes, dtype=torch.float64)
    hit = mapping >= 0
    rows = torch.arange(counts.shape[0])[hit]
    correct[mapping[hit]] = counts[rows, mapping[hit]].double()
    recall = correct / support
    recall[support == 0] = math.nan
    return recall


def _groups(train_class_counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split class ids into (head, medium, tail) by training count; see :func:`group_accuracy`."""
    counts = np.asarray(train_class_counts, dtype=np.int64).reshape(-1)
    c = counts.size
    if c == 0:
        raise ValueError("train_class_counts is empty")
    g = max(1, round(c / 3))
    order = np.argsort(counts, kind="stable")  # ascending count, ties by ascending class id
    return order[c - g:], order[g:c - g], order[:g]


def _nanmean(x: np.ndarray) -> float:
    """Mean over the finite entries, ``nan`` when there are none."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def group_accuracy(recall: Any, train_class_counts: Sequence[int]) -> dict[str, float]:
    """Mean recall over the head, medium and tail classes.

    Classes are ordered by ``(training count, class id)`` ascending (a stable sort). With
    ``g = max(1, round(C / 3))``, the tail is the first ``g`` classes (fewest training samples),
    the head the last ``g`` (most) and medium everything in between; for ``C = 1`` the single
    class is both head and tail, for ``C = 2`` medium is empty. Each value is the mean of the
    non-``nan`` recalls of its group (``nan`` if none).
    Returns ``{"head_acc": ..., "medium_acc": ..., "tail_acc": ...}``.
    """
    r = torch.as_tensor(recall, dtype=torch.float64).reshape(-1).cpu().numpy()
    if r.size != len(train_class_counts):
        raise ValueError(f"{r.size} recalls but {len(train_class_counts)} training class counts")
    head, medium, tail = _groups(train_class_counts)
    return {
        "head_acc": _nanmean(r[head]),
        "medium_acc": _nanmean(r[medium]),
        "tail_acc": _nanmean(r[tail]),
    }


def cluster_kl(pred: Any, target: Any, num_clusters: int, num_classes: int | None = None) -> float:
    """KL divergence between the predicted cluster-size profile and the true class-size profile.

    ``p`` = cluster proportions (``num_clusters`` bins) and ``q`` = class proportions, each
    sorted in descending order and the shorter one zero-padded to the longer length. Sorting
    makes the value invariant to label permutations: it only checks whether the *size
    profile* is right (collapse into few clusters, or forced balance on imbalanced data, both
    give a large value). ``KL_EPS`` (1e-8) is added to every bin and both are renormalised,
    then ``KL(p || q) = sum p log(p / q)`` in nats, i.e.
    ``scipy.stats.entropy(p + 1e-8, q + 1e-8)``.
    """
    p_lab, t_lab = _pair(pred, target)
    if p_lab.numel() == 0:
        return math.nan
    k = _size(p_lab, num_clusters, "pred")
    c = _size(t_lab, num_classes, "target")
    p = torch.bincount(p_lab, minlength=k).double().sort(descending=True).values
    q = torch.bincount(t_lab, minlength=c).double().sort(descending=True).values
    n = max(p.numel(), q.numel())
    p = torch.cat([p / p.sum(), p.new_zeros(n - p.numel())]) + KL_EPS
    q = torch.cat([q / q.sum(), q.new_zeros(n - q.numel())]) + KL_EPS
    p, q = p / p.sum(), q / q.sum()
    return float(torch.sum(p * torch.log(p / q)))


def normalized_mutual_info(pred: Any, target: Any, average_method: str = "arithmetic") -> float:
    """Normalised mutual information (torchmetrics), matching scikit-learn's conventions.

    ``average_method`` is ``"arithmetic"`` (scikit-learn's default), ``"geometric"``,
    ``"min"`` or ``"max"``. Two single-cluster labelings give 1 as in scikit-learn.
    """
    p, t = _pair(pred, target)
    if p.numel() == 0:
        return math.nan
    if torch.unique(p).numel() == 1 and torch.unique(t).numel() == 1:
        return 1.0  # torchmetrics returns 0 here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse invariant checks.*")
        return float(normalized_mutual_info_score(p, t, average_method=average_method))


def adjusted_rand_index(pred: Any, target: Any) -> float:
    """Adjusted Rand index (torchmetrics ``adjusted_rand_score``); ``nan`` for empty input."""
    p, t = _pair(pred, target)
    if p.numel() == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse invariant checks.*")
        return float(adjusted_rand_score(p, t))


def ood_auroc(score: Any, is_ood: Any) -> float:
    """AUROC of ``score`` for detecting OOD samples (OOD is the positive class, higher = more OOD).

    Computed with torchmetrics ``binary_auroc`` on the dense ranks of ``score`` scaled to
    ``[0, 1]`` (see module notes: raw scores outside ``[0, 1]`` would be squashed by a
    sigmoid). ``nan`` unless both OOD and in-distribution samples are present.
    """
    s = torch.as_tensor(score).detach().cpu().reshape(-1)
    y = torch.as_tensor(is_ood).detach().cpu().reshape(-1).bool()
    if s.numel() != y.numel():
        raise ValueError(f"score and is_ood differ in length: {s.numel()} vs {y.numel()}")
    if not s.is_floating_point():
        s = s.double()
    if bool(torch.isnan(s).any()):
        raise ValueError("ood score contains nan")
    if bool(y.all()) or not bool(y.any()):
        return math.nan
    _, ranks = torch.unique(s, sorted=True, return_inverse=True)
    ranks = ranks.double() / max(int(ranks.max()), 1)
    return float(binary_auroc(ranks, y.long()))


def confusion_after_matching(
    pred: Any,
    target: Any,
    num_classes: int,
    num_clusters: int | None = None,
    return_columns: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Class x cluster count matrix with columns reordered so matched clusters line up with classes.

    The result has ``C`` rows (true classes) and ``max(C, K)`` columns: column ``j < C`` holds the
    cluster matched to class ``j`` (all zeros when ``K < C`` left class ``j`` unmatched), so a
    perfect clustering is diagonal; the unmatched clusters (``K > C``) follow in increasing id.
    With ``return_columns=True`` also returns the cluster id shown in every column (``-1`` for
    an empty placeholder column).
    """
    counts = contingency(pred, target, num_clusters, num_classes)
    k, c = counts.shape
    mapping = _match_counts(counts)
    columns = torch.full((max(k, c),), -1, dtype=torch.long)
    matched = torch.nonzero(mapping >= 0).reshape(-1)
    columns[mapping[matched]] = matched
    unmatched = torch.nonzero(mapping < 0).reshape(-1)
    columns[c:c + unmatched.numel()] = unmatched
    padded = torch.cat([counts, counts.new_zeros(1, c)])  # row k = empty placeholder
    confusion = padded[torch.where(columns >= 0, columns, k)].T.contiguous()
    return (confusion, columns) if return_columns else confusion


# --------------------------------------------------------------------------- torchmetrics Metric
class ClusteringMetrics(Metric):
    """All clustering metrics of an evaluation epoch, DDP-safe.

    ``update(pred, target, index, is_ood=None, ood_score=None)`` stores per-sample cluster id,
    class id (OOD samples may use ``-1``), dataset index, OOD flag and optional OOD score.
    ``compute()`` gathers the states (``dist_reduce_fx="cat"``), keeps the first occurrence of
    every dataset index (removing the ``DistributedSampler`` padding) and returns float tensors:

    * ``acc``, ``nmi`` (arithmetic), ``nmi_geometric``, ``ari``, ``cluster_kl``,
      ``num_nonempty_clusters``, ``largest_cluster_frac`` -- on in-distribution samples;
    * ``head_acc``, ``medium_acc``, ``tail_acc`` -- when ``train_class_counts`` is given
      (groups as in :func:`group_accuracy`);
    * ``ood_auroc`` -- over the samples that came with a score, when these include both OOD
      and in-distribution samples.

    Values that are undefined (e.g. no in-distribution sample) are ``nan``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        num_clusters: int,
        num_classes: int,
        train_class_counts: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the metric; ``kwargs`` go to :class:`torchmetrics.Metric`."""
        super().__init__(**kwargs)
        if int(num_clusters) < 1 or int(num_classes) < 1:
            raise ValueError("num_clusters and num_classes must be positive")
        self.num_clusters = int(num_clusters)
        self.num_classes = int(num_classes)
        self.train_class_counts: tuple[int, ...] | None = None
        if train_class_counts is not None:
            counts = tuple(int(x) for x in train_class_counts)
            if len(counts) != self.num_classes:
                raise ValueError(
                    f"train_class_counts has {len(counts)} entries "
                    f"but num_classes={self.num_classes}"
                )
            self.train_class_counts = counts
        for name in ("pred", "target", "index", "is_ood", "score", "has_score"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        pred: Tensor,
        target: Tensor,
        index: Tensor,
        is_ood: Tensor | None = None,
        ood_score: Tensor | None = None,
    ) -> None:
        """Add a batch: cluster ids, class ids, dataset indices, OOD flags, optional OOD scores."""
        pred = torch.as_tensor(pred, device=self.device).reshape(-1).long()
        n = pred.numel()
        target = torch.as_tensor(target, device=self.device).reshape(-1).long()
        index = torch.as_tensor(index, device=self.device).reshape(-1).long()
        if is_ood is None:
            is_ood = torch.zeros(n, dtype=torch.bool, device=self.device)
        is_ood = torch.as_tensor(is_ood, device=self.device).reshape(-1).bool()
        if ood_score is None:
            score = torch.zeros(n, dtype=torch.float32, device=self.device)
            has_score = torch.zeros(n, dtype=torch.bool, device=self.device)
        else:
            score = torch.as_tensor(ood_score, device=self.device).reshape(-1)
            score = score if score.is_floating_point() else score.float()
            has_score = torch.ones(n, dtype=torch.bool, device=self.device)
        checks = {"target": target, "index": index, "is_ood": is_ood, "ood_score": score}
        for name, t in checks.items():
            if t.numel() != n:
                raise ValueError(f"{name} has {t.numel()} entries but pred has {n}")
        self.pred.append(pred)
        self.target.append(target)
        self.index.append(index)
        self.is_ood.append(is_ood)
        self.score.append(score.detach())
        self.has_score.append(has_score)

    def _state(self, name: str) -> Tensor:
        """A cat state as one CPU tensor, whether it is still a list or already synced."""
        value = getattr(self, name)
        if isinstance(value, list):
            if not value:
                return torch.empty(0)
            value = dim_zero_cat(value)
        return value.detach().cpu().reshape(-1)

    def _collect(self) -> dict[str, Tensor]:
        """Gathered states with duplicate dataset indices removed (first occurrence kept)."""
        index = self._state("index").long()
        order = torch.argsort(index, stable=True)
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = index[order[1:]] != index[order[:-1]]
        keep = torch.sort(order[first]).values
        # an empty rank contributes a float32 placeholder, so dtypes are restored explicitly
        out = {
            "pred": self._state("pred").long()[keep],
            "target": self._state("target").long()[keep],
            "is_ood": self._state("is_ood").bool()[keep],
            "score": self._state("score")[keep],
            "has_score": self._state("has_score").bool()[keep],
        }
        p = out["pred"]
        if p.numel() and (int(p.min()) < -1 or int(p.max()) >= self.num_clusters):
            raise ValueError(f"cluster ids must lie in [0, {self.num_clusters}) or be -1 (unassigned)")
        t = out["target"][~out["is_ood"]]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise ValueError(f"in-distribution class ids must lie in [0, {self.num_classes})")
        return out

    def _values(self, keys: set[str] | None = None) -> dict[str, Tensor]:
        """Compute the requested keys (all when ``None``) from the de-duplicated states."""
        s = self._collect()
        want = (lambda k: True) if keys is None else keys.__contains__
        idm = ~s["is_ood"]
        pred, target = s["pred"][idm], s["target"][idm]
        n = pred.numel()
        out: dict[str, float] = {}
        # Cluster -1 means "left unassigned" (a method's OOD rejection): an error for ACC and
        # recall, its own group for NMI/ARI, and not a cluster for the size metrics.
        assigned = pred >= 0
        rejected = not bool(assigned.all())
        grouped = torch.where(assigned, pred, torch.full_like(pred, self.num_clusters))
        if want("acc"):
            acc = matched_accuracy(pred[assigned], target[assigned]) if assigned.any() else 0.0
            out["acc"] = acc * float(assigned.sum()) / n if n else math.nan
        if want("nmi"):
            out["nmi"] = normalized_mutual_info(grouped, target, "arithmetic")
        if want("nmi_geometric"):
            out["nmi_geometric"] = normalized_mutual_info(grouped, target, "geometric")
        if want("ari"):
            out["ari"] = adjusted_rand_index(grouped, target)
        if want("unassigned_frac") and rejected:
            out["unassigned_frac"] = 1.0 - float(assigned.float().mean())
        groups = ("head_acc", "medium_acc", "tail_acc")
        if self.train_class_counts is not None and any(want(k) for k in groups):
            if n and not rejected:
                recall = per_class_recall(pred, target, self.num_classes, self.num_clusters)
                out.update(group_accuracy(recall, self.train_class_counts))
            elif n:
                mapping = match_clusters(pred[assigned], target[assigned], self.num_clusters, self.num_classes)
                hit = assigned & (mapping[pred.clamp_min(0)] == target)
                recall = torch.tensor([float(hit[target == c].float().mean()) if (target == c).any() else math.nan
                                       for c in range(self.num_classes)], dtype=torch.float64)
                out.update(group_accuracy(recall, self.train_class_counts))
            else:
                out.update(dict.fromkeys(groups, math.nan))
        if want("cluster_kl"):
            out["cluster_kl"] = cluster_kl(pred[assigned], target[assigned], self.num_clusters, self.num_classes)
        sizes = torch.bincount(pred[assigned], minlength=self.num_clusters)
        if want("num_nonempty_clusters"):
            out["num_nonempty_clusters"] = float((sizes > 0).sum())
        if want("largest_cluster_frac"):
            out["largest_cluster_frac"] = float(sizes.max()) / n if n else math.nan
        if want("ood_auroc"):
            scored = s["has_score"]
            flags = s["is_ood"][scored]
            if flags.any() and not flags.all():
                out["ood_auroc"] = ood_auroc(s["score"][scored], flags)
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in out.items()}

    def compute(self) -> dict[str, Tensor]:
        """Return the dict of metrics described in the class docstring."""
        return self._values()


class _SingleValue(ClusteringMetrics):
    """Base of the single-value views of :class:`ClusteringMetrics` (same ``update``)."""

    _key: str = ""

    def compute(self) -> Tensor:
        """The one value of this metric (``nan`` if undefined)."""
        value = self._values({self._key}).get(self._key)
        return value if value is not None else torch.tensor(math.nan, device=self.device)


class MatchedAccuracy(_SingleValue):
    """Hungarian-matched clustering accuracy on in-distribution samples."""

    _key = "acc"
    higher_is_better = True


class TailAccuracy(_SingleValue):
    """Mean matched recall of the tail classes; requires ``train_class_counts``."""

    _key = "tail_acc"
    higher_is_better = True

    def __init__(
        self, num_clusters: int, num_classes: int, train_class_counts: Sequence[int], **kwargs: Any
    ) -> None:
        """Create the metric; ``train_class_counts`` defines the tail classes."""
        if train_class_counts is None:
            raise ValueError("TailAccuracy needs train_class_counts")
        super().__init__(num_clusters, num_classes, train_class_counts, **kwargs)


class ClusterKL(_SingleValue):
    """KL divergence of the sorted cluster-size profile from the sorted class-size profile."""

    _key = "cluster_kl"
    higher_is_better = False


class OODAUROC(_SingleValue):
    """AUROC of the OOD score for detecting OOD samples (``nan`` without scores or both kinds)."""

    _key = "ood_auroc"
    higher_is_better = True
