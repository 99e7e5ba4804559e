"""Online deep clustering with hard-assignment regularisation (Mahon & Lukasiewicz, AAAI 2024).

"Hard Regularization to Prevent Deep Online Clustering Collapse without Data Augmentation",
arXiv:2303.16521; the authors' code is github.com/Lou1sM/online_hard_clustering.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from clusterlight.cluster.assignment import (
    distributed_assign,
    greedy_hard_assign,
    hard_objective,
    mean_assignment_kl,
    sinkhorn_assign,
)
from clusterlight.cluster.kmeans import kmeans
from clusterlight.errors import ClusterlightError
from clusterlight.methods.base import ClusteringModule, ClusterOutput
from clusterlight.methods.neighbours import PixelNeighbours
from clusterlight.nn import ConvEncoder, PoolEncoder

__all__ = ["OnlineHardClustering"]

ASSIGNMENTS = ("hard", "sinkhorn", "entropy", "argmin")


class OnlineHardClustering(PixelNeighbours, ClusteringModule):
    """Online clustering: an encoder and K centroids trained jointly on hard batch assignments.

    Each cluster is an isotropic Gaussian ``N(mu_c, sigma I)`` in the embedding space, so the cost
    of putting point ``b`` in cluster ``c`` is ``d(b, c) = ||z_b - mu_c||^2 / sigma`` (up to a
    constant). A training batch is assigned with :func:`~clusterlight.cluster.assignment.greedy_hard_assign`,
    which minimises ``sum_b d(b, c_b) + sum_c log(n_c!)`` greedily: the ``log(n_c!)`` term of the
    paper's Bayesian derivation makes the ``(n+1)``-th point of a cluster cost ``log(n+1)`` more,
    so big clusters get dearer, which is what prevents collapse without data augmentation. The
    loss is the mean cost ``d(b, c_b)`` of the chosen assignments; encoder and centroids are
    trained jointly. Evaluation assigns each image to its nearest centroid (argmin ``d``); the
    confidence is ``max softmax(-d)`` and the OOD score ``min d``.

    ``assignment`` chooses the training assignment, for collapse-robustness comparisons:
    ``hard`` (the method), ``sinkhorn`` (balanced Sinkhorn-Knopp transport, argmax of the plan,
    as SeLa/SwAV-style baselines), ``entropy`` (nearest centroid plus ``entropy_weight`` times
    ``KL(mean softmax(-d) || uniform)``), ``argmin`` (nearest centroid, no regularisation: the
    collapse-prone ablation, the reference's ``--no_reg``).

    Imbalanced data (``imbalanced: true``, with ``hard``): the cost gets a log prior over
    cluster sizes, ``d(b, c) - prior_strength * log pi_c``. The authors align a prior built from
    the true class sizes with the clusters through the labels; here ``pi`` is estimated without
    labels, as a running average (``prior_momentum``) of the fraction of training points in each
    cluster (summed over ranks under DDP): with ``prior_source: assigned`` the points the greedy
    assigns to it, with ``nearest`` those whose nearest centroid it is. The greedy's own counts are
    held near equal by the ``log(n_c!)`` penalty, so a prior built from them stays close to
    uniform and confirms itself; the nearest-centroid counts are not regularised, though the
    training pulls points towards their balanced assignments and so balances them too (on the
    ``lt10`` splits neither source gives a prior far from uniform: docs/results.md). The prior is
    kept in the ``cluster_prior
    buffer (saved in checkpoints; uniform unless ``imbalanced``) and used from epoch
    ``prior_warmup_epochs`` on. ``prior_strength`` below 1 keeps part of the
    size penalty: at strength 1 a prior that matches the current sizes cancels the ``log(n_c!)``
    term to first order, and nothing holds the cluster sizes any more.

    Under DDP, ``global_assignment: false`` assigns each rank's batch on its own (as the
    reference does on one GPU); ``true`` gathers the costs of all ranks, assigns the global batch
    (identically on every rank) and each rank keeps its own rows. ``val/loss`` (checkpoint choice)
    is the mean hard-regularised cost ``(sum_b d(b, c_b) + sum_c log(n_c!)) / B`` of the greedy
    assignment of each validation batch: label-free. Training also logs ``train/nonempty_clusters``
    and ``train/largest_cluster_frac`` of the training assignments, to watch for collapse.

    Neighbour pairs (``neighbours: k``, off by default; not in the paper). Without augmentation
    the only training signal is the pull of each embedding towards its own assigned centroid, so
    the clustering of the first epoch is what the encoder keeps reinforcing (on Fashion-MNIST the
    validation ACC stays at its first-epoch level). With ``neighbours: k`` the training split's
    ``k`` nearest neighbours in pixel space are computed when fitting starts (rank 0, broadcast;
    not saved in checkpoints: a resumed fit computes the same table again), and each training
    image is paired with one of its neighbours, drawn afresh at every step (the same draw on every
    rank). The neighbour stands in for an augmented view: the pair is assigned as one unit by the
    chosen assignment on the mean of the two costs, and the loss is that mean cost of the assigned
    cluster, so both images are pulled to the same centroid (``neighbour_draws: m`` draws ``m``
    neighbours per image, and the group of ``1 + m`` images is assigned on its mean cost). No
    label is involved; evaluation is unchanged (each image alone, nearest centroid). A ``k`` of
    about 1 % of the training images worked best on Fashion-MNIST (docs/results.md); each step
    encodes ``1 + m`` times as many images.

    Args:
        num_clusters: number of clusters (linked from the DataModule).
        input_shape: ``(channels, height, width)`` (linked from the DataModule).
        latent_dim: size of the embedding (the reference uses 128).
        widths: channel counts of the encoder stages.
        encoder: ``strided`` (:class:`~clusterlight.nn.ConvEncoder`, stride-2 3x3 convolutions) or
            ``pooled`` (:class:`~clusterlight.nn.PoolEncoder`: 5x5 convolutions and max pooling; with
            ``widths: [6, 16]`` the network of the authors' code).
        norm: normalisation in the encoder: ``batch``, ``group`` or ``none``.
        assignment: training assignment: ``hard``, ``sinkhorn``, ``entropy`` or ``argmin``.
        sigma: variance of the isotropic clusters; costs are squared distances divided by it
            (the reference's inverse covariance is ``1e-2 I``, i.e. 100).
        imbalanced: add the label-free log prior over cluster sizes to the hard assignment.
        prior_momentum: weight of each batch in the running average of the cluster sizes.
        prior_strength: multiplier of the log prior in the cost (see above).
        prior_warmup_epochs: the log prior enters the cost from this epoch on.
        prior_source: which counts the running prior averages: ``assigned`` (the greedy's
            training assignments) or ``nearest`` (each training point's nearest centroid).
        global_assignment: under DDP, assign the batches of all ranks jointly (``hard`` and
            ``sinkhorn``; the nearest-centroid assignments of ``entropy``/``argmin`` are per point).
        centroid_init: ``random`` (standard normal, as the reference) or ``kmeans`` (k-means on the
            embeddings of the untrained encoder over the whole training split, at fit start, on
            rank 0 and broadcast).
        embedding_norm: ``none`` (the reference) or ``batch``: the embeddings are standardised per
            dimension (batch normalisation without affine parameters; running statistics at
            evaluation). The loss pulls points towards their centroids and nothing in it stops the
            encoder from shrinking every embedding towards one point, where the costs no longer
            separate clusters, training assignments are decided by the size penalty alone and
            nearest-centroid evaluation collapses; with unit variance per dimension it cannot.
        neighbours: ``0`` (the reference) or ``k``: every training image is paired with one of its
            ``k`` nearest neighbours in pixel space, drawn afresh at each step (see *Neighbour
            pairs* above).
        neighbour_draws: neighbours drawn per image at each step (independently, with
            replacement); the image and its draws are assigned as one group on the mean of their
            costs, and each step encodes ``1 + neighbour_draws`` times as many images.
        neighbour_space: where the neighbours are found: ``pixel`` (at fit start, kept), or
            ``embedding`` (pixel space for the first epoch, then recomputed in the current
            embedding at the start of every later epoch; :class:`~clusterlight.methods.neighbours.PixelNeighbours`).
        neighbour_bank: ``0`` (off) or ``m`` (at most ``neighbours``): the training assignment of
            each group also averages the costs of the image's ``m`` nearest neighbours (mutual
            ones only, with ``mutual_neighbours``), computed from a bank of the embedding each
            training image had when it was last in a batch, against the current centroids. No
            extra image is encoded and the loss is unchanged (the group's fresh images only): the
            bank smooths which cluster a neighbourhood is pulled to, at the cost of an
            ``N x latent_dim`` float32 buffer (36 MB for the whole Fashion-MNIST at 128). Neighbours
            not yet seen in this fit are left out; under DDP every rank stores every rank's batch
            (``all_gather``). The bank is not saved in checkpoints: a resumed fit refills it.
        mutual_neighbours: keep only mutual pairs (``j`` among the ``k`` nearest of ``i`` and ``i``
            among those of ``j``) and draw uniformly among them; an image without one is paired
            with itself. On Fashion-MNIST at ``k`` = 500 the pairs' same-class share rises from
            0.67 to 0.77 on average over the classes (the 54,000-image training split;
            ``scripts/mutual_purity.py``).
        sinkhorn_epsilon: entropic temperature of the Sinkhorn baseline (reference: 0.5).
        sinkhorn_iters: Sinkhorn-Knopp iterations (reference: 15).
        entropy_weight: weight of the KL-to-uniform term of the entropy baseline.
        kmeans_n_init: k-means restarts for ``centroid_init: kmeans``.
        kmeans_seed: seed of k-means' own random generator.
        optimizer: optimizer factory (encoder and centroids; the reference uses Adam, lr 1e-3).
        lr_scheduler: optional learning-rate scheduler factory.
    """

    def __init__(
        self,
        num_clusters: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        latent_dim: int = 128,
        widths: list[int] = [32, 64, 128],  # noqa: B006 (jsonargparse needs a plain default)
        encoder: Literal["strided", "pooled"] = "strided",
        norm: str = "batch",
        assignment: Literal["hard", "sinkhorn", "entropy", "argmin"] = "hard",
        sigma: float = 100.0,
        imbalanced: bool = False,
        prior_momentum: float = 0.01,
        prior_strength: float = 0.5,
        prior_warmup_epochs: int = 1,
        prior_source: Literal["assigned", "nearest"] = "assigned",
        global_assignment: bool = False,
        centroid_init: Literal["random", "kmeans"] = "random",
        embedding_norm: Literal["none", "batch"] = "none",
        neighbours: int = 0,
        neighbour_space: Literal["pixel", "embedding"] = "pixel",
        neighbour_draws: int = 1,
        neighbour_bank: int = 0,
        mutual_neighbours: bool = False,
        sinkhorn_epsilon: float = 0.5,
        sinkhorn_iters: int = 15,
        entropy_weight: float = 1.0,
        kmeans_n_init: int = 3,
        kmeans_seed: int = 0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_clusters, input_shape, optimizer, lr_scheduler)
        if assignment not in ASSIGNMENTS:
            raise ClusterlightError(f"assignment must be one of {', '.join(ASSIGNMENTS)}, got {assignment!r}")
        if centroid_init not in ("random", "kmeans"):
            raise ClusterlightError(f"centroid_init must be 'random' or 'kmeans', got {centroid_init!r}")
        if not sigma > 0:
            raise ClusterlightError(f"sigma must be positive, got {sigma}")
        if not 0 < prior_momentum <= 1:
            raise ClusterlightError(f"prior_momentum must be in (0, 1], got {prior_momentum}")
        if not 0 <= prior_strength <= 1:
            raise ClusterlightError(f"prior_strength must be in [0, 1], got {prior_strength}")
        if prior_source not in ("assigned", "nearest"):
            raise ClusterlightError(f"prior_source must be 'assigned' or 'nearest', got {prior_source!r}")
        if imbalanced and assignment != "hard":
            raise ClusterlightError(f"imbalanced applies to assignment 'hard', not {assignment!r}")
        if not sinkhorn_epsilon > 0 or sinkhorn_iters < 1:
            raise ClusterlightError("sinkhorn_epsilon must be positive and sinkhorn_iters at least 1")
        if latent_dim < 1:
            raise ClusterlightError(f"latent_dim must be at least 1, got {latent_dim}")
        if embedding_norm not in ("none", "batch"):
            raise ClusterlightError(f"embedding_norm must be 'none' or 'batch', got {embedding_norm!r}")
        if encoder not in ("strided", "pooled"):
            raise ClusterlightError(f"encoder must be 'strided' or 'pooled', got {encoder!r}")
        try:
            network = ConvEncoder if encoder == "strided" else PoolEncoder
            self.encoder = network(self.input_shape, latent_dim, widths, norm)
        except ValueError as err:  # a network that does not fit the images
            raise ClusterlightError(f"encoder {encoder!r}: {err}") from None
        # Standardised embeddings (no affine): the encoder cannot shrink them towards one point.
        self.out_norm = nn.BatchNorm1d(latent_dim, affine=False) if embedding_norm == "batch" else nn.Identity()
        self.centroids = nn.Parameter(torch.randn(self.num_clusters, latent_dim))
        self.assignment = assignment
        self.sigma = float(sigma)
        self.imbalanced = imbalanced
        self.prior_momentum = float(prior_momentum)
        self.prior_strength = float(prior_strength)
        self.prior_warmup_epochs = int(prior_warmup_epochs)
        self.prior_source = prior_source
        self.global_assignment = global_assignment
        self.centroid_init = centroid_init
        self.sinkhorn_epsilon = float(sinkhorn_epsilon)
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.entropy_weight = float(entropy_weight)
        self.kmeans_n_init = kmeans_n_init
        self.kmeans_seed = kmeans_seed
        self.register_buffer("cluster_prior", torch.full((self.num_clusters,), 1.0 / self.num_clusters))
        self.register_buffer("centroids_initialised", torch.tensor(centroid_init == "random"))
        # (N, k) neighbours of the training split: pixel space at every fit start, then (neighbour_space
        # embedding) the current embedding at every later epoch start
        self._init_neighbours(neighbours, neighbour_space, mutual_neighbours)
        if isinstance(neighbour_draws, bool) or not isinstance(neighbour_draws, int) or neighbour_draws < 1:
            raise ClusterlightError(f"neighbour_draws must be a positive integer, got {neighbour_draws!r}")
        if neighbour_draws > 1 and neighbours == 0:
            raise ClusterlightError("neighbour_draws > 1 needs neighbours > 0")
        self.neighbour_draws = neighbour_draws
        if isinstance(neighbour_bank, bool) or not isinstance(neighbour_bank, int) or neighbour_bank < 0:
            raise ClusterlightError(f"neighbour_bank must be a non-negative integer, got {neighbour_bank!r}")
        if neighbour_bank > neighbours:
            raise ClusterlightError(
                f"neighbour_bank ({neighbour_bank}) must not exceed neighbours ({neighbours})")
        self.neighbour_bank = neighbour_bank
        # (N, latent_dim) last training-mode embedding of every training image and whether it has one;
        # sized when fitting starts, not saved (a resumed fit refills it during its first epoch)
        self.register_buffer("bank", torch.zeros(0, latent_dim), persistent=False)
        self.register_buffer("bank_filled", torch.zeros(0, dtype=torch.bool), persistent=False)

    # ------------------------------------------------------------------ costs and assignments
    def embed(self, images: Tensor) -> Tensor:
        return self.out_norm(self.encoder(images))

    def costs(self, z: Tensor) -> Tensor:
        """``d(b, c) = ||z_b - mu_c||^2 / sigma``, ``(B, K)`` in float32 (differentiable)."""
        diff = z.float()[:, None, :] - self.centroids.float()[None, :, :]
        return diff.pow(2).sum(dim=2) / self.sigma

    def log_prior(self) -> Tensor | None:
        """The log prior added to the hard assignment now (``None``: none)."""
        if not self.imbalanced or self.current_epoch < self.prior_warmup_epochs:
            return None
        prior = self.cluster_prior.clamp_min(1e-6)
        # log(K pi): zero for the uniform prior, so val/loss does not jump when the prior starts
        # (a constant shift changes no assignment).
        return self.prior_strength * (prior * self.num_clusters / prior.sum()).log()

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def assign(self, cost: Tensor) -> Tensor:
        """Training assignment of a batch of costs ``(B, K)`` (no gradient)."""
        cost = cost.detach()
        if self.assignment == "hard":
            log_prior = self.log_prior()

            def fn(c: Tensor) -> Tensor:
                return greedy_hard_assign(c, log_prior)
        elif self.assignment == "sinkhorn":

            def fn(c: Tensor) -> Tensor:
                return sinkhorn_assign(c, self.sinkhorn_iters, self.sinkhorn_epsilon)
        else:
            return cost.argmin(dim=1)
        if self.global_assignment and self._world_size() > 1:
            return distributed_assign(cost, fn)
        return fn(cost)

    # ------------------------------------------------------------------ hooks
    def fit_step(self, images: Tensor, index: Tensor, batch_idx: int) -> Tensor:
        if self.neighbours > 0:
            views = [images, *(self._neighbour_images(index, batch_idx, j) for j in range(self.neighbour_draws))]
            z = self.embed(torch.cat(views))
            every = self.costs(z)
            # the group's (image and its drawn neighbours) mean cost per cluster
            cost = every.view(len(views), len(images), -1).mean(dim=0)
        else:
            z = self.embed(images)
            cost = self.costs(z)
        if self.neighbour_bank > 0:
            assign = self.assign(self._with_bank_costs(cost, index))
            self._update_bank(index, z[: len(images)])
        else:
            assign = self.assign(cost)
        loss = cost.gather(1, assign[:, None]).mean()
        if self.assignment == "entropy":
            loss = loss + self.entropy_weight * mean_assignment_kl(torch.softmax(-cost, dim=1))
        with torch.no_grad():
            counts = torch.bincount(assign, minlength=self.num_clusters).float()
            if self.imbalanced:
                if self.prior_source == "nearest":
                    nearest = cost.detach().argmin(dim=1)
                    self._update_prior(torch.bincount(nearest, minlength=self.num_clusters).float())
                else:
                    self._update_prior(counts)
        batch = images.shape[0]
        self.log("train/nonempty_clusters", (counts > 0).sum().float(), on_step=True, on_epoch=True, batch_size=batch)
        self.log("train/largest_cluster_frac", counts.max() / batch, on_step=True, on_epoch=True, batch_size=batch)
        return loss

    @torch.no_grad()
    def _with_bank_costs(self, cost: Tensor, index: Tensor) -> Tensor:
        """The assignment cost of each group with the banked costs of its ``neighbour_bank``
        nearest neighbours (mutual ones only, with ``mutual_neighbours``; those not in the bank yet
        are left out): the mean over the group's fresh images and those banked neighbours."""
        m = self.neighbour_bank
        fresh = 1 + self.neighbour_draws
        rows = index.to(self.neighbour_index.device)
        nbr = self.neighbour_index[rows, :m].to(self.bank.device)  # (B, m), nearest first
        valid = self.bank_filled[nbr]
        if self.mutual_neighbours:  # a row holds count[i] mutual neighbours, then itself as filler
            count = self.neighbour_count[rows].to(nbr.device)
            valid &= torch.arange(m, device=nbr.device)[None, :] < count[:, None]
        banked = self.costs(self.bank[nbr.flatten()].to(cost.device)).view(len(index), m, -1)
        valid = valid.to(cost.device)
        total = cost.detach().float() * fresh + (banked * valid[:, :, None]).sum(dim=1)
        return total / (fresh + valid.sum(dim=1, keepdim=True))

    @torch.no_grad()
    def _update_bank(self, index: Tensor, z: Tensor) -> None:
        """Store the batch's embeddings by dataset index (every rank's, under DDP)."""
        index, z = index.to(self.bank.device), z.detach().float().to(self.bank.device)
        if self._world_size() > 1:  # equal batch shapes on every rank (the sampler pads)
            index, z = self.all_gather(index).flatten(), self.all_gather(z).flatten(0, -2)
        self.bank[index] = z
        self.bank_filled[index] = True

    def _update_prior(self, counts: Tensor) -> None:
        if self._world_size() > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")  # every rank keeps the same prior
        frac = counts / counts.sum().clamp_min(1)
        self.cluster_prior.mul_(1 - self.prior_momentum).add_(self.prior_momentum * frac.to(self.cluster_prior))

    def cluster_outputs(self, images: Tensor) -> ClusterOutput:
        z = self.embed(images)
        d = self.costs(z)
        min_d, cluster = d.min(dim=1)
        confidence = torch.softmax(-d, dim=1).max(dim=1).values
        return ClusterOutput(cluster=cluster, confidence=confidence, ood_score=min_d, embedding=z)

    def eval_loss(self, images: Tensor, index: Tensor) -> Tensor:
        cost = self.costs(self.embed(images))
        log_prior = self.log_prior()
        return hard_objective(cost, greedy_hard_assign(cost, log_prior), log_prior)

    # ------------------------------------------------------------------ centroid initialisation
    def clusters_ready(self) -> bool:
        return bool(self.centroids_initialised)

    def on_fit_start(self) -> None:
        super().on_fit_start()  # with neighbours: the pixel-space table (PixelNeighbours)
        if self.neighbour_bank > 0:
            n = len(self.neighbour_index)
            self.bank = torch.zeros(n, self.centroids.shape[1], device=self.device)
            self.bank_filled = torch.zeros(n, dtype=torch.bool, device=self.device)
        if not self.clusters_ready():
            self.refresh_clusters()

    def refresh_clusters(self) -> None:
        """``centroid_init: kmeans``: k-means on the embeddings of the training split, once."""
        if bool(self.centroids_initialised):
            return  # the centroids are learned; nothing to recompute
        with self._batch_statistics():
            z = self.compute_on_split(self._embed_train_mode)
        centers = None
        if self.trainer.is_global_zero:
            centers = kmeans(z, self.num_clusters, n_init=self.kmeans_n_init, seed=self.kmeans_seed).centers
        centers = self.broadcast_tensor(centers)
        with torch.no_grad():
            self.centroids.copy_(centers.to(self.centroids.dtype))
            self.centroids_initialised.fill_(True)
        rank_zero_info("OnlineHardClustering: centroids initialised by k-means on the training embeddings")

    def _embed_train_mode(self, images: Tensor) -> Tensor:
        # Training normalises with batch statistics: fit the centroids to embeddings made the same way.
        self.encoder.train()
        self.out_norm.train()
        try:
            return self.embed(images)
        finally:
            self.encoder.eval()
            self.out_norm.eval()

    @contextmanager
    def _batch_statistics(self) -> Any:
        """Batch-norm layers use batch statistics but leave their running statistics untouched."""
        saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in self.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        for m, _, _ in saved:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, momentum, tracked in saved:
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)

