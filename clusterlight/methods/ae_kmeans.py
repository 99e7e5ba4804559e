"""Baseline: a convolutional autoencoder, then k-means on its embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from clusterlight.cluster.kmeans import kmeans
from clusterlight.methods.base import ClusteringModule, ClusterOutput
from clusterlight.nn import ConvAutoencoder
from clusterlight.precision import float32_math


@float32_math
def squared_distances(z: Tensor, centers: Tensor) -> Tensor:
    """Squared Euclidean distances ``(B, K)`` between rows of ``z`` and ``centers``.

    Float32, also under autocast (switched off here: a bfloat16 ``z @ centers.T`` would cancel).
    """
    z, centers = z.float(), centers.float()
    d = z.pow(2).sum(1, keepdim=True) - 2 * z @ centers.T + centers.pow(2).sum(1)
    return d.clamp_min(0)


def student_t(sq_dist: Tensor, alpha: float = 1.0) -> Tensor:
    """DEC's soft assignment: ``q_ij`` proportional to ``(1 + d_ij / alpha) ** (-(alpha + 1) / 2)``."""
    logits = -(alpha + 1.0) / 2.0 * torch.log1p(sq_dist / alpha)
    return torch.softmax(logits, dim=1)


class AEKMeans(ClusteringModule):
    """Autoencoder + k-means baseline.

    The autoencoder trains on reconstruction (mean squared error). Before each validation (and
    before ``test``/``predict`` if it never ran) k-means runs on the embeddings of the whole
    training split; images are assigned to the nearest centre. The confidence is the Student-t
    soft assignment of DEC, the OOD score the squared distance to the nearest centre.

    Args:
        num_clusters: number of clusters (linked from the DataModule).
        input_shape: ``(channels, height, width)`` (linked from the DataModule).
        latent_dim: size of the embedding.
        widths: channel counts of the encoder stages (the decoder mirrors them).
        norm: normalisation in the autoencoder: ``batch``, ``group`` or ``none``.
        kmeans_n_init: k-means restarts (the best inertia wins).
        kmeans_max_iter: k-means iterations per restart.
        kmeans_seed: seed of k-means' own random generator (the global RNG is never touched).
        alpha: degrees of freedom of the Student-t kernel used for confidences.
        optimizer: optimizer factory for the autoencoder.
        lr_scheduler: optional learning-rate scheduler factory.
    """

    trainable_centers = False

    def __init__(
        self,
        num_clusters: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        latent_dim: int = 10,
        widths: list[int] = [32, 64, 128],  # noqa: B006 (jsonargparse needs a plain default)
        norm: str = "batch",
        kmeans_n_init: int = 10,
        kmeans_max_iter: int = 300,
        kmeans_seed: int = 0,
        alpha: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_clusters, input_shape, optimizer, lr_scheduler)
        self.autoencoder = ConvAutoencoder(self.input_shape, latent_dim, widths, norm)
        self.kmeans_n_init = kmeans_n_init
        self.kmeans_max_iter = kmeans_max_iter
        self.kmeans_seed = kmeans_seed
        self.alpha = alpha
        centers = torch.zeros(self.num_clusters, latent_dim)
        if self.trainable_centers:
            self.centers = nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)
        self.register_buffer("centers_fitted", torch.tensor(False))

    # -- hooks
    def fit_step(self, images: Tensor, index: Tensor, batch_idx: int) -> Tensor:
        return self.reconstruction_loss(images)

    def reconstruction_loss(self, images: Tensor) -> Tensor:
        _, recon = self.autoencoder(images)
        return F.mse_loss(recon.float(), images.float())

    def embed(self, images: Tensor) -> Tensor:
        return self.autoencoder.encode(images)

    def eval_loss(self, images: Tensor, index: Tensor) -> Tensor:
        return self.reconstruction_loss(images)

    def clusters_ready(self) -> bool:
        return bool(self.centers_fitted)

    def soft_assign(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Student-t soft assignments ``q`` and squared distances to the centres."""
        d = squared_distances(z, self.centers)
        return student_t(d, self.alpha), d

    def cluster_outputs(self, images: Tensor) -> ClusterOutput:
        z = self.embed(images)
        q, d = self.soft_assign(z)
        conf, cluster = q.max(dim=1)
        return ClusterOutput(cluster=cluster, confidence=conf, ood_score=d.min(dim=1).values, embedding=z)

    def refresh_clusters(self) -> None:
        self.fit_centers(self.kmeans_n_init)

    def fit_centers(self, n_init: int) -> None:
        """k-means on the embeddings of the whole training split (rank 0), broadcast to all ranks."""
        z = self.compute_on_split(self.embed)
        centers = None
        if self.trainer.is_global_zero:
            centers = kmeans(z, self.num_clusters, n_init=n_init, max_iter=self.kmeans_max_iter,
                             seed=self.kmeans_seed).centers
        centers = self.broadcast_tensor(centers)
        with torch.no_grad():
            self.centers.copy_(centers.to(self.centers.dtype))
            self.centers_fitted.fill_(True)
