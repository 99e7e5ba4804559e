"""Selective Pseudo-label Clustering (Mahon & Lukasiewicz, KI 2021), label-free.

An ensemble of M autoencoders is pretrained on reconstruction from noised latents. Then, every
meta-epoch, each member's embeddings of the whole training split are reduced to 2-D with UMAP and
clustered into exactly K clusters (HDBSCAN, or a Gaussian mixture); the members' labelings are
aligned to each other (Hungarian matching to a pivot member, then to the vote -- never to true
labels) and majority-voted. The points on which (nearly) all members agree become pseudo-labels:
for ``epochs_per_meta`` epochs every member trains a classification head on them (cross-entropy)
together with reconstruction. Training stops when the agreed fraction has not grown for
``patience`` meta-epochs.

Answers: for the training data, the ensemble's vote of the last labelling (:attr:`SPC.pseudo_labels`,
with :attr:`SPC.agreement`); for any image (validation, test, predict), the vote of the M heads,
confidence = fraction of heads voting for the winner, OOD score = 1 - mean max softmax of the heads.

Differences from the authors' code (https://github.com/Lou1sM/clustering, ``src/``): the members use
clusterlight's shared convolutional autoencoder (not the authors' fastai network), are trained
together by one vectorised network on the same batches, and the alignment pivot is an ensemble
member -- the authors' ``train.py`` passes the ground truth as pivot and stops on ground-truth
accuracy; here nothing reads labels. See :class:`SPC` for the defaults and their sources.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from clusterlight.cluster.consensus import consensus, select_agreed
from clusterlight.cluster.umap_hdbscan import (
    gmm_k,
    hdbscan_exact_k,
    reduce_umap,
    umap_neighbors_for,
)
from clusterlight.errors import ClusterlightError
from clusterlight.methods.base import ClusteringModule, ClusterOutput
from clusterlight.metrics import match_clusters
from clusterlight.nn.ensemble import EnsembleConvAutoencoder, EnsembleMLP
from clusterlight.precision import float32_math

__all__ = ["SPC", "PseudoLabelPrecision", "latent_noise", "pseudo_label_precision"]


def latent_noise(z: Tensor, scale: float, generator: torch.Generator | None = None,
                 rows: tuple[int, int] | None = None) -> Tensor:
    """The authors' latent noise (``utils.noiseify``): Gaussian noise divided by its maximum, times ``scale``.

    ``z`` is ``(B, M, D)``; the maximum is taken per member (over the batch and the latent axis), so
    each member is noised exactly as it would be on its own. Draws from ``generator`` (default: the
    global torch RNG). ``rows = (start, total)``: ``z`` is rows ``start ..`` of a batch of ``total``
    rows; the noise of the whole batch is drawn (and its maximum taken) and ``z``'s rows returned,
    so that ranks holding parts of one global batch noise it as one process would.
    """
    start, total = (0, z.shape[0]) if rows is None else rows
    if scale == 0 or z.numel() == 0 or total == 0:
        return torch.zeros_like(z)
    noise = torch.randn((total, *z.shape[1:]), generator=generator, device=z.device, dtype=torch.float32)
    peak = noise.amax(dim=(0, 2), keepdim=True).clamp_min(1e-3)
    return (noise[start:start + z.shape[0]] / peak * scale).to(z.dtype)


class SPC(ClusteringModule):
    """Selective pseudo-label clustering with an ensemble of autoencoders.

    Schedule (epochs are Trainer epochs): epochs ``0 .. pretrain_epochs - 1`` train reconstruction
    only. At the start of epoch ``pretrain_epochs + j * epochs_per_meta`` (j = 0, 1, ...) the
    labelling step runs on the whole training split (``compute_on_split``; UMAP, clustering,
    alignment and vote on rank 0, the result broadcast to every rank) and the next
    ``epochs_per_meta`` epochs train heads and autoencoders on the agreed pseudo-labels, looked up
    per sample by dataset index. Each labelling logs ``train/agreed_fraction``; when it has not
    grown for ``patience`` labellings, ``trainer.should_stop`` is set (the same decision on every
    rank, as the mask is broadcast). Set ``trainer.max_epochs`` to
    ``pretrain_epochs + max_meta_epochs * epochs_per_meta``.

    Losses, summed over members (member ``m`` with latent ``z_m``, noise as :func:`latent_noise`):
    L1 reconstruction ``|dec_m(z_m + noise) - x|``; with pseudo-labels, plus the cross-entropy of
    ``head_m(z_m + noise)`` on the agreed samples of the batch and the reconstruction of the
    non-agreed samples once more (as the authors' ``train_ae``).

    ``val/loss`` (label-free): L1 reconstruction from clean latents, averaged over members, plus the
    heads' cross-entropy against the heads' own majority vote on the batch; ``inf`` before the first
    labelling, so the chosen checkpoint always has trained heads (with an ``EarlyStopping`` on it,
    set ``check_finite: false``).

    Defaults follow the authors' code (``src/options.py``, ``src/multi_ae.py``, ``src/utils.py`` of
    Lou1sM/clustering) unless noted: 15 members, latent 50, noise 1.5, head MLP with 25 hidden
    units, 10 pretraining epochs, 8 epochs per meta-epoch, patience 7, Adam lr 1e-3 (set in the
    configs), UMAP ``min_dist=0`` to 2-D with ``n_neighbors = 30 * N / 70000``, HDBSCAN
    ``min_samples=10``, ``min_cluster_size = N // (2K)``. The agreement threshold defaults to 1
    (every member agrees: the paper's selection of the points all members agree on, the authors'
    ``all_agree`` in their earlier ``build_ensemble``); the authors' final code relaxes it to
    ``1 / 1.2`` of the members (set ``agreement_threshold: 0.8333``).

    Args:
        num_clusters: K (linked from the DataModule).
        input_shape: ``(channels, height, width)`` (linked from the DataModule).
        num_members: ensemble size M (scale down for quick runs).
        latent_dim: latent size of each autoencoder.
        widths: encoder channel counts of each autoencoder.
        norm: normalisation in the autoencoders: ``batch``, ``group`` or ``none``.
        head_hidden: hidden units of each member's classification head (0: a linear head).
        noise: scale of the latent noise (0 switches it off).
        pretrain_epochs: reconstruction-only epochs before the first labelling.
        epochs_per_meta: training epochs between two labellings.
        patience: stop after this many labellings without a larger agreed fraction.
        agreement_threshold: fraction of the members that must vote for a point's majority label
            for it to become a pseudo-label, in (0, 1].
        clusterer: ``hdbscan`` (the paper) or ``gmm`` (a Gaussian mixture; faster, no noise points).
        umap_neighbors: UMAP ``n_neighbors``; ``None``: ``30 * N / 70000`` (the authors' scaling),
            at least ``umap_min_neighbors``.
        umap_min_neighbors: floor of the automatic ``n_neighbors``. The authors' formula gives 3 on
            USPS; 3 neighbours fragment the UMAP graph of small training splits (on USPS-size data
            UMAP then took ~12x longer and HDBSCAN left more noise), hence 10 here. Set 3 (or
            ``umap_neighbors``) to reproduce the authors exactly.
        umap_min_dist: UMAP ``min_dist``.
        min_cluster_size: HDBSCAN ``min_cluster_size``; ``None``: ``N // (2K)``.
        min_samples: HDBSCAN ``min_samples``.
        concat_member: add the concatenation of all members' latents as one more voter (the
            authors' ``--conc``, used in their README's reproduction command).
        consensus_iters: after aligning to the pivot and voting, re-align every member to the vote
            and re-vote this many times (0: pivot alignment only, as the authors).
        pivot: the member whose labels define the label space.
        seed: seed of UMAP (member ``m`` uses ``seed + m``) and of the mixture models; the global
            RNG is not touched by the labelling step.
        optimizer: optimizer factory (autoencoders and heads).
        lr_scheduler: optional learning-rate scheduler factory.
    """

    def __init__(
        self,
        num_clusters: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        num_members: int = 15,
        latent_dim: int = 50,
        widths: list[int] = [32, 64, 128],  # noqa: B006 (jsonargparse needs a plain default)
        norm: str = "batch",
        head_hidden: int = 25,
        noise: float = 1.5,
        pretrain_epochs: int = 10,
        epochs_per_meta: int = 8,
        patience: int = 7,
        agreement_threshold: float = 1.0,
        clusterer: Literal["hdbscan", "gmm"] = "hdbscan",
        umap_neighbors: int | None = None,
        umap_min_neighbors: int = 10,
        umap_min_dist: float = 0.0,
        min_cluster_size: int | None = None,
        min_samples: int = 10,
        concat_member: bool = False,
        consensus_iters: int = 1,
        pivot: int = 0,
        seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_clusters, input_shape, optimizer, lr_scheduler)
        checks = [
            (num_members >= 1, f"num_members must be at least 1, got {num_members}"),
            (latent_dim >= 1, f"latent_dim must be at least 1, got {latent_dim}"),
            (head_hidden >= 0, f"head_hidden must be non-negative, got {head_hidden}"),
            (noise >= 0, f"noise must be non-negative, got {noise}"),
            (pretrain_epochs >= 0, f"pretrain_epochs must be non-negative, got {pretrain_epochs}"),
            (epochs_per_meta >= 1, f"epochs_per_meta must be at least 1, got {epochs_per_meta}"),
            (patience >= 1, f"patience must be at least 1, got {patience}"),
            (0 < agreement_threshold <= 1, f"agreement_threshold must lie in (0, 1], got {agreement_threshold}"),
            (clusterer in ("hdbscan", "gmm"), f"clusterer must be 'hdbscan' or 'gmm', got {clusterer!r}"),
            (umap_neighbors is None or umap_neighbors >= 2, f"umap_neighbors must be at least 2, got {umap_neighbors}"),
            (min_cluster_size is None or min_cluster_size >= 2,
             f"min_cluster_size must be at least 2, got {min_cluster_size}"),
            (min_samples >= 1, f"min_samples must be at least 1, got {min_samples}"),
            (0 <= pivot < num_members, f"pivot must lie in [0, num_members), got {pivot}"),
            (consensus_iters >= 0, f"consensus_iters must be non-negative, got {consensus_iters}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ClusterlightError(message)
        self.num_members = int(num_members)
        self.latent_dim = int(latent_dim)
        self.noise = float(noise)
        self.pretrain_epochs = int(pretrain_epochs)
        self.epochs_per_meta = int(epochs_per_meta)
        self.patience = int(patience)
        self.agreement_threshold = float(agreement_threshold)
        self.clusterer = clusterer
        self.umap_neighbors = umap_neighbors
        self.umap_min_neighbors = int(umap_min_neighbors)
        self.umap_min_dist = float(umap_min_dist)
        self.min_cluster_size = min_cluster_size
        self.min_samples = int(min_samples)
        self.concat_member = bool(concat_member)
        self.consensus_iters = int(consensus_iters)
        self.pivot = int(pivot)
        self.seed = int(seed)

        self.ensemble = EnsembleConvAutoencoder(self.num_members, self.input_shape, self.latent_dim, widths, norm)
        hidden = [head_hidden] if head_hidden > 0 else []
        self.heads = EnsembleMLP(self.num_members, self.latent_dim, hidden, self.num_clusters)
        self.register_buffer("labelled", torch.tensor(False))
        self.register_buffer("heads_trained", torch.tensor(False))
        self.register_buffer("centroids", torch.zeros(self.num_members, self.num_clusters, self.latent_dim))

        # Per-sample state of the training split, indexed by dataset index (saved in checkpoints).
        self.pseudo_labels: Tensor | None = None  # LongTensor[N]: the ensemble's vote (-1: no vote)
        self.agreed_mask: Tensor | None = None  # BoolTensor[N]: the selected pseudo-labels
        self.agreement: Tensor | None = None  # Tensor[N]: fraction of voters behind the vote
        self.labelling_version = 0  # number of labelling steps so far
        self.last_labelings: np.ndarray | None = None  # [V, N] aligned labelings of the last step (rank 0)
        self.agreed_history: list[float] = []
        self._best_agreed: float | None = None
        self._stale = 0

    # ------------------------------------------------------------------ networks
    def latents(self, images: Tensor) -> Tensor:
        """Clean latents ``(B, M, latent_dim)`` of every member."""
        return self.ensemble.encode(images)

    def embed(self, images: Tensor) -> Tensor:
        """The members' latents side by side: ``(B, M * latent_dim)``."""
        return self.latents(images).flatten(1)

    def _head_params_zero(self) -> Tensor:
        # Every parameter takes part in every loss (weight 0 where unused): DDP needs no
        # find_unused_parameters during pretraining.
        return sum(p.sum() for p in self.heads.parameters()) * 0.0

    @staticmethod
    def _l1(recon: Tensor, images: Tensor) -> Tensor:
        """Per-sample, per-member L1 reconstruction error ``(B, M)``."""
        return (recon.float() - images.float().unsqueeze(1)).abs().flatten(2).mean(dim=2)

    # ------------------------------------------------------------------ hooks
    def fit_step(self, images: Tensor, index: Tensor, batch_idx: int) -> Tensor:
        # Under DDP the noise, the agreed counts and the means are those of the global batch (all
        # ranks' batches), so the loss and its gradient are the one-process ones (see
        # ClusteringModule.gather_batch); the noise comes from a per-batch generator, the same on
        # every rank.
        z = self.latents(images)
        gathered_index, start = self.gather_batch(index)
        noise = latent_noise(z, self.noise, self.batch_generator(batch_idx, "spc_recon"),
                             (start, gathered_index.shape[0]))
        recon = self.ensemble.decode(z + noise)
        rl = self._l1(recon, images)  # (B, M)
        if self.pseudo_labels is None:
            return rl.mean(dim=0).sum() + self._head_params_zero()
        self._state_to(images.device)
        mask = self.agreed_mask[index]
        global_mask = self.agreed_mask[gathered_index]
        n_agreed, n_rest = int(global_mask.sum()), int((~global_mask).sum())
        if n_agreed == 0:
            return rl.mean(dim=0).sum() + self._head_params_zero()
        # this rank's share of a mean over the global batch: DDP averages the ranks' gradients
        scale = float(self.trainer.world_size if self._trainer is not None else 1)
        target = self.pseudo_labels[index][mask]
        zm = z[mask]
        head_noise = latent_noise(zm, self.noise, self.batch_generator(batch_idx, "spc_heads"),
                                  (int(global_mask[:start].sum()), n_agreed))
        logits = self.heads(zm + head_noise)  # (Bm, M, K)
        # mean over the agreed samples for each member, summed over members
        ce = F.cross_entropy(logits.flatten(0, 1).float(), target.repeat_interleave(self.num_members),
                             reduction="sum") * (scale / n_agreed)
        recon_loss = rl.mean(dim=0).sum()
        if n_rest > 0:
            recon_loss = recon_loss + rl[~mask].sum() * (scale / n_rest)
        self.heads_trained.fill_(True)  # no host sync: a device-side fill
        self.log("train/head_ce", ce.detach() / self.num_members, on_step=False, on_epoch=True,
                 batch_size=images.shape[0], sync_dist=True)
        return ce + recon_loss

    def eval_loss(self, images: Tensor, index: Tensor) -> Tensor:
        if not bool(self.labelled):
            # No clustering objective before the first labelling: never the best checkpoint.
            return torch.tensor(float("inf"), device=images.device)
        z = self.latents(images)
        recon = self._l1(self.ensemble.decode(z), images).mean()
        logits = self.heads(z).float()
        vote = self._vote(logits.softmax(dim=-1))[0]
        ce = F.cross_entropy(logits.flatten(0, 1), vote.repeat_interleave(self.num_members))
        return recon + ce

    def _member_probs(self, z: Tensor) -> Tensor:
        """``(B, M, K)`` cluster probabilities of each member: its head, or before the heads were
        trained, a softmax over negative squared distances to the member's agreed-cluster centroids."""
        if bool(self.heads_trained) or not bool(self.labelled):
            return self.heads(z).float().softmax(dim=-1)
        d = (z.float().unsqueeze(2) - self.centroids.float().unsqueeze(0)).pow(2).sum(-1)  # (B, M, K)
        return (-d).softmax(dim=-1)

    def _vote(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Majority vote of the members' argmax: ``(cluster, vote counts)``; ties go to the larger mean probability."""
        votes = F.one_hot(probs.argmax(dim=-1), self.num_clusters).sum(dim=1)  # (B, K)
        score = votes.float() + 0.5 * probs.mean(dim=1)
        return score.argmax(dim=1), votes

    def cluster_outputs(self, images: Tensor) -> ClusterOutput:
        z = self.latents(images)
        probs = self._member_probs(z)
        cluster, votes = self._vote(probs)
        confidence = votes.max(dim=1).values.float() / self.num_members
        ood = 1.0 - probs.max(dim=-1).values.mean(dim=1)
        return ClusterOutput(cluster=cluster, confidence=confidence, ood_score=ood, embedding=z.flatten(1))

    def clusters_ready(self) -> bool:
        return bool(self.labelled)

    def refresh_clusters(self) -> None:
        # During fit the labelling runs only at meta-epoch boundaries (on_train_epoch_start). Before
        # test/predict of a model that was never labelled, label once (the members then answer by
        # their nearest agreed-cluster centroid, as their heads are untrained).
        if bool(self.labelled) or self.trainer.state.fn == "fit":
            return
        self.update_pseudo_labels(track=False)

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        if epoch < self.pretrain_epochs:
            return
        if (epoch - self.pretrain_epochs) % self.epochs_per_meta == 0 or self.pseudo_labels is None:
            self.update_pseudo_labels(track=True)

    # ------------------------------------------------------------------ the labelling step
    def _voter_latents(self, lat: np.ndarray) -> list[np.ndarray]:
        voters = [lat[:, m] for m in range(self.num_members)]
        if self.concat_member:
            voters.append(lat.reshape(lat.shape[0], -1))
        return voters

    def label_members(self, lat: np.ndarray) -> np.ndarray:
        """Labelings ``[V, N]`` of every voter (member, plus the concatenation if enabled) from latents ``[N, M, D]``."""
        n = lat.shape[0]
        k = self.num_clusters
        neighbors = self.umap_neighbors or umap_neighbors_for(n, 30.0, self.umap_min_neighbors)
        out = []
        for v, x in enumerate(self._voter_latents(lat)):
            x2d = reduce_umap(x, neighbors, self.seed + v, self.umap_min_dist)
            if self.clusterer == "gmm":
                out.append(gmm_k(x2d, k, self.seed + v))
            else:
                out.append(hdbscan_exact_k(x2d, k, self.min_cluster_size, self.min_samples, fallback_seed=self.seed + v))
        return np.stack(out)

    @torch.no_grad()
    def update_pseudo_labels(self, track: bool = True) -> None:
        """The labelling step: latents of the whole training split, per-member UMAP + clustering,
        alignment, vote and selection on rank 0, broadcast to every rank.

        With ``track`` (during fit), logs ``train/agreed_fraction`` and applies the patience rule.
        Every rank must call this (it gathers and broadcasts).
        """
        z = self.compute_on_split(self.embed)  # (N, M * D), the same on every rank
        n = z.shape[0]
        lat = z.view(n, self.num_members, self.latent_dim)
        packed = None
        if self.trainer.is_global_zero:
            labelings = self.label_members(lat.cpu().numpy())
            aligned, labels, agreement = consensus(labelings, self.num_clusters, self.pivot, self.consensus_iters)
            mask = select_agreed(aligned, self.agreement_threshold)
            self.last_labelings = aligned  # rank 0 only, for inspection (not checkpointed)
            noise = float((labelings < 0).mean())
            packed = torch.from_numpy(np.stack([labels, mask, agreement, np.full(n, noise)], axis=1)).double()
        packed = self.broadcast_tensor(packed).to(self.device)
        labels = packed[:, 0].round().long()
        mask = packed[:, 1] > 0.5
        agreement = packed[:, 2].float()
        self.pseudo_labels, self.agreed_mask, self.agreement = labels, mask, agreement
        self.labelling_version += 1
        self._update_centroids(lat.to(self.device), labels, mask)
        self.labelled.fill_(True)

        frac = float(mask.float().mean())
        rank_zero_info(f"SPC labelling {self.labelling_version} (epoch {self.current_epoch}): "
                       f"{frac:.4f} of {n} training samples agreed, mean agreement {float(agreement.mean()):.4f}")
        if not track:
            return
        self.agreed_history.append(frac)
        if self._best_agreed is None or frac > self._best_agreed:
            self._best_agreed, self._stale = frac, 0
        else:
            self._stale += 1
        self.log_dict({
            "train/agreed_fraction": frac,
            "train/mean_agreement": float(agreement.mean()),
            "train/noise_fraction": float(packed[0, 3]),
            "train/meta_epoch": float(self.labelling_version - 1),
        }, on_step=False, on_epoch=True, sync_dist=False)
        if self._stale >= self.patience:
            rank_zero_info(f"SPC: the agreed fraction has not grown for {self._stale} meta-epochs; stopping")
            self.trainer.should_stop = True

    @float32_math
    def _update_centroids(self, lat: Tensor, labels: Tensor, mask: Tensor) -> None:
        """Per member, the mean latent of each cluster's agreed samples (all its voted samples if none agreed)."""
        k = self.num_clusters
        voted = labels >= 0
        onehot = F.one_hot(labels.clamp_min(0), k).float() * voted.unsqueeze(1).float()
        agreed = onehot * mask.unsqueeze(1).float()
        weights = torch.where(agreed.sum(0, keepdim=True) > 0, agreed, onehot)  # (N, K)
        sums = torch.einsum("nk,nmd->mkd", weights, lat.float())
        counts = weights.sum(0)  # (K,)
        have = counts > 0
        cent = self.centroids.clone()
        cent[:, have] = (sums[:, have] / counts[have].view(1, -1, 1)).to(cent.dtype)
        self.centroids.copy_(cent)

    def _state_to(self, device: torch.device) -> None:
        if self.pseudo_labels is not None and self.pseudo_labels.device != device:
            self.pseudo_labels = self.pseudo_labels.to(device)
            self.agreed_mask = self.agreed_mask.to(device)
            self.agreement = self.agreement.to(device)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        cpu = (lambda t: None if t is None else t.detach().cpu())
        checkpoint["spc_state"] = {
            "pseudo_labels": cpu(self.pseudo_labels),
            "agreed_mask": cpu(self.agreed_mask),
            "agreement": cpu(self.agreement),
            "labelling_version": self.labelling_version,
            "agreed_history": list(self.agreed_history),
            "best_agreed": self._best_agreed,
            "stale": self._stale,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("spc_state", {})
        self.pseudo_labels = state.get("pseudo_labels")
        self.agreed_mask = state.get("agreed_mask")
        self.agreement = state.get("agreement")
        self.labelling_version = int(state.get("labelling_version", 0))
        self.agreed_history = list(state.get("agreed_history", []))
        self._best_agreed = state.get("best_agreed")
        self._stale = int(state.get("stale", 0))


class PseudoLabelPrecision(Callback):
    """Monitoring only: how correct SPC's pseudo-labels are, logged after each labelling.

    Logs ``train/pseudo_label_precision`` (the fraction of the agreed pseudo-labels whose cluster
    is Hungarian-matched to their true class; the matching is fitted on every voted training
    sample) and ``train/vote_acc`` (the same over every voted training sample). It reads
    ``trainer.datamodule.train_dataset.labels``, as the evaluation metrics do, and never writes to
    the model: the method itself reads no label, which ``tests/test_label_free.py`` proves by
    training with shuffled labels to bit-identical weights. Add it with
    ``trainer.callbacks: [{class_path: clusterlight.methods.spc.PseudoLabelPrecision}]``.
    """

    def __init__(self) -> None:
        self._seen = 0
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, SPC) or pl_module.pseudo_labels is None:
            return
        if pl_module.labelling_version == self._seen:
            return
        self._seen = pl_module.labelling_version
        values = pseudo_label_precision(pl_module.pseudo_labels, pl_module.agreed_mask,
                                        trainer.datamodule.train_dataset.labels, int(trainer.datamodule.num_classes))
        self.history.append(values)
        pl_module.log_dict({f"train/{k}": v for k, v in values.items() if not math.isnan(v)},
                           on_step=False, on_epoch=True, sync_dist=False)


def pseudo_label_precision(pseudo: Tensor, mask: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """``{"pseudo_label_precision", "vote_acc", "agreed_fraction"}`` of pseudo-labels against true labels (monitoring)."""
    pseudo, mask, labels = pseudo.detach().cpu().long(), mask.detach().cpu().bool(), labels.detach().cpu().long()
    known = (labels >= 0) & (pseudo >= 0)
    out = {"pseudo_label_precision": math.nan, "vote_acc": math.nan, "agreed_fraction": float(mask.float().mean())}
    if not bool(known.any()):
        return out
    k = int(pseudo.max()) + 1
    mapping = match_clusters(pseudo[known], labels[known], k, num_classes)
    hit = mapping[pseudo.clamp_min(0)] == labels
    out["vote_acc"] = float(hit[known].float().mean())
    sel = known & mask
    if bool(sel.any()):
        out["pseudo_label_precision"] = float(hit[sel].float().mean())
    return out
