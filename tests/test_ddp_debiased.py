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
    two optimizers' steps are the one-process ones, and so is the cluster of every test image."""
    kwargs = {"widths": [16, 32], "kmeans_n_init": 2, "pretrain_epochs": 1, "latent_dim": 8, "cluster_dim": 4,
              "head_hidden": [16], "norm": "group"}
    one, two = fit_one_and_two(DebiasedClustering, kwargs, tmp_path, epochs=3)
    assert_ranks_identical(two)
    assert_same_as_one_process(one, two[0])
