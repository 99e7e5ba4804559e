"""UMAP to two dimensions, then HDBSCAN (or a Gaussian mixture) with exactly K clusters.

The labelling step of selective pseudo-label clustering (Mahon & Lukasiewicz, KI 2021):

- :func:`reduce_umap` -- UMAP with ``min_dist=0`` to 2-D, seeded locally (deterministic: with a
  ``random_state`` UMAP runs single-threaded and never touches the global RNG).
- :func:`umap_neighbors_for` -- the authors' neighbourhood size, 30 neighbours per 70,000 points.
- :func:`hdbscan_exact_k` -- HDBSCAN (scikit-learn's) with ``min_cluster_size = N // (2K)`` and
  ``min_samples = 10``; when it finds another number of clusters than K, a search over the
  distance cut of its single-linkage tree (then over smaller ``min_cluster_size``) until exactly K
  clusters remain. Points outside every cluster are labelled ``-1`` (noise).
- :func:`gmm_k` -- a K-component Gaussian mixture (the authors' ``--clusterer GMM`` option).

All functions take and return numpy arrays and use only local seeds.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

__all__ = ["gmm_k", "hdbscan_exact_k", "label_points", "reduce_umap", "umap_neighbors_for"]


def umap_neighbors_for(n: int, per_70k: float = 30.0, minimum: int = 3) -> int:
    """UMAP's ``n_neighbors`` for ``n`` points: ``per_70k * n / 70000`` (the authors' scaling), at least ``minimum``.

    The authors' code uses ``30 * dset_size // 70000``: 30 on MNIST/Fashion-MNIST (70,000), 3 on
    USPS (9,298). Small data sets would get 0, hence the floor.
    """
    return int(max(minimum, 2, int(per_70k * n // 70000)))


@contextlib.contextmanager
def preserve_torch_threads():
    """Restore torch's intra-op thread count afterwards.

    numba (behind UMAP and pynndescent) resets the OpenMP thread count when its parallel
    runtime starts, which silently changes torch's thread count too, and with it the summation
    order of later float reductions: runs stop being bit-reproducible.
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def reduce_umap(x: np.ndarray, n_neighbors: int, seed: int, min_dist: float = 0.0,
                n_components: int = 2, set_op_mix_ratio: float = 1.0, init: np.ndarray | None = None) -> np.ndarray:
    """UMAP embedding ``[N, n_components]`` (float32) of ``x`` ``[N, D]``, deterministic in ``seed``.

    ``set_op_mix_ratio`` is UMAP's: how the directed k-NN memberships are made symmetric, from the
    fuzzy union (1, UMAP's default: an edge ``i -> j`` counts fully even when ``i`` is not among
    ``j``'s neighbours) to the fuzzy intersection (0: only mutual neighbours keep their weight).
    """
    if not 0.0 <= set_op_mix_ratio <= 1.0:
        raise ValueError(f"set_op_mix_ratio must be in [0, 1], got {set_op_mix_ratio}")
    import umap  # imported lazily: numba compilation takes seconds

    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 points, got {n}")
    n_neighbors = int(min(max(2, n_neighbors), n - 1))
    start = "spectral"
    if init is not None:
        start = np.ascontiguousarray(np.asarray(init, dtype=np.float64))
        if start.shape != (n, n_components) or not np.isfinite(start).all():
            raise ValueError(f"init must be a finite array of shape ({n}, {n_components}), got {start.shape}")
    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, n_components=n_components,
                        random_state=int(seed), n_jobs=1, transform_seed=int(seed),
                        set_op_mix_ratio=float(set_op_mix_ratio), init=start)
    with warnings.catch_warnings(), preserve_torch_threads():
        warnings.simplefilter("ignore")  # disconnected-graph and spectral-init notices
        out = np.asarray(reducer.fit_transform(x), dtype=np.float32)
    if not np.isfinite(out).all():  # a point left with no edge (intersection-leaning mixes) has no position
        raise ValueError(f"UMAP (set_op_mix_ratio {set_op_mix_ratio:g}) left {int((~np.isfinite(out).all(1)).sum())} "
                         "points without a position; raise set_op_mix_ratio or n_neighbors")
    return out


def _num_clusters(labels: np.ndarray) -> int:
    return int(np.unique(labels[labels >= 0]).size)


def _keep_largest(labels: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest clusters (relabelled ``0..k-1`` by decreasing size); the rest become noise."""
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    order = np.lexsort((ids, -sizes))[:k]  # by size, ties by id: deterministic
    mapping = np.full(int(ids.max()) + 1 if ids.size else 1, -1, dtype=np.int64)
    mapping[ids[order]] = np.arange(len(order))
    return np.where(labels >= 0, mapping[np.clip(labels, 0, None)], -1)


def _search_cut(model, k: int, min_cluster_size: int, grid: int = 48, steps: int = 40) -> np.ndarray | None:
    """Flat cut of the single-linkage tree: the largest distance leaving at least ``k`` clusters.

    The number of clusters of size ``>= min_cluster_size`` at cut ``d`` is 0 for tiny ``d`` and 1
    for huge ``d``; in between it changes by one at each merge. Scanning cuts from large to small
    and bisecting at the first cut that leaves ``>= k`` clusters finds the coarsest cut with ``k``
    clusters (exactly ``k`` unless ties in the tree make the count jump; the ``k`` largest are then
    kept). ``None`` when no cut reaches ``k`` clusters.
    """
    tree = getattr(model, "_single_linkage_tree_", None)
    if tree is None:
        return None
    names = tree.dtype.names or ()
    field = "value" if "value" in names else "distance"  # scikit-learn's name, hdbscan's name
    if field not in names:
        return None
    dist = np.unique(np.asarray(tree[field], dtype=np.float64))
    dist = dist[np.isfinite(dist)]
    if dist.size == 0:
        return None

    def labels_at(i: int) -> np.ndarray:
        return model.dbscan_clustering(cut_distance=float(dist[i]), min_cluster_size=min_cluster_size)

    candidates = np.unique(np.linspace(0, dist.size - 1, grid).round().astype(np.int64))[::-1]
    hi = None  # index with fewer than k clusters (a larger cut)
    for idx in candidates:
        labels = labels_at(int(idx))
        if _num_clusters(labels) >= k:
            lo = int(idx)
            break
        hi = int(idx)
    else:
        return None
    best = labels
    if hi is not None:
        for _ in range(steps):
            if hi - lo <= 1:
                break
            mid = (lo + hi) // 2
            labels = labels_at(mid)
            if _num_clusters(labels) >= k:
                lo, best = mid, labels
            else:
                hi = mid
    return _keep_largest(best, k)


def hdbscan_exact_k(x2d: np.ndarray, k: int, min_cluster_size: int | None = None, min_samples: int = 10,
                    max_halvings: int = 4, fallback_seed: int = 0) -> np.ndarray:
    """HDBSCAN labels of ``x2d`` with exactly ``k`` clusters (``-1``: noise).

    1. scikit-learn's HDBSCAN with ``min_cluster_size`` (default ``N // (2k)``, as the authors) and
       ``min_samples``; returned as is when it finds ``k`` clusters.
    2. Otherwise the coarsest cut of its single-linkage tree (mutual-reachability distances) that
       leaves ``k`` clusters of at least ``min_cluster_size`` points (see :func:`_search_cut`).
    3. When no cut reaches ``k`` clusters, ``min_cluster_size`` is halved (up to ``max_halvings``
       times) and 1-2 repeat.
    4. Last resort: a ``k``-component Gaussian mixture (:func:`gmm_k`), so the result always has
       ``k`` clusters. Deterministic: HDBSCAN has no randomness, the mixture is seeded.
    """
    from sklearn.cluster import HDBSCAN

    x2d = np.asarray(x2d, dtype=np.float64)
    n = x2d.shape[0]
    k = int(k)
    if k < 1 or n < k:
        raise ValueError(f"cannot find {k} clusters in {n} points")
    mcs = int(min_cluster_size) if min_cluster_size else n // (2 * k)
    mcs = max(2, mcs)
    ms = max(1, min(int(min_samples), n - 1))
    for _ in range(max_halvings + 1):
        model = HDBSCAN(min_cluster_size=mcs, min_samples=ms, copy=True, n_jobs=1).fit(x2d)
        labels = np.asarray(model.labels_, dtype=np.int64)
        if _num_clusters(labels) == k:
            return _keep_largest(labels, k)
        labels = _search_cut(model, k, mcs)
        if labels is not None:
            return labels
        if mcs <= 2:
            break
        mcs = max(2, mcs // 2)
    return gmm_k(x2d, k, fallback_seed)


def gmm_k(x2d: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Labels ``[N]`` in ``[0, k)`` of a ``k``-component full-covariance Gaussian mixture, seeded by ``seed``."""
    from sklearn.mixture import GaussianMixture

    x2d = np.asarray(x2d, dtype=np.float64)
    gmm = GaussianMixture(n_components=int(k), random_state=int(seed), reg_covar=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notices
        return np.asarray(gmm.fit_predict(x2d), dtype=np.int64)


def label_points(x: np.ndarray, k: int, clusterer: str = "hdbscan", n_neighbors: int | None = None,
                 seed: int = 0, min_dist: float = 0.0, min_cluster_size: int | None = None,
                 min_samples: int = 10) -> np.ndarray:
    """UMAP of ``x`` to 2-D, then ``clusterer`` (``"hdbscan"`` or ``"gmm"``) with ``k`` clusters."""
    n_neighbors = umap_neighbors_for(len(x)) if n_neighbors is None else n_neighbors
    x2d = reduce_umap(x, n_neighbors, seed, min_dist)
    if clusterer == "gmm":
        return gmm_k(x2d, k, seed)
    if clusterer == "hdbscan":
        return hdbscan_exact_k(x2d, k, min_cluster_size, min_samples, fallback_seed=seed)
    raise ValueError(f"clusterer must be 'hdbscan' or 'gmm', got {clusterer!r}")
