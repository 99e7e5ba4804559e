"""Graph-degree-linkage agglomerative clustering over a sparse kNN graph, as used by JULE.

JULE (Yang, Parikh & Batra, "Joint Unsupervised Learning of Deep Representations and Image
Clusters", CVPR 2016; the authors' code is ``jwyang/JULE.torch``) clusters images by merging
clusters greedily with the graph-degree linkage of Zhang et al. (ECCV 2012). This module is
the clustering half, written to scale: every quantity lives on the sparse kNN graph, so memory
is O(N·K_s) and nothing of size N×N (or C×C for C clusters) is ever built.

Definitions (paper, section 3 / authors' ``affinity.lua`` and ``agg_clustering.lua``):

* **Graph.** Directed kNN graph over the features ``x_i``: an edge ``i -> j`` for each of the
  ``K_s`` nearest neighbours ``j`` of ``i`` (self excluded), with weight
  ``W_ij = exp(-||x_i - x_j||² / σ²)`` and ``σ² = mean over all N·K_s edges of ||x_i - x_j||²``.
  Squared Euclidean distances in both places: the authors' ``affinity.compute`` averages the
  same kNN distances it exponentiates into ``σ²`` (and prints ``sqrt`` of it as σ), and the
  graph-degree-linkage toolbox shipped in their repository (``gacBuildDigraph.m``) documents
  ``w_ij = exp(-d_ij² / σ²)`` with ``σ²`` the mean of ``d_ij²``. ``K_s = 20`` (``-K_s`` default).
* **Initial clusters.** Each sample joins its nearest neighbour: the clusters are the connected
  components of the 1-NN graph (``agg_clustering.init`` follows the 1-NN chains; it also cuts
  chains after 50 hops, which only matters for pathological inputs and is not reproduced).
* **Cluster affinity** (graph-degree linkage)::

      A(C_a, C_b) = |C_a|⁻² 1ᵀ W[C_a,C_b] W[C_b,C_a] 1  +  |C_b|⁻² 1ᵀ W[C_b,C_a] W[C_a,C_b] 1

  ``1ᵀ W[C_a,C_b] W[C_b,C_a] 1 = Σ_{q ∈ C_b} in_a(q) · out_a(q)`` with ``in_a(q) = Σ_{p∈C_a} W_pq``
  and ``out_a(q) = Σ_{r∈C_a} W_qr``: weighted 2-paths that leave ``C_a``, visit ``q ∈ C_b`` and
  come back. The per-(sample, cluster) sums ``in`` and ``out`` are *additive* when clusters
  merge, so they are kept in one table of at most ``2·N·K_s`` (sample, cluster) entries that only
  shrinks; the cluster affinities are re-derived from it with a few sorts after each round of
  merges. Only pairs of clusters with ``A > 0`` (joined by such 2-paths) are ever stored.
* **Merge criterion** (the forward-pass objective; ``search_clusters`` in the code): with
  ``a_1 ≥ a_2 ≥ ... ≥ a_{K_c}`` the affinities of cluster ``C_i`` to its ``K_c`` most affine
  clusters (missing neighbours count as 0), the cluster maximising::

      score(C_i) = a_1 + λ / (K_c - 1) · Σ_{k=2..K_c} (a_1 - a_k)

  is merged with its most affine cluster. The first term is the affinity to the nearest
  cluster, the second the gap to the next ``K_c - 1`` (local structure). ``K_c = 5`` (``-K_c``
  default) and ``λ = 1`` (the code adds the gaps with weight ``1 / (K_c - 1)``). Two quirks of the
  code are not reproduced: it adds the gap term only while more than 100 clusters remain, and
  its affinity matrix is upper-triangular, so a cluster only sees neighbours of lower index.
* **Forward step** (one partially unrolled period of the recurrent process): merge
  ``min(⌈η · n_c⌉, n_c - n_target)`` pairs, ``η`` the unfolding rate (0.9 by default, 0.2 for
  faces in the paper), ``n_c`` the number of clusters at the start of the step
  (``updateLabels`` in ``train.lua``).

Scaling: the paper merges one pair per time step and updates the affected affinities. Here a
step is executed in *rounds*: a round takes the clusters in decreasing order of their score
and merges each with its most affine cluster unless one of the two was already merged in this
round, up to ``max(1, round_fraction · n_c)`` pairs (and never more than the step still needs);
then all affinities are recomputed exactly from the (sample, cluster) table. ``round_fraction=0``
gives the paper's one-merge-per-step greedy; the default (0.1) trades a little of that
sequential order for speed.

Clusters with no affinity to any other cluster (no 2-path to anyone) cannot be ranked by the
criterion. As the authors' code does before a period while more than ``20 · K`` clusters remain,
a forward step then first merges them into the cluster with the nearest centroid (they are
outliers at that stage; later an isolated cluster is a whole separated group and waits). When
*no* pair has a positive affinity left (e.g. disconnected components of the kNN graph) the
remaining merges pair the clusters with the nearest centroids. Both use the features the graph
was built from (without them: the largest linked cluster, resp. the smallest clusters).

:func:`dense_affinity` and :func:`dense_merge_choice` are the naive dense definitions, for
tests on small inputs only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from clusterlight.errors import ClusterlightError
from clusterlight.precision import float32_math

__all__ = [
    "ISOLATED_FACTOR",
    "Agglomeration",
    "KnnGraph",
    "affinity_weights",
    "agglomerate",
    "build_graph",
    "dense_affinity",
    "dense_merge_choice",
    "dense_weights",
    "forward_step_merges",
    "initial_clusters",
    "knn_graph",
]


# ----------------------------------------------------------------------------------------------
# kNN graph.


@float32_math
@torch.no_grad()
def knn_graph(
    x: Tensor, k: int, chunk_size: int | None = None, col_chunk_size: int | None = None,
    ranks: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest neighbours of every row of ``x`` (itself excluded), by chunked matmul.

    Squared Euclidean distances are ranked block by block (``chunk_size`` rows ×
    ``col_chunk_size`` columns, ``|x_j|² - 2 x_i·x_j`` in one ``addmm`` into a reused buffer) and
    merged into a running top-k: the first column block by ``topk``, later ones only through
    the few entries below each row's current k-th distance. Memory is
    O(N·k + chunk_size·col_chunk_size), never N×N; with ``ranks``, O(N·len(ranks) +
    chunk_size·k + chunk_size·col_chunk_size).

    Args:
        x: ``Tensor[N, D]`` on any device (float64 stays float64, anything else is float32).
        k: neighbours per point, ``1 <= k <= N - 1``.
        chunk_size: query rows per block (default 256 on CPU, where small blocks stay in cache,
            4096 on accelerators).
        col_chunk_size: candidate columns per block (default 2048 on CPU, 16384 elsewhere; when
            ``k`` is over a quarter of that, all ``N`` columns, with ``chunk_size`` defaulting to
            the rows of about 2**25 distances).
        ranks: keep only these columns of the sorted neighbours (0-based ranks below ``k``,
            increasing), e.g. the k-th distances of a few k out of thousands: the search is the
            same, the result ``[N, len(ranks)]``.

    Returns:
        ``(indices, distances)``: ``LongTensor[N, k]`` and the squared distances ``[N, k]``,
        each row sorted by increasing distance (ties: lower index first within a block), on
        the device of ``x`` (``[N, len(ranks)]``, those columns, with ``ranks``).
    """
    if x.ndim != 2:
        raise ClusterlightError(f"knn_graph expects points of shape [N, D], got {tuple(x.shape)}")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
        raise ClusterlightError(f"k must be an integer in [1, N - 1] = [1, {max(n - 1, 0)}], got {k!r}")
    keep = None
    if ranks is not None:
        ranks = list(ranks)
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) for r in ranks) \
                or ranks != sorted(set(ranks)) or not 0 <= ranks[0] <= ranks[-1] < k:
            raise ClusterlightError(f"ranks must be increasing integers in [0, k - 1] = [0, {k - 1}], got {ranks!r}")
        keep = torch.tensor(ranks, dtype=torch.long, device=x.device)
    dev = x.device
    on_cpu = dev.type == "cpu"
    # many neighbours: merging a running top-k block by block costs more than one top-k per row
    # over all columns, so take whole rows, as many as fit a buffer of about 2**25 distances
    whole_rows = col_chunk_size is None and k > (2048 if on_cpu else 16384) // 4
    if whole_rows:
        col_chunk_size = n
        chunk_size = chunk_size or max(1, min(4096, 2 ** 25 // max(n, 1)))
    chunk_size = chunk_size or (256 if on_cpu else 4096)
    col_chunk_size = col_chunk_size or (2048 if on_cpu else 16384)
    if chunk_size < 1 or col_chunk_size < 1:
        raise ClusterlightError(f"chunk sizes must be >= 1, got {chunk_size}, {col_chunk_size}")
    x = x.detach()
    x = x if x.dtype == torch.float64 else x.float()
    if not bool(torch.isfinite(x).all()):
        raise ClusterlightError("knn_graph input contains NaN or infinite values")
    x = x - x.mean(0)  # distances are shift invariant; centring improves the expansion's precision
    sq = (x * x).sum(1)
    rows_max, cols_max = min(chunk_size, n), min(col_chunk_size, n)
    buf = torch.empty(rows_max * cols_max, dtype=x.dtype, device=dev)
    # numpy's compare + flatnonzero is several times faster than torch's nonzero on CPU
    mask = None if whole_rows else np.empty(rows_max * cols_max, dtype=bool) if on_cpu else \
        torch.empty(rows_max * cols_max, dtype=torch.bool, device=dev)
    width_out = k if keep is None else len(keep)
    out_i = torch.empty(n, width_out, dtype=torch.long, device=dev)
    out_d = torch.empty(n, width_out, dtype=x.dtype, device=dev)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        r = e - s
        best_d = torch.full((r, k), math.inf, dtype=x.dtype, device=dev)
        best_i = torch.zeros(r, k, dtype=torch.long, device=dev)
        filled = 0  # columns seen so far
        for t in range(0, n, col_chunk_size):
            u = min(n, t + col_chunk_size)
            c = u - t
            d = buf[: r * c].view(r, c)
            torch.addmm(sq[None, t:u], x[s:e], x[t:u].T, beta=1, alpha=-2, out=d)  # |x_j|² - 2 x_i·x_j
            lo, hi = max(s, t), min(e, u)
            if lo < hi:  # the block holds the diagonal: exclude each point itself
                diag = torch.arange(lo, hi, device=dev)
                d[diag - s, diag - t] = math.inf
            if whole_rows:  # the one block holds every column: its top-k is the answer
                best_d, best_i = torch.topk(d, k, dim=1, largest=False, sorted=True)
            elif filled < k:  # too few columns seen for a threshold yet: plain top-k merge
                kk = min(k, c)
                vals, idx = torch.topk(d, kk, dim=1, largest=False, sorted=True)
                cat_d, cat_i = torch.cat([best_d, vals], 1), torch.cat([best_i, idx + t], 1)
                best_d, pos = torch.topk(cat_d, k, dim=1, largest=False, sorted=True)
                best_i = torch.gather(cat_i, 1, pos)
            else:  # only entries below each row's current k-th value can enter
                if on_cpu:
                    m = mask[: r * c].reshape(r, c)
                    np.less(d.numpy(), best_d[:, -1:].numpy(), out=m)
                    flat = torch.from_numpy(np.flatnonzero(m))
                    cr, cc = flat // c, flat % c
                else:
                    m = mask[: r * c].view(r, c)
                    torch.lt(d, best_d[:, -1:], out=m)
                    cr, cc = m.nonzero().unbind(1)
                if cr.numel():  # candidates come row by row: pad them beside the current best
                    counts = torch.bincount(cr, minlength=r)
                    slot = torch.arange(cr.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[cr]
                    width = k + int(counts.max())
                    pad_d = torch.full((r, width), math.inf, dtype=x.dtype, device=dev)
                    pad_i = torch.zeros(r, width, dtype=torch.long, device=dev)
                    pad_d[:, :k], pad_i[:, :k] = best_d, best_i
                    pad_d[cr, k + slot], pad_i[cr, k + slot] = d[cr, cc], cc + t
                    best_d, pos = torch.topk(pad_d, k, dim=1, largest=False, sorted=True)
                    best_i = torch.gather(pad_i, 1, pos)
            filled += c
        if keep is not None:
            best_i, best_d = best_i[:, keep], best_d[:, keep]
        out_i[s:e] = best_i
        out_d[s:e] = (best_d + sq[s:e, None]).clamp_(min=0)
    return out_i, out_d


def affinity_weights(distances: Tensor) -> tuple[Tensor, float]:
    """JULE's edge weights ``exp(-d² / σ²)`` with ``σ² = mean(d²)`` over all kNN edges.

    Args:
        distances: squared distances ``[N, K_s]`` from :func:`knn_graph`.

    Returns:
        ``(weights, sigma2)``: float64 weights ``[N, K_s]`` and ``σ²``.
    """
    d = distances.detach().to(torch.float64)
    sigma2 = float(d.mean()) if d.numel() else 1.0
    if not sigma2 > 0:  # every neighbour is a duplicate: all weights 1
        sigma2 = 1.0
    return torch.exp(-d / sigma2), sigma2


@dataclass
class KnnGraph:
    """A directed kNN graph with JULE's weights.

    Attributes:
        indices: ``LongTensor[N, K_s]`` (CPU), the neighbours of each sample.
        distances: ``Tensor[N, K_s]`` (CPU), squared Euclidean distances.
        weights: float64 ``Tensor[N, K_s]`` (CPU), ``exp(-d² / σ²)``.
        sigma2: ``σ²``, the mean squared kNN distance.
        features: the ``[N, D]`` points the graph was built from (CPU), used to place clusters
            that have no graph affinity to any other; ``None`` to fall back to cluster sizes.
    """

    indices: Tensor
    distances: Tensor
    weights: Tensor
    sigma2: float
    features: Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return int(self.indices.shape[0])


@float32_math
def build_graph(
    x: Tensor, k_s: int = 20, chunk_size: int | None = None, keep_features: bool = True
) -> KnnGraph:
    """kNN graph of ``x`` with ``K_s = min(k_s, N - 1)`` neighbours and JULE's weights."""
    n = x.shape[0] if x.ndim == 2 else 0
    if n < 2:
        raise ClusterlightError(f"a kNN graph needs at least 2 points of shape [N, D], got {tuple(x.shape)}")
    if k_s < 1:
        raise ClusterlightError(f"k_s must be >= 1, got {k_s}")
    idx, dist = knn_graph(x, min(int(k_s), n - 1), chunk_size=chunk_size)
    weights, sigma2 = affinity_weights(dist)
    feats = x.detach().float().cpu() if keep_features else None
    return KnnGraph(idx.cpu(), dist.cpu(), weights.cpu(), sigma2, feats)


def initial_clusters(indices: Tensor) -> Tensor:
    """Connected components of the 1-NN graph (each sample with its nearest neighbour).

    Args:
        indices: ``LongTensor[N, K]`` from :func:`knn_graph`; column 0 is the nearest neighbour.

    Returns:
        ``LongTensor[N]`` of cluster labels ``0..C-1`` (CPU).
    """
    nn1 = indices[:, 0].detach().cpu().numpy().astype(np.int64)
    n = nn1.shape[0]
    graph = coo_matrix((np.ones(n, dtype=np.int8), (np.arange(n), nn1)), shape=(n, n))
    _, labels = connected_components(graph, directed=True, connection="weak")
    return torch.from_numpy(labels.astype(np.int64))


#: Isolated clusters are absorbed at the start of a forward step while more than this many
#: times the target number of clusters remain (``affinity.compute4cluster`` in the authors' code).
ISOLATED_FACTOR = 20


def forward_step_merges(n_clusters: int, n_target: int, unfolding_rate: float) -> int:
    """Merges in one forward step: ``min(⌈η · n_c⌉, n_c - n_target)`` (never negative)."""
    if not 0 < unfolding_rate <= 1:
        raise ClusterlightError(f"unfolding_rate must be in (0, 1], got {unfolding_rate}")
    return max(0, min(math.ceil(unfolding_rate * n_clusters), n_clusters - n_target))


# ----------------------------------------------------------------------------------------------
# Sparse agglomeration.


def _compact(labels: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))


class Agglomeration:
    """Graph-degree-linkage agglomeration on a fixed kNN graph (see the module docstring).

    Args:
        graph: the :class:`KnnGraph`.
        labels: starting clusters ``[N]`` (any integer ids; compacted to ``0..C-1`` in id order);
            ``None`` for the 1-NN components (:func:`initial_clusters`).
        k_c: ``K_c``, neighbouring clusters in the merge criterion (5 in the paper).
        lam: ``λ``, weight of the affinity-gap term of the criterion (1 in the paper).
        round_fraction: a round merges at most ``max(1, floor(round_fraction · n_c))`` disjoint
            pairs before affinities are recomputed; 0 merges one pair per round (the paper's
            sequential greedy).

    Attributes:
        labels: ``int64`` numpy array ``[N]``, the current cluster of each sample.
        sizes: ``int64`` numpy array ``[C]``.
        pair_i, pair_j, pair_a: the stored cluster pairs (``pair_i < pair_j``) with ``A > 0`` and
            their affinities (float64).
        score, partner: the criterion of each cluster and its most affine cluster
            (``-inf`` / ``-1`` for clusters with no affinity to any other).
    """

    def __init__(
        self,
        graph: KnnGraph,
        labels: Tensor | np.ndarray | None = None,
        *,
        k_c: int = 5,
        lam: float = 1.0,
        round_fraction: float = 0.1,
    ) -> None:
        if k_c < 1:
            raise ClusterlightError(f"k_c must be >= 1, got {k_c}")
        if not 0 <= round_fraction <= 1:
            raise ClusterlightError(f"round_fraction must be in [0, 1], got {round_fraction}")
        n, k = graph.indices.shape
        if labels is None:
            labels = initial_clusters(graph.indices)
        lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        if lab.shape != (n,):
            raise ClusterlightError(f"labels must have shape ({n},), got {tuple(lab.shape)}")
        self.k_c = int(k_c)
        self.lam = float(lam)
        self.round_fraction = float(round_fraction)
        self.features = graph.features
        self.labels = _compact(lab)
        self.sizes = np.bincount(self.labels).astype(np.int64)
        if n >= 2**31 or self.n_clusters >= 2**31:
            raise ClusterlightError(f"too many samples for the agglomeration's int32 indices: {n}")
        nbr = graph.indices.cpu().numpy().astype(np.int32).reshape(-1)
        w = graph.weights.cpu().numpy().astype(np.float64).reshape(-1)
        src = np.repeat(np.arange(n, dtype=np.int32), k)
        # (sample q, cluster X) entries: out_X(q) from the edges q -> r, in_X(q) from p -> q.
        q = np.concatenate([src, nbr])
        x = np.concatenate([self.labels[nbr], self.labels[src]]).astype(np.int32)
        del src, nbr
        zeros = np.zeros_like(w)
        self._set_table(q, x, np.concatenate([zeros, w]), np.concatenate([w, zeros]))
        self._update()

    # -- properties
    @property
    def n_clusters(self) -> int:
        return int(self.sizes.shape[0])

    def affinity_matrix(self) -> np.ndarray:
        """The cluster affinities as a dense ``[C, C]`` array (for tests and small C only)."""
        a = np.zeros((self.n_clusters, self.n_clusters))
        a[self.pair_i, self.pair_j] = self.pair_a
        a[self.pair_j, self.pair_i] = self.pair_a
        return a

    # -- internals
    def _set_table(self, q: np.ndarray, x: np.ndarray, vin: np.ndarray, vout: np.ndarray) -> None:
        """Drop entries inside their own cluster and sum duplicate (q, X) entries (int32 ids)."""
        idx = np.flatnonzero(x != self.labels[q])
        key = q[idx].astype(np.int64) * self.n_clusters + x[idx]
        order = np.argsort(key, kind="stable")  # nearly sorted after a relabelling: timsort runs
        key = key[order]
        idx = idx[order]
        del order
        starts = _group_starts(key)
        del key
        first = idx[starts]
        if starts.size:
            vin = np.add.reduceat(vin[idx], starts)
            vout = np.add.reduceat(vout[idx], starts)
        else:
            vin, vout = vin[:0], vout[:0]
        self._q, self._x, self._in, self._out = q[first], x[first].astype(np.int32), vin, vout

    def _update(self) -> None:
        """Cluster affinities from the (sample, cluster) table, then the criterion."""
        c = self.n_clusters
        prod = self._in * self._out
        m = prod > 0
        xs, ys = self._x[m], self.labels[self._q[m]]
        val = prod[m] / self.sizes[xs].astype(np.float64) ** 2  # |C_X|⁻² Σ_{q∈C_Y} in_X(q) out_X(q)
        lo, hi = np.minimum(xs, ys).astype(np.int64), np.maximum(xs, ys)
        key = lo * c + hi
        order = np.argsort(key)
        key = key[order]
        starts = _group_starts(key)
        self.pair_a = np.add.reduceat(val[order], starts) if starts.size else val[:0]
        self.pair_i, self.pair_j = key[starts] // c, key[starts] % c
        self._criterion()

    def _criterion(self) -> None:
        c = self.n_clusters
        self.score = np.full(c, -np.inf)
        self.partner = np.full(c, -1, dtype=np.int64)
        if self.pair_a.size == 0:
            return
        owner = np.concatenate([self.pair_i, self.pair_j])
        other = np.concatenate([self.pair_j, self.pair_i])
        aff = np.concatenate([self.pair_a, self.pair_a])
        # by owner, then affinity down, then id (three stable sorts: much faster than lexsort)
        order = np.argsort(other, kind="stable")
        order = order[np.argsort(-aff[order], kind="stable")]
        order = order[np.argsort(owner[order], kind="stable")]
        owner, other, aff = owner[order], other[order], aff[order]
        starts = _group_starts(owner)
        counts = np.diff(np.append(starts, owner.size))
        rank = np.arange(owner.size) - np.repeat(starts, counts)
        first = owner[starts]
        a1 = aff[starts]
        self.partner[first] = other[starts]
        if self.k_c > 1:
            sel = (rank > 0) & (rank < self.k_c)
            rest = np.bincount(owner[sel], weights=aff[sel], minlength=c)[first]
            # neighbours beyond the stored ones have affinity 0: Σ_{k=2..K_c} (a_1 - a_k)
            self.score[first] = a1 + self.lam / (self.k_c - 1) * ((self.k_c - 1) * a1 - rest)
        else:
            self.score[first] = a1

    def _apply(self, rep: np.ndarray) -> None:
        """Merge every cluster ``c`` into ``rep[c]`` (``rep[rep[c]] == rep[c]``)."""
        keep = rep == np.arange(rep.size)
        new_id = np.cumsum(keep) - 1
        mapping = new_id[rep]
        self.labels = mapping[self.labels]
        self.sizes = np.bincount(self.labels, minlength=int(keep.sum())).astype(np.int64)
        self._set_table(self._q, mapping[self._x].astype(np.int32), self._in, self._out)
        self._update()

    def _centroids(self) -> Tensor | None:
        if self.features is None:
            return None
        f = self.features.float()
        sums = torch.zeros(self.n_clusters, f.shape[1]).index_add_(0, torch.from_numpy(self.labels), f)
        return sums / torch.from_numpy(self.sizes).float().unsqueeze(1)

    def _max_pairs(self, remaining: int) -> int:
        return max(1, min(remaining, int(self.round_fraction * self.n_clusters)))

    def round_pairs(self, max_pairs: int) -> list[tuple[int, int]]:
        """Disjoint pairs (cluster, its most affine cluster) by decreasing criterion."""
        cand = np.flatnonzero(self.partner >= 0)
        order = cand[np.lexsort((cand, -self.score[cand]))]
        return _disjoint_pairs(order.tolist(), self.partner.tolist(), self.n_clusters, max_pairs)

    def _absorb_isolated(self, isolated: np.ndarray, budget: int) -> np.ndarray:
        """Representatives that merge isolated clusters into their nearest connected cluster."""
        rep = np.arange(self.n_clusters)
        connected = np.flatnonzero(self.partner >= 0)
        cent = self._centroids()
        if cent is None:
            target = np.full(isolated.size, connected[np.argmax(self.sizes[connected])])
            dist = -self.sizes[isolated].astype(np.float64)  # smallest first
        else:
            target, dist = _nearest(cent[torch.from_numpy(isolated)], cent[torch.from_numpy(connected)])
            target = connected[target]
        take = np.lexsort((isolated, dist))[:budget]
        rep[isolated[take]] = target[take]
        return rep

    def _fallback_pairs(self, max_pairs: int) -> list[tuple[int, int]]:
        """No pair has a positive affinity: pair clusters with the nearest centroids."""
        c = self.n_clusters
        cent = self._centroids()
        if cent is None:
            order = np.lexsort((np.arange(c), self.sizes)).tolist()
            return [(order[2 * t], order[2 * t + 1]) for t in range(min(max_pairs, c // 2))]
        idx, dist = knn_graph(cent, 1)
        nearest, dist = idx[:, 0].numpy(), dist[:, 0].double().numpy()
        return _disjoint_pairs(np.lexsort((np.arange(c), dist)).tolist(), nearest.tolist(), c, max_pairs)

    # -- public
    def absorb_isolated(self, budget: int) -> int:
        """Merge up to ``budget`` isolated clusters into their nearest linked cluster.

        A cluster is isolated when it has no affinity to any other. The authors' code does this
        before a period while more than ``20 · K`` clusters remain (such clusters are then
        outliers); later an isolated cluster is a whole separated group and should stay.
        Returns the number of merges (0 when nothing is isolated or nothing is linked).
        """
        isolated = np.flatnonzero(self.partner < 0)
        budget = min(budget, self.n_clusters - 1)
        if budget <= 0 or not isolated.size or not self.pair_a.size:
            return 0
        c = self.n_clusters
        self._apply(self._absorb_isolated(isolated, budget))
        return c - self.n_clusters

    def merge_round(self, remaining: int) -> int:
        """One round of at most ``remaining`` merges; returns how many were made.

        Disjoint pairs by the criterion (isolated clusters wait); when no pair of clusters has a
        positive affinity, disjoint pairs of nearest centroids.
        """
        c = self.n_clusters
        remaining = min(remaining, c - 1)
        if remaining <= 0:
            return 0
        max_pairs = self._max_pairs(remaining)
        pairs = self.round_pairs(max_pairs) if self.pair_a.size else self._fallback_pairs(max_pairs)
        rep = np.arange(c)
        a = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        rep[a.max(1)] = a.min(1)
        self._apply(rep)
        return c - self.n_clusters

    def merge(self, n_merges: int, absorb_isolated: bool = False) -> int:
        """Exactly ``min(n_merges, n_c - 1)`` merges, in rounds; returns the number made.

        Args:
            n_merges: merges to make.
            absorb_isolated: first merge the clusters that are isolated now into their nearest
                linked cluster (:meth:`absorb_isolated`), counted among the ``n_merges``.
        """
        target = min(max(0, int(n_merges)), self.n_clusters - 1)
        done = self.absorb_isolated(target) if absorb_isolated else 0
        while done < target:
            made = self.merge_round(target - done)
            if made == 0:  # cannot happen (a round always merges); guards against a silent loop
                raise RuntimeError("agglomeration made no progress")
            done += made
        return done


@float32_math
def _nearest(a: Tensor, b: Tensor, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``a``, the index of and squared distance to the nearest row of ``b``."""
    idx, dist = [], []
    bsq = (b * b).sum(1)
    for s in range(0, a.shape[0], chunk_size):
        blk = a[s : s + chunk_size]
        d = (blk * blk).sum(1, keepdim=True) - 2 * blk @ b.T + bsq
        v, i = d.min(1)
        idx.append(i)
        dist.append(v)
    return torch.cat(idx).numpy(), torch.cat(dist).double().numpy()


@float32_math
def agglomerate(
    x: Tensor | KnnGraph,
    n_target: int,
    *,
    unfolding_rate: float = 0.9,
    labels: Tensor | None = None,
    k_s: int = 20,
    k_c: int = 5,
    lam: float = 1.0,
    round_fraction: float = 0.1,
    max_steps: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """JULE's agglomerative clustering of ``x`` down to ``n_target`` clusters.

    Each forward step merges ``min(⌈η · n_c⌉, n_c - n_target)`` pairs (:func:`forward_step_merges`),
    so the result has exactly ``n_target`` clusters once enough steps ran (``max_steps=None``
    runs until then). When the starting clusters are already ``n_target`` or fewer nothing is
    merged (agglomeration never splits).

    Args:
        x: features ``[N, D]`` (the graph is built with ``k_s`` neighbours) or a :class:`KnnGraph`.
        n_target: number of clusters to stop at, ``1 <= n_target <= N``.
        unfolding_rate: ``η`` in (0, 1].
        labels: starting clusters ``[N]``; ``None`` for the 1-NN components, or singletons when
            those are already fewer than ``n_target``.
        k_s: neighbours of the graph (ignored when ``x`` is a graph).
        k_c: ``K_c`` of the merge criterion.
        lam: ``λ`` of the merge criterion.
        round_fraction: see :class:`Agglomeration`.
        max_steps: stop after this many forward steps (``None``: until ``n_target``).
        chunk_size: rows per block of the kNN search.

    Returns:
        ``LongTensor[N]`` (CPU) of labels ``0..n-1``.
    """
    graph = x if isinstance(x, KnnGraph) else build_graph(x, k_s, chunk_size)
    n = graph.num_nodes
    if isinstance(n_target, bool) or not isinstance(n_target, int) or not 1 <= n_target <= n:
        raise ClusterlightError(f"n_target must be an integer in [1, N] = [1, {n}], got {n_target!r}")
    if labels is None:
        labels = initial_clusters(graph.indices)
        if int(labels.max()) + 1 < n_target:
            labels = torch.arange(n)
    state = Agglomeration(graph, labels, k_c=k_c, lam=lam, round_fraction=round_fraction)
    steps = 0
    while state.n_clusters > n_target and (max_steps is None or steps < max_steps):
        state.merge(forward_step_merges(state.n_clusters, n_target, unfolding_rate),
                    absorb_isolated=state.n_clusters > ISOLATED_FACTOR * n_target)
        steps += 1
    return torch.from_numpy(state.labels.copy())


# ----------------------------------------------------------------------------------------------
# Naive dense reference (tests only).


def dense_weights(graph: KnnGraph) -> Tensor:
    """The ``[N, N]`` float64 weight matrix of a graph (``W[i, j]`` for the edge ``i -> j``)."""
    n = graph.num_nodes
    w = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n).unsqueeze(1).expand_as(graph.indices)
    w[rows, graph.indices] = graph.weights.to(torch.float64)
    return w


def dense_affinity(w: Tensor, labels: Tensor) -> Tensor:
    """Graph-degree linkage straight from the definition, one pair of clusters at a time.

    ``A[a, b] = |C_a|⁻² 1ᵀ W[C_a,C_b] W[C_b,C_a] 1 + |C_b|⁻² 1ᵀ W[C_b,C_a] W[C_a,C_b] 1``, zero on
    the diagonal. O(C²) submatrix products: small inputs only.
    """
    w = w.to(torch.float64)
    labels = torch.as_tensor(labels).long()
    c = int(labels.max()) + 1
    members = [torch.nonzero(labels == i).flatten() for i in range(c)]
    a = torch.zeros(c, c, dtype=torch.float64)
    for i in range(c):
        for j in range(i + 1, c):
            wij = w[members[i]][:, members[j]]
            wji = w[members[j]][:, members[i]]
            v = (wij @ wji).sum() / len(members[i]) ** 2 + (wji @ wij).sum() / len(members[j]) ** 2
            a[i, j] = a[j, i] = v
    return a


def dense_merge_choice(a: Tensor, k_c: int = 5, lam: float = 1.0) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """The merge criterion on a dense affinity matrix.

    Returns:
        ``(score, partner, (i, j))``: each cluster's score (``-inf`` when it has no positive
        affinity) and most affine cluster (ties: lower id; ``-1`` when none), and the pair
        chosen by the greedy step: the cluster with the highest score (ties: lower id) and its
        partner.
    """
    a = a.to(torch.float64)
    c = a.shape[0]
    score = torch.full((c,), -math.inf, dtype=torch.float64)
    partner = torch.full((c,), -1, dtype=torch.long)
    for i in range(c):
        others = [j for j in range(c) if j != i]
        vals = sorted(((float(a[i, j]), j) for j in others), key=lambda t: (-t[0], t[1]))
        if not vals or vals[0][0] <= 0:
            continue
        top = [v for v, _ in vals[:k_c]] + [0.0] * max(0, k_c - len(vals))
        s = top[0] + (lam / (k_c - 1) * sum(top[0] - v for v in top[1:]) if k_c > 1 else 0.0)
        score[i], partner[i] = s, vals[0][1]
    best = max(range(c), key=lambda i: (float(score[i]), -i))
    return score, partner, (best, int(partner[best]))


def _disjoint_pairs(order: list[int], partner: list[int], n: int, max_pairs: int) -> list[tuple[int, int]]:
    """Greedy: walk ``order``, pair each cluster with ``partner[i]`` unless either is already paired."""
    used = bytearray(n)
    pairs: list[tuple[int, int]] = []
    for i in order:
        j = int(partner[i])
        if used[i] or used[j]:
            continue
        used[i] = used[j] = 1
        pairs.append((i, j))
        if len(pairs) >= max_pairs:
            break
    return pairs
