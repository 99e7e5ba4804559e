"""Matplotlib figures of a clustering: embedding map, matched confusion matrix, cluster sizes, sample images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from clusterlight.metrics import confusion_after_matching

# Figures are made with matplotlib's object-oriented API (``Figure``), never through pyplot, so
# importing this module (as training does) leaves the user's backend alone: notebooks keep
# their inline plots and headless machines need no display.


def close(fig: Figure) -> None:
    """Release a figure (kept for callers; OO figures are freed when no longer referenced)."""
    fig.clear()


def _subplots(*args, figsize: tuple[float, float] | None = None, **kwargs):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def project_2d(embedding: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Project embeddings to 2-D with PCA, UMAP or t-SNE (all with a fixed local seed)."""
    x = np.asarray(embedding, dtype=np.float32)
    if x.shape[1] <= 2:
        return np.pad(x, ((0, 0), (0, 2 - x.shape[1])))
    if method == "umap":
        import umap

        from clusterlight.cluster.umap_hdbscan import preserve_torch_threads

        with preserve_torch_threads():
            return umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, random_state=seed, init="pca").fit_transform(x)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def embedding_figure(
    embedding: np.ndarray, cluster: np.ndarray, label: np.ndarray, ood: np.ndarray, method: str = "pca"
) -> Figure:
    """Two panels: the 2-D map coloured by cluster, and by class (OOD samples as black crosses)."""
    xy = project_2d(embedding, method)
    fig, axes = _subplots(1, 2, figsize=(11, 5))
    for ax, colour, title in ((axes[0], cluster, "by cluster"), (axes[1], label, "by class")):
        ind = ~ood
        ax.scatter(xy[ind, 0], xy[ind, 1], c=colour[ind] % 20, cmap="tab20", vmin=0, vmax=19, s=4, alpha=0.7)
        if ood.any():
            ax.scatter(xy[ood, 0], xy[ood, 1], c="k", marker="x", s=8, label="OOD")
            ax.legend(loc="best")
        ax.set_title(f"embedding ({method}) {title}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def confusion_figure(
    cluster: np.ndarray, label: np.ndarray, num_clusters: int, class_names: Sequence[str] | None = None
) -> Figure:
    """Confusion matrix (true class x cluster) with clusters reordered by the Hungarian matching."""
    num_classes = int(label.max()) + 1 if len(label) else 1
    matrix = np.asarray(confusion_after_matching(cluster, label, num_classes, num_clusters=num_clusters))
    fig, ax = _subplots(figsize=(1 + 0.45 * matrix.shape[1], 1 + 0.45 * matrix.shape[0]))
    ax.imshow(matrix, cmap="Blues")
    if matrix.shape[0] * matrix.shape[1] <= 900:
        for (i, j), v in np.ndenumerate(matrix):
            if v:
                ax.text(j, i, int(v), ha="center", va="center", fontsize=7)
    ax.set_xlabel("cluster (matched order)")
    ax.set_ylabel("class")
    if class_names is not None and len(class_names) == matrix.shape[0]:
        ax.set_yticks(range(matrix.shape[0]), [str(c)[:12] for c in class_names], fontsize=7)
    ax.set_title("confusion after matching")
    fig.tight_layout()
    return fig


def _display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """One ``(C, H, W)`` image scaled to [0, 1] for ``imshow``, with its colour map.

    Three channels are shown as RGB; one channel (or any other count, averaged) in grey. A
    constant image is shown black.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    x = np.nan_to_num(x)
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if x.shape[0] == 3:
        return np.transpose(x, (1, 2, 0)), None
    return x.mean(0), "gray"


def sample_grid_figure(
    images: np.ndarray, cluster: np.ndarray, num_clusters: int, per_cluster: int = 8, seed: int = 0
) -> Figure:
    """Sample images of every cluster: one row per cluster, ``per_cluster`` images at most.

    Row ``k`` shows up to ``per_cluster`` images of cluster ``k`` chosen at random (with a local
    generator seeded by ``seed``; the global RNG is never touched) and is labelled with the
    cluster id and its size among ``images``; an empty cluster's row says "empty". Samples of
    cluster ``-1`` (left unassigned, e.g. rejected as OOD) get an extra last row, "unassigned",
    when there are any. Each image is scaled to [0, 1] on its own for display.

    Args:
        images: ``(N, C, H, W)`` (or ``(N, H, W)``) images, any numeric range; 3 channels are
            shown as RGB, other channel counts in grey (averaged over the channels).
        cluster: ``(N,)`` cluster of each image, in ``-1 .. num_clusters - 1``.
        num_clusters: number of clusters (rows, not counting "unassigned").
        per_cluster: at most this many images per row.
        seed: seed of the generator that picks the images.
    """
    images = np.asarray(images)
    cluster = np.asarray(cluster).astype(np.int64).reshape(-1)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or len(images) != len(cluster):
        raise ValueError(f"images must be (N, C, H, W) with one cluster each, got images {images.shape} "
                         f"and {len(cluster)} clusters")
    if per_cluster < 1:
        raise ValueError(f"per_cluster must be at least 1, got {per_cluster}")
    if len(cluster) and (cluster.min() < -1 or cluster.max() >= num_clusters):
        raise ValueError(f"clusters must be in -1 .. {num_clusters - 1}, got {cluster.min()} .. {cluster.max()}")
    rng = np.random.default_rng(seed)
    rows = [(f"cluster {k}", np.flatnonzero(cluster == k)) for k in range(num_clusters)]
    if (cluster == -1).any():
        rows.append(("unassigned", np.flatnonzero(cluster == -1)))
    h, w = images.shape[2:]
    cell = 0.9
    fig, axes = _subplots(len(rows), per_cluster, squeeze=False,
                             figsize=(1.4 + cell * per_cluster, 0.6 + cell * len(rows) * h / max(w, 1)))
    for (name, members), row in zip(rows, axes):
        chosen = np.sort(rng.choice(members, size=min(per_cluster, len(members)), replace=False))
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        for ax, i in zip(row, chosen):
            picture, cmap = _display_image(images[i])
            ax.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        row[0].set_ylabel(f"{name}\nn={len(members)}", rotation=0, ha="right", va="center", fontsize=8)
        if not len(members):
            row[0].text(0.5, 0.5, "empty", ha="center", va="center", fontsize=8, color="0.4",
                        transform=row[0].transAxes)
    fig.suptitle(f"sample images per cluster (n: cluster size among these {len(cluster)} samples)")
    fig.tight_layout()
    return fig


def sizes_figure(cluster: np.ndarray, label: np.ndarray, num_clusters: int) -> Figure:
    """Cluster sizes (sorted) beside true class sizes (sorted), to see collapse or forced balance."""
    sizes = np.sort(np.bincount(cluster[cluster >= 0], minlength=num_clusters))[::-1]
    classes = np.sort(np.bincount(label[label >= 0]))[::-1]
    fig, ax = _subplots(figsize=(7, 4))
    width = 0.4
    ax.bar(np.arange(len(sizes)) - width / 2, sizes, width, label="clusters")
    ax.bar(np.arange(len(classes)) + width / 2, classes, width, label="classes")
    ax.set_xlabel("rank (largest first)")
    ax.set_ylabel("samples")
    ax.set_title("cluster sizes vs class sizes")
    ax.legend()
    fig.tight_layout()
    return fig
