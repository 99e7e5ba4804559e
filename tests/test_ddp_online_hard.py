"""DDP equals one device: OnlineHardClustering with global_assignment (one DDP test per file).

With ``global_assignment: false`` each rank assigns its own half batch (the reference's
behaviour on one GPU), which by design is not the one-process assignment of the whole batch.
"""

from __future__ import annotations

import pytest

from clusterlight.methods import OnlineHardClustering
from tests.ddp_equivalence import (
    assert_ranks_identical,
    assert_same_as_one_process,
    fit_one_and_two,
)

pytestmark = pytest.mark.ddp


def test_two_gloo_processes_give_the_one_process_clusters(tmp_path) -> None:
    """Same seed, same global batch of 64: the k-means centroid initialisation (rank 0, broadcast)
    and the hard assignment of the gathered global batch are the one-process ones, and so is the
    cluster of every test image."""
    kwargs = {"widths": [16, 32], "latent_dim": 16, "centroid_init": "kmeans", "kmeans_n_init": 1,
              "global_assignment": True, "norm": "group"}
    one, two = fit_one_and_two(OnlineHardClustering, kwargs, tmp_path, epochs=3)
    assert_ranks_identical(two)
    assert_same_as_one_process(one, two[0])
