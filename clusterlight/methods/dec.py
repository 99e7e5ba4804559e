"""Baseline: Deep Embedded Clustering (Xie, Girshick & Farhadi, ICML 2016)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from clusterlight.methods.ae_kmeans import AEKMeans


def target_distribution(q: Tensor) -> Tensor:
    """DEC's sharpened target: ``p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j')`` with ``f_j = sum_i q_ij``."""
    weight = q.pow(2) / q.sum(dim=0).clamp_min(1e-12)
    return weight / weight.sum(dim=1, keepdim=True)


def dec_kl(p: Tensor, q: Tensor) -> Tensor:
    """``KL(P || Q)`` averaged over the batch."""
    p = p.float()
    return (p * (p.clamp_min(1e-12).log() - q.float().clamp_min(1e-12).log())).sum(dim=1).mean()


class DEC(AEKMeans):
    """Deep Embedded Clustering on the shared convolutional autoencoder.

    Phase 1 (``pretrain_epochs`` epochs): the autoencoder trains on reconstruction; validation
    uses k-means on the current embeddings, as :class:`AEKMeans` does. Phase 2: the centres start
    from k-means (``init_n_init`` restarts) on the embeddings of the whole training split and
    become trainable; the encoder and centres minimise ``KL(P || Q)`` between the Student-t soft
    assignments ``Q`` and the sharpened target ``P``. ``P`` is computed over the whole training
    split (gathered and de-duplicated under DDP) every ``target_update_epochs`` epochs and looked
    up per sample by dataset index, as in the paper (not per batch). Training stops early when
    fewer than ``tol`` of the samples change cluster between two target updates.

    ``val/loss`` is the same KL objective on each validation batch (target from the batch), so
    checkpoint choice uses DEC's own criterion; during pretraining it is ``inf`` (there is no
    clustering objective yet), so the chosen checkpoint always comes from phase 2. With an
    ``EarlyStopping`` on ``val/loss``, set its ``check_finite: false``.

    Args:
        num_clusters: number of clusters (linked from the DataModule).
        input_shape: ``(channels, height, width)`` (linked from the DataModule).
        latent_dim: size of the embedding.
        widths: channel counts of the encoder stages.
        norm: normalisation in the autoencoder.
        pretrain_epochs: epochs of reconstruction-only pretraining.
        target_update_epochs: recompute the target distribution every this many epochs.
        recon_weight: weight of the reconstruction loss kept in phase 2 (0: DEC; >0: IDEC).
        tol: stop when the fraction of samples changing cluster between updates is below this.
        init_n_init: k-means restarts for the initial centres (the paper uses 20).
        kmeans_n_init: k-means restarts for the validation clusters during pretraining.
        kmeans_max_iter: k-means iterations per restart.
        kmeans_seed: seed of k-means' own random generator.
        alpha: degrees of freedom of the Student-t kernel (1 in the paper).
        optimizer: optimizer factory (encoder, decoder and centres).
        lr_scheduler: optional learning-rate scheduler factory.
    """

    trainable_centers = True

    def __init__(
        self,
        num_clusters: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        latent_dim: int = 10,
        widths: list[int] = [32, 64, 128],  # noqa: B006
        norm: str = "batch",
        pretrain_epochs: int = 20,
        target_update_epochs: int = 1,
        recon_weight: float = 0.0,
        tol: float = 0.001,
        init_n_init: int = 20,
        kmeans_n_init: int = 5,
        kmeans_max_iter: int = 300,
        kmeans_seed: int = 0,
        alpha: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_clusters, input_shape, latent_dim, widths, norm, kmeans_n_init, kmeans_max_iter,
                         kmeans_seed, alpha, optimizer, lr_scheduler)
        self.pretrain_epochs = pretrain_epochs
        self.target_update_epochs = max(1, target_update_epochs)
        self.recon_weight = recon_weight
        self.tol = tol
        self.init_n_init = init_n_init
        self.register_buffer("clustering_started", torch.tensor(False))
        self._target: Tensor | None = None  # (N, K): P for every training sample, by dataset index
        self._target_labels: Tensor | None = None

    @property
    def pretraining(self) -> bool:
        return self.current_epoch < self.pretrain_epochs

    def on_train_epoch_start(self) -> None:
        if self.pretraining:
            return
        if not bool(self.clustering_started):
            self.fit_centers(self.init_n_init)
            self.clustering_started.fill_(True)
            rank_zero_info(f"DEC: centres initialised by k-means at epoch {self.current_epoch}")
        epochs_in = self.current_epoch - self.pretrain_epochs
        if self._target is None or epochs_in % self.target_update_epochs == 0:
            self.update_target()

    def update_target(self) -> None:
        """Recompute ``P`` from ``Q`` over the whole training split; stop when assignments settle."""
        q = self.compute_on_split(lambda x: self.soft_assign(self.embed(x))[0])
        labels = q.argmax(dim=1)
        if self._target_labels is not None:
            changed = (labels != self._target_labels).float().mean()
            self.log("train/label_change", changed, sync_dist=False)
            if changed < self.tol:
                rank_zero_info(f"DEC: {changed.item():.5f} of the samples changed cluster (< tol {self.tol}); stopping")
                self.trainer.should_stop = True
        self._target = target_distribution(q).detach()
        self._target_labels = labels

    def fit_step(self, images: Tensor, index: Tensor, batch_idx: int) -> Tensor:
        # Every trainable parameter takes part in every loss (with weight 0 where unused), so DDP
        # needs no find_unused_parameters: centres in phase 1, the decoder in phase 2 of plain DEC.
        if self.pretraining or self._target is None:
            return self.reconstruction_loss(images) + 0.0 * self.centers.sum()
        z, recon = self.autoencoder(images)
        q, _ = self.soft_assign(z)
        loss = dec_kl(self._target[index].to(q.device), q)
        recon_loss = torch.nn.functional.mse_loss(recon.float(), images.float())
        return loss + self.recon_weight * recon_loss if self.recon_weight > 0 else loss + 0.0 * recon_loss

    def refresh_clusters(self) -> None:
        # Learned centres in phase 2; k-means on the current embeddings before that.
        if not bool(self.clustering_started):
            super().refresh_clusters()

    def eval_loss(self, images: Tensor, index: Tensor) -> Tensor:
        if not bool(self.clustering_started):
            # Pretraining has no clustering objective yet: never the best checkpoint.
            return torch.tensor(float("inf"), device=images.device)
        q, _ = self.soft_assign(self.embed(images))
        return dec_kl(target_distribution(q), q)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dec_state"] = {"target": self._target, "target_labels": self._target_labels}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("dec_state", {})
        self._target = state.get("target")
        self._target_labels = state.get("target_labels")
