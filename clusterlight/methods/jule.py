"""JULE: Joint Unsupervised LEarning of deep representations and image clusters.

Yang, Parikh & Batra, CVPR 2016 (arXiv:1604.03628); authors' Torch code ``jwyang/JULE.torch``
(``train.lua``, ``criterions/TripletEmbedding.lua``, ``models_def/*.lua``), read for the defaults.
The agglomerative clustering itself lives in :mod:`clusterlight.cluster.agglomerative`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from clusterlight.cluster.agglomerative import (
    ISOLATED_FACTOR,
    Agglomeration,
    agglomerate,
    build_graph,
    forward_step_merges,
    initial_clusters,
)
from clusterlight.errors import ClusterlightError
from clusterlight.methods.base import ClusteringModule, ClusterOutput
from clusterlight.nn.backbones import _norm
from clusterlight.precision import no_autocast


def weighted_triplet_loss(
    z: Tensor,
    labels: Tensor,
    margin: float = 0.2,
    gamma: float = 2.0,
    num_negatives: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """JULE's weighted triplet loss on one batch.

    Triplets: every pair ``i < j`` (batch order) of samples of the same cluster gives an anchor
    ``i`` and a positive ``j``; the negatives are ``num_negatives`` samples of other clusters
    drawn at random without replacement (all of them when ``None`` or fewer are available), as
    ``organize_samples`` in the authors' ``train.lua`` does. Each triplet costs::

        max(0, γ · ||z_a - z_p||² - ||z_a - z_n||² + margin)

    (``TripletEmbeddingCriterion`` in the authors' code). On L2-normalised features
    ``||u - v||² = 2 - 2 cos(u, v)``, so each term is ``max(0, 2 (cos(a, n) - γ cos(a, p)) + m')``
    with ``m' = m + 2 (γ - 1)``: the weighted hinge on cosine affinities. The loss is the mean over
    triplets; a batch without any triplet gives a zero that still carries a gradient graph.

    Args:
        z: features ``[B, D]``.
        labels: cluster of each sample ``[B]``.
        margin: the margin ``m`` (0.2 in the code).
        gamma: weight ``γ`` of the positive distance (``TripletEmbeddingCriterion`` default 2).
        num_negatives: negatives per positive pair (20 in the code); ``None`` for all.
        generator: random generator for the negatives (``None``: torch's global one).
    """
    labels = labels.to(z.device)
    same = labels[:, None] == labels[None, :]
    anchor, positive = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
    zero = (z * 0).sum()
    if anchor.numel() == 0:
        return zero
    z = z.float()
    with no_autocast(z):  # float32 distances also under mixed precision
        sq = (z * z).sum(1)
        dist = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0)
    negative = ~same[anchor]  # [P, B]
    if num_negatives is not None and num_negatives < z.shape[0]:
        scores = torch.rand(negative.shape, device=z.device, generator=generator)
        scores = scores.masked_fill(~negative, -1.0)
        vals, idx = scores.topk(num_negatives, dim=1)
        negative = torch.zeros_like(negative).scatter_(1, idx, vals >= 0)
    count = negative.sum()
    if count == 0:
        return zero
    terms = F.relu(gamma * dist[anchor, positive][:, None] - dist[anchor] + margin)
    return (terms * negative).sum() / count


class JULENet(nn.Module):
    """The authors' CNN (``models_def/*.lua``), sized to the input.

    Blocks of ``conv 5x5 (no padding) -> batch norm -> ReLU -> max-pool 2x2 (ceil)`` with
    ``channels`` maps each, added while the map after the next block would still be at least
    4 px (at least one block), then a linear layer to ``feature_dim`` and L2 normalisation.
    This reproduces ``models_def`` for 16 px (USPS: 1 block, 50·6·6 = 1800 inputs to the
    linear layer) and 128 px (their COIL-20: 4 blocks, 50·5·5 = 1250); for 28 px (MNIST) it
    gives 2 blocks like theirs but also pools after the second (800 inputs instead of 3200).
    Weights are drawn from N(0, 0.01²), biases zero (``NetInit``).

    Args:
        input_shape: ``(channels, height, width)``.
        channels: feature maps per block (50 in the authors' models).
        feature_dim: output size (160 in the authors' models).
        norm: normalisation after each convolution: ``batch`` (the authors'), ``group`` or ``none``.
    """

    def __init__(self, input_shape: Sequence[int], channels: int = 50, feature_dim: int = 160,
                 norm: str = "batch") -> None:
        super().__init__()
        c, h, w = (int(v) for v in input_shape)
        layers: list[nn.Module] = []
        cin = c

        def after(size: int, kernel: int) -> int:
            return math.ceil((size - kernel + 1) / 2)

        while True:
            kernel = min(5, h, w)
            nh, nw = after(h, kernel), after(w, kernel)
            if layers and (kernel < 5 or min(nh, nw) < 4):
                break
            layers += [nn.Conv2d(cin, channels, kernel), _norm(norm, channels), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, 2, ceil_mode=True)]
            cin, h, w = channels, nh, nw
        self.blocks = nn.Sequential(*layers)
        self.num_blocks = len(layers) // 4
        self.fc = nn.Linear(channels * h * w, feature_dim)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.fc(self.blocks(x).flatten(1)), dim=1)


class JULE(ClusteringModule):
    """JULE: a CNN trained jointly with recurrent agglomerative clustering.

    The recurrent process (as in the paper and the authors' ``train.lua``):

    1. **Initial clusters** (first training epoch): the connected components of the 1-NN
       graph of the L2-normalised raw pixels (``init_on_pixels``, as the code does) or of the
       untrained CNN's features.
    2. **Backward pass**: ``epochs_per_period`` epochs of the CNN on the weighted triplet loss
       (:func:`weighted_triplet_loss`), the triplets of each batch built from the current
       cluster of each sample, looked up by its dataset index. Under DDP the triplets come from
       the global batch (the features of all ranks gathered) and the negatives from a generator
       seeded by the run seed, epoch and batch, so the loss and its gradient are those of one
       process with the same global batch.
    3. **Forward pass** (after the last batch of the period, before that epoch's validation):
       the features of the whole training split (``compute_on_split``) build a kNN graph and
       ``min(⌈η · n_c⌉, n_c - K)`` pairs of the current clusters are merged with the
       graph-degree linkage and the ``K_c`` criterion
       (:class:`~clusterlight.cluster.agglomerative.Agglomeration`), on rank 0; the labels are
       broadcast to every rank.
    4. Repeat 2-3 until ``K = num_clusters`` clusters remain; then training stops (the CNN is
       not trained on the final ``K`` clusters, as in the code).

    **Answer** (``refresh_clusters``, before each validation/test): as the code's
    ``merge_label_final``, the features of the training split are clustered again from scratch
    (1-NN components, then merges down to ``K``); the ``K`` cluster centroids (mean features,
    re-normalised) classify new images by cosine similarity. ``confidence`` is the softmax of
    the cosine similarities over ``temperature``; ``ood_score = 1 - max cosine similarity``.

    ``val/loss`` (label-free) is the weighted triplet loss of each validation batch with
    nearest-centroid clusters and all negatives, once the recurrent process has reached ``K``
    clusters; before that it is ``inf`` (the clusters being trained on are not yet the answer),
    so the chosen checkpoint is always one of the finished model. With an ``EarlyStopping`` on
    ``val/loss``, set ``check_finite: false``.

    State saved in checkpoints: the cluster of every training sample, the period counter, the
    epoch the current period began and whether the process finished (``jule_state``), and the
    centroids (buffers).

    Args:
        num_clusters: number of clusters ``K`` (linked from the DataModule).
        input_shape: ``(channels, height, width)`` (linked from the DataModule).
        conv_channels: feature maps per convolution block of :class:`JULENet` (50 in the authors' models).
        feature_dim: size of the L2-normalised features (160 in the authors' models).
        unfolding_rate: ``η``, fraction of the clusters merged per period (0.9; 0.2 for faces).
        epochs_per_period: CNN epochs per partially unrolled period (``epoch_pp``, 20 in the code).
        k_s: neighbours of the kNN graph (``K_s``, 20).
        k_c: neighbouring clusters of the merge criterion (``K_c``, 5).
        lam: weight ``λ`` of the affinity-gap term of the merge criterion (1).
        margin: margin of the triplet loss (0.2).
        gamma: weight ``γ`` of the positive pair in the triplet loss (2, the criterion's
            default; ``train.lua`` passes 1 and suggests 1-2).
        num_negatives: negatives drawn per positive pair in training (20).
        init_on_pixels: initial clusters from raw pixels (the code) instead of CNN features.
        round_fraction: merges per recomputation of the affinities, as a fraction of the
            clusters (see :class:`~clusterlight.cluster.agglomerative.Agglomeration`; 0 is the
            paper's one merge at a time).
        temperature: temperature of the softmax giving the confidences.
        norm: normalisation in the CNN: ``batch`` (the authors'), ``group`` or ``none`` (per-sample
            normalisations need no synchronised batch statistics under DDP on CPUs).
        optimizer: optimizer factory (the code: SGD, lr 0.01, momentum 0.9, weight decay 5e-5).
        lr_scheduler: optional learning-rate scheduler factory.
    """

    def __init__(
        self,
        num_clusters: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        conv_channels: int = 50,
        feature_dim: int = 160,
        unfolding_rate: float = 0.9,
        epochs_per_period: int = 20,
        k_s: int = 20,
        k_c: int = 5,
        lam: float = 1.0,
        margin: float = 0.2,
        gamma: float = 2.0,
        num_negatives: int | None = 20,
        init_on_pixels: bool = True,
        round_fraction: float = 0.1,
        temperature: float = 0.1,
        norm: str = "batch",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_clusters, input_shape, optimizer, lr_scheduler)
        checks = {
            "unfolding_rate": 0 < unfolding_rate <= 1, "epochs_per_period": epochs_per_period >= 1,
            "k_s": k_s >= 1, "k_c": k_c >= 1, "margin": margin >= 0, "gamma": gamma > 0,
            "num_negatives": num_negatives is None or num_negatives >= 1,
            "round_fraction": 0 <= round_fraction <= 1, "temperature": temperature > 0,
            "norm": norm in ("batch", "group", "none"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ClusterlightError(f"JULE: invalid {', '.join(bad)} (see `--model.help JULE`)")
        self.net = JULENet(self.input_shape, conv_channels, feature_dim, norm)
        self.unfolding_rate = unfolding_rate
        self.epochs_per_period = epochs_per_period
        self.k_s, self.k_c, self.lam = k_s, k_c, lam
        self.margin, self.gamma, self.num_negatives = margin, gamma, num_negatives
        self.init_on_pixels = init_on_pixels
        self.round_fraction = round_fraction
        self.temperature = temperature
        self.register_buffer("centroids", torch.zeros(self.num_clusters, feature_dim))
        self.register_buffer("centroids_fitted", torch.tensor(False))
        # recurrent-process state (saved in checkpoints as ``jule_state``)
        self._labels: Tensor | None = None  # cluster of every training sample, by dataset index
        self._period = 0
        self._period_start = 0
        self._finished = False

    # ------------------------------------------------------------------ features and answers
    def features(self, images: Tensor) -> Tensor:
        """L2-normalised CNN features ``[B, feature_dim]``."""
        return self.net(images)

    def embed(self, images: Tensor) -> Tensor:
        return self.features(images)

    def clusters_ready(self) -> bool:
        return bool(self.centroids_fitted)

    def similarities(self, z: Tensor) -> Tensor:
        """Cosine similarities ``[B, K]`` of normalised features to the centroids (float32)."""
        with no_autocast(z):
            return z.float() @ F.normalize(self.centroids.float(), dim=1).T

    def cluster_outputs(self, images: Tensor) -> ClusterOutput:
        z = self.features(images)
        sim = self.similarities(z)
        best, cluster = sim.max(dim=1)
        conf = torch.softmax(sim / self.temperature, dim=1).max(dim=1).values
        return ClusterOutput(cluster=cluster, confidence=conf, ood_score=1.0 - best, embedding=z)

    @property
    def num_current_clusters(self) -> int:
        """Clusters of the recurrent process now (0 before the initial clustering)."""
        return 0 if self._labels is None else int(self._labels.max()) + 1

    # ------------------------------------------------------------------ training
    def fit_step(self, images: Tensor, index: Tensor, batch_idx: int) -> Tensor | dict[str, Tensor]:
        if self._finished or self._labels is None:
            return {}  # nothing left to learn: the step is skipped
        if self._labels.device != index.device:
            self._labels = self._labels.to(index.device)
        # Triplets and negatives of the global batch (all ranks' batches: under DDP the same as on one
        # process), drawn from a per-batch generator that is the same on every rank.
        z, _ = self.gather_batch(self.features(images))
        labels, _ = self.gather_batch(self._labels[index])
        loss = weighted_triplet_loss(z, labels, self.margin, self.gamma, self.num_negatives,
                                     generator=self.batch_generator(batch_idx, "jule_negatives"))
        return self.gathered_loss(loss)

    def on_train_epoch_start(self) -> None:
        if self._finished:  # e.g. resumed after the process ended: nothing to train
            self.trainer.should_stop = True
            return
        if self._labels is None:
            self._initialise()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The forward pass closes a period after its last batch, before the epoch's validation.
        if self._finished or self._labels is None or batch_idx + 1 != self.trainer.num_training_batches:
            return
        if self.current_epoch + 1 - self._period_start < self.epochs_per_period:
            return
        self._forward_pass()
        self._period_start = self.current_epoch + 1

    def on_train_epoch_end(self) -> None:
        self.log("train/num_clusters", float(self.num_current_clusters), on_step=False, on_epoch=True)

    def on_fit_end(self) -> None:
        super().on_fit_end()
        if not self._finished:
            rank_zero_warn(f"JULE stopped with {self.num_current_clusters} clusters, before reaching "
                           f"num_clusters={self.num_clusters}: raise max_epochs or lower epochs_per_period")

    def _initialise(self) -> None:
        """Initial clusters: 1-NN components of the training split (rank 0, broadcast)."""
        if self.init_on_pixels:
            z = self.compute_on_split(lambda x: F.normalize(x.flatten(1).float(), dim=1))
        else:
            z = self.compute_on_split(self.features)
        labels = None
        if self.trainer.is_global_zero:
            graph = build_graph(z, self.k_s, keep_features=False)
            labels = initial_clusters(graph.indices)
            if int(labels.max()) + 1 < self.num_clusters:
                labels = torch.arange(z.shape[0])  # fewer components than K: start from singletons
            labels = labels.to(z.device)
        self._labels = self.broadcast_tensor(labels).long()
        self._period, self._period_start = 1, self.current_epoch
        n = self.num_current_clusters
        self._finished = n <= self.num_clusters
        rank_zero_info(f"JULE: {n} initial clusters from the 1-NN graph of the "
                       f"{'pixels' if self.init_on_pixels else 'CNN features'} ({z.shape[0]} samples)")

    def _forward_pass(self) -> None:
        """One forward step of the recurrent process on the current features (rank 0, broadcast)."""
        assert self._labels is not None
        z = self.compute_on_split(self.features)
        before = self.num_current_clusters
        labels = None
        if self.trainer.is_global_zero:
            graph = build_graph(z, self.k_s)
            state = Agglomeration(graph, self._labels.cpu(), k_c=self.k_c, lam=self.lam,
                                  round_fraction=self.round_fraction)
            state.merge(forward_step_merges(state.n_clusters, self.num_clusters, self.unfolding_rate),
                        absorb_isolated=state.n_clusters > ISOLATED_FACTOR * self.num_clusters)
            labels = torch.from_numpy(state.labels).to(z.device)
        self._labels = self.broadcast_tensor(labels).long()
        self._period += 1
        n = self.num_current_clusters
        rank_zero_info(f"JULE: forward pass {self._period - 1} after epoch {self.current_epoch}: "
                       f"{before} -> {n} clusters")
        if n <= self.num_clusters:
            self._finished = True
            self.trainer.should_stop = True
            rank_zero_info(f"JULE: reached {n} clusters; training stops after this epoch's validation")

    # ------------------------------------------------------------------ final clustering
    def refresh_clusters(self) -> None:
        """Re-cluster the training split's features from scratch to ``K``; keep the centroids."""
        z = self.compute_on_split(self.features)
        labels = None
        if self.trainer.is_global_zero:
            labels = agglomerate(z, self.num_clusters, unfolding_rate=self.unfolding_rate, k_s=self.k_s,
                                 k_c=self.k_c, lam=self.lam, round_fraction=self.round_fraction).to(z.device)
        labels = self.broadcast_tensor(labels).long().to(z.device)
        sums = torch.zeros(self.num_clusters, z.shape[1], device=z.device, dtype=torch.float32)
        sums.index_add_(0, labels, z.float())
        with torch.no_grad():
            self.centroids.copy_(F.normalize(sums, dim=1).to(self.centroids))
            self.centroids_fitted.fill_(True)

    def eval_loss(self, images: Tensor, index: Tensor) -> Tensor:
        if not self._finished or not bool(self.centroids_fitted):
            # the recurrent process has not reached K clusters: never the best checkpoint
            return torch.tensor(float("inf"), device=images.device)
        z = self.features(images)
        return weighted_triplet_loss(z, self.similarities(z).argmax(dim=1), self.margin, self.gamma, None)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["jule_state"] = {
            "labels": None if self._labels is None else self._labels.detach().cpu(),
            "period": self._period,
            "period_start": self._period_start,
            "finished": self._finished,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("jule_state", {})
        self._labels = state.get("labels")
        self._period = int(state.get("period", 0))
        self._period_start = int(state.get("period_start", 0))
        self._finished = bool(state.get("finished", False))
