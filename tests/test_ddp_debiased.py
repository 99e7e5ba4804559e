"""DDP equals one device: DebiasedClustering (issue "DDP equals one device"; one DDP test per file)."""

from __future__ import annotations

import pytest

from clusterlight.methods import DebiasedClustering
from tests.ddp_equivalence import (
    assert_ranks_identical,
    assert_same_as_one_process,
    fit_one_and_two,
)

pytestmark = pytest.mark.ddp


def test_two_gloo_processes_give_the_one_process_clusters(tmp_path) -> None:
    """Same seed, same global batch of 64: the statistics pooling blocks (all-reduced), the
    cardinality weights and the target's cluster frequencies (both over the global batch) and the
    two optimizers' steps are the one-process ones, and so is the cluster of every test image.

    With ``manifold: none``: the UMAP embedding that ``manifold: umap`` computes on rank 0 (and
    broadcasts) is deterministic but not continuous in its input, like SPC's labelling (see
    ``tests/test_ddp_spc.py``): features that differ by float rounding between a one-process and a
    two-process run give another layout. And ``init_partition: kmeans`` with ``gmm_iters: 0``: a
    hundred EM iterations carry the rounding differences into the mixture's parameters, which
    moved 2 of 359 boundary test images (k-means' hard partition absorbs them); the default
    full-covariance mixture is EM too. Everything else of the method is the same code either way;
    ``tests/test_ddp_resume.py`` runs the defaults (``manifold: umap``, ``init_partition: gmm``)
    on two processes (both ranks identical)."""
    kwargs = {"widths": [16, 32], "kmeans_n_init": 2, "pretrain_epochs": 1, "latent_dim": 8, "cluster_dim": 4,
              "head_hidden": [16], "norm": "group", "manifold": "none",
              "init_partition": "kmeans", "gmm_iters": 0}
    one, two = fit_one_and_two(DebiasedClustering, kwargs, tmp_path, epochs=3)
    assert_ranks_identical(two)
    assert_same_as_one_process(one, two[0])
