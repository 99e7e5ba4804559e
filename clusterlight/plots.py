"""Matplotlib figures of a clustering: embedding map, matched confusion matrix, cluster sizes."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clusterlight.metrics import confusion_after_matching  # noqa: E402


def close(fig: plt.Figure) -> None:
    plt.close(fig)


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
) -> plt.Figure:
    """Two panels: the 2-D map coloured by cluster, and by class (OOD samples as black crosses)."""
    xy = project_2d(embedding, method)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
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
) -> plt.Figure:
    """Confusion matrix (true class x cluster) with clusters reordered by the Hungarian matching."""
    num_classes = int(label.max()) + 1 if len(label) else 1
    matrix = np.asarray(confusion_after_matching(cluster, label, num_classes, num_clusters=num_clusters))
    fig, ax = plt.subplots(figsize=(1 + 0.45 * matrix.shape[1], 1 + 0.45 * matrix.shape[0]))
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


def sizes_figure(cluster: np.ndarray, label: np.ndarray, num_clusters: int) -> plt.Figure:
    """Cluster sizes (sorted) beside true class sizes (sorted), to see collapse or forced balance."""
    sizes = np.sort(np.bincount(cluster[cluster >= 0], minlength=num_clusters))[::-1]
    classes = np.sort(np.bincount(label[label >= 0]))[::-1]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.4
    ax.bar(np.arange(len(sizes)) - width / 2, sizes, width, label="clusters")
    ax.bar(np.arange(len(classes)) + width / 2, classes, width, label="classes")
    ax.set_xlabel("rank (largest first)")
    ax.set_ylabel("samples")
    ax.set_title("cluster sizes vs class sizes")
    ax.legend()
    fig.tight_layout()
    return fig
