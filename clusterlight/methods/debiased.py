"""Flagship: joint debiased representation learning and clustering, with statistics pooling.

This is clusterlight's reading of Rezaei et al., "Joint Debiased Representation Learning and
Imbalanced Data Clustering" (arXiv 2109.05232). Only the paper's abstract is public (no code, no
formulas), so the design below is ours, built from the abstract's ingredients: a representation
network and a clustering network trained simultaneously, both using a statistics pooling block
(mean, variance, cardinality) against class imbalance and out-of-distribution samples.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from clusterlight.cluster.agglomerative import knn_graph
from clusterlight.cluster.consensus import consensus_responsibilities
from clusterlight.cluster.kmeans import kmeans
from clusterlight.cluster.mixture import (
    diag_gmm_em,
    full_gmm,
    merge_by_entropy,
    merge_by_graph,
    one_hot,
    refine_by_cut,
)
from clusterlight.cluster.umap_hdbscan import preserve_torch_threads, reduce_umap
from clusterlight.errors import ClusterlightError
from clusterlight.methods.base import ClusteringModule, ClusterOutput
from clusterlight.methods.neighbours import PixelNeighbours
from clusterlight.nn import MLP, ConvAutoencoder
from clusterlight.nn.augment import INTERPOLATIONS as AFFINE_INTERPOLATIONS
from clusterlight.nn.augment import PARTS as AFFINE_PARTS
from clusterlight.nn.augment import random_affine
from clusterlight.nn.contrastive import nt_xent
from clusterlight.nn.stats_pool import StatisticsPooling
from clusterlight.precision import float32_math


@float32_math
def mixture_log_posterior(z: Tensor, mean: Tensor, var: Tensor, log_prior: Tensor) -> tuple[Tensor, Tensor]:
    """Log posterior ``log q (B, K)`` of a diagonal Gaussian mixture and the Mahalanobis terms.

    ``log q_bk = log pi_k - 0.5 * sum_d [(z_bd - mu_kd)^2 / var_kd + log var_kd]`` (normalised
    over ``k``). Also returns the squared Mahalanobis distances ``(B, K)``. Float32, also under autocast.
    """
    z, mean, var = z.float(), mean.float(), var.float()
    inv = 1.0 / var
    # sum_d (z - mu)^2 / var without a (B, K, D) tensor
    maha = (z * z) @ inv.T - 2.0 * z @ (mean * inv).T + (mean * mean * inv).sum(1)
    maha = maha.clamp_min(0.0)
    log_lik = -0.5 * (maha + torch.log(var).sum(1))
    return torch.log_softmax(log_lik + log_prior, dim=1), maha


def debiased_target(q: Tensor, prior: Tensor | None, power: float = 2.0, freq: Tensor | None = None,
                    q_prior: Tensor | None = None) -> Tensor:
    """Self-training target debiased by cardinality.

    DEC's target ``q^2 / f`` (``f_k`` the batch's soft cluster frequency) pushes every cluster
    towards the same size. Multiplying by the running cardinality prior ``pi_k`` of the
    statistics pooling block removes that push: ``p_bk ~ q_bk^power * pi_k / f_k``. A cluster used
    in the batch as often as its running size says is only sharpened, neither grown nor shrunk;
    one suddenly over-used (absorbing others) is damped. ``prior=None`` gives DEC's target.
    ``freq`` is ``f`` (default ``q.sum(0)``; under DDP pass the global batch's sum).

    ``q_prior``: the mixing weights ``q`` was computed with (``q_bk ~ q_prior_k * L_bk``). When
    given, only the likelihood is sharpened, not the posterior: ``q^power`` holds the prior to the
    power ``power``, so the target is multiplied by ``q_prior^(1 - power)``, which leaves
    ``p_bk ~ q_prior_k * L_bk^power * pi_k / f_k``. Sharpening the posterior counts the prior
    ``power`` times: between a cluster 100 times bigger and a small one, a sample as likely
    under both is pushed to the big one with odds ``100^power``, not 100.
    """
    q = q.float()
    weight = q.pow(power) / (q.sum(0) if freq is None else freq.float()).clamp_min(1e-12)
    if prior is not None:
        weight = weight * prior.float()
    if q_prior is not None:
        weight = weight * q_prior.float().clamp_min(1e-12).pow(1.0 - power)
    return weight / weight.sum(1, keepdim=True).clamp_min(1e-12)


def _standardise(x: Tensor) -> Tensor:
    """Each column to mean 0 and standard deviation 1 (floored at 1e-6)."""
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)


def _check_positive_int(name: str, value: Any, note: str = "") -> None:
    """Raise a one-line error unless ``value`` is an integer >= 1 (``True`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClusterlightError(f"{name} must be a positive integer{note}, got {value!r}")


def _is_count_or_fraction(k: Any) -> bool:
    """An integer >= 1 (a count) or a float in (0, 1) (a fraction); ``True`` is neither."""
    if isinstance(k, bool):
        return False
    return (isinstance(k, int) and k >= 1) or (isinstance(k, float) and 0.0 < k < 1.0)


def _median(x: Tensor) -> Tensor:
    """numpy's median over dim 0 (the mean of the two middle values for an even count)."""
    s = x.sort(0).values
    return 0.5 * (s[(len(s) - 1) // 2] + s[len(s) // 2])


OOD_SCORES = ("knn", "full_mahalanobis", "mahalanobis", "nll")
INIT_PARTITIONS = ("gmm", "kmeans")
# the k-NN score's state, made together from the training split: dropped together when a checkpoint's
# OOD settings differ from the model's (recomputed before the next evaluation)
KNN_BANK_BUFFERS = ("ood_bank", "ood_scale", "ood_train_scores", "ood_bank_scores", "ood_bank_cluster")


class DebiasedClustering(PixelNeighbours, ClusteringModule):
    """Debiased representation learning and clustering, co-trained, with statistics pooling.

    **Networks.** The representation network ``R`` is a convolutional autoencoder
    (reconstruction). The clustering network ``C`` is an MLP on ``R``'s features that embeds them
    into a clustering space, where clusters form a diagonal Gaussian mixture. Both train at once,
    with two optimizers (manual optimisation): each batch takes one ``R`` step, then one ``C``
    step.

    **Clustering space** (``manifold: umap``, the default). When clustering starts, the features
    of the whole training split are embedded by UMAP into ``cluster_dim`` dimensions (rank 0,
    broadcast; ``min_dist`` 0), and ``C`` is fitted to map each sample's features to its UMAP
    coordinates (``distill_epochs``), then keeps that embedding loss (``distill_weight``) next to
    the clustering loss: ``C`` is a parametric version of the manifold embedding, so new images
    need no UMAP. In that space the classes of an autoencoder's features separate far better than
    in the features themselves (on long-tailed USPS, k-means: ACC 0.47 on the features, 0.65 on
    their 10-D UMAP; a diagonal mixture: 0.68). ``manifold: none`` keeps the earlier design: ``C``
    shaped by the clustering loss alone.

    **Statistics pooling block (SPB)**, :class:`~clusterlight.nn.stats_pool.StatisticsPooling`,
    used by both networks. It summarises each cluster (and the whole data) by mean, diagonal
    variance and cardinality, kept as running sums across batches (all-reduced under DDP, saved in
    checkpoints):

    1. *Clusters as a mixture* (``C``): the assignment is the mixture posterior with the SPB's
       per-cluster mean, variance and cardinality prior, so it weighs each cluster's spread and
       size instead of the distance to a centre; the mixture starts from data statistics, never
       from random centres: a full-covariance Gaussian mixture fitted to the clustering space of
       the whole training split (``init_partition: gmm``; the best likelihood of
       ``2 * kmeans_n_init`` starts, a label-free choice), so a small tight cluster keeps its points
       next to a big spread one and an elongated class is not cut in two the way k-means cuts it
       (USPS, ``fast`` budget: ACC 0.846 +- 0.009 over three seeds against 0.766 +- 0.067 with
       k-means and a diagonal EM, ``init_partition: kmeans``; docs/results.md). Likelihood still
       draws a big class whose samples do not fit one Gaussian as two clusters, and with ``K``
       fixed two smaller classes then share one; ``refine_cut`` (the Fashion-MNIST config sets it) makes
       merge-and-split moves while they lower the normalised cut of the k-NN graph of ``R``'s
       features (:func:`~clusterlight.cluster.mixture.refine_by_cut`).
    2. *Debiased target* (``C``): ``p ~ q^2 * pi / f`` (see :func:`debiased_target`): DEC's
       ``q^2 / f`` forces equal cluster sizes, plain ``q^2`` lets big clusters absorb small ones;
       the running cardinality ``pi`` cancels the balancing push. But ``q`` is the mixture's
       posterior, ``q ~ pi * L``, so squaring it counts the prior twice: a sample as likely under a
       cluster 100 times bigger as under a small one is pushed to the big one with odds 100^2.
       ``target_sharpen: likelihood`` sharpens the likelihood only, ``p ~ pi * L^2 * pi / f``
       (odds 100, the posterior's own); the USPS configs set it (docs/flagship.md).
    3. *OOD score* in ``R``'s feature space, debiased by cardinality (``ood_score: knn``, the
       default): for each ``k`` of ``ood_neighbours`` (1, 2, 4, ..., 128) the distance to the
       ``k``-th nearest training feature, divided by the median of that distance over the training
       samples of the sample's cluster (``C``'s assignment); the score is the mean of the logs.
       A tail cluster's samples lie farther apart than a head cluster's; the division keeps them
       from being taken for outliers, and the scales from one to 128 neighbours catch an
       outlier next to a few training samples as well as one in a sparse region
       (``ood_scaling: global`` divides by the median over all training samples instead, so the
       score ranks as the plain mean log distance). ``C``'s assignment of an OOD sample says
       little: ``C`` maps every image onto some cluster of its embedding, often a sparse one whose
       large scale then hides the outlier (Fashion-MNIST, ankle boots held out: 607 of the 1,000
       test boots went to the sparse bag cluster on one seed, AUROC 0.73). ``ood_scaling:
       neighbours`` (the Fashion-MNIST config) takes the scale of the region the sample
       lies in instead: the geometric mean of the scales of the clusters of its
       ``ood_scale_neighbours`` (100) nearest training samples (docs/results.md). ``ood_metric: cosine``
       compares the features' directions only; no config uses it; nor ``ood_space: conv``, the bank in
       the last convolutional stage of ``R``'s encoder instead of its features. A *local* correction
       (``ood_local_weight: w``, off in the class, 0.5 in the USPS configs) subtracts ``w`` times
       the mean training score of the sample's ``ood_local_neighbours`` (64) nearest training
       samples, each scored without itself, as the local outlier factor compares a point's
       density with its neighbours': the training images of a tail class lie far apart, so
       the test images of that class are far from the bank too, and its neighbours' own scores
       say so; a held-out class near no training image keeps its distance (USPS, digit 9 held
       out: test AUROC from 0.860 to 0.910 over five seeds; docs/results.md). The bank of
       training features and the scales are recomputed from the whole training split before
       every validation (one pass of ``R``), so they belong to the weights they are saved with
       (checkpoints carry them). The alternatives: ``full_mahalanobis``, the smallest
       Mahalanobis distance to a cluster in ``R``'s space with each cluster's *full* covariance
       (an SPB with ``full_covariance``, ``ood_shrinkage`` towards its mean variance, ``C``'s
       soft assignments, recomputed likewise); ``mahalanobis``, the smallest diagonal one in
       ``C``'s space; ``nll``, the negative log-likelihood under ``C``'s mixture. ``C``'s space
       is a UMAP-like embedding, which places every sample near some cluster: the two scores in
       it rank held-out classes worst (docs/results.md). The score is returned by ``predict``
       and evaluated as ``test/ood_auroc``. ``reject_quantile`` leaves samples unassigned
       (cluster ``-1``) whose score exceeds that quantile of the training scores.
    4. *Debiased representation* (``R``): ``R``'s reconstruction loss weighs each sample by
       ``(K * pi_k)^-debias_strength`` for its current cluster ``k`` (tail clusters count more,
       head clusters less; weights normalised to mean 1), and ``C`` reads ``R``'s features
       standardised by the *cluster-balanced* mean and variance of the SPB over ``R``'s space
       (each cluster weighs the same, so head classes do not set the scale).
    5. *Neighbour views* (``neighbours: k``; off by default, the configs set 10, Fashion-MNIST's 20 mutual ones, COIL-20's 5).
       Without augmentation an autoencoder's features follow pixel reconstruction only. With
       ``neighbours`` each training image is paired with one of its ``k`` nearest training images
       in pixel space (the table of :class:`~clusterlight.methods.neighbours.PixelNeighbours`, as
       in online hard clustering), and ``R`` also minimises the NT-Xent loss (:func:`~clusterlight.nn.contrastive.nt_xent`,
       ``contrast_weight``, ``contrast_temperature``) between the projections of the pairs over
       the global batch; each step then encodes twice as many images. With ``augment`` (a
       strength; the USPS configs set 1, Fashion-MNIST's 2, off by default and in the other
       configs) the view -- the neighbour, or the image itself without ``neighbours`` -- goes
       through a random affine map first (:mod:`clusterlight.nn.augment`: at strength 1,
       rotation up to 15 degrees, scale 0.85 to 1.15, shift up to 7.5 % of the size;
       ``augment_parts`` draws only some of the three: the Fashion-MNIST config draws only the
       scale), so ``R``
       also learns features that such small deformations do not change (USPS and Fashion-MNIST,
       ``fast`` budget: docs/results.md). With ``mutual_neighbours`` (the Fashion-MNIST config,
       with ``neighbours: 20``) a pair is kept only if each image is among the other's ``k``
       nearest: the nearest images of a tail-class image are mostly of head classes (there are
       more of them everywhere), so plain pairs pull tail images into head clusters -- a bias by
       cardinality in the views themselves. On long-tailed Fashion-MNIST (``lt10_ood``, 10 pixel
       neighbours) the share of pairs within one class goes from 0.22 to 0.30 for the smallest
       class (shirts), 0.54 to 0.77 (dresses), 0.48 to 0.59 (coats); an image left with no mutual
       neighbour is paired with (an augmented copy of) itself.

    6. *Assignment by training neighbours* (``assign_neighbours: k``; off by default, the USPS
       configs set 5). ``C`` is a parametric map onto a UMAP-like embedding: it places every image
       near some cluster, but a map fitted to thousands of images smooths the borders between
       classes. With ``assign_neighbours`` a sample takes the cluster most of its ``k`` nearest
       training samples in ``R``'s features have (each training sample's cluster is ``C``'s
       assignment, so the partition is still ``C``'s; the bank of training features is the
       k-NN OOD score's). On USPS, ``k = 5`` raised ACC, NMI and ARI on all four splits at both
       benchmark budgets, balanced included, with the same weights (docs/flagship.md).

    **Gradients between the networks.** ``C`` reads ``R``'s features *detached*: no gradient of
    the clustering loss reaches ``R``. The clustering loss rewards confident assignments, and
    letting it shape the encoder lets small classes be merged into big clusters -- the bias this
    method fights -- while reconstruction keeps every class's information. ``R`` learns from
    ``C`` only through the pooled statistics (weights and balanced standardisation of item 4).

    **Phases.** ``pretrain_epochs`` of plain reconstruction (validation clusters by the same
    initialisation, recomputed before each validation); then the clustering space and the SPBs
    are set up from the whole training split (:meth:`init_clusters`; once, or again every
    ``recluster_every`` epochs) and both networks train.

    **Ablations.** ``use_variance: false`` (unit variances: Euclidean mixture),
    ``use_cardinality: false`` (uniform prior, DEC's balancing target, unweighted
    reconstruction), ``cotrain: false`` (``R`` frozen after pretraining; ``C`` alone).

    Args:
        num_clusters: number of clusters (linked from the DataModule).
        input_shape: ``(channels, height, width)`` (linked from the DataModule).
        latent_dim: size of ``R``'s features.
        cluster_dim: size of ``C``'s clustering space.
        widths: channel counts of ``R``'s encoder stages.
        norm: normalisation in ``R``: ``batch``, ``group`` or ``none``.
        head_hidden: hidden layer sizes of ``C``'s MLP.
        pretrain_epochs: epochs of reconstruction before clustering starts.
        momentum: weight of the past in the SPBs' running statistics (per batch).
        target_power: sharpening exponent of the self-training target (1: none; with a batch that uses
            each cluster as often as its running cardinality says, the target is then ``q``). Probed
            at 1 on USPS and Fashion-MNIST, not adopted (docs/flagship.md).
        target_sharpen: what ``target_power`` sharpens: ``posterior`` (``q``, which holds the
            cardinality prior, so the prior counts ``target_power`` times) or ``likelihood`` (the
            prior counts once; :func:`debiased_target`'s ``q_prior``).
        debias_strength: exponent of the cardinality weights of ``R``'s reconstruction loss.
        debias_views: weigh ``R``'s contrast loss of the view pairs by the same cardinality weights
            (item 4; needs view pairs: ``neighbours`` or ``augment``): both rows of a sample's pair
            count its weight in the NT-Xent mean. The contrast loss, not the reconstruction, shapes
            most of ``R``'s features; unweighted, its pairs come mostly from head clusters.
        manifold: ``umap``: ``C`` learns to embed ``R``'s features as their UMAP embedding (see
            *Clustering space*); ``none``: ``C`` is trained by the self-training loss alone.
        umap_neighbors: UMAP's neighbourhood size for the clustering space. The USPS configs set 5:
            with 15, more than the smallest long-tailed digits have images, their images join the
            clusters of the head digits around them (docs/flagship.md: against 15, higher ACC on
            6 of the 8 USPS split-budget pairs and higher ``lt100`` tail ACC at both budgets; lower
            ``lt10`` tail ACC at both, lower ``paper`` ``lt10`` ACC).
        umap_set_op_mix_ratio: UMAP's symmetrisation of the k-NN graph of ``R``'s features: 1, the
            fuzzy union (UMAP's default), keeps an edge ``i -> j`` at full weight even when ``i`` is
            not among ``j``'s nearest; towards 0, the fuzzy intersection, only mutual neighbours
            keep their weight. A tail-class sample's nearest samples are mostly of head classes
            (more of them everywhere), but it is rarely among theirs: the union glues it to them.
        umap_runs: ``M > 1``: UMAP embeds the features ``M`` times, with seeds ``kmeans_seed`` to
            ``kmeans_seed + M - 1``; each embedding gets its own initial partition, and the
            partitions are combined: aligned one-to-one to the majority vote of their hard labels
            and their responsibilities averaged
            (:func:`~clusterlight.cluster.consensus.consensus_responsibilities`). ``C``'s target is
            the first embedding. UMAP's layout depends on its seed, and so does which head class
            an embedding cuts in two and which small classes it joins; the vote keeps what most
            embeddings agree on. Costs ``M - 1`` more UMAP fits and partitions on rank 0. ``1``: one.
        distill_epochs: passes over the training split that fit ``C`` to the UMAP embedding when
            clustering starts.
        distill_weight: weight of ``C``'s embedding loss (distance to the UMAP target) during co-training.
        gmm_iters: EM iterations: at most this many per start of the full-covariance mixture
            (``init_partition: gmm``, at least 1), or of the diagonal mixture fitted to the k-means
            partition (``kmeans``; 0: k-means only).
        init_partition: the initial partition of the clustering space: ``gmm`` (a full-covariance
            Gaussian mixture, the best likelihood of ``kmeans_n_init`` starts from k-means and as many
            from k-means++) or ``kmeans``
            (``kmeans_n_init`` restarts, then ``gmm_iters`` of diagonal EM; the earlier default).
        overcluster: ``m > 1``: the initial mixture (``init_partition: gmm``) has ``m * K``
            components, merged into ``K`` clusters, each step the two whose union most lowers the
            entropy of the responsibilities (:func:`~clusterlight.cluster.mixture.merge_by_entropy`,
            Baudry et al. 2010): a head class that one Gaussian does not fit takes several
            components that end in one cluster instead of two clusters of its own. ``1``: off.
        overcluster_merge: how ``overcluster``'s components are merged: ``entropy`` (above) or
            ``graph`` (:func:`~clusterlight.cluster.mixture.merge_by_graph`: along the
            ``umap_neighbors``-nearest-neighbour graph of the clustering space, first the two
            groups with the largest share of the bigger one's edges between them, so that a small
            island beside a big class keeps its own cluster).
        refine_cut: ``k > 0``: after the initial partition (any ``init_partition``, ``overcluster``,
            ``umap_runs``), merge-and-split moves
            (:func:`~clusterlight.cluster.mixture.refine_by_cut`) while they lower the normalised
            cut of the ``k``-nearest-neighbour graph of ``R``'s (standardised) features, each split
            a two-component full-covariance mixture in the clustering space: a head class drawn as two
            clusters is joined and a cluster that holds two classes is cut (rank 0, with the
            partition). ``0``: off.
        recluster_every: ``n > 0``: every ``n`` epochs after clustering starts (at the start of
            epochs ``pretrain_epochs + n``, ``+ 2n``, ...), the clustering space, the initial
            partition and both SPBs are rebuilt from ``R``'s current features as when clustering
            started (:meth:`init_clusters`: UMAP, the partition, ``C`` distilled to the new
            embedding): the partition then follows the representation co-training has shaped
            instead of the one pretraining left. ``0``: once, when clustering starts. A run
            resumed from a checkpoint saved inside such an epoch rebuilds again at its start, from
            the checkpoint's weights.
        recluster_warm: with ``recluster_every``, each rebuild continues from the current clustering
            instead of starting over: UMAP's layout starts from ``C``'s current embedding of the
            training split (not a spectral one), and the mixture of ``C``'s current posterior,
            carried to the new embedding, is one more start of the full-covariance mixture (the
            best likelihood still wins). The USPS configs set it with ``recluster_every: 2``
            (higher ACC on USPS's long-tailed splits; docs/flagship.md).
        use_variance: use the pooled variances (``false``: unit variances).
        use_cardinality: use the pooled cardinalities (``false``: uniform prior, DEC target).
        cotrain: keep training ``R`` during clustering (``false``: ``C`` alone on a frozen ``R``).
        ood_score: ``full_mahalanobis`` (smallest full-covariance Mahalanobis distance in ``R``'s
            space), ``knn`` (multi-scale k-NN distance in ``R``'s space over each cluster's
            median, see item 3), ``mahalanobis`` (smallest diagonal one in ``C``'s space) or
            ``nll`` (``C``'s mixture).
        ood_shrinkage: shrinkage of the clusters' full covariances towards their mean variance (0 to 1).
        ood_neighbours: the numbers of neighbours whose distances make ``ood_score: knn`` (each
            capped at the number of training images minus one). An entry in (0, 1) is a fraction
            of the training split (rounded, at least 1): the same setting then reaches as far into
            the data at every budget (``0.05`` is 185 neighbours of the 3,696 training images of
            Fashion-MNIST ``lt10_ood`` at the ``fast`` budget, 998 of its 19,969 at ``paper``).
            The neighbour search refitted before every validation grows with k, so on a large
            split a fraction costs more time than a count (Fashion-MNIST balanced at ``paper``,
            54,000 images, k up to 3,740: 983 s of training against the counts' 860 s, measured on
            two machines); the training split's search keeps only the ranks the score reads
            (there 1.95 GB peak RSS, against 5.6 GB with all k kept; docs/flagship.md).
        ood_scaling: the divisor of each ``k``-NN distance in ``ood_score: knn``: ``cluster``, the
            median over the training samples of the sample's cluster (item 3); ``neighbours``, the
            geometric mean of those medians over the clusters of the sample's
            ``ood_scale_neighbours`` nearest training samples (a training sample's own match
            skipped), not the cluster ``C`` assigns it to; or ``global``, the median over all
            training samples (the score then ranks as the mean log distance).
        ood_scale_neighbours: how many nearest training samples' clusters make the scale with
            ``ood_scaling: neighbours`` (capped at the number of training images minus one).
        ood_metric: the distance of ``ood_score: knn``: ``euclidean``, or ``cosine`` (Euclidean
            distance between the features scaled to unit length, ``sqrt(2 (1 - cos))``: the same
            neighbours and the same ranking of scores as the cosine distance).
        ood_space: the space of ``ood_score: knn``'s bank of training samples: ``features``, R's
            features, or ``conv``, the last convolutional stage of R's encoder flattened (the map
            R's linear layer reads; 2,048 numbers an image for 28x28 images with the default
            widths, against ``latent_dim``, so the bank in a checkpoint is that much larger). The
            bank's neighbours also make ``assign_neighbours``' vote; the clusters and their
            scales are C's either way. Off in every config: an offline probe found it higher on
            most Fashion-MNIST ``lt10_ood`` runs with ``ood_scaling: global`` and lower on others
            (docs/flagship.md).
        ood_local_weight: local density correction of ``ood_score: knn`` (item 3; 0: off): the
            score minus this weight times the mean training score of the sample's
            ``ood_local_neighbours`` nearest training samples (each scored without itself). 1 is a
            local-outlier-factor-like ratio, 0.5 the mean of that and the uncorrected score.
        ood_local_neighbours: how many nearest training samples make the local correction
            (capped at the number of training images minus one).
        reject_quantile: leave unassigned the samples whose OOD score is above this quantile of
            the training scores (``null``: assign every sample).
        assign_neighbours: ``k > 0``: a sample's cluster is the one most of its ``k`` nearest
            training samples in ``R``'s features have (their ``C`` assignments; the bank of
            ``ood_score: knn``, which it needs; ties go to ``C``'s posterior), its confidence the
            vote share (item 6). ``0``: ``C``'s mixture posterior assigns. Only the assignment
            changes: training, ``C``'s target and the OOD score stay as they are.
        kmeans_n_init: starts of the initial partition (mixture fits or k-means restarts).
        kmeans_seed: seed of the initial partition (k-means' own generator, the mixture's starts) and of UMAP.
        neighbours: ``0`` (off) or ``k``: pair each training image with one of its ``k`` nearest
            training images in pixel space for ``R``'s contrastive loss (item 5).
        mutual_neighbours: keep only mutual pixel-space neighbours (``j`` among the ``k`` nearest
            of ``i`` and ``i`` among those of ``j``; needs ``neighbours``): a tail-class image's
            nearest images are mostly of head classes, and the plain pairs pull it into their
            clusters (item 5). An image with no mutual neighbour is paired with itself.
        augment: strength of the random affine map applied to the second view of ``R``'s contrast
            pairs (item 5; 0: none, 1: rotation up to 15 degrees, scale 0.85 to 1.15, shift up to
            7.5 % of the size; at most 4). Without ``neighbours`` the pairs are each image and its
            augmented copy.
        augment_parts: the components of that map drawn (of ``rotation``, ``scale``, ``shift``;
            all three when unset; the others stay at the identity). Needs ``augment`` > 0. The
            Fashion-MNIST config sets ``[scale]``: over ten class orders (``fast``) it raised ACC
            and NMI on every long-tailed split and the tail ACC on ``lt10_ood``, and lowered the
            ``lt100`` tail ACC and the OOD AUROC on the benchmark's order; at ``paper`` it lowered
            the ``lt10_ood`` OOD AUROC on every order measured, the ``lt10`` tail ACC and the
            balanced ACC on the benchmark's order and the ``lt100`` tail ACC on split seeds 1 to 3
            (docs/flagship.md).
        augment_strengths: a strength per component, overriding ``augment`` for the components
            named (e.g. ``{scale: 3, rotation: 1}``; each in [0, 4]); the others drawn keep
            ``augment``. Needs ``augment`` > 0; a component left out by ``augment_parts`` cannot be
            named. No config sets it (docs/flagship.md).
        contrast_weight: weight of the NT-Xent loss of the view pairs (neighbours and/or augmented copies) in ``R``'s loss.
        contrast_temperature: NT-Xent temperature.
        projection_dim: output size of ``R``'s projection head for the NT-Xent loss.
        augment_interpolation: how the augmented views are resampled: ``bilinear`` (the default)
            or ``nearest`` (the nearest pixel: fine texture is not averaged between pixels). No
            config sets ``nearest``; on Fashion-MNIST it did not keep the shirts that R's views
            cost (docs/flagship.md).
        contrast_dims: the projection head reads only the first this many of ``R``'s
            ``latent_dim`` features (``null``: all of them). The others are then shaped by the
            reconstruction alone (and so is everything else the decoder needs): the view pairs'
            invariances (augmented views, neighbours) reach only part of the features that the
            clustering space and the OOD score read. Needs view pairs; no config sets it
            (docs/flagship.md).
        rotation_negatives: shifted instances for ``R``'s contrast loss (item 5): each view pair
            also enters rotated by 90, 180 and 270 degrees, as three more pairs whose members are
            negatives of the upright ones. Needs view pairs (``neighbours`` or ``augment``) and
            square images; the contrast loss then encodes four times as many images.
        grad_clip: clip each network's gradient norm to this value (``null``: no clipping).
        optimizer_r: optimizer factory of the representation network.
        optimizer_c: optimizer factory of the clustering network.
        lr_scheduler: optional scheduler factory, applied to both optimizers (stepped per epoch).
    """

    def __init__(
        self,
        num_clusters: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        latent_dim: int = 32,
        cluster_dim: int = 16,
        widths: list[int] = [32, 64, 128],  # noqa: B006
        norm: str = "batch",
        head_hidden: list[int] = [128],  # noqa: B006
        pretrain_epochs: int = 10,
        momentum: float = 0.9,
        target_power: float = 2.0,
        target_sharpen: Literal["posterior", "likelihood"] = "posterior",
        debias_strength: float = 0.5,
        debias_views: bool = False,
        use_variance: bool = True,
        use_cardinality: bool = True,
        cotrain: bool = True,
        ood_score: Literal["knn", "full_mahalanobis", "mahalanobis", "nll"] = "knn",
        ood_shrinkage: float = 0.01,
        ood_neighbours: list[int | float] = [1, 2, 4, 8, 16, 32, 64, 128],  # noqa: B006
        ood_scaling: Literal["cluster", "global", "neighbours"] = "cluster",
        ood_scale_neighbours: int = 100,
        ood_metric: Literal["euclidean", "cosine"] = "euclidean",
        ood_space: Literal["features", "conv"] = "features",
        ood_local_weight: float = 0.0,
        ood_local_neighbours: int = 64,
        reject_quantile: float | None = None,
        assign_neighbours: int = 0,
        kmeans_n_init: int = 10,
        kmeans_seed: int = 0,
        manifold: Literal["umap", "none"] = "umap",
        umap_neighbors: int = 15,
        umap_set_op_mix_ratio: float = 1.0,
        umap_runs: int = 1,
        distill_epochs: int = 20,
        distill_weight: float = 1.0,
        gmm_iters: int = 100,
        init_partition: Literal["gmm", "kmeans"] = "gmm",
        overcluster: int = 1,
        overcluster_merge: Literal["entropy", "graph"] = "entropy",
        refine_cut: int = 0,
        recluster_every: int = 0,
        recluster_warm: bool = False,
        neighbours: int = 0,
        mutual_neighbours: bool = False,
        augment: float = 0.0,
        augment_parts: list[str] | None = None,
        augment_strengths: dict[str, float] | None = None,
        contrast_weight: float = 1.0,
        contrast_temperature: float = 0.5,
        projection_dim: int = 64,
        augment_interpolation: Literal["bilinear", "nearest"] = "bilinear",
        contrast_dims: int | None = None,
        rotation_negatives: bool = False,
        grad_clip: float | None = None,
        optimizer_r: OptimizerCallable = torch.optim.Adam,
        optimizer_c: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_clusters, input_shape, optimizer_r, lr_scheduler)
        if reject_quantile is not None and not 0.0 < reject_quantile < 1.0:
            raise ClusterlightError(f"reject_quantile must be in (0, 1) or null, got {reject_quantile}")
        if ood_score not in OOD_SCORES:
            raise ClusterlightError(f"ood_score must be one of {', '.join(OOD_SCORES)}, got {ood_score!r}")
        if isinstance(ood_neighbours, (int, float)) and not isinstance(ood_neighbours, bool):
            ood_neighbours = [ood_neighbours]
        if not ood_neighbours or not all(_is_count_or_fraction(k) for k in ood_neighbours):
            raise ClusterlightError("ood_neighbours must be a non-empty list of positive integers (counts) or numbers "
                                    f"in (0, 1) (fractions of the training split), got {ood_neighbours!r}")
        if not 0.0 <= ood_shrinkage <= 1.0:
            raise ClusterlightError(f"ood_shrinkage must be in [0, 1], got {ood_shrinkage}")
        self.automatic_optimization = False
        self.optimizer_c_factory = optimizer_c
        k = self.num_clusters
        self.representation = ConvAutoencoder(self.input_shape, latent_dim, widths, norm)
        self.clustering = MLP(latent_dim, head_hidden, cluster_dim)
        self.spb_r = StatisticsPooling(k, latent_dim, momentum)
        self.spb_c = StatisticsPooling(k, cluster_dim, momentum)
        # full-covariance statistics of R's features per cluster, for the OOD score (set from the
        # whole training split, never updated per batch)
        self.spb_ood = StatisticsPooling(k, latent_dim, full_covariance=True)
        self.ood_shrinkage = ood_shrinkage
        # counts first, then fractions, each in increasing order (a fraction's count is known once the
        # training split is: _ks)
        self.ood_neighbours = sorted(set(ood_neighbours), key=lambda k: (isinstance(k, float), k))
        if ood_scaling not in ("cluster", "global", "neighbours"):
            raise ClusterlightError(f"ood_scaling must be 'cluster', 'global' or 'neighbours', got {ood_scaling!r}")
        self.ood_scaling = ood_scaling
        _check_positive_int("ood_scale_neighbours", ood_scale_neighbours)
        self.ood_scale_neighbours = int(ood_scale_neighbours)
        if ood_metric not in ("euclidean", "cosine"):
            raise ClusterlightError(f"ood_metric must be 'euclidean' or 'cosine', got {ood_metric!r}")
        self.ood_metric = ood_metric
        if ood_space not in ("features", "conv"):
            raise ClusterlightError(f"ood_space must be 'features' or 'conv', got {ood_space!r}")
        if ood_space == "conv" and ood_score != "knn":
            raise ClusterlightError(f"ood_space conv is the space of ood_score knn's bank, got ood_score {ood_score!r}")
        self.ood_space = ood_space
        if isinstance(ood_local_weight, bool) or not isinstance(ood_local_weight, (int, float)) \
                or not 0.0 <= ood_local_weight <= 1.0:
            raise ClusterlightError(f"ood_local_weight must be a number in [0, 1] (0: off), got {ood_local_weight!r}")
        _check_positive_int("ood_local_neighbours", ood_local_neighbours)
        self.ood_local_weight = float(ood_local_weight)
        self.ood_local_neighbours = int(ood_local_neighbours)
        # which scaling made the saved scales: a checkpoint loaded with the other one recomputes them
        self.register_buffer("ood_scaling_global", torch.tensor(ood_scaling == "global"))
        # and how many neighbours' clusters made the saved training scores with ood_scaling
        # neighbours (0 with the other scalings): likewise
        self.register_buffer("ood_scale_setting",
                             torch.tensor(float(self.ood_scale_neighbours) if ood_scaling == "neighbours" else 0.0))
        # and the ood_neighbours (counts and fractions) the saved scales were made with: likewise (a
        # list of the same length but other values has scales of the same shape)
        self.register_buffer("ood_neighbours_setting", torch.tensor([float(v) for v in self.ood_neighbours]))
        # and which metric made the saved bank (unit-length features for cosine): likewise
        self.register_buffer("ood_metric_cosine", torch.tensor(ood_metric == "cosine"))
        # and the bank's space (a bank of R's features loaded into a model with ood_space conv: recomputed)
        self.register_buffer("ood_space_conv", torch.tensor(ood_space == "conv"))
        # and the local correction the saved training scores (reject threshold) were made with:
        # (weight, neighbours), (0, 0) when off
        self.register_buffer("ood_local_setting", self._local_setting())
        # ood_score knn: R's features of the training split (the bank), the median distance of a
        # training sample of each cluster to its ood_neighbours-th neighbour, and every training
        # sample's own score (for reject_quantile); set with spb_ood, saved in checkpoints
        bank_dim = latent_dim if ood_space == "features" else math.prod(self.representation.encoder.feature_shape)
        self.register_buffer("ood_bank", torch.zeros(0, bank_dim))
        self.register_buffer("ood_scale", torch.ones(len(self.ood_neighbours), k))
        self.register_buffer("ood_train_scores", torch.zeros(0))
        # each bank row's own score before the local correction (what the correction averages)
        self.register_buffer("ood_bank_scores", torch.zeros(0))
        # each bank row's cluster (C's assignment of that training sample; ood_scaling neighbours reads it)
        self.register_buffer("ood_bank_cluster", torch.zeros(0, dtype=torch.long))
        self._ood_fit_step: int | None = None  # training step at which the OOD statistics were fitted
        self.pretrain_epochs = pretrain_epochs
        self.target_power = target_power
        if target_sharpen not in ("posterior", "likelihood"):
            raise ClusterlightError(f"target_sharpen must be posterior or likelihood, got {target_sharpen!r}")
        self.target_sharpen = target_sharpen
        self.debias_strength = debias_strength
        self.debias_views = bool(debias_views)
        self.use_variance = use_variance
        self.use_cardinality = use_cardinality
        self.cotrain = cotrain
        self.ood_score_kind = ood_score
        self.reject_quantile = reject_quantile
        if isinstance(assign_neighbours, bool) or not isinstance(assign_neighbours, int) or assign_neighbours < 0:
            raise ClusterlightError(f"assign_neighbours must be an integer >= 0 (0: C's mixture assigns), "
                                    f"got {assign_neighbours!r}")
        if assign_neighbours > 0 and ood_score != "knn":
            raise ClusterlightError(f"assign_neighbours {assign_neighbours} needs ood_score knn (its bank of "
                                    f"training features), got {ood_score!r}")
        self.assign_neighbours = assign_neighbours
        self.kmeans_n_init = kmeans_n_init
        self.kmeans_seed = kmeans_seed
        self.grad_clip = grad_clip
        if manifold not in ("umap", "none"):
            raise ClusterlightError(f"manifold must be 'umap' or 'none', got {manifold!r}")
        if umap_neighbors < 2 or distill_epochs < 0 or distill_weight < 0 or gmm_iters < 0:
            raise ClusterlightError("umap_neighbors must be >= 2; distill_epochs, distill_weight and gmm_iters >= 0")
        self.manifold = manifold
        self.umap_neighbors = umap_neighbors
        if isinstance(umap_set_op_mix_ratio, bool) or not isinstance(umap_set_op_mix_ratio, (int, float)) \
                or not 0.0 <= umap_set_op_mix_ratio <= 1.0:
            raise ClusterlightError(f"umap_set_op_mix_ratio must be a number in [0, 1], got {umap_set_op_mix_ratio!r}")
        self.umap_set_op_mix_ratio = float(umap_set_op_mix_ratio)
        _check_positive_int("umap_runs", umap_runs, " (1: one embedding)")
        if umap_runs > 1 and manifold != "umap":
            raise ClusterlightError(f"umap_runs {umap_runs} needs manifold umap, got {manifold!r}")
        self.umap_runs = umap_runs
        self.distill_epochs = distill_epochs
        self.distill_weight = distill_weight
        self.gmm_iters = gmm_iters
        if init_partition not in INIT_PARTITIONS:
            raise ClusterlightError(f"init_partition must be one of {', '.join(INIT_PARTITIONS)}, got {init_partition!r}")
        if init_partition == "gmm" and gmm_iters < 1:
            raise ClusterlightError(f"init_partition gmm needs gmm_iters >= 1 (EM iterations per start), got {gmm_iters}")
        _check_positive_int("kmeans_n_init", kmeans_n_init)
        self.init_partition = init_partition
        _check_positive_int("overcluster", overcluster, " (1: off)")
        if overcluster > 1 and init_partition != "gmm":
            raise ClusterlightError(f"overcluster {overcluster} needs init_partition gmm, got {init_partition!r}")
        self.overcluster = overcluster
        if overcluster_merge not in ("entropy", "graph"):
            raise ClusterlightError(f"overcluster_merge must be entropy or graph, got {overcluster_merge!r}")
        if overcluster_merge != "entropy" and overcluster == 1:
            raise ClusterlightError(f"overcluster_merge {overcluster_merge} needs overcluster > 1 (components to merge)")
        self.overcluster_merge = overcluster_merge
        if isinstance(refine_cut, bool) or not isinstance(refine_cut, int) or refine_cut < 0:
            raise ClusterlightError(f"refine_cut must be an integer >= 0 (0: off), got {refine_cut!r}")
        self.refine_cut = refine_cut
        if isinstance(recluster_every, bool) or not isinstance(recluster_every, int) or recluster_every < 0:
            raise ClusterlightError(f"recluster_every must be an integer >= 0 (0: off), got {recluster_every!r}")
        self.recluster_every = recluster_every
        if not isinstance(recluster_warm, bool):
            raise ClusterlightError(f"recluster_warm must be true or false, got {recluster_warm!r}")
        if recluster_warm and (recluster_every == 0 or manifold != "umap" or init_partition != "gmm" or overcluster > 1):
            raise ClusterlightError("recluster_warm needs recluster_every > 0, manifold umap, init_partition gmm "
                                    "and overcluster 1 (its start has one component per cluster)")
        self.recluster_warm = recluster_warm
        if contrast_weight < 0 or not contrast_temperature > 0 or projection_dim < 1:
            raise ClusterlightError("contrast_weight must be >= 0, contrast_temperature > 0 and projection_dim >= 1")
        if isinstance(augment, bool) or not isinstance(augment, (int, float)) or not 0.0 <= augment <= 4.0:
            raise ClusterlightError(f"augment must be a number in [0, 4] (0: no augmented views), got {augment!r}")
        self.augment = float(augment)
        if augment_parts is not None:
            if self.augment == 0:
                raise ClusterlightError("augment_parts needs augment > 0")
            if not augment_parts or len(set(augment_parts)) != len(augment_parts) or not set(augment_parts) <= set(AFFINE_PARTS):
                raise ClusterlightError(f"augment_parts must be distinct names of {list(AFFINE_PARTS)}, got {augment_parts!r}")
        self.augment_parts = tuple(augment_parts) if augment_parts is not None else AFFINE_PARTS
        strengths = dict(augment_strengths or {})
        if augment_strengths is not None:
            if self.augment == 0:
                raise ClusterlightError("augment_strengths needs augment > 0")
            if not set(strengths) <= set(self.augment_parts) or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 4.0 for v in strengths.values()):
                raise ClusterlightError(f"augment_strengths must map components drawn ({list(self.augment_parts)}) "
                                        f"to numbers in [0, 4], got {augment_strengths!r}")
        if augment_interpolation not in AFFINE_INTERPOLATIONS:
            raise ClusterlightError(f"augment_interpolation must be one of {list(AFFINE_INTERPOLATIONS)}, got {augment_interpolation!r}")
        if augment_interpolation != "bilinear" and self.augment == 0:
            raise ClusterlightError("augment_interpolation needs augment > 0")
        self.augment_interpolation = augment_interpolation
        # one number when every component has the same strength: the maps are then those made before the option, bit for bit
        per_part = tuple(float(strengths.get(p, self.augment)) for p in AFFINE_PARTS)
        self.augment_strength: float | tuple[float, ...] = per_part[0] if len(set(per_part)) == 1 else per_part
        # neighbour views for R (pixel-space kNN table, recomputed at every fit start); with them or
        # with augment, R has a projection head for the contrast loss
        self._init_neighbours(neighbours, mutual=mutual_neighbours)
        self.contrast_weight = float(contrast_weight)
        self.contrast_temperature = float(contrast_temperature)
        views = neighbours > 0 or self.augment > 0
        if rotation_negatives and not views:
            raise ClusterlightError("rotation_negatives needs view pairs: set neighbours > 0 or augment > 0")
        if rotation_negatives and self.input_shape[1] != self.input_shape[2]:
            raise ClusterlightError(f"rotation_negatives needs square images, got {self.input_shape[1]}x{self.input_shape[2]}")
        self.rotation_negatives = bool(rotation_negatives)
        if debias_views and not views:
            raise ClusterlightError("debias_views needs view pairs: set neighbours > 0 or augment > 0")
        if contrast_dims is not None:
            if isinstance(contrast_dims, bool) or not isinstance(contrast_dims, int) or not 1 <= contrast_dims <= latent_dim:
                raise ClusterlightError(f"contrast_dims must be a positive integer at most latent_dim ({latent_dim}), "
                                        f"got {contrast_dims!r}")
            if not views:
                raise ClusterlightError("contrast_dims needs view pairs: set neighbours > 0 or augment > 0")
        self.contrast_dims = latent_dim if contrast_dims is None else contrast_dims
        self.projector = MLP(self.contrast_dims, [2 * latent_dim], projection_dim) if views else None
        # C's target embedding of every training sample (rows by dataset index), set when clustering starts
        self.register_buffer("manifold_target", torch.zeros(0, cluster_dim))
        self._register_load_state_dict_pre_hook(self._adapt_state_dict)
        self.register_buffer("clustering_started", torch.tensor(False))
        self.register_buffer("reject_threshold", torch.tensor(float("inf")))

    # ------------------------------------------------------------------ pieces
    @property
    def pretraining(self) -> bool:
        return self.current_epoch < self.pretrain_epochs and not bool(self.clustering_started)

    def _balanced_standardise(self, z_r: Tensor) -> Tensor:
        """``R``'s features standardised by the cluster-balanced SPB mean and variance."""
        if not bool(self.spb_r.initialised):
            return z_r
        mean, var, count = self.spb_r.stats()
        present = count > 1e-6
        mu = mean[present].mean(0)
        # balanced variance: mean within-cluster variance + variance of the cluster means
        v = var[present].mean(0) + ((mean[present] - mu) ** 2).mean(0)
        return (z_r.float() - mu) / v.sqrt()

    def _cluster_space(self, z_r: Tensor) -> Tensor:
        return self.clustering(self._balanced_standardise(z_r))

    def _mixture(self) -> tuple[Tensor, Tensor, Tensor]:
        mean, var, _ = self.spb_c.stats()
        if not self.use_variance:
            var = torch.ones_like(var)
        prior = self.spb_c.prior() if self.use_cardinality else torch.full_like(self.spb_c.count, 1.0 / self.num_clusters)
        return mean, var, prior

    def _sharpened_prior(self, prior: Tensor) -> Tensor | None:
        """The mixing weights to take out of ``q`` before sharpening (``target_sharpen: likelihood``)."""
        return prior if self.target_sharpen == "likelihood" else None

    def _posterior(self, z_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean, var, prior = self._mixture()
        log_q, maha = mixture_log_posterior(z_c, mean, var, prior.log())
        return log_q, maha, prior

    @float32_math
    def _feature_mahalanobis(self, z_r: Tensor) -> Tensor:
        """Smallest full-covariance Mahalanobis distance (per dimension) of ``R``'s features to a cluster."""
        z = z_r.float()
        mean = self.spb_ood.stats()[0]
        chol = torch.linalg.cholesky(self.spb_ood.covariance(self.ood_shrinkage))  # (K, D, D)
        diff = (z.unsqueeze(0) - mean.unsqueeze(1)).transpose(1, 2)  # (K, D, B)
        white = torch.linalg.solve_triangular(chol, diff, upper=False)
        maha = white.pow(2).sum(1)  # (K, B)
        present = self.spb_ood.count > 1e-6
        maha = torch.where(present.unsqueeze(1), maha, torch.full_like(maha, float("inf")))
        return maha.min(0).values / z.shape[1]

    @torch.no_grad()
    def _fit_ood_statistics(self, z_r: Tensor | None = None) -> None:
        """Per-cluster full covariances of ``R``'s features over the whole training split (``C``'s soft assignments)."""
        bank = None
        if z_r is None and self.ood_space == "conv" and self.ood_score_kind == "knn":  # both in one pass
            both = self.compute_on_split(lambda x: torch.cat(self._encode_for_bank(x), 1))
            d = self.representation.encoder.latent_dim
            z_r, bank = both[:, :d], both[:, d:]
        elif z_r is None:
            z_r = self.compute_on_split(lambda x: self.representation.encode(x))
        z_r = z_r.float()
        resp = torch.cat([self._posterior(self._cluster_space(z_r[i:i + 4096]))[0].exp()
                          for i in range(0, len(z_r), 4096)])
        self.spb_ood.reset_from(z_r, resp)
        if self.ood_score_kind == "knn":
            if bank is None:
                bank = z_r if self.ood_space == "features" else \
                    self.compute_on_split(lambda x: self._encode_for_bank(x)[1])
            self._fit_knn_bank(bank, resp.argmax(1))
        self._ood_fit_step = self._step_now()

    def _encode_for_bank(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``R``'s features of ``images`` and their rows in the space of the k-NN bank (``ood_space``).

        With ``features`` both are the same tensor; with ``conv`` the second is the last
        convolutional stage of ``R``'s encoder, flattened (what its linear layer maps to the features).
        """
        if self.ood_space == "features":
            z_r = self.representation.encode(images)
            return z_r, z_r
        encoder = self.representation.encoder
        conv = encoder.features(images).flatten(1)
        return encoder.fc(conv), conv

    def _step_now(self) -> int | None:
        return int(self.global_step) if self._trainer is not None else None

    def _fit_knn_bank(self, z_r: Tensor, cluster: Tensor) -> None:
        """The bank of training features and the clusters' scales for ``ood_score: knn``.

        For each ``k`` of ``ood_neighbours``, the scale of cluster ``c`` is the median, over the
        training samples assigned to ``c``, of the distance to their ``k``-th nearest training
        sample (themselves excluded); an empty cluster takes the median over all, and so does
        every cluster with ``ood_scaling: global``. With ``reject_quantile`` the reject threshold is
        set from the training samples' scores. Every rank computes the same values from the same
        whole-split tensors.
        """
        z_r = self._knn_space(z_r)
        ks = self._ks(len(z_r))
        m = self._local_m(len(z_r))
        n_scale = self._scale_m(len(z_r))
        # only the ranks used: the first max(m, n_scale) (their rows) and each k-th distance; a
        # fraction of a large split asks for thousands of neighbours, which need not be kept
        first = max(m, n_scale)
        ranks = sorted(set(range(first)) | {k - 1 for k in ks})
        idx, dist = knn_graph(z_r, max(ks[-1], first), ranks=ranks)  # themselves excluded
        dist = dist.clamp_min(0.0).sqrt()  # (N, len(ranks)), increasing
        kth = dist[:, [ranks.index(k - 1) for k in ks]]  # (N, len(ood_neighbours))
        overall = _median(kth).clamp_min(1e-12)
        if self.ood_scaling == "global":  # one scale per k: the score ranks as the plain mean log distance
            scale = overall[:, None].expand(-1, self.num_clusters)
        else:
            scale = torch.stack([_median(kth[cluster == c]) if int((cluster == c).sum()) > 0 else overall
                                 for c in range(self.num_clusters)], 1)  # (len(ood_neighbours), K)
        self.ood_bank = z_r.detach().float().clone()
        self.ood_bank_cluster = cluster.detach().long().clone()
        # a cluster of (near-)duplicates has a median distance of about 0: floor it relative to the data
        self.ood_scale = torch.maximum(scale, 1e-3 * overall[:, None]).float()
        own = self._scaled_log_distances(kth, cluster, idx[:, :n_scale])
        self.ood_bank_scores = own.float().clone()
        self.ood_train_scores = self._local_correction(own, idx[:, :m])
        if self.reject_quantile is not None:
            # the threshold belongs to this bank's scores, also when a checkpoint made with other OOD
            # settings had its bank dropped on loading (test and predict refit the bank, not the threshold)
            self.reject_threshold.fill_(float(torch.quantile(self.ood_train_scores.float(), self.reject_quantile)))

    def _knn_space(self, z_r: Tensor) -> Tensor:
        """``R``'s features as the k-NN score compares them: float32, unit length with ``ood_metric: cosine``.

        A feature of norm 0 stays 0 (distance 1 to every unit vector); with cosine, a query pointing
        the same way as a training feature counts as that training sample for the self-match skip.
        """
        z = z_r.float()
        return F.normalize(z, dim=1) if self.ood_metric == "cosine" else z

    def _local_setting(self) -> Tensor:
        on = self.ood_local_weight > 0
        return torch.tensor([self.ood_local_weight, float(self.ood_local_neighbours) if on else 0.0])

    def _local_m(self, n_train: int) -> int:
        """``ood_local_neighbours`` capped at ``n_train - 1`` (1 when the correction is off)."""
        return max(1, min(self.ood_local_neighbours, n_train - 1)) if self.ood_local_weight > 0 else 1

    def _local_correction(self, score: Tensor, neighbours: Tensor) -> Tensor:
        """``score`` minus ``ood_local_weight`` times the mean bank score of each row's ``neighbours``."""
        if self.ood_local_weight == 0:
            return score
        return score - self.ood_local_weight * self.ood_bank_scores[neighbours].mean(1)

    def _scale_m(self, n_train: int) -> int:
        """``ood_scale_neighbours`` capped at ``n_train - 1`` with ``ood_scaling: neighbours`` (0 otherwise)."""
        return max(1, min(self.ood_scale_neighbours, n_train - 1)) if self.ood_scaling == "neighbours" else 0

    def _ks(self, n_train: int) -> list[int]:
        """``ood_neighbours`` as counts for a bank of ``n_train`` samples, in increasing order.

        A fraction ``f`` is ``round(f * n_train)`` neighbours (at least 1); every count is capped at
        ``n_train - 1`` (the most neighbours a training sample has). Counts that coincide are kept
        (the list keeps its length, that of ``ood_scale``'s first axis) and weigh in the mean as often.
        """
        ks = [round(k * n_train) if isinstance(k, float) else k for k in self.ood_neighbours]
        return sorted(max(1, min(k, n_train - 1)) for k in ks)

    def _scaled_log_distances(self, kth: Tensor, cluster: Tensor, neighbours: Tensor) -> Tensor:
        """Mean over the ``k`` of ``log(d_k / scale_k)``, each ratio floored at 1e-3.

        ``scale_k`` is that of the sample's ``cluster``; with ``ood_scaling: neighbours``, the
        geometric mean of the scales of the clusters of its ``neighbours`` (bank rows, ``(N, m)``).
        """
        if self.ood_scaling == "neighbours":
            log_scale = self.ood_scale.log()[:, self.ood_bank_cluster[neighbours]].mean(2).T  # (N, len(ks))
            return (kth / log_scale.exp()).clamp_min(1e-3).log().mean(1)
        return (kth / self.ood_scale[:, cluster].T).clamp_min(1e-3).log().mean(1)

    def _vote_k(self, n_train: int) -> int:
        """``assign_neighbours`` capped at ``n_train - 1`` (0 when off)."""
        return max(1, min(self.assign_neighbours, n_train - 1)) if self.assign_neighbours > 0 else 0

    @float32_math
    def _bank_search(self, z_r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's nearest bank rows, as many as the k-NN score and the vote need (``z_r`` non-empty).

        Returns the sorted distances ``(B, n)``, the bank rows ``(B, n)`` and a mask ``(B,)`` of the
        queries that are themselves a training sample (distance ~0 to a bank row: ``eval_on: all``,
        predicting the training split), whose match with itself the callers skip, as the training
        scores do.
        """
        bank = self.ood_bank
        z = self._knn_space(z_r)
        n = bank.shape[0]
        need = max(self._ks(n)[-1], self._local_m(n), self._scale_m(n), self._vote_k(n))
        top = min(need + 1, n)
        # centred on the bank's mean: cdist's matmul expansion loses precision far from the origin
        centre = bank.mean(0)
        bank, z = bank - centre, z - centre
        parts, order = [], []
        for i in range(0, len(z), 512):
            q = z[i:i + 512]
            idx = torch.cdist(q, bank).topk(top, dim=1, largest=False).indices
            # the candidates' distances again, exactly (cdist's matmul expansion leaves ~1e-3 on a self-match)
            d, j = (q[:, None, :] - bank[idx]).pow(2).sum(2).sqrt().sort(dim=1)
            parts.append(d)
            order.append(idx.gather(1, j))
        dist, nbr = torch.cat(parts), torch.cat(order)
        own = dist[:, 0] <= 1e-4 * self.ood_scale[0].min()
        return dist, nbr, own

    @staticmethod
    def _skip_own(rows: Tensor, own: Tensor, count: int) -> Tensor:
        """The first ``count`` columns of ``rows``, shifted by one where ``own`` (a self-match skipped)."""
        if rows.shape[1] > count:
            return torch.where(own[:, None], rows[:, 1:count + 1], rows[:, :count])
        return rows[:, :count]

    @float32_math
    def _knn_scores(self, z_r: Tensor, cluster: Tensor,
                    search: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """The multi-scale, cluster-normalised k-NN distance of ``R``'s features (``ood_score: knn``).

        For each ``k`` of ``ood_neighbours``: the distance to the ``k``-th nearest training
        feature over the median of that distance in the sample's cluster; the score is the mean
        of the logs. A sample of a sparse tail cluster is not an outlier for being far from the
        head classes, and the scales from 1 to 128 neighbours catch both an outlier next to a
        few training samples and one in a sparse region. With ``ood_local_weight``, minus that
        weight times the mean bank score of the sample's ``ood_local_neighbours`` nearest
        training samples (a training sample's match with itself skipped here too). ``search``:
        :meth:`_bank_search`'s result for ``z_r``, when the caller has it.
        """
        if len(z_r) == 0:
            return z_r.new_zeros(0).float()
        dist, nbr, own = self._bank_search(z_r) if search is None else search
        n = self.ood_bank.shape[0]
        ks = self._ks(n)
        cols = torch.tensor([k - 1 for k in ks], device=dist.device)
        kth = self._skip_own(dist, own, ks[-1])[:, cols]
        return self._local_correction(
            self._scaled_log_distances(kth, cluster, self._skip_own(nbr, own, self._scale_m(n))),
            self._skip_own(nbr, own, self._local_m(n)))

    def _vote(self, search: tuple[Tensor, Tensor, Tensor], q: Tensor) -> tuple[Tensor, Tensor]:
        """``assign_neighbours``: the cluster most of a sample's nearest training samples have.

        Each of the ``assign_neighbours`` nearest bank rows (a self-match skipped) votes for its
        cluster (``C``'s assignment of that training sample); a tie goes to the cluster ``C``'s
        posterior ``q`` (``(B, K)``) ranks higher. Returns the clusters and the winners' vote shares.
        """
        _, nbr, own = search
        k = self._vote_k(self.ood_bank.shape[0])
        votes = F.one_hot(self.ood_bank_cluster[self._skip_own(nbr, own, k)], self.num_clusters).sum(1).float()
        cluster = (votes + 0.5 * q.float()).argmax(1)  # q sums to 1: it only breaks ties
        return cluster, votes.gather(1, cluster[:, None]).squeeze(1) / k

    def _ood_scores(self, z_r: Tensor, z_c: Tensor, log_q: Tensor, maha: Tensor,
                    search: tuple[Tensor, Tensor, Tensor] | None = None, z_bank: Tensor | None = None) -> Tensor:
        """The OOD score (``ood_score``); ``z_bank``: the rows in the k-NN bank's space (default ``z_r``)."""
        if self.ood_score_kind == "knn" and self.ood_bank.shape[0] > 0:
            return self._knn_scores(z_r if z_bank is None else z_bank, log_q.argmax(1), search)
        # full_mahalanobis before its statistics exist (monitoring during pretraining): the diagonal score
        if self.ood_score_kind == "full_mahalanobis" and bool(self.spb_ood.initialised):
            return self._feature_mahalanobis(z_r)
        if self.ood_score_kind == "nll":
            _, var, prior = self._mixture()
            log_lik = -0.5 * (maha + torch.log(var).sum(1) + z_c.shape[1] * math.log(2 * math.pi))
            return -torch.logsumexp(log_lik + prior.log(), dim=1)
        return maha.min(dim=1).values / z_c.shape[1]

    def _touch(self, *modules: torch.nn.Module) -> Tensor:
        """Zero that depends on every parameter of ``modules`` (DDP then needs no unused-parameter search)."""
        return sum(p.sum() for m in modules for p in m.parameters() if p.requires_grad) * 0.0

    def _r_modules(self) -> list[torch.nn.Module]:
        """``R``: the autoencoder and, with view pairs (neighbours or augment), its projection head."""
        return [self.representation] + ([self.projector] if self.projector is not None else [])

    def _represent(self, images: Tensor, index: Tensor, batch_idx: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """``R`` on a training batch: features, reconstruction and the projections of the view pairs.

        The second view of each image is one of its pixel-space neighbours (``neighbours``) or the
        image itself, under a random affine map when ``augment`` > 0; image and view are encoded
        together, and the projections of the pairs are gathered over the global batch for
        :meth:`_contrast` (every rank's pairs are the negatives, as on one process). Without views: ``None``.
        """
        if self.projector is None:
            z_r, recon = self.representation(images)
            return z_r, recon, None
        view = self._neighbour_images(index, batch_idx) if self.neighbours > 0 else images
        if self.augment > 0:
            # drawn for every training index with the batch's generator, kept for this batch's rows:
            # a sample gets the same view whatever the number of processes
            n = len(self._datamodule().train_dataset)
            u = torch.rand((n, 4), generator=self.batch_generator(batch_idx, "augment"), device=self.device)
            view = random_affine(view, u[index.to(self.device)], self.augment_strength, self.augment_parts,
                                 self.augment_interpolation)
        first = images
        if self.rotation_negatives:  # shifted instances: rotated pairs, negatives of the upright ones
            first = torch.cat([images] + [torch.rot90(images, r, (2, 3)) for r in (1, 2, 3)])
            view = torch.cat([view] + [torch.rot90(view, r, (2, 3)) for r in (1, 2, 3)])
        both = self.representation.encode(torch.cat([first, view]))
        z_a, z_n = both[: len(first)], both[len(first):]
        z_r = z_a[: len(images)]
        recon = self.representation.decode(z_r)
        m = self.contrast_dims  # the features the view pairs shape; the others follow the reconstruction only
        a, _ = self.gather_batch(self.projector(z_a[:, :m]))
        b, _ = self.gather_batch(self.projector(z_n[:, :m]))
        return z_r, recon, (a, b)

    def _contrast(self, pairs: tuple[Tensor, Tensor] | None, weight: Tensor | None = None) -> Tensor:
        """NT-Xent of the gathered view pairs of :meth:`_represent` (0 without views).

        ``weight``: this rank's per-sample weights (``debias_views``), gathered like the pairs and
        repeated for the rotated copies of ``rotation_negatives``; ``None``: unweighted.
        """
        if pairs is None:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        a, b = pairs
        if weight is not None:
            weight, _ = self.gather_batch(weight.float())
            weight = weight.repeat(len(a) // len(weight))
            return self.gathered_loss(nt_xent(a, b, self.contrast_temperature, weight))
        return self.gathered_loss(nt_xent(a, b, self.contrast_temperature))

    # ------------------------------------------------------------------ hooks
    def configure_optimizers(self) -> Any:
        opt_r = self.optimizer_factory([p for m in self._r_modules() for p in m.parameters()])
        opt_c = self.optimizer_c_factory(self.clustering.parameters())
        if self.lr_scheduler_factory is None:
            return [opt_r, opt_c]
        return [opt_r, opt_c], [self.lr_scheduler_factory(opt_r), self.lr_scheduler_factory(opt_c)]

    def _step(self, opt: Any, loss: Tensor) -> None:
        # manual_backward and the LightningOptimizer's step() go through the precision plugin:
        # under 16-mixed the loss is scaled and the step unscales, skips non-finite steps and
        # updates the GradScaler.
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Called inside opt.step(), after a GradScaler (16-mixed) has unscaled the gradients:
        # clipping here sees the true gradient norm under every precision.
        if self.grad_clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def fit_step(self, images: Tensor, index: Tensor, batch_idx: int) -> dict[str, Tensor]:
        opt_r, opt_c = self.optimizers()
        if self.pretraining:
            z_r, recon, pairs = self._represent(images, index, batch_idx)
            contrast = self._contrast(pairs)
            recon_loss = F.mse_loss(recon.float(), images.float())
            self._step(opt_r, recon_loss + self.contrast_weight * contrast + self._touch(self.clustering))
            return {"loss": (recon_loss + self.contrast_weight * contrast).detach(), "recon": recon_loss.detach(),
                    "contrast": contrast.detach()}

        # R step: reconstruction weighted by the cardinality of each sample's current cluster,
        # plus the contrast of the view pairs (with ``neighbours`` or ``augment``; weighted
        # likewise with ``debias_views``).
        if self.cotrain:
            z_r, recon, pairs = self._represent(images, index, batch_idx)
        else:
            (z_r, recon), pairs = self.representation(images), None
        per_sample = (recon.float() - images.float()).pow(2).flatten(1).mean(1)
        with torch.no_grad():
            log_q_now, _, prior = self._posterior(self._cluster_space(z_r.detach()))
            if self.use_cardinality and self.debias_strength > 0:
                w = (self.num_clusters * prior[log_q_now.argmax(1)]).pow(-self.debias_strength)
                # normalised to mean 1 over the global batch (all ranks' batches under DDP)
                w = w * (self.global_batch_sum(w.new_tensor(float(w.numel()))) / self.global_batch_sum(w.sum()))
            else:
                w = torch.ones_like(per_sample)
        recon_loss = (w * per_sample).mean()
        contrast = self._contrast(pairs, w if self.debias_views else None)
        if self.cotrain:
            self._step(opt_r, recon_loss + self.contrast_weight * contrast + self._touch(self.clustering))

        # C step: self-training of the mixture posterior on detached features of R.
        z_c = self._cluster_space(z_r.detach())
        log_q, _, prior = self._posterior(z_c)
        q = log_q.exp()
        target = debiased_target(q.detach(), prior if self.use_cardinality else None, self.target_power,
                                 freq=self.global_batch_sum(q.detach().sum(0)),  # f of the global batch
                                 q_prior=self._sharpened_prior(prior))
        cluster_loss = (target * (target.clamp_min(1e-12).log() - log_q)).sum(1).mean()
        embed_loss = self._embedding_loss(z_c, index)
        self._step(opt_c, cluster_loss + self.distill_weight * embed_loss + self._touch(*self._r_modules()))

        # SPB updates (all-reduced under DDP): soft assignments, like an online EM M-step.
        self.spb_r.update(z_r.detach(), q.detach())
        self.spb_c.update(z_c.detach(), q.detach())
        return {"loss": (recon_loss + self.contrast_weight * contrast + cluster_loss).detach(),
                "recon": recon_loss.detach(), "contrast": contrast.detach(), "cluster_loss": cluster_loss.detach(), "embed_loss": embed_loss.detach(),
                "nonempty_clusters": (q.argmax(1).bincount(minlength=self.num_clusters) > 0).sum().float()}

    def on_train_epoch_start(self) -> None:
        if self.pretraining:
            return
        if not bool(self.clustering_started):
            self.init_clusters()
            self.clustering_started.fill_(True)
            rank_zero_info(f"DebiasedClustering: clustering starts at epoch {self.current_epoch}")
        elif self.recluster_due(self.current_epoch):
            self.init_clusters()
            rank_zero_info(f"DebiasedClustering: clustering space and mixture rebuilt from R at epoch {self.current_epoch}")

    def recluster_due(self, epoch: int) -> bool:
        """Whether the clustering space and the mixture are rebuilt at the start of ``epoch`` (``recluster_every``)."""
        since = epoch - self.pretrain_epochs
        return self.recluster_every > 0 and since > 0 and since % self.recluster_every == 0

    def on_train_epoch_end(self) -> None:
        if bool(self.clustering_started) and self.reject_quantile is not None:
            self._set_reject_threshold()
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for sch in schedulers if isinstance(schedulers, list) else [schedulers]:
            sch.step()

    @staticmethod
    def _drop_knn_bank(state_dict: dict[str, Tensor], prefix: str) -> None:
        for name in KNN_BANK_BUFFERS:
            state_dict.pop(prefix + name, None)

    def _adapt_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        # the target has one row per training sample: take the checkpoint's size before loading it
        if prefix + "ood_bank_scores" not in state_dict and prefix + "ood_train_scores" in state_dict:
            # checkpoints from before the local correction: their training scores are the uncorrected ones
            state_dict[prefix + "ood_bank_scores"] = state_dict[prefix + "ood_train_scores"].clone()
        for name in ("manifold_target", "ood_bank", "ood_train_scores", "ood_bank_scores", "ood_bank_cluster"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, getattr(self, name).new_zeros(saved.shape))
        # checkpoints from before the full-covariance OOD statistics: load them uninitialised (they
        # are recomputed from the training split before the next evaluation or prediction)
        ood_keys = [prefix + "spb_ood." + name for name, _ in self.spb_ood.named_buffers()]
        if not any(key in state_dict for key in ood_keys):
            for name, buf in self.spb_ood.named_buffers():
                state_dict[prefix + "spb_ood." + name] = torch.zeros_like(buf)
        # a checkpoint trained without view pairs (neighbours, augment) has no projection head: it only serves
        # training, so keep this model's initial one (a fit resumed from it trains it from there)
        if self.projector is not None and not any(key.startswith(prefix + "projector.") for key in state_dict):
            for name, value in self.projector.state_dict().items():
                state_dict[prefix + "projector." + name] = value.clone()
        if self.projector is None:  # and one trained with them, loaded without: the head is not needed
            for key in [key for key in state_dict if key.startswith(prefix + "projector.")]:
                del state_dict[key]
        # a bank, scales and training scores made with other OOD settings than the model's: recomputed.
        # A setting missing from the checkpoint (made before its option) reads as zero: cluster
        # scaling, euclidean, no local correction, no neighbours' scales; ood_neighbours, unsaved before
        # fractions, reads as the model's own (the shape check below compares their number, as then)
        for name in ("ood_scaling_global", "ood_metric_cosine", "ood_space_conv", "ood_local_setting",
                     "ood_scale_setting", "ood_neighbours_setting"):
            mine = getattr(self, name)
            saved = state_dict.get(prefix + name, mine if name == "ood_neighbours_setting" else torch.zeros_like(mine))
            if not torch.equal(saved.cpu().float(), mine.cpu().float()):  # False for other shapes too
                self._drop_knn_bank(state_dict, prefix)
            state_dict[prefix + name] = mine.clone()
        # other ood_neighbours than the checkpoint's: the bank and scales are recomputed
        saved_scale = state_dict.get(prefix + "ood_scale")
        if saved_scale is not None and saved_scale.shape != self.ood_scale.shape:
            self._drop_knn_bank(state_dict, prefix)
        # checkpoints from before ood_score knn: an empty bank (refilled before the next evaluation)
        for name, empty in (("ood_bank", self.ood_bank.new_zeros((0, self.ood_bank.shape[1]))),
                            ("ood_scale", torch.ones_like(self.ood_scale)), ("ood_train_scores", self.ood_train_scores.new_zeros(0)),
                            ("ood_bank_scores", self.ood_bank_scores.new_zeros(0)),
                            ("ood_bank_cluster", self.ood_bank_cluster.new_zeros(0))):
            if prefix + name not in state_dict:
                setattr(self, name, empty)
                state_dict[prefix + name] = empty.clone()

    def _embedding_loss(self, z_c: Tensor, index: Tensor) -> Tensor:
        """Mean squared distance of ``C``'s embeddings to their UMAP targets (0 without ``manifold``)."""
        if self.manifold_target.shape[0] == 0:
            return z_c.new_zeros(())
        return (z_c.float() - self.manifold_target[index]).pow(2).sum(1).mean()

    def init_clusters(self, monitor_only: bool = False) -> None:
        """The mixture's start, from data statistics of the whole training split.

        ``manifold: umap``: UMAP of ``R``'s features (rank 0, broadcast) gives the target
        embedding; the initial partition of it (``init_partition``: a full-covariance mixture, or
        k-means refined by a diagonal-Gaussian EM; rank 0, broadcast) gives the initial
        responsibilities; ``C`` is fitted to embed ``R``'s features as the target. ``none``: the
        same partition of ``R``'s features (standardised for the mixture). Both SPBs are set from
        these responsibilities. ``monitor_only`` (validations during pretraining): k-means on
        ``R``'s features, no UMAP.
        """
        z_r = self.compute_on_split(lambda x: self.representation.encode(x))
        space = z_r
        manifold = self.manifold == "umap" and not monitor_only
        warm_layout = warm_resp = None
        # a rebuild (recluster_every) started from the current clustering: only rank 0 lays out and partitions
        if manifold and self.recluster_warm and bool(self.clustering_started) and self.trainer.is_global_zero:
            with torch.no_grad():
                z_c = torch.cat([self._cluster_space(chunk) for chunk in z_r.split(4096)]).float()
                warm_resp = self._posterior(z_c)[0].exp()
            warm_layout = _standardise(z_c).cpu().numpy()
        if manifold:
            target = None
            if self.trainer.is_global_zero:
                x = _standardise(z_r)
                try:
                    # umap_runs embeddings from consecutive seeds: the first is C's target, all of them
                    # are partitioned below and the partitions combined (rank 0 only)
                    embeddings = []
                    features = x.cpu().numpy()
                    for run in range(self.umap_runs):
                        with preserve_torch_threads():
                            u = reduce_umap(features, self.umap_neighbors, seed=self.kmeans_seed + run,
                                            set_op_mix_ratio=self.umap_set_op_mix_ratio,
                                            n_components=self.manifold_target.shape[1], init=warm_layout)
                        embeddings.append(_standardise(torch.from_numpy(u).float().to(self.device)))
                    target = embeddings[0]
                except ValueError as err:  # broadcast a NaN target so that every rank raises below
                    rank_zero_info(f"DebiasedClustering: {err}")
                    target = torch.full((x.shape[0], self.manifold_target.shape[1]), float("nan"), device=self.device)
            self.manifold_target = self.broadcast_tensor(target).float()
            if not torch.isfinite(self.manifold_target).all():
                raise ClusterlightError(f"UMAP gave no usable embedding of the training split (the reason is logged by rank 0; "
                                        f"umap_set_op_mix_ratio {self.umap_set_op_mix_ratio:g}: below 1, raise it or umap_neighbors)")
            space = self.manifold_target
        if space.shape[0] < self.num_clusters:  # every rank holds the whole split: all raise together
            raise ValueError(f"the training split has {space.shape[0]} samples, fewer than num_clusters "
                             f"({self.num_clusters})")
        resp = None
        if self.trainer.is_global_zero:
            if manifold and self.umap_runs > 1:
                start = time.perf_counter()
                parts = torch.stack([self._partition(e, manifold, monitor_only, warm_resp) for e in embeddings])
                combined, agreement = consensus_responsibilities(parts)
                resp = torch.from_numpy(combined).float().to(space.device)
                rank_zero_info(f"DebiasedClustering: {self.umap_runs} UMAP embeddings partitioned and combined by vote "
                               f"(a point's partitions agree with the vote on {float(agreement.mean()):.0%} of them "
                               f"on average; {time.perf_counter() - start:.1f} s)")
            else:
                resp = self._partition(space, manifold, monitor_only, warm_resp)
            if self.refine_cut > 0 and not monitor_only:
                resp = self._refine_by_cut(z_r, space if manifold else _standardise(space), resp)
        resp = self.broadcast_tensor(resp)
        self.spb_r.reset_from(z_r, resp)
        if manifold:
            self._distill(z_r, self.manifold_target)
        z_c = self.compute_on_split(lambda x: self._cluster_space(self.representation.encode(x)))
        self.spb_c.reset_from(z_c, resp)
        if not monitor_only:
            self._fit_ood_statistics(z_r)  # R is unchanged since z_r was computed

    def _partition(self, space: Tensor, manifold: bool, monitor_only: bool, warm_resp: Tensor | None = None) -> Tensor:
        """Responsibilities ``(N, K)`` of the initial partition of ``space`` (``init_partition``).

        ``warm_resp``: the current clustering's responsibilities, one more start of the mixture
        (``recluster_warm``).
        """
        if self.init_partition == "gmm" and not monitor_only:
            if not manifold:  # R's features, unscaled: the mixture's reg_covar assumes unit scale
                space = _standardise(space)
            return self._full_gmm_partition(space, warm_resp)
        labels = kmeans(space, self.num_clusters, n_init=self.kmeans_n_init, seed=self.kmeans_seed).labels
        resp = one_hot(labels, self.num_clusters).to(space.device)
        if self.gmm_iters > 0 and not monitor_only:
            resp = diag_gmm_em(space, resp, iters=self.gmm_iters)[0]
        return resp

    def _refine_by_cut(self, z_r: Tensor, space: Tensor, resp: Tensor) -> Tensor:
        """``resp`` after :func:`refine_by_cut` on the ``refine_cut``-NN graph of ``R``'s features (rank 0)."""
        start = time.perf_counter()
        neighbours, _ = knn_graph(_standardise(z_r.float()), min(self.refine_cut, z_r.shape[0] - 1))
        resp, moves = refine_by_cut(resp, neighbours, space.float(), seed=self.kmeans_seed)
        made = ", ".join(f"{a}+{b} merged, {c} split ({before:.3f} -> {after:.3f})" for a, b, c, before, after in moves)
        rank_zero_info(f"DebiasedClustering: normalised-cut refinement of the initial partition, {len(moves)} move(s)"
                       f"{': ' + made if moves else ''} ({time.perf_counter() - start:.1f} s)")
        return resp

    def _full_gmm_partition(self, space: Tensor, warm_resp: Tensor | None = None) -> Tensor:
        """Responsibilities ``(N, K)`` of the full-covariance mixture on ``space`` (:func:`full_gmm`).

        With ``overcluster`` ``m > 1`` the mixture has ``m * K`` components, merged into ``K``
        clusters by :func:`merge_by_entropy`.
        """
        start = time.perf_counter()
        components = self.overcluster * self.num_clusters
        warm = warm_resp is not None  # recluster_warm: overcluster is 1, one component per cluster
        resp, won = full_gmm(space, components, self.kmeans_n_init, self.kmeans_seed, max_iter=self.gmm_iters,
                             init_resp=warm_resp, return_start=True)
        merged = f", the current clustering among them, won by {won}" if warm else ""
        if components > self.num_clusters:
            if self.overcluster_merge == "graph":
                neighbours, _ = knn_graph(space.float(), min(self.umap_neighbors, space.shape[0] - 1))
                resp, groups = merge_by_graph(resp, self.num_clusters, neighbours)
            else:
                resp, groups = merge_by_entropy(resp, self.num_clusters)
            merged += f", {components} components merged by {self.overcluster_merge} into {[len(g) for g in groups]}"
        rank_zero_info(f"DebiasedClustering: initial partition, a full-covariance mixture on {space.shape[0]} x "
                       f"{space.shape[1]} ({2 * self.kmeans_n_init + int(warm)} starts{merged}, {time.perf_counter() - start:.1f} s)")
        return resp

    @torch.enable_grad()
    def _distill(self, z_r: Tensor, target: Tensor) -> None:
        """Fit ``C`` to map ``R``'s features (standardised as in training) onto ``target``.

        A copy of ``C`` is trained (Adam, the data in a seeded order, the same on every rank: the
        inputs are whole-split tensors every rank holds), then its weights are loaded into ``C``;
        the registered optimizers and DDP's gradient hooks are not involved.
        """
        student = copy.deepcopy(self.clustering).float()  # new parameters: no DDP hooks, no optimizer state
        opt = torch.optim.Adam(student.parameters(), lr=1e-3)
        x = self._balanced_standardise(z_r).detach().float()
        gen = torch.Generator().manual_seed(self.kmeans_seed)
        batch = 256
        with torch.autocast(device_type=self.device.type, enabled=False):
            for _ in range(self.distill_epochs):
                order = torch.randperm(len(x), generator=gen).to(x.device)
                for start in range(0, len(x), batch):
                    rows = order[start:start + batch]
                    loss = (student(x[rows]) - target[rows]).pow(2).sum(1).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        self.clustering.load_state_dict(student.state_dict())

    def _set_reject_threshold(self) -> None:
        if self.ood_score_kind == "knn":
            # _fit_knn_bank sets the threshold from its training scores (each sample's own match
            # excluded); the bank of the current weights is enough (validation refits it at the same
            # step: reuse that)
            if self.ood_bank.shape[0] == 0 or self._ood_fit_step != self._step_now():
                self._fit_ood_statistics()
            return
        scores = self.compute_on_split(lambda x: self._outputs(x).ood_score)
        self.reject_threshold.fill_(float(torch.quantile(scores.float(), self.reject_quantile)))

    def refresh_clusters(self) -> None:
        # Before clustering starts, validation clusters come from k-means on R's features; after,
        # the OOD statistics follow R's and C's current weights.
        if not bool(self.clustering_started):
            self.init_clusters(monitor_only=True)
        elif self.ood_score_kind in ("full_mahalanobis", "knn"):
            self._fit_ood_statistics()

    def clusters_ready(self) -> bool:
        ood_ready = self.ood_score_kind not in ("full_mahalanobis", "knn") or not bool(self.clustering_started) \
            or bool(self.spb_ood.initialised)
        if self.ood_score_kind == "knn" and bool(self.clustering_started):
            ood_ready = ood_ready and self.ood_bank.shape[0] > 0
        return bool(self.spb_c.initialised) and ood_ready

    def embed(self, images: Tensor) -> Tensor:
        return self._cluster_space(self.representation.encode(images))

    def _outputs(self, images: Tensor) -> ClusterOutput:
        z_r, z_bank = self._encode_for_bank(images)
        z_c = self._cluster_space(z_r)
        log_q, maha = self._posterior(z_c)[:2]
        q = log_q.exp()
        conf, cluster = q.max(1)
        search = None
        if self.ood_score_kind == "knn" and self.ood_bank.shape[0] > 0 and len(z_r) > 0:
            search = self._bank_search(z_bank)
            if self.assign_neighbours > 0:
                cluster, conf = self._vote(search, q)
        return ClusterOutput(cluster=cluster, confidence=conf,
                             ood_score=self._ood_scores(z_r, z_c, log_q, maha, search, z_bank), embedding=z_c)

    def cluster_outputs(self, images: Tensor) -> ClusterOutput:
        out = self._outputs(images)
        if self.reject_quantile is not None and torch.isfinite(self.reject_threshold):
            out.cluster = torch.where(out.ood_score > self.reject_threshold, torch.full_like(out.cluster, -1),
                                      out.cluster)
        return out

    def eval_loss(self, images: Tensor, index: Tensor) -> Tensor:
        if not bool(self.clustering_started):
            return torch.tensor(float("inf"), device=images.device)
        log_q, _, prior = self._posterior(self.embed(images))
        target = debiased_target(log_q.exp(), prior if self.use_cardinality else None, self.target_power,
                                 q_prior=self._sharpened_prior(prior))
        return (target * (target.clamp_min(1e-12).log() - log_q)).sum(1).mean()
