"""Gaussian mixtures for :class:`~clusterlight.methods.DebiasedClustering`'s initial partition.

- :func:`diag_gmm_em` -- a diagonal mixture fitted by EM in torch (float32, any device, no global
  RNG), from given responsibilities (``init_partition: kmeans``: a k-means partition).
- :func:`full_gmm` -- a full-covariance mixture (scikit-learn, locally seeded), the best
  likelihood of k-means and k-means++ starts (``init_partition: gmm``).
- :func:`merge_by_entropy` -- merges a mixture's components into fewer clusters, each step the pair
  whose union most lowers the entropy of the responsibilities (Baudry et al. 2010), for a mixture
  fitted with more components than clusters (``overcluster``); :func:`merge_by_graph` merges them
  along a k-NN graph instead, the pair with the largest share of the bigger group's edges first.
- :func:`refine_by_cut` -- moves that merge two clusters and split a third in two, kept while they
  lower the normalised cut (:func:`normalized_cut`) of a k-NN graph: a head class that the
  mixture drew as two clusters beside two classes that share one.

Unlike k-means, a mixture with per-cluster means, covariances and weights (cardinalities) lets a
small, tight cluster keep its points next to a big, spread one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterlight.precision import float32_math


@float32_math
def diag_gmm_em(x: Tensor, resp: Tensor, iters: int = 100, reg: float = 1e-6,
                tol: float = 1e-6) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EM for a diagonal Gaussian mixture, started from responsibilities ``resp (N, K)``.

    Each iteration is an M-step (weights, means, variances from the responsibilities; ``reg``
    added to every variance, as scikit-learn's ``reg_covar``) then an E-step. It stops after
    ``iters`` iterations or when the mean log-likelihood improves by less than ``tol``.

    Returns ``(resp, weights (K,), means (K, D), variances (K, D))``, the responsibilities being
    those of the returned parameters.
    """
    x, resp = x.float(), resp.float()
    prev = -math.inf
    for _ in range(max(1, iters)):
        n = resp.sum(0) + 1e-10
        weights = n / n.sum()
        means = resp.T @ x / n[:, None]
        variances = (resp.T @ (x * x)) / n[:, None] - means * means + reg
        variances = variances.clamp_min(reg)
        inv = 1.0 / variances
        maha = (x * x) @ inv.T - 2.0 * x @ (means * inv).T + (means * means * inv).sum(1)
        log_p = -0.5 * (maha + torch.log(variances).sum(1) + x.shape[1] * math.log(2 * math.pi)) + weights.log()
        log_norm = torch.logsumexp(log_p, dim=1, keepdim=True)
        resp = (log_p - log_norm).exp()
        ll = float(log_norm.mean())
        if ll - prev < tol:
            break
        prev = ll
    return resp, weights, means, variances


def full_gmm(x: Tensor, k: int, n_init: int, seed: int, max_iter: int = 100, reg_covar: float = 1e-5,
             init_resp: Tensor | None = None, return_start: bool = False) -> Tensor | tuple[Tensor, str]:
    """Responsibilities ``(N, k)`` (float32, on ``x``'s device) of a full-covariance Gaussian mixture.

    EM (scikit-learn, float64, at most ``max_iter`` iterations per start) from ``n_init`` k-means
    partitions and from as many k-means++ seedings, seeded by ``seed``; the fit with the best
    likelihood is kept (a label-free choice). Starts from k-means alone inherit its cuts: on two
    long clusters beside a small one, every one of them splits a long cluster.

    ``init_resp`` ``(N, k)``: one more start, the mixture (weights, means, covariances) these
    responsibilities define on ``x``, in the same likelihood contest. ``return_start``: also return
    which start won (``"kmeans"``, ``"k-means++"`` or ``"init_resp"``).
    """
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    from clusterlight.cluster.umap_hdbscan import preserve_torch_threads

    data = x.detach().cpu().double().numpy()
    fits = []
    with warnings.catch_warnings(), preserve_torch_threads():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        for init in ("kmeans", "k-means++"):
            fits.append((init, GaussianMixture(k, covariance_type="full", n_init=n_init, init_params=init, random_state=seed,
                                               reg_covar=reg_covar, max_iter=max_iter).fit(data)))
        if init_resp is not None:
            r = init_resp.detach().cpu().double().numpy()
            if r.shape != (data.shape[0], k):
                raise ValueError(f"init_resp must have shape ({data.shape[0]}, {k}), got {r.shape}")
            n = r.sum(0) + 10 * np.finfo(np.float64).eps
            means = r.T @ data / n[:, None]
            precisions = np.empty((k, data.shape[1], data.shape[1]))
            for c in range(k):
                diff = data - means[c]
                cov = (r[:, c, None] * diff).T @ diff / n[c] + reg_covar * np.eye(data.shape[1])
                precisions[c] = np.linalg.inv(cov)
            fits.append(("init_resp", GaussianMixture(k, covariance_type="full", weights_init=n / n.sum(), means_init=means,
                                                      precisions_init=precisions, random_state=seed, reg_covar=reg_covar,
                                                      max_iter=max_iter).fit(data)))
        start, best = fits[0]
        for name, gmm in fits[1:]:
            if gmm.lower_bound_ > best.lower_bound_:
                start, best = name, gmm
        resp = best.predict_proba(data)
    out = torch.from_numpy(resp).float().to(x.device)
    return (out, start) if return_start else out


def merge_by_entropy(resp: Tensor, k: int) -> tuple[Tensor, list[list[int]]]:
    """Merge the components of responsibilities ``resp (N, M)`` into ``k`` clusters.

    Baudry, Raftery, Celeux, Lo and Gottardo, "Combining mixture components for clustering"
    (JCGS 2010): while more than ``k`` groups remain, merge the two whose union most lowers the
    entropy ``-sum_n sum_j t_nj log t_nj`` of the responsibilities, i.e. that maximise
    ``sum_n [(t_ni + t_nj) log(t_ni + t_nj) - t_ni log t_ni - t_nj log t_nj]``. Two components
    that share their samples (one cluster that is not Gaussian, drawn by two of them) merge first;
    two that are apart, whatever their sizes, last. The merged responsibilities are the sums of
    their components'.

    Returns ``(resp (N, k), groups)``, ``groups[c]`` the sorted original components of cluster ``c``
    (clusters ordered by their smallest component).
    """
    if not 1 <= k <= resp.shape[1]:
        raise ValueError(f"k must be in [1, {resp.shape[1]}] (the number of components), got {k}")
    t = resp.detach().double().cpu().clone()  # merged in place below: never the caller's tensor
    groups = [[j] for j in range(t.shape[1])]

    def plogp(v: Tensor) -> Tensor:
        return torch.xlogy(v, v).sum(0)

    while t.shape[1] > k:
        own = plogp(t)  # (M,)
        m = t.shape[1]
        gain = torch.full((m, m), -math.inf, dtype=torch.float64)
        for i in range(m - 1):
            union = t[:, i:i + 1] + t[:, i + 1:]  # (N, M - i - 1)
            gain[i, i + 1:] = plogp(union) - own[i] - own[i + 1:]
        i, j = divmod(int(gain.argmax()), m)
        t[:, i] += t[:, j]
        t = torch.cat([t[:, :j], t[:, j + 1:]], 1)
        groups[i] = sorted(groups[i] + groups[j])
        del groups[j]
    return t.to(device=resp.device, dtype=resp.dtype), groups


def merge_by_graph(resp: Tensor, k: int, neighbours: Tensor, min_size: float | None = None) -> tuple[Tensor, list[list[int]]]:
    """Merge the components of responsibilities ``resp (N, M)`` into ``k`` clusters along a k-NN graph.

    ``neighbours (N, n)`` lists each sample's nearest samples (itself excluded). The link between
    groups ``a`` and ``b`` is the responsibility-weighted number of graph edges between them,
    ``W_ab = sum_i sum_{j in nb(i)} (t_ia t_jb + t_ib t_ja)``, and their size ``n_a = sum_i t_ia``.
    While more than ``k`` groups remain, a group smaller than ``min_size`` (default ``n``: smaller
    than a neighbourhood) joins the group it has the most edges to; otherwise the two groups with
    the largest ``W_ab / max(n_a, n_b)`` merge: the share of the larger group's edges that cross to
    the other. Two halves of one class share a long border and merge first; a small island next
    to a big class sends a fair share of its few edges there, but that is a small share of the big
    class's edges, so it keeps its own cluster. Entropy merging (:func:`merge_by_entropy`) looks
    only at how components share samples, not at their sizes or at the graph.

    Returns ``(resp (N, k), groups)`` as :func:`merge_by_entropy`.
    """
    if not 1 <= k <= resp.shape[1]:
        raise ValueError(f"k must be in [1, {resp.shape[1]}] (the number of components), got {k}")
    if neighbours.ndim != 2 or neighbours.shape[0] != resp.shape[0]:
        raise ValueError(f"neighbours must have shape ({resp.shape[0]}, n), got {tuple(neighbours.shape)}")
    t = resp.detach().double().cpu().clone()  # merged in place below: never the caller's tensor
    nb = neighbours.detach().long().cpu()
    min_size = float(nb.shape[1] if min_size is None else min_size)
    pull = t[nb].sum(1)  # (N, M): each sample's neighbours' responsibilities
    w = t.T @ pull
    w = w + w.T
    w.fill_diagonal_(0.0)
    size = t.sum(0)
    groups = [[j] for j in range(t.shape[1])]
    while t.shape[1] > k:
        if float(size.min()) < min_size:
            a = int(size.argmin())
            links = w[a].clone()
            links[a] = -math.inf
            i, j = sorted((a, int(links.argmax())))
        else:
            score = w / torch.maximum(size[:, None], size[None, :])
            score.fill_diagonal_(-math.inf)
            i, j = divmod(int(score.argmax()), t.shape[1])
            i, j = min(i, j), max(i, j)
        t[:, i] += t[:, j]
        w[i] += w[j]
        w[:, i] += w[:, j]
        w[i, i] = 0.0
        size[i] += size[j]
        keep = [c for c in range(t.shape[1]) if c != j]
        t, w, size = t[:, keep], w[keep][:, keep], size[keep]
        groups[i] = sorted(groups[i] + groups[j])
        del groups[j]
    return t.to(device=resp.device, dtype=resp.dtype), groups


def _undirected_edges(neighbours: Tensor) -> Tensor:
    """The edges ``(E, 2)`` (``i < j``, each once) of the k-NN graph ``neighbours (N, n)``, symmetrised:
    ``i`` and ``j`` are joined when either lists the other."""
    nb = neighbours.detach().long().cpu()
    n = nb.shape[0]
    rows = torch.arange(n).repeat_interleave(nb.shape[1])
    cols = nb.reshape(-1)
    keep = rows != cols
    lo, hi = torch.minimum(rows, cols)[keep], torch.maximum(rows, cols)[keep]
    key = torch.unique(lo * n + hi)
    return torch.stack([key // n, key % n], 1)


def _ncut_of_edges(edges: Tensor, labels: Tensor, k: int) -> float:
    la, lb = labels[edges[:, 0]], labels[edges[:, 1]]
    same = la == lb
    within = torch.bincount(la[same], minlength=k).double()
    cut = (torch.bincount(la[~same], minlength=k) + torch.bincount(lb[~same], minlength=k)).double()
    volume = 2.0 * within + cut
    return float((cut / volume.clamp_min(1.0)).sum())


def normalized_cut(labels: Tensor, neighbours: Tensor, k: int) -> float:
    """The normalised cut ``sum_c cut(c) / vol(c)`` of the partition ``labels (N,)`` (values below ``k``).

    The graph is the k-NN graph ``neighbours (N, n)`` (each sample's nearest samples, itself
    excluded), symmetrised and unweighted: ``i`` and ``j`` are joined (once) when either lists
    the other. ``cut(c)`` counts the edges with one end in cluster ``c``, ``vol(c)`` the edge ends in
    ``c`` (the sum of its samples' degrees); an empty cluster adds 0 (Shi and Malik 2000).
    """
    if labels.ndim != 1 or neighbours.ndim != 2 or neighbours.shape[0] != labels.shape[0]:
        raise ValueError(f"labels (N,) and neighbours (N, n) must agree, got {tuple(labels.shape)} and {tuple(neighbours.shape)}")
    return _ncut_of_edges(_undirected_edges(neighbours), labels.detach().long().cpu(), k)


def refine_by_cut(resp: Tensor, neighbours: Tensor, space: Tensor, n_init: int = 3, seed: int = 0,
                  max_moves: int | None = None) -> tuple[Tensor, list[tuple[int, int, int, float, float]]]:
    """Merge-and-split moves on the partition ``resp (N, K)``, kept while they lower the normalised cut.

    A mixture fitted by likelihood draws a big class whose samples do not fit one Gaussian as two
    components, and with the number of clusters fixed, two smaller classes then share one. Each
    move here merges two clusters ``a`` and ``b`` and splits a third, ``c``, in two (a
    two-component full-covariance mixture, :func:`full_gmm` with ``n_init`` and ``seed``, on
    ``space``'s rows of ``c``), its second half taking the freed cluster ``b``. Of all such moves
    (the clusters are the argmax of ``resp``) the one with the lowest :func:`normalized_cut` of
    the k-NN graph ``neighbours (N, n)`` is made when it is below the current cut, at most
    ``max_moves`` times (default ``K``). Two halves of one class share many graph edges: merging
    them removes a large part of the cut; two classes in one cluster share few: splitting them
    adds little. The graph and ``space`` can differ (e.g. the neighbours of the features, the
    split in their embedding).

    The responsibilities follow the moves: ``b``'s column is added to ``a``'s, and the rows of
    ``c``'s second half move their ``c`` column to ``b``. Returns ``(resp (N, K), moves)``, each
    move ``(a, b, c, cut before, cut after)``; without a move, ``resp`` itself.
    """
    if resp.ndim != 2 or space.ndim != 2 or space.shape[0] != resp.shape[0]:
        raise ValueError(f"resp (N, K) and space (N, D) must agree, got {tuple(resp.shape)} and {tuple(space.shape)}")
    if neighbours.ndim != 2 or neighbours.shape[0] != resp.shape[0]:
        raise ValueError(f"neighbours must have shape ({resp.shape[0]}, n), got {tuple(neighbours.shape)}")
    k = resp.shape[1]
    edges = _undirected_edges(neighbours)
    labels = resp.detach().argmax(1).cpu()
    out = resp
    moves: list[tuple[int, int, int, float, float]] = []
    halves: dict[int, Tensor | None] = {}

    def halve(c: int) -> Tensor | None:
        """The rows of cluster ``c`` that its two-component split puts in the second half."""
        rows = torch.nonzero(labels == c).squeeze(1)
        if rows.numel() < 4:
            return None
        second = full_gmm(space[rows.to(space.device)], 2, n_init, seed).argmax(1).cpu() == 1
        if bool(second.all()) or not bool(second.any()):
            return None
        return rows[second]

    for _ in range(k if max_moves is None else max_moves):
        current = _ncut_of_edges(edges, labels, k)
        for c in range(k):
            if c not in halves:
                halves[c] = halve(c)
        best: tuple[float, int, int, int] | None = None
        for a in range(k):
            for b in range(a + 1, k):
                merged = torch.where(labels == b, a, labels)  # b freed
                for c, rows in halves.items():
                    if c in (a, b) or rows is None:
                        continue
                    trial = merged.clone()
                    trial[rows] = b
                    value = _ncut_of_edges(edges, trial, k)
                    if value < current - 1e-12 and (best is None or value < best[0]):
                        best = (value, a, b, c)
        if best is None:
            break
        value, a, b, c = best
        rows = halves[c]
        assert rows is not None
        out = out.clone()
        out[:, a] += out[:, b]
        out[:, b] = 0.0
        r = rows.to(out.device)
        out[r, b] = out[r, c]
        out[r, c] = 0.0
        labels = torch.where(labels == b, a, labels)
        labels[rows] = b
        moves.append((a, b, c, current, value))
        for changed in (a, b, c):
            halves.pop(changed, None)
    return out, moves


def one_hot(labels: Tensor, k: int) -> Tensor:
    """``labels (N,)`` to float one-hot responsibilities ``(N, k)``."""
    return F.one_hot(labels.long(), k).float()
